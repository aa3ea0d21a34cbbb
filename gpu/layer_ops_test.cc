// LaunchRmsNorm, LaunchRopeQk and LaunchSiluMul against float64 computations of the same steps,
// over both dtypes and many shapes (widths that do or do not fill the CTA, strided rows, GQA
// ratios, head dims 4-256, positions up to 3,000,000, llama3 scaling). Kernel cases skip without
// a GPU; the argument checks run everywhere (they fail before any CUDA call).
#include "gpu/layer_ops.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "gpu/rope.h"
#include "gpu/rope_reference.h"
#include "gpu/test_util.h"

namespace shotdb {
namespace gpu {
namespace {

using testing::Download16;
using testing::Random16;
using testing::ToDevice;

// The kernels round their result to the dtype (RMSNorm and SiLU*up twice); float32 arithmetic
// adds far less.
double Tolerance(DType d) { return d == DType::kBF16 ? 1.0 / 128 : 1.0 / 1024; }

// Worst |got - want| / (|want| + floor) over the values, in units of the tolerance.
double WorstError(const std::vector<double>& got, const std::vector<double>& want, double floor,
                  DType dtype) {
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    worst = std::max(worst, std::abs(got[i] - want[i]) / (std::abs(want[i]) + floor));
  }
  return worst / Tolerance(dtype);
}

class LayerOpsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

struct NormCase {
  DType dtype;
  uint32_t rows, width;
  int64_t stride;
  float eps;
};

TEST_F(LayerOpsTest, RmsNormMatchesFloat64) {
  const std::vector<NormCase> cases = {
      {DType::kBF16, 1, 4096, 4096, 1e-5f},   {DType::kF16, 3, 64, 64, 1e-6f},
      {DType::kBF16, 130, 5120, 5122, 1e-5f}, {DType::kBF16, 2, 2, 2, 1e-5f},
      {DType::kF16, 17, 16384, 16384, 1e-5f}, {DType::kBF16, 5, 578, 600, 1e-2f},
  };
  for (const NormCase& c : cases) {
    SCOPED_TRACE(std::string(DTypeName(c.dtype)) + " rows " + std::to_string(c.rows) + " width " +
                 std::to_string(c.width));
    std::mt19937 rng(c.rows * 7919u + c.width);
    const testing::Host16 x = Random16(c.dtype, size_t(c.rows) * c.stride, 2.f, &rng);
    const testing::Host16 w = Random16(c.dtype, c.width, 1.5f, &rng);
    std::vector<double> want(size_t(c.rows) * c.width);
    for (uint32_t r = 0; r < c.rows; ++r) {
      double sq = 0;
      for (uint32_t i = 0; i < c.width; ++i) sq += std::pow(x.values[r * c.stride + i], 2);
      const double inv = 1.0 / std::sqrt(sq / c.width + double(c.eps));
      for (uint32_t i = 0; i < c.width; ++i) {
        want[size_t(r) * c.width + i] = w.values[i] * x.values[r * c.stride + i] * inv;
      }
    }
    auto dx = ToDevice(x.bits), dw = ToDevice(w.bits);
    auto dout = DeviceBuffer::Allocate(want.size() * 2);
    ASSERT_TRUE(dx.ok() && dw.ok() && dout.ok());
    RmsNormArgs a;
    a.dtype = c.dtype;
    a.rows = c.rows;
    a.width = c.width;
    a.x = dx->get();
    a.x_row_stride = c.stride;
    a.weight = dw->get();
    a.eps = c.eps;
    a.out = dout->get();
    ASSERT_TRUE(LaunchRmsNorm(a, nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    Result<std::vector<double>> got = Download16(c.dtype, dout->get(), want.size());
    ASSERT_TRUE(got.ok());
    const double worst = WorstError(*got, want, 1e-2, c.dtype);
    std::printf("  rmsnorm %s %ux%u: worst error %.3f of the tolerance\n",
                std::string(DTypeName(c.dtype)).c_str(), c.rows, c.width, worst);
    EXPECT_LE(worst, 1.0);
  }
}

struct RopeCase {
  DType dtype;
  uint32_t q_heads, kv_heads, head_dim, rows;
  bool llama3;
  int64_t max_position;
};

TEST_F(LayerOpsTest, RopeQkMatchesFloat64) {
  const std::vector<RopeCase> cases = {
      {DType::kBF16, 32, 8, 128, 16, true, 100000},  // Llama-3.1-8B, a DBSA query
      {DType::kF16, 4, 4, 64, 300, false, 4096},     {DType::kBF16, 8, 1, 64, 1, true, 3000000},
      {DType::kBF16, 2, 2, 4, 7, false, 50},         {DType::kF16, 12, 2, 256, 33, true, 200000},
      {DType::kBF16, 9, 3, 128, 130, false, 131072},
  };
  for (const RopeCase& c : cases) {
    SCOPED_TRACE(std::string(DTypeName(c.dtype)) + " heads " + std::to_string(c.q_heads) + "/" +
                 std::to_string(c.kv_heads) + " d " + std::to_string(c.head_dim) + " rows " +
                 std::to_string(c.rows));
    std::mt19937 rng(c.q_heads * 131u + c.head_dim * 7u + c.rows);
    const uint32_t d = c.head_dim;
    // The QKV projection's layout: Q, K, then V (which the kernel must leave alone).
    const int64_t stride = int64_t(c.q_heads + 2 * c.kv_heads) * d;
    const testing::Host16 qkv = Random16(c.dtype, size_t(c.rows) * stride, 1.f, &rng);
    std::vector<int64_t> positions(c.rows);
    std::uniform_int_distribution<int64_t> pos(0, c.max_position);
    for (int64_t& p : positions) p = pos(rng);
    positions[0] = 0;
    RopeParams rope;
    rope.theta = c.llama3 ? 500000.0 : 10000.0;
    rope.llama3_scaling = c.llama3;
    Result<std::vector<double>> inv = RopeInvFreq(rope, d);
    ASSERT_TRUE(inv.ok());
    std::vector<double> want_q(size_t(c.q_heads) * c.rows * d),
        want_k(size_t(c.kv_heads) * c.rows * d);
    for (uint32_t r = 0; r < c.rows; ++r) {
      for (uint32_t h = 0; h < c.q_heads + c.kv_heads; ++h) {
        double* dst = h < c.q_heads ? &want_q[(size_t(h) * c.rows + r) * d]
                                    : &want_k[(size_t(h - c.q_heads) * c.rows + r) * d];
        RotateHalfReference(&qkv.values[r * stride + size_t(h) * d], dst, positions[r], *inv);
      }
    }
    auto dqkv = ToDevice(qkv.bits);
    auto dpos = ToDevice(positions);
    auto dq = DeviceBuffer::Allocate(want_q.size() * 2),
         dk = DeviceBuffer::Allocate(want_k.size() * 2);
    ASSERT_TRUE(dqkv.ok() && dpos.ok() && dq.ok() && dk.ok());
    RopeQkArgs a;
    a.dtype = c.dtype;
    a.q_heads = c.q_heads;
    a.kv_heads = c.kv_heads;
    a.head_dim = d;
    a.rows = c.rows;
    a.qk = dqkv->get();
    a.row_stride = stride;
    a.positions = dpos->as<int64_t>();
    a.rope = rope;
    a.q_out = dq->get();
    a.k_out = dk->get();
    ASSERT_TRUE(LaunchRopeQk(a, nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    Result<std::vector<double>> got_q = Download16(c.dtype, dq->get(), want_q.size());
    Result<std::vector<double>> got_k = Download16(c.dtype, dk->get(), want_k.size());
    ASSERT_TRUE(got_q.ok() && got_k.ok());
    const double worst = std::max(WorstError(*got_q, want_q, 0.05, c.dtype),
                                  WorstError(*got_k, want_k, 0.05, c.dtype));
    std::printf("  rope q/k %s %u/%u d%u rows %u: worst error %.3f of the tolerance\n",
                std::string(DTypeName(c.dtype)).c_str(), c.q_heads, c.kv_heads, d, c.rows, worst);
    EXPECT_LE(worst, 1.0);
  }
}

struct SiluCase {
  DType dtype;
  uint32_t rows, width;
  int64_t stride;
};

TEST_F(LayerOpsTest, SiluMulMatchesFloat64) {
  const std::vector<SiluCase> cases = {
      {DType::kBF16, 16, 14336, 2 * 14336},
      {DType::kF16, 1, 2, 4},
      {DType::kBF16, 300, 1000, 2002},
      {DType::kF16, 7, 8192, 16384},
  };
  for (const SiluCase& c : cases) {
    SCOPED_TRACE(std::string(DTypeName(c.dtype)) + " rows " + std::to_string(c.rows) + " width " +
                 std::to_string(c.width));
    std::mt19937 rng(c.rows * 31u + c.width);
    const testing::Host16 gu = Random16(c.dtype, size_t(c.rows) * c.stride, 6.f, &rng);
    std::vector<double> want(size_t(c.rows) * c.width);
    for (uint32_t r = 0; r < c.rows; ++r) {
      for (uint32_t i = 0; i < c.width; ++i) {
        const double g = gu.values[r * c.stride + i], u = gu.values[r * c.stride + c.width + i];
        want[size_t(r) * c.width + i] = g / (1.0 + std::exp(-g)) * u;
      }
    }
    auto dgu = ToDevice(gu.bits);
    auto dout = DeviceBuffer::Allocate(want.size() * 2);
    ASSERT_TRUE(dgu.ok() && dout.ok());
    SiluMulArgs a;
    a.dtype = c.dtype;
    a.rows = c.rows;
    a.width = c.width;
    a.gate_up = dgu->get();
    a.row_stride = c.stride;
    a.out = dout->get();
    ASSERT_TRUE(LaunchSiluMul(a, nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    Result<std::vector<double>> got = Download16(c.dtype, dout->get(), want.size());
    ASSERT_TRUE(got.ok());
    const double worst = WorstError(*got, want, 1e-2, c.dtype);
    std::printf("  silu*up %s %ux%u: worst error %.3f of the tolerance\n",
                std::string(DTypeName(c.dtype)).c_str(), c.rows, c.width, worst);
    EXPECT_LE(worst, 1.0);
  }
}

TEST(LayerOpsArgsTest, RejectsBadArgumentsBeforeAnyCudaCall) {
  alignas(8) uint16_t buf[64] = {};
  int64_t pos = 0;
  RmsNormArgs n;
  n.rows = 1;
  n.width = 4;
  n.x = buf;
  n.x_row_stride = 4;
  n.weight = buf;
  n.out = buf + 8;
  auto norm_fails = [&](RmsNormArgs a) { return LaunchRmsNorm(a, nullptr).IsInvalidArgument(); };
  RmsNormArgs b = n;
  b.dtype = DType::kF32;
  EXPECT_TRUE(norm_fails(b));
  b = n;
  b.width = 3;
  EXPECT_TRUE(norm_fails(b));
  b = n;
  b.x_row_stride = 2;
  EXPECT_TRUE(norm_fails(b));
  b = n;
  b.rows = 0;
  EXPECT_TRUE(norm_fails(b));
  b = n;
  b.weight = nullptr;
  EXPECT_TRUE(norm_fails(b));
  b = n;
  b.x = buf + 1;  // 2-byte aligned
  EXPECT_TRUE(norm_fails(b));
  b = n;
  b.eps = 0;
  EXPECT_TRUE(norm_fails(b));

  RopeQkArgs r;
  r.q_heads = 2;
  r.kv_heads = 1;
  r.head_dim = 8;
  r.rows = 1;
  r.qk = buf;
  r.row_stride = 24;
  r.positions = &pos;
  r.q_out = buf + 24;
  r.k_out = buf + 40;
  auto rope_fails = [&](RopeQkArgs a) { return LaunchRopeQk(a, nullptr).IsInvalidArgument(); };
  RopeQkArgs c = r;
  c.head_dim = 6;
  EXPECT_TRUE(rope_fails(c));
  c = r;
  c.row_stride = 16;  // narrower than Q and K
  EXPECT_TRUE(rope_fails(c));
  c = r;
  c.kv_heads = 0;
  EXPECT_TRUE(rope_fails(c));
  c = r;
  c.positions = nullptr;
  EXPECT_TRUE(rope_fails(c));
  c = r;
  c.rope.theta = 1.0;
  EXPECT_TRUE(rope_fails(c));
  c = r;
  c.dtype = DType::kF8E4M3;
  EXPECT_TRUE(rope_fails(c));

  SiluMulArgs s;
  s.rows = 1;
  s.width = 4;
  s.gate_up = buf;
  s.row_stride = 8;
  s.out = buf + 8;
  auto silu_fails = [&](SiluMulArgs a) { return LaunchSiluMul(a, nullptr).IsInvalidArgument(); };
  SiluMulArgs t = s;
  t.row_stride = 6;
  EXPECT_TRUE(silu_fails(t));
  t = s;
  t.width = 5;
  EXPECT_TRUE(silu_fails(t));
  t = s;
  t.out = nullptr;
  EXPECT_TRUE(silu_fails(t));
  t = s;
  t.dtype = DType::kF64;
  EXPECT_TRUE(silu_fails(t));
}

}  // namespace
}  // namespace gpu
}  // namespace shotdb
