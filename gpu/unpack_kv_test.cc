// LaunchUnpackKv against the host: fp8 and int8 payloads against KvToFloat + ConvertFromFloat
// (bit-exact),
// 16-bit payloads against the payload itself, over head counts, head dims, token counts and both
// page dtypes, with more records than one launch takes. The
// argument checks run everywhere (they fail before any CUDA call); kernel cases skip without a GPU.
#include "gpu/unpack_kv.h"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "format/kv_values.h"
#include "gpu/cuda_util.h"
#include "gpu/stream.h"
#include "gpu/test_util.h"

namespace shotdb {
namespace gpu {
namespace {

using testing::FromDevice;
using testing::ToDevice;

struct DequantCase {
  std::string name;
  DType dtype;
  uint32_t kv_heads, head_dim;
  std::vector<uint32_t> tokens;  // one record per entry
};
void PrintTo(const DequantCase& c, std::ostream* os) { *os << c.name; }

class UnpackKvTest : public ::testing::TestWithParam<DequantCase> {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

// Scaled payloads (fp8 and int8) of heads with very different magnitudes (one of zeros) and, in
// every head, outlier channels (as pre-RoPE keys have).
void ExpectScaledMatchesHost(const DequantCase& c, DType stored) {
  SCOPED_TRACE(std::string(DTypeName(stored)));
  std::mt19937 rng(static_cast<uint32_t>(std::hash<std::string>()(c.name)) +
                   static_cast<uint32_t>(stored));
  std::normal_distribution<float> normal(0.f, 1.f);
  // Records packed at 4-byte offsets (as tight as the kernel allows), pages at 8-byte ones.
  std::vector<uint8_t> raw_all;
  std::vector<size_t> raw_at, page_at;
  std::vector<uint16_t> want;
  for (size_t r = 0; r < c.tokens.size(); ++r) {
    const uint64_t per_head = uint64_t{c.tokens[r]} * c.head_dim;
    std::vector<float> x(c.kv_heads * per_head);
    // Heads of very different magnitudes, one of them zeros.
    for (uint32_t h = 0; h < c.kv_heads; ++h) {
      const float mag = h == 1 ? 0.f : std::ldexp(1.f, static_cast<int>(rng() % 24) - 12);
      for (uint64_t i = 0; i < per_head; ++i) {
        x[h * per_head + i] = normal(rng) * mag * (i % c.head_dim % 16 == 3 ? 30.f : 1.f);
      }
    }
    const size_t n_raw = *KvRawBytes(stored, c.kv_heads, c.tokens[r], c.head_dim);
    raw_at.push_back(raw_all.size());
    raw_all.resize(raw_all.size() + (n_raw + 3) / 4 * 4);
    ASSERT_TRUE(KvFromFloat(stored, c.kv_heads, c.tokens[r], c.head_dim, x.data(),
                            raw_all.data() + raw_at.back())
                    .ok());
    std::vector<float> back(x.size());
    KvToFloat(stored, c.kv_heads, c.tokens[r], c.head_dim, raw_all.data() + raw_at.back(),
              back.data());
    page_at.push_back(want.size());
    want.resize(want.size() + back.size() + (back.size() % 4 ? 4 - back.size() % 4 : 0));
    ConvertFromFloat(c.dtype, back.data(), want.data() + page_at.back(), back.size());
  }
  auto src = ToDevice(raw_all);
  auto dst = DeviceBuffer::Allocate(want.size() * 2);
  ASSERT_TRUE(src.ok() && dst.ok());
  // cudaMemset may run asynchronously on the legacy stream, which a non-blocking stream does not
  // wait for: finish it before the launch.
  ASSERT_EQ(cudaMemset(dst->get(), 0xff, want.size() * 2), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  UnpackKvArgs a;
  a.stored = stored;
  a.dtype = c.dtype;
  a.kv_heads = c.kv_heads;
  a.head_dim = c.head_dim;
  for (size_t r = 0; r < c.tokens.size(); ++r) {
    a.jobs.push_back({static_cast<uint8_t*>(src->get()) + raw_at[r],
                      static_cast<uint16_t*>(dst->get()) + page_at[r], c.tokens[r]});
  }
  auto stream = CudaStream::Create();
  ASSERT_TRUE(stream.ok());
  ASSERT_TRUE(LaunchUnpackKv(a, stream->get()).ok());
  ASSERT_EQ(cudaStreamSynchronize(stream->get()), cudaSuccess);
  Result<std::vector<uint16_t>> fetched = FromDevice<uint16_t>(dst->get(), want.size());
  ASSERT_TRUE(fetched.ok());
  const std::vector<uint16_t>& got = *fetched;
  size_t bad = 0;
  for (size_t r = 0; r < c.tokens.size(); ++r) {
    const size_t n = size_t{c.kv_heads} * c.tokens[r] * c.head_dim;
    for (size_t i = 0; i < n; ++i) {
      if (got[page_at[r] + i] != want[page_at[r] + i] && ++bad <= 5) {
        ADD_FAILURE() << "record " << r << " element " << i << ": got 0x" << std::hex
                      << got[page_at[r] + i] << ", want 0x" << want[page_at[r] + i];
      }
    }
  }
  EXPECT_EQ(bad, 0u);
}

TEST_P(UnpackKvTest, ScaledPayloadsMatchHostBitForBit) {
  for (DType stored : {DType::kF8E4M3, DType::kI8}) ExpectScaledMatchesHost(GetParam(), stored);
}

std::vector<DequantCase> Cases() {
  std::vector<uint32_t> many;  // 1,500 records: two launches
  for (int i = 0; i < 1500; ++i) many.push_back(1 + i % 37);
  return {
      {"bf16_h8_d128_mixed", DType::kBF16, 8, 128, {1, 7, 64, 1000, 3}},
      {"f16_h8_d128_mixed", DType::kF16, 8, 128, {1, 7, 64, 1000, 3}},
      {"bf16_h1_d64_long", DType::kBF16, 1, 64, {70000}},
      {"f16_h3_d4_odd", DType::kF16, 3, 4, {1, 2, 5, 9}},
      {"bf16_h2_d12", DType::kBF16, 2, 12, {11, 13}},
      {"bf16_h8_d128_1500_records", DType::kBF16, 8, 128, many},
      {"f16_h4_d64_1500_records", DType::kF16, 4, 64, many},
  };
}

// 16-bit payloads are copied as they are (random bit patterns, NaNs included), each from its
// offset in one landing buffer to its own page.
TEST_P(UnpackKvTest, CopiesSixteenBitPayloads) {
  const DequantCase& c = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(std::hash<std::string>()(c.name)) + 1);
  std::vector<uint16_t> src_all, want;
  std::vector<size_t> src_at, page_at;
  for (uint32_t tokens : c.tokens) {
    const size_t n = size_t{c.kv_heads} * tokens * c.head_dim;  // a multiple of 4
    src_at.push_back(src_all.size());
    page_at.push_back(want.size());
    for (size_t i = 0; i < n; ++i) src_all.push_back(static_cast<uint16_t>(rng()));
    want.insert(want.end(), src_all.end() - n, src_all.end());
    src_all.resize(src_all.size() + 4 * (rng() % 3));  // gaps between records, as in the map
    want.resize(want.size() + 4);                      // pages apart too
  }
  auto src = ToDevice(src_all);
  auto dst = DeviceBuffer::Allocate(want.size() * 2);
  ASSERT_TRUE(src.ok() && dst.ok());
  ASSERT_EQ(cudaMemset(dst->get(), 0, want.size() * 2), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);  // before the launch on another stream
  UnpackKvArgs a;
  a.stored = c.dtype;
  a.dtype = c.dtype;
  a.kv_heads = c.kv_heads;
  a.head_dim = c.head_dim;
  for (size_t r = 0; r < c.tokens.size(); ++r) {
    a.jobs.push_back({static_cast<uint16_t*>(src->get()) + src_at[r],
                      static_cast<uint16_t*>(dst->get()) + page_at[r], c.tokens[r]});
    // The 4 values after each page stay untouched (0): nothing is written past a page.
    std::fill(want.begin() + page_at[r] + size_t{c.kv_heads} * c.tokens[r] * c.head_dim,
              want.begin() + page_at[r] + size_t{c.kv_heads} * c.tokens[r] * c.head_dim + 4, 0);
  }
  auto stream = CudaStream::Create();
  ASSERT_TRUE(stream.ok());
  ASSERT_TRUE(LaunchUnpackKv(a, stream->get()).ok());
  ASSERT_EQ(cudaStreamSynchronize(stream->get()), cudaSuccess);
  Result<std::vector<uint16_t>> got = FromDevice<uint16_t>(dst->get(), want.size());
  ASSERT_TRUE(got.ok());
  EXPECT_TRUE(*got == want) << c.name;
}

// Copies of other dtypes and of payloads that are not a whole number of 8-byte words (the last
// bytes are copied one by one), with a guard word after each page that must stay untouched.
TEST(UnpackKvCopyTest, CopiesAnyDtypeAndOddSizes) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  struct Shape {
    DType dtype;
    uint32_t heads, tokens, dim;
  };
  for (const Shape& c :
       {Shape{DType::kF32, 2, 5, 3}, Shape{DType::kF16, 1, 1, 3}, Shape{DType::kF64, 8, 7, 128},
        Shape{DType::kBF16, 3, 1000, 5}, Shape{DType::kF8E4M3, 1, 3, 1}}) {
    const size_t bytes = size_t{c.heads} * c.tokens * c.dim * DTypeSize(c.dtype);
    std::mt19937 rng(static_cast<uint32_t>(bytes));
    std::vector<uint8_t> src(bytes);
    for (uint8_t& b : src) b = static_cast<uint8_t>(rng());
    const size_t page = (bytes + 8 + 255) / 256 * 256;  // the page, a guard, 256-byte aligned
    auto d_src = ToDevice(src);
    auto d_dst = DeviceBuffer::Allocate(2 * page);
    ASSERT_TRUE(d_src.ok() && d_dst.ok());
    ASSERT_EQ(cudaMemset(d_dst->get(), 0xa5, 2 * page), cudaSuccess);
    UnpackKvArgs a;
    a.stored = a.dtype = c.dtype;
    a.kv_heads = c.heads;
    a.head_dim = c.dim;
    a.jobs = {{d_src->get(), d_dst->get(), c.tokens},
              {d_src->get(), static_cast<uint8_t*>(d_dst->get()) + page, c.tokens}};
    ASSERT_TRUE(LaunchUnpackKv(a, nullptr).ok()) << DTypeName(c.dtype);
    Result<std::vector<uint8_t>> got = FromDevice<uint8_t>(d_dst->get(), 2 * page);
    ASSERT_TRUE(got.ok());
    std::vector<uint8_t> want(2 * page, 0xa5);
    std::copy(src.begin(), src.end(), want.begin());
    std::copy(src.begin(), src.end(), want.begin() + page);
    EXPECT_TRUE(*got == want) << DTypeName(c.dtype) << " " << bytes << " bytes";
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, UnpackKvTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<DequantCase>& i) {
                           return i.param.name;
                         });

TEST(UnpackKvArgsTest, BadArgumentsAreRefusedBeforeAnyCudaCall) {
  alignas(16) static uint8_t buf[256];
  UnpackKvArgs good;
  good.kv_heads = 2;
  good.head_dim = 8;
  good.jobs = {{buf, buf + 128, 1}};
  auto refused = [](const UnpackKvArgs& a) {
    return LaunchUnpackKv(a, nullptr).IsInvalidArgument();
  };
  UnpackKvArgs a = good;
  a.dtype = DType::kF32;
  EXPECT_TRUE(refused(a));
  a = good;
  a.head_dim = 6;
  EXPECT_TRUE(refused(a));
  a = good;
  a.kv_heads = 0;
  EXPECT_TRUE(refused(a));
  a = good;
  a.jobs[0].tokens = 0;
  EXPECT_TRUE(refused(a));
  a = good;
  a.jobs[0].src = buf + 2;
  EXPECT_TRUE(refused(a));
  a = good;
  a.jobs[0].dst = buf + 132;
  EXPECT_TRUE(refused(a));
  a = good;
  a.jobs.push_back({nullptr, buf, 1});
  EXPECT_TRUE(refused(a));
  a = good;
  a.stored = DType::kF32;  // not a payload dtype
  EXPECT_TRUE(refused(a));
  a = good;
  a.stored = DType::kI8;
  a.head_dim = 6;  // int8 is unpacked in groups of 4 channels too
  EXPECT_TRUE(refused(a));
  a.head_dim = 8;
  a.dtype = DType::kF32;  // into 16-bit pages only
  EXPECT_TRUE(refused(a));
  a = good;
  a.stored = DType::kBF16;  // 16-bit payloads are copied into pages of their own dtype only
  a.dtype = DType::kF16;
  EXPECT_TRUE(refused(a));
  a.dtype = DType::kBF16;
  a.jobs[0].src = buf + 4;  // a copy reads 8-byte words
  EXPECT_TRUE(refused(a));
  a = good;
  a.jobs.clear();  // nothing to do: no launch, no error
  EXPECT_TRUE(LaunchUnpackKv(a, nullptr).ok());
}

}  // namespace
}  // namespace gpu
}  // namespace shotdb
