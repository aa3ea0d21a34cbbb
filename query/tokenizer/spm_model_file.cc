#include "query/tokenizer/spm_model_file.h"

#include <cstring>
#include <fstream>
#include <sstream>

namespace shotdb {

namespace {

// Protobuf wire types (https://protobuf.dev/programming-guides/encoding/).
enum WireType : uint32_t { kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kFixed32 = 5 };

// One field of a message: its number, wire type and value (the varint or fixed32 value, or the
// bytes of a length-delimited field).
struct Field {
  uint32_t number = 0;
  uint32_t wire_type = 0;
  uint64_t integer = 0;
  std::string_view bytes;
};

// Iterates over the fields of one serialized message.
class FieldReader {
 public:
  FieldReader(std::string_view data, std::string context)
      : data_(data), context_(std::move(context)) {}

  // Reads the next field into `field`; false at the end of the message or on error (status()).
  bool Next(Field* field) {
    if (pos_ >= data_.size() || !status_.ok()) return false;
    uint64_t key;
    if (!ReadVarint(&key)) return false;
    field->number = static_cast<uint32_t>(key >> 3);
    field->wire_type = static_cast<uint32_t>(key & 7);
    switch (field->wire_type) {
      case kVarint:
        return ReadVarint(&field->integer);
      case kFixed64:
        return Skip(8, field);
      case kFixed32:
        if (!Skip(4, field)) return false;
        uint32_t v;
        std::memcpy(&v, field->bytes.data(), 4);  // little-endian on the wire, as on x86/arm64
        field->integer = v;
        return true;
      case kLengthDelimited: {
        uint64_t length;
        if (!ReadVarint(&length)) return false;
        return Skip(length, field);
      }
      default:
        status_ = Status::Corruption(context_ + ": field " + std::to_string(field->number) +
                                     " has unknown protobuf wire type " +
                                     std::to_string(field->wire_type));
        return false;
    }
  }

  const Status& status() const { return status_; }

 private:
  bool ReadVarint(uint64_t* value) {
    *value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ >= data_.size()) return Fail("truncated varint");
      const uint8_t byte = static_cast<uint8_t>(data_[pos_++]);
      *value |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if ((byte & 0x80) == 0) return true;
    }
    return Fail("varint longer than 10 bytes");
  }

  bool Skip(uint64_t length, Field* field) {
    if (length > data_.size() - pos_) return Fail("field runs past the end of the message");
    field->bytes = data_.substr(pos_, length);
    pos_ += length;
    return true;
  }

  bool Fail(const char* what) {
    status_ = Status::Corruption(context_ + ": " + what + " at byte " + std::to_string(pos_));
    return false;
  }

  std::string_view data_;
  std::string context_;
  size_t pos_ = 0;
  Status status_;
};

// Checks that `field` has the wire type its schema gives it.
Status ExpectWireType(const Field& field, uint32_t wire_type, const std::string& context) {
  if (field.wire_type == wire_type) return Status::OK();
  return Status::Corruption(context + ": field " + std::to_string(field.number) +
                            " has wire type " + std::to_string(field.wire_type) + ", expected " +
                            std::to_string(wire_type));
}

// sentencepiece.ModelProto.SentencePiece: piece = 1, score = 2, type = 3 (default NORMAL).
Status ParsePiece(std::string_view bytes, const std::string& context, SpmVocab* vocab) {
  std::string piece;
  float score = 0;
  SpmTokenType type = SpmTokenType::kNormal;
  FieldReader reader(bytes, context);
  Field f;
  while (reader.Next(&f)) {
    if (f.number == 1) {
      SHOTDB_RETURN_IF_ERROR(ExpectWireType(f, kLengthDelimited, context));
      piece = std::string(f.bytes);
    } else if (f.number == 2) {
      SHOTDB_RETURN_IF_ERROR(ExpectWireType(f, kFixed32, context));
      const uint32_t bits = static_cast<uint32_t>(f.integer);
      std::memcpy(&score, &bits, sizeof score);
    } else if (f.number == 3) {
      SHOTDB_RETURN_IF_ERROR(ExpectWireType(f, kVarint, context));
      if (f.integer < 1 || f.integer > 6) {
        return Status::Corruption(context + ": unknown piece type " + std::to_string(f.integer));
      }
      type = static_cast<SpmTokenType>(f.integer);
    }
  }
  SHOTDB_RETURN_IF_ERROR(reader.status());
  vocab->pieces.push_back(std::move(piece));
  vocab->scores.push_back(score);
  vocab->types.push_back(type);
  return Status::OK();
}

// The TrainerSpec options that change encoding. Defaults are the proto's.
struct TrainerOptions {
  uint64_t model_type = 1;  // UNIGRAM = 1, BPE = 2, WORD = 3, CHAR = 4
  int32_t unk_id = 0;
  int32_t bos_id = 1;
  int32_t eos_id = 2;
};

Status ParseTrainerSpec(std::string_view bytes, const std::string& context, TrainerOptions* out) {
  FieldReader reader(bytes, context);
  Field f;
  while (reader.Next(&f)) {
    // int32 fields are sign-extended to 64 bits on the wire, so -1 arrives as 2^64 - 1.
    const auto as_int32 = [&] { return static_cast<int32_t>(static_cast<int64_t>(f.integer)); };
    switch (f.number) {
      case 3:
        SHOTDB_RETURN_IF_ERROR(ExpectWireType(f, kVarint, context));
        out->model_type = f.integer;
        break;
      case 40:
        SHOTDB_RETURN_IF_ERROR(ExpectWireType(f, kVarint, context));
        out->unk_id = as_int32();
        break;
      case 41:
        SHOTDB_RETURN_IF_ERROR(ExpectWireType(f, kVarint, context));
        out->bos_id = as_int32();
        break;
      case 42:
        SHOTDB_RETURN_IF_ERROR(ExpectWireType(f, kVarint, context));
        out->eos_id = as_int32();
        break;
      default:
        break;  // options that only matter for training
    }
  }
  return reader.status();
}

// The NormalizerSpec options that change encoding. Defaults are the proto's.
struct NormalizerOptions {
  std::string name;
  bool has_charsmap = false;
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = true;
  bool escape_whitespaces = true;
};

Status ParseNormalizerSpec(std::string_view bytes, const std::string& context,
                           NormalizerOptions* out) {
  FieldReader reader(bytes, context);
  Field f;
  while (reader.Next(&f)) {
    if (f.number == 1 || f.number == 2) {
      SHOTDB_RETURN_IF_ERROR(ExpectWireType(f, kLengthDelimited, context));
      if (f.number == 1) out->name = std::string(f.bytes);
      if (f.number == 2) out->has_charsmap = !f.bytes.empty();
    } else if (f.number >= 3 && f.number <= 5) {
      SHOTDB_RETURN_IF_ERROR(ExpectWireType(f, kVarint, context));
      const bool value = f.integer != 0;
      if (f.number == 3) out->add_dummy_prefix = value;
      if (f.number == 4) out->remove_extra_whitespaces = value;
      if (f.number == 5) out->escape_whitespaces = value;
    }
  }
  return reader.status();
}

}  // namespace

Result<SpmVocab> ParseSentencePieceModel(std::string_view proto, const std::string& source) {
  SpmVocab vocab;
  TrainerOptions trainer;
  NormalizerOptions normalizer;
  FieldReader reader(proto, source + ": ModelProto");
  Field f;
  while (reader.Next(&f)) {
    if (f.number < 1 || f.number > 3) continue;  // self-test data, denormalizer
    const std::string context =
        source + ": ModelProto." +
        (f.number == 1   ? "pieces[" + std::to_string(vocab.pieces.size()) + "]"
         : f.number == 2 ? std::string("trainer_spec")
                         : std::string("normalizer_spec"));
    SHOTDB_RETURN_IF_ERROR(ExpectWireType(f, kLengthDelimited, context));
    if (f.number == 1) SHOTDB_RETURN_IF_ERROR(ParsePiece(f.bytes, context, &vocab));
    if (f.number == 2) SHOTDB_RETURN_IF_ERROR(ParseTrainerSpec(f.bytes, context, &trainer));
    if (f.number == 3) SHOTDB_RETURN_IF_ERROR(ParseNormalizerSpec(f.bytes, context, &normalizer));
  }
  SHOTDB_RETURN_IF_ERROR(reader.status());
  if (vocab.pieces.empty()) {
    return Status::Corruption(source + ": not a SentencePiece model (no pieces)");
  }
  if (trainer.model_type != 2) {
    static const char* const kNames[] = {"?", "unigram", "bpe", "word", "char"};
    const char* name = trainer.model_type < 5 ? kNames[trainer.model_type] : "?";
    return Status::NotSupported(source + ": SentencePiece model_type " + name +
                                " is not supported (only bpe, as in Llama 2 and Mistral)");
  }
  if (normalizer.has_charsmap || (normalizer.name != "identity" && !normalizer.name.empty())) {
    return Status::NotSupported(source + ": SentencePiece normalizer '" + normalizer.name +
                                "' is not supported (only identity)");
  }
  if (normalizer.remove_extra_whitespaces || !normalizer.escape_whitespaces) {
    return Status::NotSupported(
        source +
        ": SentencePiece normalizer options remove_extra_whitespaces=true or "
        "escape_whitespaces=false are not supported");
  }
  const auto id_or_none = [&](int32_t id) {
    return id >= 0 && id < static_cast<int64_t>(vocab.pieces.size()) ? id : -1;
  };
  vocab.unk_id = id_or_none(trainer.unk_id);
  vocab.bos_id = id_or_none(trainer.bos_id);
  vocab.eos_id = id_or_none(trainer.eos_id);
  vocab.add_bos = vocab.bos_id >= 0;
  vocab.add_space_prefix = normalizer.add_dummy_prefix;
  return vocab;
}

Result<SpmVocab> ReadSentencePieceModel(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IOError(path + ": cannot open for reading");
  std::ostringstream bytes;
  bytes << in.rdbuf();
  if (in.bad()) return Status::IOError(path + ": read failed");
  return ParseSentencePieceModel(bytes.str(), path);
}

}  // namespace shotdb
