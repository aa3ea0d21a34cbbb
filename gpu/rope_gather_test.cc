// The gather kernel against the float64 reference (rope_reference.h), in bf16 and f16. Needs a
// GPU (the argument checks do not).
#include "gpu/rope_gather.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "gpu/cuda_util.h"
#include "gpu/rope_reference.h"
#include "gpu/stream.h"
#include "gpu/test_util.h"

namespace shotdb {
namespace gpu {
namespace {

using testing::Download16;
using testing::Host16;
using testing::Random16;
using testing::Roundoff;
using testing::ToDevice;

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
    Host16 k = Random16(c.dtype, size_t(kv_heads) * t * d, 1.f, &rng);
    Host16 v = Random16(c.dtype, size_t(kv_heads) * t * d, 1.f, &rng);
    auto dk = ToDevice(k.bits), dv = ToDevice(v.bits);
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
  Result<std::vector<double>> r_k = Download16(c.dtype, k_out->get(), n),
                              r_v = Download16(c.dtype, v_out->get(), n);
  ASSERT_TRUE(r_k.ok() && r_v.ok());
  const std::vector<double>&got_k = *r_k, &got_v = *r_v;
  // One rounding to the output type (half an ulp: 2^-9 bf16, 2^-12 f16) plus float arithmetic.
  const double rel = Roundoff(c.dtype);
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
