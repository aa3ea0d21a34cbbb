// LaunchMergeAttention against a float64 computation of the same merge (context result + masked
// attention over the new tokens), for both dtypes, head dims, GQA ratios, tree-like masks,
// strided K/V views and no context. Kernel cases skip without a GPU; the argument checks run
// everywhere (they fail before any CUDA call).
#include "gpu/merge_attention.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "format/dtype.h"
#include "gpu/cuda_util.h"
#include "gpu/stream.h"
#include "gpu/test_util.h"

namespace shotdb {
namespace gpu {
namespace {

struct MergeCase {
  std::string name;
  DType dtype;
  uint32_t kv_heads, group, head_dim, rows;
  bool context;
};
void PrintTo(const MergeCase& c, std::ostream* os) { *os << c.name; }

// n values of `dtype` (bits) and their exact values.
void RandomIn(DType dtype, size_t n, float range, std::mt19937* rng, std::vector<uint16_t>* bits,
              std::vector<double>* values) {
  std::uniform_real_distribution<float> u(-range, range);
  std::vector<float> f(n);
  for (float& x : f) x = u(*rng);
  bits->resize(n);
  ConvertFromFloat(dtype, f.data(), bits->data(), n);
  ConvertToFloat(dtype, bits->data(), f.data(), n);
  values->assign(f.begin(), f.end());
}

using testing::Download16;
using testing::ToDevice;

class MergeAttentionTest : public ::testing::TestWithParam<MergeCase> {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_P(MergeAttentionTest, MatchesFloat64) {
  const MergeCase& c = GetParam();
  const uint32_t d = c.head_dim, qh = c.kv_heads * c.group, t = c.rows;
  std::mt19937 rng(static_cast<uint32_t>(std::hash<std::string>()(c.name)));
  // q [qh, t, d] contiguous. K and V live inside one [t, qh + 2 kv, d] buffer (QKV-like), so their
  // strides are (d, (qh + 2 kv) d) as views into a projection's output.
  const uint32_t width = qh + 2 * c.kv_heads;
  std::vector<uint16_t> qbits, qkv_bits;
  std::vector<double> q, qkv;
  RandomIn(c.dtype, size_t(qh) * t * d, 2.f, &rng, &qbits, &q);
  RandomIn(c.dtype, size_t(t) * width * d, 1.f, &rng, &qkv_bits, &qkv);
  auto kval = [&](uint32_t h, uint32_t j, uint32_t i) {
    return qkv[(size_t(j) * width + qh + h) * d + i];
  };
  auto vval = [&](uint32_t h, uint32_t j, uint32_t i) {
    return qkv[(size_t(j) * width + qh + c.kv_heads + h) * d + i];
  };
  // Mask: a causal prompt of half the rows, then branches of 2 that see the prompt, plus a few
  // random extra columns; every row sees itself.
  std::vector<uint8_t> mask(size_t(t) * t, 0);
  const uint32_t p = (t + 1) / 2;
  std::bernoulli_distribution extra(0.1);
  for (uint32_t r = 0; r < t; ++r) {
    for (uint32_t j = 0; j < t; ++j) {
      const bool prompt = j <= r && j < p;
      const bool branch = r >= p && j >= p && (j - p) / 2 == (r - p) / 2 && j <= r;
      mask[size_t(r) * t + j] = prompt || branch || extra(rng);
    }
  }
  std::vector<float> ctx_out(size_t(qh) * t * d), ctx_lse(size_t(qh) * t);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (float& x : ctx_out) x = u(rng);
  for (float& x : ctx_lse) x = 2.f + 3.f * u(rng);

  // Float64: softmax over {context as one entry of logit lse with value out_ctx} + allowed keys.
  const double scale = 1.0 / std::sqrt(double(d));
  std::vector<double> want(size_t(t) * qh * d);
  for (uint32_t r = 0; r < t; ++r) {
    for (uint32_t h = 0; h < qh; ++h) {
      const uint32_t kvh = h / c.group;
      std::vector<double> logits, weights;
      std::vector<uint32_t> cols;
      double m = c.context ? ctx_lse[size_t(h) * t + r] : -INFINITY;
      for (uint32_t j = 0; j < t; ++j) {
        if (!mask[size_t(r) * t + j]) continue;
        double s = 0;
        for (uint32_t i = 0; i < d; ++i) s += q[(size_t(h) * t + r) * d + i] * kval(kvh, j, i);
        logits.push_back(s * scale);
        cols.push_back(j);
        m = std::max(m, s * scale);
      }
      double sum = c.context ? std::exp(ctx_lse[size_t(h) * t + r] - m) : 0;
      const double wctx = sum;
      for (double s : logits) sum += std::exp(s - m);
      for (uint32_t i = 0; i < d; ++i) {
        double acc = c.context ? wctx * ctx_out[(size_t(h) * t + r) * d + i] : 0;
        for (size_t n = 0; n < cols.size(); ++n)
          acc += std::exp(logits[n] - m) * vval(kvh, cols[n], i);
        want[(size_t(r) * qh + h) * d + i] = acc / sum;
      }
    }
  }

  auto dq = ToDevice(qbits), dqkv = ToDevice(qkv_bits), dmask = ToDevice(mask);
  auto dctx = ToDevice(ctx_out), dlse = ToDevice(ctx_lse);
  auto dout = DeviceBuffer::Allocate(want.size() * 2);
  ASSERT_TRUE(dq.ok() && dqkv.ok() && dmask.ok() && dctx.ok() && dlse.ok() && dout.ok());
  MergeAttentionArgs a;
  a.dtype = c.dtype;
  a.q_heads = qh;
  a.kv_heads = c.kv_heads;
  a.head_dim = d;
  a.rows = t;
  a.q = dq->get();
  a.q_head_stride = int64_t(t) * d;
  a.q_row_stride = d;
  a.k = dqkv->as<uint16_t>() + size_t(qh) * d;
  a.k_head_stride = d;
  a.k_row_stride = int64_t(width) * d;
  a.v = dqkv->as<uint16_t>() + size_t(qh + c.kv_heads) * d;
  a.v_head_stride = d;
  a.v_row_stride = int64_t(width) * d;
  a.mask = dmask->as<uint8_t>();
  if (c.context) {
    a.ctx_out = dctx->as<float>();
    a.ctx_lse = dlse->as<float>();
  }
  a.out = dout->get();
  ASSERT_TRUE(LaunchMergeAttention(a, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  Result<std::vector<double>> fetched = Download16(c.dtype, dout->get(), want.size());
  ASSERT_TRUE(fetched.ok()) << fetched.status().ToString();
  const std::vector<double>& got = *fetched;
  // The output is rounded to the dtype once; float32 arithmetic adds far less.
  const double tol = (c.dtype == DType::kBF16 ? 1.0 / 128 : 1.0 / 1024);
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::abs(got[i] - want[i]) / (std::abs(want[i]) + 0.05);
    worst = std::max(worst, err / tol);
  }
  std::printf("  merge vs float64: worst error %.3f of the tolerance\n", worst);
  EXPECT_LE(worst, 1.0);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, MergeAttentionTest,
    ::testing::Values(MergeCase{"bf16_g4_d128_r17_ctx", DType::kBF16, 8, 4, 128, 17, true},
                      MergeCase{"f16_g1_d64_r5_ctx", DType::kF16, 3, 1, 64, 5, true},
                      MergeCase{"bf16_g8_d64_r1_ctx", DType::kBF16, 2, 8, 64, 1, true},
                      MergeCase{"f16_g2_d128_r40_noctx", DType::kF16, 4, 2, 128, 40, false},
                      MergeCase{"bf16_g4_d128_r300_ctx", DType::kBF16, 8, 4, 128, 300, true}),
    [](const ::testing::TestParamInfo<MergeCase>& i) { return i.param.name; });

TEST(MergeAttentionArgsTest, RejectsBadArgumentsBeforeAnyCudaCall) {
  uint16_t x = 0;
  uint8_t m = 1;
  float f = 0;
  MergeAttentionArgs good;
  good.q_heads = 4;
  good.kv_heads = 2;
  good.head_dim = 128;
  good.rows = 1;
  good.q = good.k = good.v = good.out = &x;
  good.mask = &m;
  auto bad = [&](auto change) {
    MergeAttentionArgs a = good;
    change(&a);
    return LaunchMergeAttention(a, nullptr).IsInvalidArgument();
  };
  EXPECT_TRUE(bad([](MergeAttentionArgs* a) { a->dtype = DType::kF32; }));
  EXPECT_TRUE(bad([](MergeAttentionArgs* a) { a->head_dim = 96; }));
  EXPECT_TRUE(bad([](MergeAttentionArgs* a) { a->q_heads = 3; }));
  EXPECT_TRUE(bad([](MergeAttentionArgs* a) { a->kv_heads = 0; }));
  EXPECT_TRUE(bad([](MergeAttentionArgs* a) { a->rows = 0; }));
  EXPECT_TRUE(bad([](MergeAttentionArgs* a) { a->mask = nullptr; }));
  EXPECT_TRUE(bad([](MergeAttentionArgs* a) { a->k = nullptr; }));
  EXPECT_TRUE(bad([&](MergeAttentionArgs* a) { a->ctx_out = &f; }));  // without ctx_lse
}

}  // namespace
}  // namespace gpu
}  // namespace shotdb
