// The gather kernel against the float64 reference (rope_reference.h), in bf16 and f16. Needs a
// GPU (the argument checks do not).
#include "gpu/rope_gather.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "gpu/cuda_util.h"
#include "gpu/rope_reference.h"
#include "gpu/stream.h"

namespace shotdb {
namespace gpu {
namespace {

struct Case {
  DType dtype;
  bool llama3;
  int64_t first_position;
  uint32_t head_dim;
};
std::string CaseName(const Case& c) {
  return std::string(DTypeName(c.dtype)) + (c.llama3 ? "_llama3" : "") + "_pos" +
         std::to_string(c.first_position) + "_d" + std::to_string(c.head_dim);
}
// GoogleTest prints parameters with this instead of dumping the struct's bytes (padding included).
void PrintTo(const Case& c, std::ostream* os) { *os << CaseName(c); }

// Random values rounded to the dtype: the host copy (as double) is exactly what the kernel reads.
struct HostTensor {
  std::vector<uint16_t> bits;
  std::vector<double> values;
};
HostTensor Random(DType dtype, size_t n, std::mt19937* rng) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> f(n);
  for (float& x : f) x = u(*rng);
  HostTensor t;
  t.bits.resize(n);
  ConvertFromFloat(dtype, f.data(), t.bits.data(), n);
  std::vector<float> back(n);
  ConvertToFloat(dtype, t.bits.data(), back.data(), n);
  t.values.assign(back.begin(), back.end());
  return t;
}

Result<DeviceBuffer> Upload(const std::vector<uint16_t>& bits) {
  SHOTDB_ASSIGN_OR_RETURN(DeviceBuffer b, DeviceBuffer::Allocate(bits.size() * 2));
  SHOTDB_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(b.get(), bits.data(), bits.size() * 2, cudaMemcpyHostToDevice));
  return b;
}

std::vector<double> Download16(DType dtype, const DeviceBuffer& b, size_t n) {
  std::vector<uint16_t> bits(n);
  EXPECT_EQ(cudaMemcpy(bits.data(), b.get(), n * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  std::vector<float> f(n);
  ConvertToFloat(dtype, bits.data(), f.data(), n);
  return std::vector<double>(f.begin(), f.end());
}

class RopeGatherTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_P(RopeGatherTest, GatherMatchesReference) {
  const Case c = GetParam();
  const uint32_t kv_heads = 2, d = c.head_dim;
  const std::vector<uint32_t> tokens = {5, 130, 1, 64, 77};  // odd sizes
  std::mt19937 rng(11);
  RopeParams rope;
  rope.llama3_scaling = c.llama3;
  auto inv = RopeInvFreq(rope, d);
  ASSERT_TRUE(inv.ok());

  std::vector<ReferenceBlock> ref_blocks;
  std::vector<DeviceBuffer> dev;
  std::vector<KvBlockRef> refs;
  uint32_t total = 0;
  for (uint32_t t : tokens) {
    HostTensor k = Random(c.dtype, size_t(kv_heads) * t * d, &rng);
    HostTensor v = Random(c.dtype, size_t(kv_heads) * t * d, &rng);
    auto dk = Upload(k.bits), dv = Upload(v.bits);
    ASSERT_TRUE(dk.ok() && dv.ok());
    refs.push_back(KvBlockRef{dk->get(), dv->get(), t});
    dev.push_back(std::move(*dk));
    dev.push_back(std::move(*dv));
    ref_blocks.push_back(ReferenceBlock{k.values, v.values, t});
    total += t;
  }
  const size_t n = size_t(kv_heads) * total * d;
  auto k_out = DeviceBuffer::Allocate(n * 2), v_out = DeviceBuffer::Allocate(n * 2);
  ASSERT_TRUE(k_out.ok() && v_out.ok());

  GatherRopeArgs g;
  g.dtype = c.dtype;
  g.kv_heads = kv_heads;
  g.head_dim = d;
  g.blocks = refs;
  g.rope = rope;
  g.first_position = c.first_position;
  g.k_out = k_out->get();
  g.v_out = v_out->get();
  ASSERT_TRUE(LaunchGatherRope(g, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  std::vector<double> want_k, want_v;
  GatherRopeReference(ref_blocks, kv_heads, d, *inv, c.first_position, &want_k, &want_v);
  const std::vector<double> got_k = Download16(c.dtype, *k_out, n);
  const std::vector<double> got_v = Download16(c.dtype, *v_out, n);
  // One rounding to the output type (half an ulp: 2^-9 bf16, 2^-12 f16) plus float arithmetic.
  const double rel = c.dtype == DType::kBF16 ? 1.0 / 256 : 1.0 / 2048;
  for (size_t i = 0; i < n; ++i) {
    ASSERT_NEAR(got_k[i], want_k[i], rel * std::fabs(want_k[i]) + 2e-6) << "K element " << i;
    ASSERT_EQ(got_v[i], want_v[i]) << "V element " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, RopeGatherTest,
    ::testing::Values(Case{DType::kBF16, true, 0, 128}, Case{DType::kBF16, false, 100000, 128},
                      Case{DType::kF16, true, 7, 64}, Case{DType::kF16, false, 0, 128}),
    [](const ::testing::TestParamInfo<Case>& info) { return CaseName(info.param); });

TEST(RopeGatherArgsTest, RejectsBadArguments) {
  GatherRopeArgs g;
  g.dtype = DType::kF32;
  EXPECT_TRUE(LaunchGatherRope(g, nullptr).IsInvalidArgument());
  g.dtype = DType::kBF16;
  g.kv_heads = 1;
  g.head_dim = 6;
  EXPECT_TRUE(LaunchGatherRope(g, nullptr).IsInvalidArgument());
}

}  // namespace
}  // namespace gpu
}  // namespace shotdb
