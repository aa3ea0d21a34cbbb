#include "engine/task.h"

#include "engine/lmdb_util.h"

namespace shotdb {

std::string ModelFingerprint::ToString() const {
  return architecture + " " + std::string(DTypeName(dtype)) +
         " layers=" + std::to_string(num_layers) + " kv_heads=" + std::to_string(kv_heads) +
         " head_dim=" + std::to_string(head_dim) + " tokenizer=" + tokenizer_hash;
}

std::string_view PositionSchemeName(PositionScheme scheme) {
  return scheme == PositionScheme::kWindowed ? "windowed" : "sequential";
}

std::optional<PositionScheme> ParsePositionScheme(std::string_view name) {
  if (name == "sequential") return PositionScheme::kSequential;
  if (name == "windowed") return PositionScheme::kWindowed;
  return std::nullopt;
}

std::vector<uint32_t> ContextBlocks(const BlockConfig& config, uint32_t index) {
  std::vector<uint32_t> blocks;
  const uint32_t first_recent = index > config.window ? index - config.window : 0;
  for (uint32_t b = 0; b < index; ++b) {
    if (b < config.sink_blocks || b >= first_recent) blocks.push_back(b);
  }
  return blocks;
}

EncodingPositions PositionsForEncoding(PositionScheme scheme,
                                       const std::vector<const BlockInfo*>& context,
                                       const BlockInfo& block) {
  EncodingPositions p;
  if (scheme == PositionScheme::kSequential) {
    for (const BlockInfo* c : context) p.context.push_back(c->position_offset);
    p.block = block.position_offset;
  } else {
    for (const BlockInfo* c : context) {
      p.context.push_back(p.block);
      p.block += c->token_count;
    }
  }
  p.end = p.block + block.token_count;
  return p;
}

std::string EncodeTaskInfo(const TaskInfo& t) {
  lmdb::ByteWriter w;
  w.Str(t.name);
  w.Str(t.model.architecture);
  w.U8(static_cast<uint8_t>(t.model.dtype));
  w.Str(t.model.tokenizer_hash);
  w.U32(t.model.num_layers);
  w.U32(t.model.kv_heads);
  w.U32(t.model.head_dim);
  w.U32(t.blocks.demos_per_block);
  w.U32(t.blocks.window);
  w.U32(t.blocks.sink_blocks);
  w.U8(static_cast<uint8_t>(t.codec));
  w.Str(t.prompt_template);
  w.Str(t.separator);
  w.U32(static_cast<uint32_t>(t.labels.size()));
  for (const std::string& label : t.labels) w.Str(label);
  w.Str(t.analyzer.tokenizer.Serialize());
  w.F64(t.bm25.k1);
  w.F64(t.bm25.b);
  w.F64(t.bm25.epsilon);
  w.Str(t.metadata_json);
  w.U64(t.num_blocks);
  w.U64(t.num_demos);
  w.U64(t.num_tokens);
  w.U64(t.payload_raw_bytes);
  w.U64(t.payload_stored_bytes);
  w.U64(t.version);
  w.I64(t.created_unix);
  // Added in store format 2; a record without them (format 1) decodes with sequential positions,
  // the simple analyzer and Okapi idf.
  w.U8(static_cast<uint8_t>(t.blocks.positions));
  w.U8(static_cast<uint8_t>(t.analyzer.kind));
  w.U32(static_cast<uint32_t>(t.analyzer.stopwords.size()));
  for (const std::string& word : t.analyzer.stopwords) w.Str(word);
  w.U8(static_cast<uint8_t>(t.bm25.idf));
  return w.Take();
}

Result<TaskInfo> DecodeTaskInfo(std::string_view bytes, const std::string& what) {
  lmdb::ByteReader r(bytes, what);
  TaskInfo t;
  uint8_t dtype = 0, codec = 0;
  uint32_t num_labels = 0;
  std::string tokenizer;
  r.Str(&t.name);
  r.Str(&t.model.architecture);
  r.U8(&dtype);
  r.Str(&t.model.tokenizer_hash);
  r.U32(&t.model.num_layers);
  r.U32(&t.model.kv_heads);
  r.U32(&t.model.head_dim);
  r.U32(&t.blocks.demos_per_block);
  r.U32(&t.blocks.window);
  r.U32(&t.blocks.sink_blocks);
  r.U8(&codec);
  r.Str(&t.prompt_template);
  r.Str(&t.separator);
  if (r.U32(&num_labels) && num_labels > bytes.size()) r.Fail("label count is implausible");
  for (uint32_t i = 0; i < num_labels && !r.failed(); ++i) {
    t.labels.emplace_back();
    r.Str(&t.labels.back());
  }
  r.Str(&tokenizer);
  r.F64(&t.bm25.k1);
  r.F64(&t.bm25.b);
  r.F64(&t.bm25.epsilon);
  r.Str(&t.metadata_json);
  r.U64(&t.num_blocks);
  r.U64(&t.num_demos);
  r.U64(&t.num_tokens);
  r.U64(&t.payload_raw_bytes);
  r.U64(&t.payload_stored_bytes);
  r.U64(&t.version);
  r.I64(&t.created_unix);
  uint8_t positions = 0, analyzer = 0, idf = 0;
  if (!r.AtEnd()) {
    uint32_t num_stopwords = 0;
    r.U8(&positions);
    r.U8(&analyzer);
    if (r.U32(&num_stopwords) && num_stopwords > bytes.size()) {
      r.Fail("stop word count is implausible");
    }
    for (uint32_t i = 0; i < num_stopwords && !r.failed(); ++i) {
      t.analyzer.stopwords.emplace_back();
      r.Str(&t.analyzer.stopwords.back());
    }
    r.U8(&idf);
  }
  if (!r.failed()) {
    if (positions > static_cast<uint8_t>(PositionScheme::kWindowed)) {
      r.Fail("position scheme byte " + std::to_string(positions) + " is not known");
    }
    if (analyzer > static_cast<uint8_t>(AnalyzerOptions::Kind::kRetriv)) {
      r.Fail("analyzer byte " + std::to_string(analyzer) + " is not known");
    }
    if (idf > static_cast<uint8_t>(Bm25Idf::kLucene)) {
      r.Fail("idf byte " + std::to_string(idf) + " is not known");
    }
    if (!IsValidDType(dtype)) r.Fail("dtype byte " + std::to_string(dtype) + " is not a DType");
    if (!IsValidCodec(codec)) r.Fail("codec byte " + std::to_string(codec) + " is not a Codec");
    Result<TextTokenizerOptions> opts = TextTokenizerOptions::Parse(tokenizer);
    if (!opts.ok()) {
      r.Fail(opts.status().message());
    } else {
      t.analyzer.tokenizer = *opts;
    }
  }
  SHOTDB_RETURN_IF_ERROR(r.Finish());
  t.model.dtype = static_cast<DType>(dtype);
  t.codec = static_cast<Codec>(codec);
  t.blocks.positions = static_cast<PositionScheme>(positions);
  t.analyzer.kind = static_cast<AnalyzerOptions::Kind>(analyzer);
  t.bm25.idf = static_cast<Bm25Idf>(idf);
  return t;
}

std::string EncodeBlockInfo(const BlockInfo& b) {
  lmdb::ByteWriter w;
  w.U32(b.index);
  w.U64(b.position_offset);
  w.U32(b.token_count);
  w.U32(static_cast<uint32_t>(b.demo_ids.size()));
  for (uint64_t id : b.demo_ids) w.U64(id);
  w.Str(b.text);
  return w.Take();
}

Result<BlockInfo> DecodeBlockInfo(std::string_view bytes, const std::string& what) {
  lmdb::ByteReader r(bytes, what);
  BlockInfo b;
  uint32_t n = 0;
  r.U32(&b.index);
  r.U64(&b.position_offset);
  r.U32(&b.token_count);
  if (r.U32(&n) && n > bytes.size() / 8) r.Fail("demo id count " + std::to_string(n) + " too big");
  b.demo_ids.resize(r.failed() ? 0 : n);
  for (uint64_t& id : b.demo_ids) r.U64(&id);
  r.Str(&b.text);
  SHOTDB_RETURN_IF_ERROR(r.Finish());
  return b;
}

std::string EncodeDemonstration(const Demonstration& d) {
  lmdb::ByteWriter w;
  w.U64(d.id);
  w.Str(d.text);
  w.Str(d.label);
  return w.Take();
}

Result<Demonstration> DecodeDemonstration(std::string_view bytes, const std::string& what) {
  lmdb::ByteReader r(bytes, what);
  Demonstration d;
  r.U64(&d.id);
  r.Str(&d.text);
  r.Str(&d.label);
  SHOTDB_RETURN_IF_ERROR(r.Finish());
  return d;
}

}  // namespace shotdb
