// LaunchDequantizeKv against the host's KvToFloat + ConvertFromFloat (bit-exact), over head counts,
// head dims, token counts and both page dtypes, with more records than one launch takes. The
// argument checks run everywhere (they fail before any CUDA call); kernel cases skip without a GPU.
#include "gpu/dequantize_kv.h"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "format/kv_values.h"
#include "gpu/cuda_util.h"
#include "gpu/stream.h"

namespace shotdb {
namespace gpu {
namespace {

struct DequantCase {
  std::string name;
  DType dtype;
  uint32_t kv_heads, head_dim;
  std::vector<uint32_t> tokens;  // one record per entry
};
void PrintTo(const DequantCase& c, std::ostream* os) { *os << c.name; }

class DequantizeKvTest : public ::testing::TestWithParam<DequantCase> {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_P(DequantizeKvTest, MatchesHostBitForBit) {
  const DequantCase& c = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(std::hash<std::string>()(c.name)));
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
      for (uint64_t i = 0; i < per_head; ++i) x[h * per_head + i] = normal(rng) * mag;
    }
    const size_t n_raw = *KvRawBytes(DType::kF8E4M3, c.kv_heads, c.tokens[r], c.head_dim);
    raw_at.push_back(raw_all.size());
    raw_all.resize(raw_all.size() + (n_raw + 3) / 4 * 4);
    ASSERT_TRUE(
        KvFromFloat(DType::kF8E4M3, c.kv_heads, per_head, x.data(), raw_all.data() + raw_at.back())
            .ok());
    std::vector<float> back(x.size());
    KvToFloat(DType::kF8E4M3, c.kv_heads, per_head, raw_all.data() + raw_at.back(), back.data());
    page_at.push_back(want.size());
    want.resize(want.size() + back.size() + (back.size() % 4 ? 4 - back.size() % 4 : 0));
    ConvertFromFloat(c.dtype, back.data(), want.data() + page_at.back(), back.size());
  }
  auto src = DeviceBuffer::Allocate(raw_all.size());
  auto dst = DeviceBuffer::Allocate(want.size() * 2);
  ASSERT_TRUE(src.ok() && dst.ok());
  ASSERT_EQ(cudaMemcpy(src->get(), raw_all.data(), raw_all.size(), cudaMemcpyHostToDevice),
            cudaSuccess);
  ASSERT_EQ(cudaMemset(dst->get(), 0xff, want.size() * 2), cudaSuccess);
  DequantizeKvArgs a;
  a.dtype = c.dtype;
  a.kv_heads = c.kv_heads;
  a.head_dim = c.head_dim;
  for (size_t r = 0; r < c.tokens.size(); ++r) {
    a.jobs.push_back({static_cast<uint8_t*>(src->get()) + raw_at[r],
                      static_cast<uint16_t*>(dst->get()) + page_at[r], c.tokens[r]});
  }
  auto stream = CudaStream::Create();
  ASSERT_TRUE(stream.ok());
  ASSERT_TRUE(LaunchDequantizeKv(a, stream->get()).ok());
  ASSERT_EQ(cudaStreamSynchronize(stream->get()), cudaSuccess);
  std::vector<uint16_t> got(want.size());
  ASSERT_EQ(cudaMemcpy(got.data(), dst->get(), got.size() * 2, cudaMemcpyDeviceToHost),
            cudaSuccess);
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

INSTANTIATE_TEST_SUITE_P(Shapes, DequantizeKvTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<DequantCase>& i) {
                           return i.param.name;
                         });

TEST(DequantizeKvArgsTest, BadArgumentsAreRefusedBeforeAnyCudaCall) {
  alignas(16) static uint8_t buf[256];
  DequantizeKvArgs good;
  good.kv_heads = 2;
  good.head_dim = 8;
  good.jobs = {{buf, buf + 128, 1}};
  auto refused = [](const DequantizeKvArgs& a) {
    return LaunchDequantizeKv(a, nullptr).IsInvalidArgument();
  };
  DequantizeKvArgs a = good;
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
  a.jobs.clear();  // nothing to do: no launch, no error
  EXPECT_TRUE(LaunchDequantizeKv(a, nullptr).ok());
}

}  // namespace
}  // namespace gpu
}  // namespace shotdb
