#include "format/block_record.h"

#include <gtest/gtest.h>
#include <lz4.h>
#include <xxhash.h>

#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

namespace shotdb {
namespace {

const Codec kAllCodecs[] = {Codec::kRaw, Codec::kLz4, Codec::kShuffleLz4};
const DType kAllDTypes[] = {DType::kF32, DType::kF16, DType::kBF16, DType::kF64};

std::vector<uint8_t> Tensor(const BlockRecordMeta& m, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const size_t n = size_t{m.kv_heads} * m.tokens * m.head_dim;
  std::vector<float> f(n);
  for (size_t i = 0; i < n; ++i) f[i] = normal(rng) * static_cast<float>(1 + i % m.head_dim);
  std::vector<uint8_t> out(n * DTypeSize(m.dtype));
  ConvertFromFloat(m.dtype, f.data(), out.data(), n);
  return out;
}

std::vector<uint8_t> Encode(const BlockRecordMeta& m, Codec codec,
                            const std::vector<uint8_t>& raw) {
  Result<EncodedBlockRecord> rec = EncodeBlockRecord(m, codec, raw.data(), raw.size());
  EXPECT_TRUE(rec.ok()) << rec.status().ToString();
  if (!rec.ok()) return {};
  std::vector<uint8_t> bytes(rec->size());
  rec->WriteTo(bytes.data());
  return bytes;
}

// Little-endian field reads written independently of block_record.cc, following docs/format.md.
uint64_t Le(const std::vector<uint8_t>& b, size_t off, size_t n) {
  uint64_t v = 0;
  for (size_t i = 0; i < n; ++i) v |= uint64_t{b[off + i]} << (8 * i);
  return v;
}
void SetLe(std::vector<uint8_t>* b, size_t off, size_t n, uint64_t v) {
  for (size_t i = 0; i < n; ++i) (*b)[off + i] = static_cast<uint8_t>(v >> (8 * i));
}
// Recomputes the header checksum (xxh3-64 of bytes 0-55, stored at 56), as a newer writer would.
void Reseal(std::vector<uint8_t>* b) { SetLe(b, 56, 8, XXH3_64bits(b->data(), 56)); }

// Full read path: Parse, then Verify and Decode. Returns the first failure.
Status ReadBack(const std::vector<uint8_t>& bytes, std::vector<uint8_t>* out) {
  Result<BlockRecordView> view = ParseBlockRecord(bytes.data(), bytes.size(), "test record");
  if (!view.ok()) return view.status();
  SHOTDB_RETURN_IF_ERROR(VerifyBlockRecord(*view, "test record"));
  out->assign(view->header.raw_size, 0);
  return DecodeBlockRecord(*view, out->data(), out->size(), "test record");
}

TEST(BlockRecordTest, RoundTripEveryCodecAndDType) {
  for (Codec codec : kAllCodecs) {
    for (DType dtype : kAllDTypes) {
      for (uint32_t tokens : {0u, 1u, 7u, 50u, 333u}) {
        SCOPED_TRACE(std::string(CodecName(codec)) + " " + std::string(DTypeName(dtype)) +
                     " tokens " + std::to_string(tokens));
        const BlockRecordMeta m{
            dtype, tokens % 2 ? TensorKind::kValue : TensorKind::kKey, 29, 3, tokens, 64};
        const std::vector<uint8_t> raw = Tensor(m, tokens);
        Result<EncodedBlockRecord> rec = EncodeBlockRecord(m, codec, raw.data(), raw.size());
        ASSERT_TRUE(rec.ok()) << rec.status().ToString();
        std::vector<uint8_t> bytes(rec->size());
        rec->WriteTo(bytes.data());

        Result<BlockRecordView> view = ParseBlockRecord(bytes.data(), bytes.size(), "r");
        ASSERT_TRUE(view.ok()) << view.status().ToString();
        const BlockRecordHeader& h = view->header;
        EXPECT_EQ(h.meta.dtype, dtype);
        EXPECT_EQ(h.meta.kind, m.kind);
        EXPECT_EQ(h.meta.layer, 29u);
        EXPECT_EQ(h.meta.kv_heads, 3u);
        EXPECT_EQ(h.meta.tokens, tokens);
        EXPECT_EQ(h.meta.head_dim, 64u);
        EXPECT_EQ(h.codec, codec);
        EXPECT_EQ(h.format_version, kBlockRecordFormatVersion);
        EXPECT_EQ(h.raw_size, raw.size());
        EXPECT_EQ(h.stored_size, bytes.size() - kBlockRecordHeaderSize);
        EXPECT_EQ(h.checksum, XXH3_64bits(raw.data(), raw.size()));
        EXPECT_EQ(view->payload, bytes.data() + kBlockRecordHeaderSize);
        EXPECT_EQ(rec->header().checksum, h.checksum);
        EXPECT_EQ(rec->header().stored_size, h.stored_size);
        EXPECT_EQ(rec->header().payload_checksum, h.payload_checksum);

        std::vector<uint8_t> back;
        ASSERT_TRUE(ReadBack(bytes, &back).ok());
        EXPECT_EQ(back, raw);
      }
    }
  }
}

// Pins the byte layout of docs/format.md with reads that do not use block_record.cc.
TEST(BlockRecordTest, HeaderLayoutMatchesTheDocumentation) {
  const BlockRecordMeta m{DType::kBF16, TensorKind::kValue, 0x01020304, 3, 5, 64};
  const std::vector<uint8_t> raw = Tensor(m, 1);
  for (Codec codec : kAllCodecs) {
    const std::vector<uint8_t> b = Encode(m, codec, raw);
    ASSERT_GE(b.size(), 64u);
    EXPECT_EQ(std::string(b.begin(), b.begin() + 4), "SHKV");
    EXPECT_EQ(Le(b, 4, 2), 1u);                    // format version
    EXPECT_EQ(b[6], 2u);                           // dtype bf16
    EXPECT_EQ(b[7], static_cast<uint8_t>(codec));  // codec
    EXPECT_EQ(b[8], 1u);                           // kind V
    EXPECT_EQ(Le(b, 9, 3), 0u);                    // reserved
    EXPECT_EQ(Le(b, 12, 4), 0x01020304u);          // layer
    EXPECT_EQ(Le(b, 16, 4), 3u);                   // kv_heads
    EXPECT_EQ(Le(b, 20, 4), 5u);                   // tokens
    EXPECT_EQ(Le(b, 24, 4), 64u);                  // head_dim
    EXPECT_EQ(Le(b, 28, 4),
              XXH3_64bits(b.data() + 64, b.size() - 64) & 0xffffffffu);  // payload sum
    EXPECT_EQ(Le(b, 32, 8), raw.size());                                 // raw_size
    EXPECT_EQ(Le(b, 40, 8), b.size() - 64);                              // stored_size
    EXPECT_EQ(Le(b, 48, 8), XXH3_64bits(raw.data(), raw.size()));        // raw checksum
    EXPECT_EQ(Le(b, 56, 8), XXH3_64bits(b.data(), 56));                  // header checksum
    if (codec == Codec::kRaw) {
      EXPECT_EQ(std::vector<uint8_t>(b.begin() + 64, b.end()), raw);
    } else if (codec == Codec::kLz4) {
      std::vector<uint8_t> out(raw.size());
      EXPECT_EQ(LZ4_decompress_safe(reinterpret_cast<const char*>(b.data() + 64),
                                    reinterpret_cast<char*>(out.data()),
                                    static_cast<int>(b.size() - 64), static_cast<int>(out.size())),
                static_cast<int>(raw.size()));
      EXPECT_EQ(out, raw);
    }
  }
}

TEST(BlockRecordTest, RawCodecWritesTheCallersBytesAtWriteTime) {
  const BlockRecordMeta m{DType::kF32, TensorKind::kKey, 0, 1, 2, 4};
  std::vector<uint8_t> raw = Tensor(m, 2);
  Result<EncodedBlockRecord> rec = EncodeBlockRecord(m, Codec::kRaw, raw.data(), raw.size());
  ASSERT_TRUE(rec.ok());
  std::vector<uint8_t> bytes(rec->size());
  rec->WriteTo(bytes.data());
  EXPECT_EQ(std::vector<uint8_t>(bytes.begin() + 64, bytes.end()), raw);
  EncodedBlockRecord copy = *rec;
  std::vector<uint8_t> again(copy.size());
  copy.WriteTo(again.data());
  EXPECT_EQ(again, bytes);
}

TEST(BlockRecordTest, EncodeRejectsInconsistentArguments) {
  const BlockRecordMeta m{DType::kF16, TensorKind::kKey, 0, 2, 3, 4};
  const std::vector<uint8_t> raw(2 * 3 * 4 * 2);
  EXPECT_TRUE(
      EncodeBlockRecord(m, Codec::kRaw, raw.data(), raw.size() - 2).status().IsInvalidArgument());
  EXPECT_TRUE(EncodeBlockRecord(m, static_cast<Codec>(7), raw.data(), raw.size())
                  .status()
                  .IsInvalidArgument());
  BlockRecordMeta bad = m;
  bad.dtype = static_cast<DType>(9);
  EXPECT_TRUE(
      EncodeBlockRecord(bad, Codec::kRaw, raw.data(), raw.size()).status().IsInvalidArgument());
  bad = m;
  bad.kind = static_cast<TensorKind>(2);
  EXPECT_TRUE(
      EncodeBlockRecord(bad, Codec::kRaw, raw.data(), raw.size()).status().IsInvalidArgument());
  bad = m;
  bad.kv_heads = bad.tokens = bad.head_dim = 0xffffffffu;  // shape product overflows 64 bits
  EXPECT_TRUE(
      EncodeBlockRecord(bad, Codec::kRaw, raw.data(), raw.size()).status().IsInvalidArgument());
  EXPECT_TRUE(EncodeBlockRecord(m, Codec::kLz4, nullptr, raw.size()).status().IsInvalidArgument());
}

TEST(BlockRecordTest, DecodeRejectsAWrongBufferSize) {
  const BlockRecordMeta m{DType::kBF16, TensorKind::kKey, 0, 2, 3, 4};
  const std::vector<uint8_t> raw = Tensor(m, 3);
  const std::vector<uint8_t> bytes = Encode(m, Codec::kLz4, raw);
  Result<BlockRecordView> view = ParseBlockRecord(bytes.data(), bytes.size(), "r");
  ASSERT_TRUE(view.ok());
  std::vector<uint8_t> dst(raw.size() + 1);
  EXPECT_TRUE(DecodeBlockRecord(*view, dst.data(), dst.size(), "r").IsInvalidArgument());
}

// Any single damaged byte, in the header or the payload, must surface as Corruption from Parse,
// Verify or Decode: never a silent success, never a crash (also run under ASan/UBSan).
TEST(BlockRecordTest, EverySingleByteFlipIsDetected) {
  for (Codec codec : kAllCodecs) {
    for (DType dtype : {DType::kBF16, DType::kF32}) {
      const BlockRecordMeta m{dtype, TensorKind::kKey, 4, 2, 9, 8};
      const std::vector<uint8_t> raw = Tensor(m, 4);
      const std::vector<uint8_t> good = Encode(m, codec, raw);
      std::vector<uint8_t> out;
      ASSERT_TRUE(ReadBack(good, &out).ok());
      for (size_t i = 0; i < good.size(); ++i) {
        for (uint8_t mask : {0x01, 0x10, 0x80, 0xff}) {
          std::vector<uint8_t> bad = good;
          bad[i] ^= mask;
          // Each of the three calls alone must catch it where it can: a header byte in Parse, a
          // payload byte in both Verify and Decode.
          Result<BlockRecordView> view = ParseBlockRecord(bad.data(), bad.size(), "r");
          if (i < kBlockRecordHeaderSize) {
            ASSERT_FALSE(view.ok()) << CodecName(codec) << " byte " << i << " mask " << int{mask};
            ASSERT_TRUE(view.status().IsCorruption()) << view.status().ToString();
            continue;
          }
          ASSERT_TRUE(view.ok()) << view.status().ToString();
          const Status verify = VerifyBlockRecord(*view, "r");
          EXPECT_TRUE(verify.IsCorruption()) << CodecName(codec) << " byte " << i << " mask "
                                             << int{mask} << ": " << verify.ToString();
          std::vector<uint8_t> dst(view->header.raw_size);
          const Status decode = DecodeBlockRecord(*view, dst.data(), dst.size(), "r");
          EXPECT_TRUE(decode.IsCorruption()) << CodecName(codec) << " byte " << i << " mask "
                                             << int{mask} << ": " << decode.ToString();
        }
      }
    }
  }
}

TEST(BlockRecordTest, TruncatedAndExtendedRecordsAreCorruption) {
  for (Codec codec : kAllCodecs) {
    const BlockRecordMeta m{DType::kF16, TensorKind::kValue, 1, 2, 5, 8};
    const std::vector<uint8_t> good = Encode(m, codec, Tensor(m, 5));
    for (size_t len = 0; len < good.size(); ++len) {
      Result<BlockRecordView> view = ParseBlockRecord(good.data(), len, "r");
      ASSERT_FALSE(view.ok()) << len;
      EXPECT_TRUE(view.status().IsCorruption()) << view.status().ToString();
    }
    std::vector<uint8_t> longer = good;
    longer.push_back(0);
    Result<BlockRecordView> view = ParseBlockRecord(longer.data(), longer.size(), "r");
    ASSERT_FALSE(view.ok());
    EXPECT_TRUE(view.status().IsCorruption());
    EXPECT_NE(view.status().message().find("stored_size"), std::string::npos)
        << view.status().message();
  }
}

// An intact header (valid header checksum) with a value this build does not know was written by
// a newer shotdb: NotSupported, naming the field, the value and `what`.
TEST(BlockRecordTest, UnknownVersionDTypeOrCodecIsNotSupported) {
  const BlockRecordMeta m{DType::kBF16, TensorKind::kKey, 0, 1, 4, 8};
  const std::vector<uint8_t> good = Encode(m, Codec::kRaw, Tensor(m, 6));
  struct Case {
    size_t offset, width;
    uint64_t value;
    const char* field;
  };
  for (const Case& c :
       {Case{4, 2, 2, "format_version"}, Case{4, 2, 0, "format_version"}, Case{6, 1, 6, "dtype"},
        Case{6, 1, 255, "dtype"}, Case{7, 1, 3, "codec"}, Case{7, 1, 200, "codec"}}) {
    std::vector<uint8_t> bad = good;
    SetLe(&bad, c.offset, c.width, c.value);
    Reseal(&bad);
    Result<BlockRecordView> view = ParseBlockRecord(bad.data(), bad.size(), "task nlu block 3");
    ASSERT_FALSE(view.ok()) << c.field << " " << c.value;
    EXPECT_TRUE(view.status().IsNotSupported()) << view.status().ToString();
    const std::string& msg = view.status().message();
    EXPECT_NE(msg.find("task nlu block 3"), std::string::npos) << msg;
    EXPECT_NE(msg.find(c.field), std::string::npos) << msg;
    EXPECT_NE(msg.find(std::to_string(c.value)), std::string::npos) << msg;
  }
}

// Intact header checksum but inconsistent contents (a writer bug, or deliberate tampering).
TEST(BlockRecordTest, ResealedInconsistentHeadersAreCorruption) {
  const BlockRecordMeta m{DType::kBF16, TensorKind::kKey, 0, 2, 4, 8};
  const std::vector<uint8_t> raw_rec = Encode(m, Codec::kRaw, Tensor(m, 7));
  const std::vector<uint8_t> lz4_rec = Encode(m, Codec::kLz4, Tensor(m, 7));
  struct Case {
    const std::vector<uint8_t>* base;
    size_t offset, width;
    uint64_t value;
    const char* field;
  };
  const Case cases[] = {
      {&raw_rec, 8, 1, 2, "kind"},
      {&raw_rec, 9, 1, 1, "reserved"},
      {&raw_rec, 11, 1, 0x80, "reserved"},
      {&raw_rec, 20, 4, 5, "raw_size"},    // tokens no longer match raw_size
      {&raw_rec, 32, 8, 130, "raw_size"},  // raw_size no longer matches the shape
      {&raw_rec, 16, 4, 0x80000000u, "raw_size"},
      {&raw_rec, 6, 1, 0, "raw_size"},     // f32 doubles the expected raw size
      {&raw_rec, 7, 1, 1, "lz4"},          // raw bytes read as an LZ4 stream do not decode
      {&lz4_rec, 7, 1, 0, "stored_size"},  // raw codec needs stored == raw
  };
  for (const Case& c : cases) {
    std::vector<uint8_t> bad = *c.base;
    SetLe(&bad, c.offset, c.width, c.value);
    Reseal(&bad);
    std::vector<uint8_t> out;
    const Status s = ReadBack(bad, &out);
    EXPECT_TRUE(s.IsCorruption()) << c.field << " @" << c.offset << ": " << s.ToString();
    EXPECT_NE(s.message().find(c.field), std::string::npos) << s.message();
  }
}

TEST(BlockRecordTest, BadMagicAndHeaderChecksumNameTheField) {
  const BlockRecordMeta m{DType::kF32, TensorKind::kKey, 0, 1, 1, 4};
  std::vector<uint8_t> bytes = Encode(m, Codec::kRaw, Tensor(m, 8));
  std::vector<uint8_t> bad = bytes;
  bad[0] = 'X';
  Result<BlockRecordView> view = ParseBlockRecord(bad.data(), bad.size(), "blk");
  ASSERT_TRUE(view.status().IsCorruption());
  EXPECT_NE(view.status().message().find("magic"), std::string::npos);
  bad = bytes;
  bad[13] ^= 1;  // layer: only the header checksum can tell
  view = ParseBlockRecord(bad.data(), bad.size(), "blk");
  ASSERT_TRUE(view.status().IsCorruption());
  EXPECT_NE(view.status().message().find("header_checksum"), std::string::npos);
  EXPECT_EQ(view.status().message().rfind("blk", 0), 0u) << view.status().message();
}

std::vector<uint8_t> ReadFixture(const std::string& name) {
  const std::string path = std::string(SHOTDB_SOURCE_DIR) + "/tests/fixtures/format/" + name;
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

// Records written by tests/scripts/make_block_record_golden.py, an independent Python
// implementation of docs/format.md (numpy shuffle, python-lz4, python-xxhash).
TEST(BlockRecordTest, ReadsGoldenRecordsWrittenFromTheDocumentation) {
  struct Golden {
    const char* name;
    Codec codec;
    BlockRecordMeta meta;
  };
  const Golden goldens[] = {
      {"raw_f32_k", Codec::kRaw, {DType::kF32, TensorKind::kKey, 3, 2, 5, 8}},
      {"lz4_bf16_v", Codec::kLz4, {DType::kBF16, TensorKind::kValue, 29, 3, 40, 64}},
      {"shuffle_bf16_k", Codec::kShuffleLz4, {DType::kBF16, TensorKind::kKey, 7, 3, 40, 64}},
      {"shuffle_f16_v", Codec::kShuffleLz4, {DType::kF16, TensorKind::kValue, 0, 2, 17, 16}},
      {"shuffle_f64_k", Codec::kShuffleLz4, {DType::kF64, TensorKind::kKey, 1, 1, 9, 8}},
      {"lz4_f32_empty", Codec::kLz4, {DType::kF32, TensorKind::kValue, 2, 3, 0, 64}},
  };
  for (const Golden& g : goldens) {
    SCOPED_TRACE(g.name);
    const std::vector<uint8_t> rec = ReadFixture(std::string(g.name) + ".shkv");
    const std::vector<uint8_t> raw = ReadFixture(std::string(g.name) + ".raw");
    Result<BlockRecordView> view = ParseBlockRecord(rec.data(), rec.size(), g.name);
    ASSERT_TRUE(view.ok()) << view.status().ToString();
    const BlockRecordHeader& h = view->header;
    EXPECT_EQ(h.meta.dtype, g.meta.dtype);
    EXPECT_EQ(h.meta.kind, g.meta.kind);
    EXPECT_EQ(h.meta.layer, g.meta.layer);
    EXPECT_EQ(h.meta.kv_heads, g.meta.kv_heads);
    EXPECT_EQ(h.meta.tokens, g.meta.tokens);
    EXPECT_EQ(h.meta.head_dim, g.meta.head_dim);
    EXPECT_EQ(h.codec, g.codec);
    EXPECT_TRUE(VerifyBlockRecord(*view, g.name).ok());
    std::vector<uint8_t> decoded(h.raw_size);
    ASSERT_TRUE(DecodeBlockRecord(*view, decoded.data(), decoded.size(), g.name).ok());
    EXPECT_EQ(decoded, raw);

    // Writing the same tensor gives the same header fields; the LZ4 bytes themselves may differ
    // between LZ4 library versions, so those are compared in full for kRaw only.
    const std::vector<uint8_t> mine = Encode(g.meta, g.codec, raw);
    if (g.codec == Codec::kRaw) {
      EXPECT_EQ(mine, rec);
    } else {
      ASSERT_GE(mine.size(), kBlockRecordHeaderSize);
      EXPECT_TRUE(std::equal(rec.begin(), rec.begin() + 28, mine.begin()));
      EXPECT_EQ(Le(mine, 32, 8), Le(rec, 32, 8));  // raw_size
      EXPECT_EQ(Le(mine, 48, 8), Le(rec, 48, 8));  // raw checksum
    }
  }
}

}  // namespace
}  // namespace shotdb
