// LaunchQuantizeKv against the host's KvFromFloat (format/kv_values.h), byte for byte: fp8 and
// int8 payloads of bf16, f16 and float32 values over head counts, head dims, token counts (one
// int8 token group, several, a short last one) and value ranges (heads of very different
// magnitudes, a head of zeros, outlier channels, subnormal and huge float32 values), with more
// records than one launch takes; values halfway between two codes round to the even one; values
// that are not finite are flagged per record. The argument checks run everywhere (they fail
// before any CUDA call); kernel cases skip without a GPU.
#include "gpu/quantize_kv.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
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

struct QuantCase {
  std::string name;
  DType src;  // kBF16, kF16 or kF32
  uint32_t kv_heads, head_dim;
  std::vector<uint32_t> tokens;  // one record per entry
};
void PrintTo(const QuantCase& c, std::ostream* os) { *os << c.name; }

class QuantizeKvTest : public ::testing::TestWithParam<QuantCase> {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

// Values of one record, already representable in `src` (so the host's float32 input is exact):
// per head a magnitude from 2^-12 to 2^12 (to 2^3 for f16, whose largest value is 65504: 2^12 x
// 30 would overflow it; head 1 zeros; for float32 the last head subnormal or huge), every 16th
// channel an outlier 30x the rest.
std::vector<float> RecordValues(const QuantCase& c, uint32_t tokens, std::mt19937* rng) {
  std::normal_distribution<float> normal(0.f, 1.f);
  const uint64_t per_head = uint64_t{tokens} * c.head_dim;
  std::vector<float> x(c.kv_heads * per_head);
  for (uint32_t h = 0; h < c.kv_heads; ++h) {
    const uint32_t exponents = c.src == DType::kF16 ? 16 : 24;
    float mag = h == 1 ? 0.f : std::ldexp(1.f, static_cast<int>((*rng)() % exponents) - 12);
    if (c.src == DType::kF32 && h + 1 == c.kv_heads && h > 1) {
      mag = (*rng)() % 2 ? std::ldexp(1.f, -140) : std::ldexp(1.f, 120);
    }
    for (uint64_t i = 0; i < per_head; ++i) {
      x[h * per_head + i] = normal(*rng) * mag * (i % c.head_dim % 16 == 3 ? 30.f : 1.f);
    }
  }
  if (c.src != DType::kF32) {  // round to the source dtype
    std::vector<uint16_t> bits(x.size());
    ConvertFromFloat(c.src, x.data(), bits.data(), x.size());
    ConvertToFloat(c.src, bits.data(), x.data(), x.size());
  }
  return x;
}

// The source values as `src` bytes.
std::vector<uint8_t> AsBytes(DType src, const std::vector<float>& x) {
  std::vector<uint8_t> bytes(x.size() * DTypeSize(src));
  ConvertFromFloat(src, x.data(), bytes.data(), x.size());
  return bytes;
}

void ExpectMatchesHost(const QuantCase& c, DType stored) {
  SCOPED_TRACE(std::string(DTypeName(stored)));
  std::mt19937 rng(static_cast<uint32_t>(std::hash<std::string>()(c.name)) +
                   static_cast<uint32_t>(stored));
  // Records' values packed at 16-byte offsets, payloads at 4-byte ones (as tight as allowed).
  std::vector<uint8_t> src_all, want;
  std::vector<size_t> src_at, raw_at;
  for (uint32_t tokens : c.tokens) {
    const std::vector<float> x = RecordValues(c, tokens, &rng);
    const std::vector<uint8_t> bytes = AsBytes(c.src, x);
    src_at.push_back(src_all.size());
    src_all.insert(src_all.end(), bytes.begin(), bytes.end());
    src_all.resize((src_all.size() + 15) / 16 * 16);
    const size_t n_raw = *KvRawBytes(stored, c.kv_heads, tokens, c.head_dim);
    raw_at.push_back(want.size());
    want.resize(want.size() + (n_raw + 3) / 4 * 4);
    ASSERT_TRUE(
        KvFromFloat(stored, c.kv_heads, tokens, c.head_dim, x.data(), want.data() + raw_at.back())
            .ok());
  }
  auto src = ToDevice(src_all);
  auto dst = DeviceBuffer::Allocate(want.size());
  auto flags = DeviceBuffer::Allocate(4 * c.tokens.size());
  ASSERT_TRUE(src.ok() && dst.ok() && flags.ok());
  // The padding between payloads is never written: fill both sides with the same bytes.
  ASSERT_EQ(cudaMemset(dst->get(), 0x5a, want.size()), cudaSuccess);
  ASSERT_EQ(cudaMemset(flags->get(), 0xff, 4 * c.tokens.size()), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);  // before the launch on another stream
  for (size_t r = 0; r < c.tokens.size(); ++r) {
    const size_t n_raw = *KvRawBytes(stored, c.kv_heads, c.tokens[r], c.head_dim);
    std::fill(want.begin() + raw_at[r] + n_raw,
              r + 1 < c.tokens.size() ? want.begin() + raw_at[r + 1] : want.end(), 0x5a);
  }
  QuantizeKvArgs a;
  a.src_dtype = c.src;
  a.stored = stored;
  a.kv_heads = c.kv_heads;
  a.head_dim = c.head_dim;
  a.not_finite = static_cast<uint32_t*>(flags->get());
  for (size_t r = 0; r < c.tokens.size(); ++r) {
    a.jobs.push_back({static_cast<uint8_t*>(src->get()) + src_at[r],
                      static_cast<uint8_t*>(dst->get()) + raw_at[r], c.tokens[r]});
  }
  auto stream = CudaStream::Create();
  ASSERT_TRUE(stream.ok());
  ASSERT_TRUE(LaunchQuantizeKv(a, stream->get()).ok());
  ASSERT_EQ(cudaStreamSynchronize(stream->get()), cudaSuccess);
  Result<std::vector<uint8_t>> got = FromDevice<uint8_t>(dst->get(), want.size());
  Result<std::vector<uint32_t>> got_flags = FromDevice<uint32_t>(flags->get(), c.tokens.size());
  ASSERT_TRUE(got.ok() && got_flags.ok());
  EXPECT_EQ(*got_flags, std::vector<uint32_t>(c.tokens.size(), 0u));
  size_t bad = 0;
  for (size_t r = 0; r < c.tokens.size(); ++r) {
    const size_t end = r + 1 < c.tokens.size() ? raw_at[r + 1] : want.size();
    for (size_t i = raw_at[r]; i < end; ++i) {
      if ((*got)[i] != want[i] && ++bad <= 5) {
        ADD_FAILURE() << "record " << r << " byte " << i - raw_at[r] << ": got 0x" << std::hex
                      << int{(*got)[i]} << ", want 0x" << int{want[i]};
      }
    }
  }
  EXPECT_EQ(bad, 0u);
}

TEST_P(QuantizeKvTest, PayloadsMatchHostByteForByte) {
  for (DType stored : {DType::kF8E4M3, DType::kI8}) ExpectMatchesHost(GetParam(), stored);
}

std::vector<QuantCase> Cases() {
  std::vector<uint32_t> many;  // 1,100 records: two launches
  for (int i = 0; i < 1100; ++i) many.push_back(1 + i % 37);
  return {
      {"bf16_h8_d128_block", DType::kBF16, 8, 128, {95, 95, 96, 94}},
      {"bf16_h8_d128_groups", DType::kBF16, 8, 128, {1, 127, 128, 129, 300, 1000}},
      {"f16_h4_d64", DType::kF16, 4, 64, {1, 7, 256, 257}},
      {"f32_h3_d128", DType::kF32, 3, 128, {5, 130, 400}},
      {"f32_h5_d12_odd", DType::kF32, 5, 12, {1, 2, 3, 200}},
      {"bf16_h2_d200_wide", DType::kBF16, 2, 200, {9, 140}},  // channels beyond one CTA's threads
      {"bf16_h1_d64_long", DType::kBF16, 1, 64, {70000}},
      {"bf16_h8_d128_1100_records", DType::kBF16, 8, 128, many},
  };
}

INSTANTIATE_TEST_SUITE_P(Shapes, QuantizeKvTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<QuantCase>& i) { return i.param.name; });

// Float32 records of `tokens` tokens each, one after another in `x`, quantised on the device in
// one launch: the first record's payload bytes, and every record's not-finite word.
struct Quantized {
  std::vector<uint8_t> first;
  std::vector<uint32_t> not_finite;
};
Quantized QuantizeOnDevice(DType stored, uint32_t kv_heads, uint32_t tokens, uint32_t head_dim,
                           const std::vector<float>& x) {
  const size_t n = size_t{kv_heads} * tokens * head_dim, records = x.size() / n;
  const size_t n_raw = *KvRawBytes(stored, kv_heads, tokens, head_dim);
  const size_t stride = (n_raw + 3) / 4 * 4;
  auto src = ToDevice(x);
  auto dst = DeviceBuffer::Allocate(stride * records);
  auto flags = DeviceBuffer::Allocate(4 * records);
  EXPECT_TRUE(src.ok() && dst.ok() && flags.ok());
  if (!src.ok() || !dst.ok() || !flags.ok()) return {};
  QuantizeKvArgs a;
  a.src_dtype = DType::kF32;
  a.stored = stored;
  a.kv_heads = kv_heads;
  a.head_dim = head_dim;
  a.not_finite = static_cast<uint32_t*>(flags->get());
  for (size_t r = 0; r < records; ++r) {
    a.jobs.push_back({static_cast<float*>(src->get()) + r * n,
                      static_cast<uint8_t*>(dst->get()) + r * stride, tokens});
  }
  EXPECT_TRUE(LaunchQuantizeKv(a, nullptr).ok());
  Result<std::vector<uint8_t>> got = FromDevice<uint8_t>(dst->get(), n_raw);
  Result<std::vector<uint32_t>> words = FromDevice<uint32_t>(flags->get(), records);
  EXPECT_TRUE(got.ok() && words.ok());
  if (!got.ok() || !words.ok()) return {};
  return {*got, *words};
}

// Values exactly halfway between two codes round to the even one, as on the host: int8 codes
// k + 1/2 for every k (a channel scale of exactly 1/8), and fp8 midpoints between every two
// neighbouring e4m3 magnitudes, subnormals included (a head scale of exactly 1), both signs.
TEST(QuantizeKvTiesTest, HalfwayValuesRoundToEvenAsOnTheHost) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  {
    const uint32_t head_dim = 128, tokens = 4;  // token 0 sets each channel's scale
    std::vector<float> x(size_t{tokens} * head_dim);
    for (uint32_t d = 0; d < head_dim; ++d) {
      x[d] = (d % 2 ? -127.f : 127.f) / 8;  // amax 127/8: scale 1/8 exactly
      for (uint32_t t = 1; t < tokens; ++t) {
        const int k = static_cast<int>((d * 3 + t * 85) % 254) - 127;  // -127 .. 126
        x[size_t{t} * head_dim + d] = (static_cast<float>(k) + 0.5f) / 8;
      }
    }
    std::vector<uint8_t> want(*KvRawBytes(DType::kI8, 1, tokens, head_dim));
    ASSERT_TRUE(KvFromFloat(DType::kI8, 1, tokens, head_dim, x.data(), want.data()).ok());
    EXPECT_EQ(QuantizeOnDevice(DType::kI8, 1, tokens, head_dim, x).first, want);
  }
  {
    std::vector<float> magnitudes;  // the finite e4m3 magnitudes, ascending
    for (int code = 0; code < 0x7f; ++code) {
      magnitudes.push_back(Fp8E4M3ToFloat(static_cast<uint8_t>(code)));
    }
    std::vector<float> x = {448.f};  // amax 448: scale 1
    for (size_t i = 0; i + 1 < magnitudes.size(); ++i) {
      const float mid = (magnitudes[i] + magnitudes[i + 1]) / 2;  // exact in float32
      x.push_back(mid);
      x.push_back(-mid);
    }
    const uint32_t head_dim = 4;
    while (x.size() % head_dim != 0) x.push_back(0.f);
    const uint32_t tokens = static_cast<uint32_t>(x.size() / head_dim);
    std::vector<uint8_t> want(*KvRawBytes(DType::kF8E4M3, 1, tokens, head_dim));
    ASSERT_TRUE(KvFromFloat(DType::kF8E4M3, 1, tokens, head_dim, x.data(), want.data()).ok());
    EXPECT_EQ(QuantizeOnDevice(DType::kF8E4M3, 1, tokens, head_dim, x).first, want);
  }
}

// A NaN or an infinity anywhere in a record flags that record, and only it, for both dtypes.
TEST(QuantizeKvFlagTest, ValuesThatAreNotFiniteAreFlaggedPerRecord) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  const uint32_t kv_heads = 4, head_dim = 64, tokens = 200;
  const size_t n = size_t{kv_heads} * tokens * head_dim;
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Record r: finite except (for r = 1, 2, 3) one value at a place in a later head and group.
  const std::vector<std::pair<size_t, float>> poison = {
      {0, 0.f}, {n - 1, nan}, {n / 2 + 3, inf}, {2 * tokens * head_dim + 130 * head_dim, -inf}};
  for (DType stored : {DType::kF8E4M3, DType::kI8}) {
    std::vector<float> all;
    for (size_t r = 0; r < poison.size(); ++r) {
      std::vector<float> x(n, 0.25f);
      if (r > 0) x[poison[r].first] = poison[r].second;
      all.insert(all.end(), x.begin(), x.end());
    }
    EXPECT_EQ(QuantizeOnDevice(stored, kv_heads, tokens, head_dim, all).not_finite,
              (std::vector<uint32_t>{0, 1, 1, 1}))
        << DTypeName(stored);
  }
}

TEST(QuantizeKvArgsTest, BadArgumentsAreRefusedBeforeAnyCudaCall) {
  alignas(16) static uint8_t buf[256];
  alignas(16) static uint32_t flags[4];
  QuantizeKvArgs good;
  good.kv_heads = 2;
  good.head_dim = 8;
  good.not_finite = flags;
  good.jobs = {{buf, buf + 128, 1}};
  auto refused = [](const QuantizeKvArgs& a) {
    return LaunchQuantizeKv(a, nullptr).IsInvalidArgument();
  };
  QuantizeKvArgs a = good;
  a.stored = DType::kBF16;  // not a scaled dtype
  EXPECT_TRUE(refused(a));
  a = good;
  a.src_dtype = DType::kF64;
  EXPECT_TRUE(refused(a));
  a = good;
  a.src_dtype = DType::kI8;
  EXPECT_TRUE(refused(a));
  a = good;
  a.kv_heads = 0;
  EXPECT_TRUE(refused(a));
  a = good;
  a.head_dim = 0;
  EXPECT_TRUE(refused(a));
  a = good;
  a.jobs[0].tokens = 0;
  EXPECT_TRUE(refused(a));
  a = good;
  a.jobs[0].src = buf + 1;  // bf16 values are 2-byte aligned
  EXPECT_TRUE(refused(a));
  a = good;
  a.src_dtype = DType::kF32;
  a.jobs[0].src = buf + 2;  // float32 values 4-byte aligned
  EXPECT_TRUE(refused(a));
  a = good;
  a.jobs[0].dst = buf + 130;
  EXPECT_TRUE(refused(a));
  a = good;
  a.jobs.push_back({nullptr, buf, 1});
  EXPECT_TRUE(refused(a));
  a = good;
  a.not_finite = nullptr;
  EXPECT_TRUE(refused(a));
  a = good;
  a.not_finite = reinterpret_cast<uint32_t*>(buf + 2);
  EXPECT_TRUE(refused(a));
  a = good;
  a.jobs.clear();  // nothing to do: no launch, no error (not_finite may then be null)
  a.not_finite = nullptr;
  EXPECT_TRUE(LaunchQuantizeKv(a, nullptr).ok());
}

}  // namespace
}  // namespace gpu
}  // namespace shotdb
