// The float64 reference checked against independent facts: hand-computed values from the
// formulas' definitions, rotation invariants, and limiting cases of attention.
#include "gpu/rope_reference.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "gpu/rope.h"

namespace shotdb {
namespace gpu {
namespace {

TEST(RopeInvFreqTest, PlainFrequenciesByHand) {
  RopeParams p;
  p.theta = 10000;
  auto inv = RopeInvFreq(p, 4);
  ASSERT_TRUE(inv.ok());
  ASSERT_EQ(inv->size(), 2u);
  EXPECT_DOUBLE_EQ((*inv)[0], 1.0);
  EXPECT_DOUBLE_EQ((*inv)[1], 0.01);  // 10000^(-2/4)
  EXPECT_TRUE(RopeInvFreq(p, 3).status().IsInvalidArgument());
  EXPECT_TRUE(RopeInvFreq(p, 0).status().IsInvalidArgument());
  p.theta = 1;
  EXPECT_TRUE(RopeInvFreq(p, 4).status().IsInvalidArgument());
}

TEST(RopeInvFreqTest, Llama3ScalingBands) {
  RopeParams plain;  // Llama-3.1-8B: theta 500000, head_dim 128
  RopeParams scaled = plain;
  scaled.llama3_scaling = true;
  auto a = RopeInvFreq(plain, 128), b = RopeInvFreq(scaled, 128);
  ASSERT_TRUE(a.ok() && b.ok());
  const double kPi = 3.14159265358979323846;
  int high = 0, low = 0, medium = 0;
  for (size_t i = 0; i < a->size(); ++i) {
    const double wavelen = 2 * kPi / (*a)[i];
    if (wavelen < 8192.0 / 4) {
      EXPECT_EQ((*b)[i], (*a)[i]) << i;
      ++high;
    } else if (wavelen > 8192.0) {
      EXPECT_DOUBLE_EQ((*b)[i], (*a)[i] / 8) << i;
      ++low;
    } else {
      EXPECT_GT((*b)[i], (*a)[i] / 8) << i;
      EXPECT_LT((*b)[i], (*a)[i]) << i;
      ++medium;
    }
    if (i > 0) {
      EXPECT_LT((*b)[i], (*b)[i - 1]) << "scaled frequencies must still decrease";
    }
  }
  EXPECT_GT(high, 0);
  EXPECT_GT(low, 0);
  EXPECT_GT(medium, 0);
  // One medium element by hand: i = 30 of 64, f = 500000^(-60/128).
  const double f = std::pow(500000.0, -60.0 / 128);
  const double wavelen = 2 * kPi / f;
  ASSERT_GT(wavelen, 2048.0);
  ASSERT_LT(wavelen, 8192.0);
  const double s = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
  EXPECT_NEAR((*b)[30], (1 - s) * f / 8 + s * f, 1e-15);
}

TEST(RotateHalfReferenceTest, TwoDimsByHand) {
  const std::vector<double> inv = {0.5};
  const double x[2] = {3.0, -2.0};
  double out[2];
  RotateHalfReference(x, out, 3, inv);  // angle 1.5
  EXPECT_NEAR(out[0], 3.0 * std::cos(1.5) + 2.0 * std::sin(1.5), 1e-15);
  EXPECT_NEAR(out[1], -2.0 * std::cos(1.5) + 3.0 * std::sin(1.5), 1e-15);
}

TEST(RotateHalfReferenceTest, PositionZeroIsIdentityAndPairNormsArePreserved) {
  RopeParams p;
  p.llama3_scaling = true;
  auto inv = RopeInvFreq(p, 16);
  ASSERT_TRUE(inv.ok());
  std::mt19937 rng(1);
  std::normal_distribution<double> n;
  std::vector<double> x(16), y(16), z(16);
  for (double& v : x) v = n(rng);
  RotateHalfReference(x.data(), y.data(), 0, *inv);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(y[i], x[i]);
  RotateHalfReference(x.data(), y.data(), 12345, *inv);
  for (int i = 0; i < 8; ++i) {
    EXPECT_NEAR(std::hypot(y[i], y[i + 8]), std::hypot(x[i], x[i + 8]), 1e-12) << i;
  }
  // Rotations compose: pos 5 then 7 equals pos 12; and q.k depends only on the distance.
  RotateHalfReference(x.data(), y.data(), 5, *inv);
  RotateHalfReference(y.data(), y.data(), 7, *inv);
  RotateHalfReference(x.data(), z.data(), 12, *inv);
  for (int i = 0; i < 16; ++i) EXPECT_NEAR(y[i], z[i], 1e-12);
}

TEST(GatherRopeReferenceTest, LayoutAndPositions) {
  const std::vector<double> inv = {0.25, 0.125};
  ReferenceBlock a, b;
  a.tokens = 1;
  b.tokens = 2;
  // kv_heads 2, head_dim 4; element value encodes (block, head, token, dim).
  for (int h = 0; h < 2; ++h) {
    for (int d = 0; d < 4; ++d) {
      a.k.push_back(100 + h * 10 + d);
      a.v.push_back(-(100 + h * 10 + d));
    }
  }
  for (int h = 0; h < 2; ++h) {
    for (int t = 0; t < 2; ++t) {
      for (int d = 0; d < 4; ++d) {
        b.k.push_back(200 + h * 10 + t * 5 + d);
        b.v.push_back(-(200 + h * 10 + t * 5 + d));
      }
    }
  }
  std::vector<double> k, v;
  GatherRopeReference({a, b}, 2, 4, inv, 10, &k, &v);
  ASSERT_EQ(k.size(), 2u * 3 * 4);
  // Head 1, concatenated token 2 = block b token 1, at position 12.
  const double* src = &b.k[(1 * 2 + 1) * 4];
  double expect[4];
  RotateHalfReference(src, expect, 12, inv);
  for (int d = 0; d < 4; ++d) {
    EXPECT_DOUBLE_EQ(k[(1 * 3 + 2) * 4 + d], expect[d]);
    EXPECT_DOUBLE_EQ(v[(1 * 3 + 2) * 4 + d], b.v[(1 * 2 + 1) * 4 + d]);
  }
  // Head 0, token 0 = block a at position 10.
  RotateHalfReference(&a.k[0], expect, 10, inv);
  for (int d = 0; d < 4; ++d) EXPECT_DOUBLE_EQ(k[d], expect[d]);
}

TEST(PagedAttentionReferenceTest, LimitingCases) {
  // 4 query heads on 2 kv heads, 1 row, 3 tokens, head_dim 2.
  const std::vector<double> k = {1, 0, 0, 1, 1, 1, /* head 1 */ 2, 0, 0, 2, 0, 0};
  const std::vector<double> v = {1, 2, 3, 4, 5, 6, /* head 1 */ 7, 8, 9, 10, 11, 12};
  std::vector<double> q(8, 0.0), out, lse;
  // q = 0: uniform weights, the mean of V of the head's kv head; lse = log(3).
  PagedAttentionReference(q, k, v, 4, 2, 1, 3, 2, &out, &lse);
  ASSERT_EQ(out.size(), 8u);
  ASSERT_EQ(lse.size(), 4u);
  EXPECT_NEAR(out[0], 3.0, 1e-12);
  EXPECT_NEAR(out[1], 4.0, 1e-12);
  EXPECT_NEAR(out[4], 9.0, 1e-12);  // head 2 uses kv head 1
  EXPECT_NEAR(out[7], 10.0, 1e-12);
  for (double x : lse) EXPECT_NEAR(x, std::log(3.0), 1e-12);
  // Query head 1 = (s, 0): weights exp(s/sqrt2 * [1, 0, 1]) by hand.
  q[2] = 3.0;
  PagedAttentionReference(q, k, v, 4, 2, 1, 3, 2, &out, &lse);
  const double e = std::exp(3.0 / std::sqrt(2.0));
  EXPECT_NEAR(out[2], (e * 1 + 1 * 3 + e * 5) / (2 * e + 1), 1e-12);
  EXPECT_NEAR(out[3], (e * 2 + 1 * 4 + e * 6) / (2 * e + 1), 1e-12);
  EXPECT_NEAR(lse[1], std::log(2 * e + 1), 1e-12);
}

TEST(PagedAttentionReferenceTest, OneTokenGivesItsValueAndScore) {
  // 2 query heads on 1 kv head, 2 rows, head_dim 4, one token: out = v, lse = q.k / 2.
  const std::vector<double> k = {0.5, -1, 2, 0.25};
  const std::vector<double> v = {3, -4, 5, -6};
  const std::vector<double> q = {1,
                                 2,
                                 3,
                                 4,
                                 /* row 1 */ -1,
                                 0,
                                 1,
                                 0,
                                 /* head 1 */ 0,
                                 0,
                                 0,
                                 0,
                                 /* row 1 */ 2,
                                 2,
                                 2,
                                 2};
  std::vector<double> out, lse;
  PagedAttentionReference(q, k, v, 2, 1, 2, 1, 4, &out, &lse);
  for (int qv = 0; qv < 4; ++qv) {
    double dot = 0;
    for (int i = 0; i < 4; ++i) {
      EXPECT_NEAR(out[qv * 4 + i], v[i], 1e-12) << qv;
      dot += q[qv * 4 + i] * k[i];
    }
    EXPECT_NEAR(lse[qv], dot / 2, 1e-12) << qv;
  }
}

TEST(PagedAttentionReferenceTest, EqualKeysAverageValues) {
  // n equal keys: uniform weights whatever q is; lse = score + log(n).
  const uint32_t n = 7, d = 4;
  const std::vector<double> key = {0.3, -0.2, 0.9, 1.5};
  std::vector<double> k, v;
  std::vector<double> mean(d, 0.0);
  for (uint32_t t = 0; t < n; ++t) {
    k.insert(k.end(), key.begin(), key.end());
    for (uint32_t i = 0; i < d; ++i) {
      v.push_back(t * 1.5 - i);
      mean[i] += (t * 1.5 - i) / n;
    }
  }
  const std::vector<double> q = {2, -1, 0.5, 3, /* row 1 */ -4, 0, 1, 1};
  std::vector<double> out, lse;
  PagedAttentionReference(q, k, v, 1, 1, 2, n, d, &out, &lse);
  for (int r = 0; r < 2; ++r) {
    double dot = 0;
    for (uint32_t i = 0; i < d; ++i) {
      EXPECT_NEAR(out[r * d + i], mean[i], 1e-12);
      dot += q[r * d + i] * key[i];
    }
    EXPECT_NEAR(lse[r], dot / 2 + std::log(double(n)), 1e-12);
  }
}

TEST(PagedAttentionReferenceTest, RowsAreIndependentAndMergeByLse) {
  // Random shapes: each (head, row) equals a one-row call with that query alone, and attention
  // over the two halves of the context merged through lse equals attention over the whole (the
  // merge a caller does with the kernel's result).
  const uint32_t q_heads = 4, kv_heads = 2, rows = 3, d = 8, n1 = 5, n2 = 9, n = n1 + n2;
  std::mt19937 rng(3);
  std::normal_distribution<double> nd;
  std::vector<double> q(q_heads * rows * d), k(kv_heads * n * d), v(k.size());
  for (double& x : q) x = nd(rng);
  for (double& x : k) x = nd(rng);
  for (double& x : v) x = nd(rng);
  std::vector<double> out, lse;
  PagedAttentionReference(q, k, v, q_heads, kv_heads, rows, n, d, &out, &lse);
  // Halves: tokens [0, n1) and [n1, n) of every kv head.
  std::vector<double> k1, v1, k2, v2;
  for (uint32_t h = 0; h < kv_heads; ++h) {
    const size_t base = size_t(h) * n * d;
    k1.insert(k1.end(), k.begin() + base, k.begin() + base + n1 * d);
    v1.insert(v1.end(), v.begin() + base, v.begin() + base + n1 * d);
    k2.insert(k2.end(), k.begin() + base + n1 * d, k.begin() + base + n * d);
    v2.insert(v2.end(), v.begin() + base + n1 * d, v.begin() + base + n * d);
  }
  std::vector<double> o1, l1, o2, l2;
  PagedAttentionReference(q, k1, v1, q_heads, kv_heads, rows, n1, d, &o1, &l1);
  PagedAttentionReference(q, k2, v2, q_heads, kv_heads, rows, n2, d, &o2, &l2);
  for (uint32_t h = 0; h < q_heads; ++h) {
    for (uint32_t r = 0; r < rows; ++r) {
      const size_t qv = size_t(h) * rows + r;
      std::vector<double> one_q(q.begin() + qv * d, q.begin() + (qv + 1) * d);
      std::vector<double> one_k(k.begin() + (h / 2) * n * d, k.begin() + (h / 2 + 1) * n * d);
      std::vector<double> one_v(v.begin() + (h / 2) * n * d, v.begin() + (h / 2 + 1) * n * d);
      std::vector<double> one_out, one_lse;
      PagedAttentionReference(one_q, one_k, one_v, 1, 1, 1, n, d, &one_out, &one_lse);
      EXPECT_NEAR(lse[qv], one_lse[0], 1e-12);
      const double lse_merged = std::log(std::exp(l1[qv]) + std::exp(l2[qv]));
      EXPECT_NEAR(lse[qv], lse_merged, 1e-12);
      for (uint32_t i = 0; i < d; ++i) {
        EXPECT_NEAR(out[qv * d + i], one_out[i], 1e-12);
        const double merged = std::exp(l1[qv] - lse_merged) * o1[qv * d + i] +
                              std::exp(l2[qv] - lse_merged) * o2[qv * d + i];
        EXPECT_NEAR(out[qv * d + i], merged, 1e-12);
      }
    }
  }
}

}  // namespace
}  // namespace gpu
}  // namespace shotdb
