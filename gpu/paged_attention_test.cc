// LaunchPagedAttention against the float64 reference (rope_reference.h) over many shapes, in bf16
// and f16. The kernel cases need a GPU and skip without one; the argument checks run everywhere
// (they fail before any CUDA call).
#include "gpu/paged_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gpu/cuda_util.h"
#include "gpu/rope_gather.h"
#include "gpu/rope_reference.h"
#include "gpu/stream.h"
#include "gpu/test_util.h"

namespace shotdb {
namespace gpu {
namespace {

using testing::FromDevice;
using testing::Host16;
using testing::Random16;
using testing::Roundoff;
using testing::ToDevice;

struct Case {
  std::string name;
  DType dtype;
  uint32_t kv_heads, group, head_dim, rows;
  std::vector<uint32_t> blocks;  // tokens per block, in concatenation order
  bool rotate;
  bool llama3;
  int64_t first_position;
};
// GoogleTest prints parameters with this instead of dumping the struct's bytes.
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

std::vector<uint32_t> Repeat(uint32_t tokens, uint32_t n, std::vector<uint32_t> tail = {}) {
  std::vector<uint32_t> b(n, tokens);
  b.insert(b.end(), tail.begin(), tail.end());
  return b;
}

// Rounds float64 values to the dtype (through float32), in place.
void RoundTo(DType dtype, std::vector<double>* x) {
  constexpr size_t kChunk = 1 << 20;
  std::vector<float> f(kChunk);
  std::vector<uint16_t> bits(kChunk);
  for (size_t i = 0; i < x->size(); i += kChunk) {
    const size_t n = std::min(kChunk, x->size() - i);
    for (size_t j = 0; j < n; ++j) f[j] = static_cast<float>((*x)[i + j]);
    ConvertFromFloat(dtype, f.data(), bits.data(), n);
    ConvertToFloat(dtype, bits.data(), f.data(), n);
    for (size_t j = 0; j < n; ++j) (*x)[i + j] = f[j];
  }
}

// The pages of all blocks in one device arena, each tensor at an offset that is 16-byte but not
// 32-byte aligned (the kernel promises to need no more than 16).
struct DevicePages {
  DeviceBuffer arena;
  std::vector<KvBlockRef> refs;
};
Result<DevicePages> UploadPages(const std::vector<Host16>& k, const std::vector<Host16>& v,
                                const std::vector<uint32_t>& tokens) {
  auto slot = [](size_t bytes) { return (bytes + 255) / 256 * 256 + 256; };
  size_t total = 0;
  for (size_t b = 0; b < tokens.size(); ++b) total += slot(k[b].bits.size() * 2) * 2;
  DevicePages p;
  SHOTDB_ASSIGN_OR_RETURN(p.arena, DeviceBuffer::Allocate(total));
  uint8_t* base = p.arena.as<uint8_t>();
  size_t off = 0;
  for (size_t b = 0; b < tokens.size(); ++b) {
    const size_t bytes = k[b].bits.size() * 2;
    uint8_t* dk = base + off + 16;
    off += slot(bytes);
    uint8_t* dv = base + off + 16;
    off += slot(bytes);
    SHOTDB_CUDA_RETURN_IF_ERROR(cudaMemcpy(dk, k[b].bits.data(), bytes, cudaMemcpyHostToDevice));
    SHOTDB_CUDA_RETURN_IF_ERROR(cudaMemcpy(dv, v[b].bits.data(), bytes, cudaMemcpyHostToDevice));
    p.refs.push_back(KvBlockRef{dk, dv, tokens[b]});
  }
  return p;
}

// Compares out and lse with the reference: out within 2 roundoffs of the dtype relative to the
// largest |value| of its row (P is rounded to the dtype before multiplying V), lse within 1e-3.
void ExpectClose(const Case& c, const std::vector<float>& out, const std::vector<float>& lse,
                 const std::vector<double>& want_out, const std::vector<double>& want_lse,
                 const std::string& what) {
  const uint32_t d = c.head_dim;
  const double rel = 2 * Roundoff(c.dtype);
  double worst_out = 0, worst_lse = 0;  // as fractions of the tolerance
  for (size_t qv = 0; qv < want_lse.size(); ++qv) {
    double scale = 0;
    for (uint32_t i = 0; i < d; ++i) scale = std::max(scale, std::fabs(want_out[qv * d + i]));
    const double tol = rel * scale + 1e-6;
    for (uint32_t i = 0; i < d; ++i) {
      const double err = std::fabs(out[qv * d + i] - want_out[qv * d + i]);
      worst_out = std::max(worst_out, err / tol);
      ASSERT_LE(err, tol) << what << ": out of query vector " << qv << " (head " << qv / c.rows
                          << ", row " << qv % c.rows << "), element " << i << ": got "
                          << out[qv * d + i] << ", want " << want_out[qv * d + i] << ", row scale "
                          << scale;
    }
    const double err = std::fabs(lse[qv] - want_lse[qv]);
    worst_lse = std::max(worst_lse, err / 1e-3);
    ASSERT_LE(err, 1e-3) << what << ": lse of query vector " << qv << ": got " << lse[qv]
                         << ", want " << want_lse[qv];
  }
  std::printf("  %s: worst out error %.3f, worst lse error %.3f of the tolerance\n", what.c_str(),
              worst_out, worst_lse);
}

// Parameterised kernel tests: skipped without a GPU.
template <typename P>
class GpuParamTest : public ::testing::TestWithParam<P> {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};
using PagedAttentionTest = GpuParamTest<Case>;

TEST_P(PagedAttentionTest, MatchesReference) {
  const Case& c = GetParam();
  const uint32_t d = c.head_dim, q_heads = c.kv_heads * c.group;
  std::mt19937 rng(static_cast<uint32_t>(std::hash<std::string>()(c.name)));
  RopeParams rope;
  rope.llama3_scaling = c.llama3;
  auto inv = RopeInvFreq(rope, d);
  ASSERT_TRUE(inv.ok());

  std::vector<Host16> hk, hv;
  std::vector<ReferenceBlock> ref_blocks;
  uint32_t total = 0;
  for (uint32_t t : c.blocks) {
    hk.push_back(Random16(c.dtype, size_t(c.kv_heads) * t * d, 1.f, &rng));
    hv.push_back(Random16(c.dtype, size_t(c.kv_heads) * t * d, 1.f, &rng));
    ref_blocks.push_back(ReferenceBlock{hk.back().values, hv.back().values, t});
    hk.back().values.clear();
    hv.back().values.clear();
    total += t;
  }
  auto pages = UploadPages(hk, hv, c.blocks);
  ASSERT_TRUE(pages.ok()) << pages.status().ToString();
  hk.clear();
  hv.clear();
  // Queries in [-2, 2]: scores with a standard deviation of ~0.7, a softmax far from uniform.
  Host16 q = Random16(c.dtype, size_t(q_heads) * c.rows * d, 2.f, &rng);
  auto dq = ToDevice(q.bits);
  ASSERT_TRUE(dq.ok());

  // The reference's K: concatenated, rotated in float64 (zero frequencies: not rotated), then
  // rounded to the dtype as the kernel does before its tensor-core products.
  std::vector<double> k_ref, v_ref;
  const std::vector<double> no_rotation(d / 2, 0.0);
  GatherRopeReference(ref_blocks, c.kv_heads, d, c.rotate ? *inv : no_rotation, c.first_position,
                      &k_ref, &v_ref);
  ref_blocks.clear();
  if (c.rotate) RoundTo(c.dtype, &k_ref);
  std::vector<double> want_out, want_lse;
  PagedAttentionReference(q.values, k_ref, v_ref, q_heads, c.kv_heads, c.rows, total, d, &want_out,
                          &want_lse);

  const size_t qvecs = size_t(q_heads) * c.rows;
  auto out = DeviceBuffer::Allocate(qvecs * d * 4), lse = DeviceBuffer::Allocate(qvecs * 4);
  const size_t ws_bytes = PagedAttentionWorkspaceBytes(q_heads, c.kv_heads, c.rows, d, total);
  auto ws = DeviceBuffer::Allocate(ws_bytes);
  ASSERT_TRUE(out.ok() && lse.ok() && ws.ok());
  ASSERT_EQ(cudaMemset(out->get(), 0xff, qvecs * d * 4), cudaSuccess);  // NaN if never written
  ASSERT_EQ(cudaMemset(lse->get(), 0xff, qvecs * 4), cudaSuccess);
  PagedAttentionArgs a;
  a.dtype = c.dtype;
  a.q_heads = q_heads;
  a.kv_heads = c.kv_heads;
  a.head_dim = d;
  a.rows = c.rows;
  a.q = dq->get();
  a.blocks = pages->refs;
  a.rotate_keys = c.rotate;
  a.rope = rope;
  a.first_position = c.first_position;
  a.out = out->as<float>();
  a.lse = lse->as<float>();
  a.workspace = ws->get();
  a.workspace_bytes = ws_bytes;
  std::printf("  %u tokens in %zu blocks, %zu query vectors, workspace %zu bytes\n", total,
              c.blocks.size(), qvecs, ws_bytes);
  Status st = LaunchPagedAttention(a, nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  Result<std::vector<float>> got_out = FromDevice<float>(out->get(), qvecs * d);
  Result<std::vector<float>> got_lse = FromDevice<float>(lse->get(), qvecs);
  ASSERT_TRUE(got_out.ok() && got_lse.ok());
  ASSERT_NO_FATAL_FAILURE(
      ExpectClose(c, *got_out, *got_lse, want_out, want_lse, "kernel vs float64"));

  // Again without lse: bit-identical out (no atomics, no order dependence).
  ASSERT_EQ(cudaMemset(out->get(), 0xff, qvecs * d * 4), cudaSuccess);
  a.lse = nullptr;
  st = LaunchPagedAttention(a, nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  Result<std::vector<float>> again = FromDevice<float>(out->get(), qvecs * d);
  ASSERT_TRUE(again.ok());
  ASSERT_EQ(std::memcmp(again->data(), got_out->data(), again->size() * 4), 0)
      << "a second launch gave different bits";
}

// Query vectors per kv head M = group * rows picks the CTA shape (4 warps: M <= 16, 32, 64; 8
// warps: M <= 80 in the mixed layout, more in tiles of 128); the context length and M pick the
// splits (one split writes out directly, several go through the merge kernel).
INSTANTIATE_TEST_SUITE_P(
    Shapes, PagedAttentionTest,
    ::testing::Values(
        Case{"bf16_g4_d128_r1_mixed_blocks",
             DType::kBF16,
             2,
             4,
             128,
             1,
             {5, 130, 1, 64, 77},
             true,
             true,
             0},
        Case{"f16_g1_d64_r3_one_token_blocks", DType::kF16, 3, 1, 64, 3,
             Repeat(1, 17, {63, 1, 1, 1, 1, 1, 2, 129}), true, false, 7},
        Case{"bf16_g8_d128_r16_pos100k",
             DType::kBF16,
             1,
             8,
             128,
             16,
             {1000, 24, 1, 300},
             true,
             true,
             100000},
        Case{"bf16_g2_d64_r33_unrotated", DType::kBF16, 2, 2, 64, 33, {200, 313}, false, false, 0},
        Case{"f16_g4_d128_r130", DType::kF16, 2, 4, 128, 130, {700, 300, 1500}, true, true, 12345},
        Case{"bf16_g1_d128_r1_one_token", DType::kBF16, 1, 1, 128, 1, {1}, true, true, 5},
        Case{"f16_g2_d128_r1_one_tile", DType::kF16, 1, 2, 128, 1, {64}, true, false, 0},
        Case{"bf16_g8_d64_r3_m24",
             DType::kBF16,
             2,
             8,
             64,
             3,
             {63, 65, 1, 2, 130, 700},
             true,
             true,
             1},
        Case{"f16_g2_d128_r16_m32_unrotated",
             DType::kF16,
             4,
             2,
             128,
             16,
             {1500, 1500, 1},
             false,
             false,
             0},
        Case{"bf16_g1_d64_r130_splits", DType::kBF16, 2, 1, 64, 130, {3000, 2001}, true, false, 0},
        Case{"bf16_g4_d128_r32_llama8b_shape",
             DType::kBF16,
             8,
             4,
             128,
             32,
             {1000, 1000, 1000, 1096},
             true,
             true,
             0},
        Case{"f16_g4_d64_r2_28k", DType::kF16, 2, 4, 64, 2, Repeat(997, 29), true, false, 0},
        // DBSA prompts on the Llama-3.1-8B shape, in 95-token blocks: 16 rows (64 vectors, 4
        // warps along M) and 20 rows (80 vectors: the 8-warp CTA).
        Case{"bf16_g4_d128_r16_m64_dbsa", DType::kBF16, 2, 4, 128, 16, Repeat(95, 40, {17}), true,
             true, 2048},
        Case{"f16_g4_d128_r20_m80_dbsa", DType::kF16, 2, 4, 128, 20, Repeat(95, 30), true, true, 0},
        // The mixed 8-warp CTA (65-80 vectors) with its fifth tile part empty: an 18-row DBSA
        // prompt (72 vectors), and head_dim 64 in one split (the CTA writes out itself).
        Case{"bf16_g4_d128_r18_m72_dbsa", DType::kBF16, 2, 4, 128, 18, Repeat(95, 35, {40}), true,
             true, 512},
        Case{"f16_g1_d64_r70_m70_one_split", DType::kF16, 2, 1, 64, 70, {100, 50}, true, false, 3},
        Case{"f16_g8_d128_r16_40k", DType::kF16, 1, 8, 128, 16, Repeat(4096, 10), true, true,
             65536},
        Case{"bf16_g8_d128_r1_128k_far", DType::kBF16, 1, 8, 128, 1, Repeat(1024, 128), true, true,
             3000000},
        Case{"bf16_g4_d128_r1_128k_unrotated", DType::kBF16, 1, 4, 128, 1, Repeat(1000, 131, {72}),
             false, false, 0}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

// The on-the-fly rotation against LaunchGatherRope's rotated copy read with rotate_keys false:
// the same K up to float rounding in the angles, so nearly the same result.
TEST(PagedAttentionGatherTest, PagesMatchGatheredCopy) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    const uint32_t kv_heads = 2, q_heads = 8, d = 128, rows = 5;
    const std::vector<uint32_t> tokens = {300, 1, 2000, 77, 1500};
    std::mt19937 rng(5);
    std::vector<Host16> hk, hv;
    uint32_t total = 0;
    for (uint32_t t : tokens) {
      hk.push_back(Random16(dtype, size_t(kv_heads) * t * d, 1.f, &rng));
      hv.push_back(Random16(dtype, size_t(kv_heads) * t * d, 1.f, &rng));
      total += t;
    }
    auto pages = UploadPages(hk, hv, tokens);
    ASSERT_TRUE(pages.ok());
    Host16 q = Random16(dtype, size_t(q_heads) * rows * d, 2.f, &rng);
    auto dq = ToDevice(q.bits);
    const size_t n = size_t(kv_heads) * total * d;
    auto k_all = DeviceBuffer::Allocate(n * 2), v_all = DeviceBuffer::Allocate(n * 2);
    ASSERT_TRUE(dq.ok() && k_all.ok() && v_all.ok());
    RopeParams rope;
    rope.llama3_scaling = true;
    GatherRopeArgs g;
    g.dtype = dtype;
    g.kv_heads = kv_heads;
    g.head_dim = d;
    g.blocks = pages->refs;
    g.rope = rope;
    g.first_position = 40000;
    g.k_out = k_all->get();
    g.v_out = v_all->get();
    ASSERT_TRUE(LaunchGatherRope(g, nullptr).ok());

    const size_t qvecs = size_t(q_heads) * rows;
    const size_t ws_bytes = PagedAttentionWorkspaceBytes(q_heads, kv_heads, rows, d, total);
    auto ws = DeviceBuffer::Allocate(ws_bytes);
    auto out1 = DeviceBuffer::Allocate(qvecs * d * 4), out2 = DeviceBuffer::Allocate(qvecs * d * 4);
    auto lse1 = DeviceBuffer::Allocate(qvecs * 4), lse2 = DeviceBuffer::Allocate(qvecs * 4);
    ASSERT_TRUE(ws.ok() && out1.ok() && out2.ok() && lse1.ok() && lse2.ok());
    PagedAttentionArgs a;
    a.dtype = dtype;
    a.q_heads = q_heads;
    a.kv_heads = kv_heads;
    a.head_dim = d;
    a.rows = rows;
    a.q = dq->get();
    a.rope = rope;
    a.first_position = g.first_position;
    a.workspace = ws->get();
    a.workspace_bytes = ws_bytes;
    a.blocks = pages->refs;
    a.rotate_keys = true;
    a.out = out1->as<float>();
    a.lse = lse1->as<float>();
    ASSERT_TRUE(LaunchPagedAttention(a, nullptr).ok());
    a.blocks = {KvBlockRef{k_all->get(), v_all->get(), total}};
    a.rotate_keys = false;
    a.out = out2->as<float>();
    a.lse = lse2->as<float>();
    ASSERT_TRUE(LaunchPagedAttention(a, nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    Result<std::vector<float>> r_o1 = FromDevice<float>(out1->get(), qvecs * d),
                               r_o2 = FromDevice<float>(out2->get(), qvecs * d),
                               r_l1 = FromDevice<float>(lse1->get(), qvecs),
                               r_l2 = FromDevice<float>(lse2->get(), qvecs);
    ASSERT_TRUE(r_o1.ok() && r_o2.ok() && r_l1.ok() && r_l2.ok());
    const std::vector<float>&o1 = *r_o1, &o2 = *r_o2, &l1 = *r_l1, &l2 = *r_l2;
    for (size_t qv = 0; qv < qvecs; ++qv) {
      float scale = 0;
      for (uint32_t i = 0; i < d; ++i) scale = std::max(scale, std::fabs(o2[qv * d + i]));
      for (uint32_t i = 0; i < d; ++i) {
        ASSERT_NEAR(o1[qv * d + i], o2[qv * d + i], Roundoff(dtype) * scale + 1e-6)
            << DTypeName(dtype) << " query vector " << qv << " element " << i;
      }
      ASSERT_NEAR(l1[qv], l2[qv], 5e-4) << DTypeName(dtype) << " query vector " << qv;
    }
  }
}

// ---- LaunchPagedAttentionBatch: several queries over the union of their blocks ----

struct BatchQuery {
  uint32_t rows;
  std::vector<uint32_t> blocks;  // union indices, in the query's concatenation order
  int64_t first_position;
};
struct BatchCase {
  std::string name;
  DType dtype;
  uint32_t kv_heads, group, head_dim;
  std::vector<uint32_t> union_tokens;
  std::vector<BatchQuery> queries;
  uint32_t splits;  // 0: the layout picks
  bool llama3;
};
void PrintTo(const BatchCase& c, std::ostream* os) { *os << c.name; }

// `n` queries over a union of `blocks` blocks, each selecting `per` distinct blocks in a random
// order, with rows from `rows` in turn.
std::vector<BatchQuery> RandomQueries(uint32_t n, uint32_t blocks, uint32_t per,
                                      std::vector<uint32_t> rows, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<BatchQuery> out;
  for (uint32_t i = 0; i < n; ++i) {
    std::vector<uint32_t> all(blocks);
    for (uint32_t b = 0; b < blocks; ++b) all[b] = b;
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(per);
    out.push_back(BatchQuery{rows[i % rows.size()], all, 0});
  }
  return out;
}

using PagedAttentionBatchTest = GpuParamTest<BatchCase>;

// Each query's rows of one batched launch against the float64 reference over that query's own
// blocks, concatenated in its order at its positions.
TEST_P(PagedAttentionBatchTest, EveryQueryMatchesItsReference) {
  const BatchCase& c = GetParam();
  const uint32_t d = c.head_dim, q_heads = c.kv_heads * c.group;
  std::mt19937 rng(static_cast<uint32_t>(std::hash<std::string>()(c.name)));
  RopeParams rope;
  rope.llama3_scaling = c.llama3;
  auto inv = RopeInvFreq(rope, d);
  ASSERT_TRUE(inv.ok());

  std::vector<Host16> hk, hv;
  for (uint32_t t : c.union_tokens) {
    hk.push_back(Random16(c.dtype, size_t(c.kv_heads) * t * d, 1.f, &rng));
    hv.push_back(Random16(c.dtype, size_t(c.kv_heads) * t * d, 1.f, &rng));
  }
  auto pages = UploadPages(hk, hv, c.union_tokens);
  ASSERT_TRUE(pages.ok()) << pages.status().ToString();

  std::vector<PagedBatchQuery> queries;
  uint32_t rows = 0;
  for (const BatchQuery& bq : c.queries) {
    queries.push_back(PagedBatchQuery{bq.rows, bq.blocks, bq.first_position});
    rows += bq.rows;
  }
  Result<PagedBatchLayout> layout =
      MakePagedBatchLayout(q_heads, c.kv_heads, d, c.union_tokens, queries, c.splits);
  ASSERT_TRUE(layout.ok()) << layout.status().ToString();
  auto words = ToDevice(layout->words);
  ASSERT_TRUE(words.ok());
  Host16 q = Random16(c.dtype, size_t(q_heads) * rows * d, 2.f, &rng);
  auto dq = ToDevice(q.bits);
  const size_t qvecs = size_t(q_heads) * rows;
  auto out = DeviceBuffer::Allocate(qvecs * d * 4), lse = DeviceBuffer::Allocate(qvecs * 4);
  const size_t ws_bytes = PagedBatchWorkspaceBytes(*layout);
  auto ws = DeviceBuffer::Allocate(ws_bytes);
  ASSERT_TRUE(dq.ok() && out.ok() && lse.ok() && ws.ok());
  ASSERT_EQ(cudaMemset(out->get(), 0xff, qvecs * d * 4), cudaSuccess);  // NaN if never written
  ASSERT_EQ(cudaMemset(lse->get(), 0xff, qvecs * 4), cudaSuccess);
  PagedBatchArgs a;
  a.dtype = c.dtype;
  a.layout = &*layout;
  a.layout_words = words->get();
  a.blocks = pages->refs;
  a.rope = rope;
  a.q = dq->get();
  a.out = out->as<float>();
  a.lse = lse->as<float>();
  a.workspace = ws->get();
  a.workspace_bytes = ws_bytes;
  std::printf("  %zu queries, %u rows, %zu union blocks, %u splits\n", queries.size(), rows,
              c.union_tokens.size(), layout->splits);
  Status st = LaunchPagedAttentionBatch(a, nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  Result<std::vector<float>> got_out = FromDevice<float>(out->get(), qvecs * d);
  Result<std::vector<float>> got_lse = FromDevice<float>(lse->get(), qvecs);
  ASSERT_TRUE(got_out.ok() && got_lse.ok());

  uint32_t first = 0;
  for (size_t i = 0; i < c.queries.size(); ++i) {
    const BatchQuery& bq = c.queries[i];
    std::vector<ReferenceBlock> ref_blocks;
    uint32_t total = 0;
    for (uint32_t b : bq.blocks) {
      ref_blocks.push_back(ReferenceBlock{hk[b].values, hv[b].values, c.union_tokens[b]});
      total += c.union_tokens[b];
    }
    std::vector<double> k_ref, v_ref;
    GatherRopeReference(ref_blocks, c.kv_heads, d, *inv, bq.first_position, &k_ref, &v_ref);
    RoundTo(c.dtype, &k_ref);
    // This query's q, out and lse: its rows of every head.
    std::vector<double> qi;
    std::vector<float> oi, li;
    for (uint32_t h = 0; h < q_heads; ++h) {
      for (uint32_t r = 0; r < bq.rows; ++r) {
        const size_t v = size_t(h) * rows + first + r;
        qi.insert(qi.end(), q.values.begin() + v * d, q.values.begin() + (v + 1) * d);
        oi.insert(oi.end(), got_out->begin() + v * d, got_out->begin() + (v + 1) * d);
        li.push_back((*got_lse)[v]);
      }
    }
    std::vector<double> want_out, want_lse;
    PagedAttentionReference(qi, k_ref, v_ref, q_heads, c.kv_heads, bq.rows, total, d, &want_out,
                            &want_lse);
    const Case as_one{c.name,  c.dtype, c.kv_heads, c.group,  d,
                      bq.rows, {},      true,       c.llama3, bq.first_position};
    ASSERT_NO_FATAL_FAILURE(ExpectClose(as_one, oi, li, want_out, want_lse,
                                        "query " + std::to_string(i) + " vs float64"));
    first += bq.rows;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, PagedAttentionBatchTest,
    ::testing::Values(
        // DBSA-like: 95-token blocks, prompts of 16-20 rows (the mixed 8-warp CTA for the
        // longest; the shorter queries leave part of it idle), the layout's own split.
        BatchCase{"bf16_g4_d128_dbsa_4q", DType::kBF16, 2, 4, 128, Repeat(95, 40, {17}),
                  RandomQueries(4, 41, 15, {18, 16, 20, 5}, 1), 0, true},
        // Ten splits: the short contexts' last splits are empty (their CTAs write a partial of
        // weight 0).
        BatchCase{"f16_g1_d64_small_splits",
                  DType::kF16,
                  3,
                  1,
                  64,
                  {5, 130, 1, 64, 77, 300, 2},
                  {{3, {6, 0, 2}, 7}, {1, {1}, 0}, {7, {4, 3, 5, 1, 0}, 1000}},
                  10,
                  false},
        // Decode-like rows, far positions, Llama 3.1 scaling, a repeated block within a query.
        BatchCase{"bf16_g8_d128_far",
                  DType::kBF16,
                  1,
                  8,
                  128,
                  {1000, 1024, 24, 4096, 1},
                  {{1, {3, 0}, 100000}, {1, {1, 2, 4}, 3000000}, {2, {0, 3, 2, 0}, 5}},
                  0,
                  true},
        // 130 rows: several 128-vector tiles for the first query, one for the others.
        BatchCase{"bf16_g2_d64_r130",
                  DType::kBF16,
                  2,
                  2,
                  64,
                  {200, 313, 64, 900},
                  {{130, {1, 3}, 0}, {2, {0, 2}, 0}, {40, {3, 2, 1, 0}, 77}},
                  5,
                  false},
        // One split: the CTAs write out and lse themselves.
        BatchCase{"f16_g4_d128_one_split",
                  DType::kF16,
                  2,
                  4,
                  128,
                  {100, 50, 300},
                  {{4, {2, 0}, 0}, {3, {1}, 0}},
                  1,
                  true},
        // Batch 16 of 4-warp CTAs (rows 2, M = 8), 200 blocks of 95 tokens.
        BatchCase{"bf16_g4_d128_16q", DType::kBF16, 2, 4, 128, Repeat(95, 200),
                  RandomQueries(16, 200, 60, {2, 1, 3}, 2), 0, true}),
    [](const ::testing::TestParamInfo<BatchCase>& info) { return info.param.name; });

TEST(PagedAttentionBatchLayoutTest, SplitsEachContextAndRejectsBadQueries) {
  const std::vector<uint32_t> tokens = {100, 50, 200};
  std::vector<PagedBatchQuery> queries = {{4, {2, 0}, 0}, {1, {1}, 10}};
  Result<PagedBatchLayout> l = MakePagedBatchLayout(8, 2, 128, tokens, queries, 3);
  ASSERT_TRUE(l.ok()) << l.status().ToString();
  EXPECT_EQ(l->rows, 5u);
  EXPECT_EQ(l->queries, 2u);
  EXPECT_EQ(l->segments, 3u);
  EXPECT_EQ(l->splits, 3u);
  // Partial results: (head_dim + 2) floats per split and query vector.
  EXPECT_EQ(PagedBatchWorkspaceBytes(*l), size_t(8) * 5 * 3 * 130 * 4);
  // One split: no workspace.
  l = MakePagedBatchLayout(8, 2, 128, tokens, queries, 1);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(PagedBatchWorkspaceBytes(*l), 0u);
  // The layout's own choice: splits of at least 128 tokens of the shortest context (50): one.
  l = MakePagedBatchLayout(8, 2, 128, tokens, queries);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->splits, 1u);

  struct Bad {
    const char* what;
    void (*mutate)(std::vector<uint32_t>*, std::vector<PagedBatchQuery>*, uint32_t*);
  };
  const Bad bad[] = {
      {"no queries",
       [](std::vector<uint32_t>*, std::vector<PagedBatchQuery>* q, uint32_t*) { q->clear(); }},
      {"rows 0", [](std::vector<uint32_t>*, std::vector<PagedBatchQuery>* q,
                    uint32_t*) { (*q)[1].rows = 0; }},
      {"a query without blocks", [](std::vector<uint32_t>*, std::vector<PagedBatchQuery>* q,
                                    uint32_t*) { (*q)[0].blocks.clear(); }},
      {"a block outside the union", [](std::vector<uint32_t>*, std::vector<PagedBatchQuery>* q,
                                       uint32_t*) { (*q)[0].blocks.push_back(3); }},
      {"negative position", [](std::vector<uint32_t>*, std::vector<PagedBatchQuery>* q,
                               uint32_t*) { (*q)[1].first_position = -1; }},
      {"positions past 2^31", [](std::vector<uint32_t>*, std::vector<PagedBatchQuery>* q,
                                 uint32_t*) { (*q)[1].first_position = INT32_MAX - 10; }},
      {"empty union",
       [](std::vector<uint32_t>* t, std::vector<PagedBatchQuery>*, uint32_t*) { t->clear(); }},
      {"a union block of 0 tokens",
       [](std::vector<uint32_t>* t, std::vector<PagedBatchQuery>*, uint32_t*) { (*t)[1] = 0; }},
  };
  for (const Bad& b : bad) {
    std::vector<uint32_t> t = tokens;
    std::vector<PagedBatchQuery> q = queries;
    uint32_t splits = 3;
    b.mutate(&t, &q, &splits);
    const Result<PagedBatchLayout> r = MakePagedBatchLayout(8, 2, 128, t, q, splits);
    EXPECT_TRUE(r.status().IsInvalidArgument()) << b.what << ": " << r.status().ToString();
  }
  EXPECT_TRUE(MakePagedBatchLayout(8, 3, 128, tokens, queries).status().IsInvalidArgument());
  EXPECT_TRUE(MakePagedBatchLayout(8, 2, 96, tokens, queries).status().IsInvalidArgument());

  // Launch arguments that do not fit the layout, rejected before any CUDA call.
  l = MakePagedBatchLayout(8, 2, 128, tokens, queries, 3);
  ASSERT_TRUE(l.ok());
  PagedBatchArgs a;
  a.layout = &*l;
  a.layout_words = reinterpret_cast<const void*>(uintptr_t{0x60000});
  for (uint32_t t : tokens) {
    a.blocks.push_back(KvBlockRef{reinterpret_cast<const void*>(uintptr_t{0x20000}),
                                  reinterpret_cast<const void*>(uintptr_t{0x30000}), t});
  }
  a.q = reinterpret_cast<const void*>(uintptr_t{0x10000});
  a.out = reinterpret_cast<float*>(uintptr_t{0x40000});
  PagedBatchArgs b = a;
  b.blocks[1].tokens = 51;
  EXPECT_TRUE(LaunchPagedAttentionBatch(b, nullptr).IsInvalidArgument());
  b = a;
  b.blocks.pop_back();
  EXPECT_TRUE(LaunchPagedAttentionBatch(b, nullptr).IsInvalidArgument());
  b = a;
  b.dtype = DType::kF32;
  EXPECT_TRUE(LaunchPagedAttentionBatch(b, nullptr).IsInvalidArgument());
  b = a;  // three splits need a workspace
  EXPECT_TRUE(LaunchPagedAttentionBatch(b, nullptr).IsInvalidArgument());
  b = a;
  b.layout_words = nullptr;
  EXPECT_TRUE(LaunchPagedAttentionBatch(b, nullptr).IsInvalidArgument());
  b = a;
  b.q = nullptr;
  EXPECT_TRUE(LaunchPagedAttentionBatch(b, nullptr).IsInvalidArgument());
}

TEST(PagedAttentionWorkspaceTest, ShortContextsNeedNone) {
  EXPECT_EQ(PagedAttentionWorkspaceBytes(32, 8, 1, 128, 1), 0u);
  EXPECT_EQ(PagedAttentionWorkspaceBytes(32, 8, 1, 128, 128), 0u);
  EXPECT_EQ(PagedAttentionWorkspaceBytes(32, 8, 32, 128, 1024), 0u);  // chunk >= 8 * M = 1024
  // Long contexts are split; the partial results are (head_dim + 2) floats per split and vector.
  const size_t ws = PagedAttentionWorkspaceBytes(32, 8, 1, 128, 131072);
  EXPECT_GT(ws, 0u);
  EXPECT_EQ(ws % (32 * 130 * sizeof(float)), 0u);
  const size_t splits = ws / (32 * 130 * sizeof(float));
  // One wave of CTAs: 8 kv heads x splits fill the GPU's (or, without one, an H200's 132) SMs
  // at 2 CTAs each.
  EXPECT_GE(8 * splits, 64u);
  EXPECT_LE(8 * splits, 2 * 1024u);
  EXPECT_GT(PagedAttentionWorkspaceBytes(32, 8, 32, 128, 131072), 0u);
}

// Valid except for the one field each check breaks; the pointers are never dereferenced because
// validation fails first (so this runs without a GPU, and never launches on one).
PagedAttentionArgs FakeArgs() {
  PagedAttentionArgs a;
  a.dtype = DType::kBF16;
  a.q_heads = 8;
  a.kv_heads = 2;
  a.head_dim = 128;
  a.rows = 4;
  a.q = reinterpret_cast<const void*>(uintptr_t{0x10000});
  a.blocks = {KvBlockRef{reinterpret_cast<const void*>(uintptr_t{0x20000}),
                         reinterpret_cast<const void*>(uintptr_t{0x30000}), 10}};
  a.out = reinterpret_cast<float*>(uintptr_t{0x40000});
  return a;
}

TEST(PagedAttentionArgsTest, RejectsBadArgumentsBeforeAnyCudaCall) {
  struct Bad {
    const char* what;
    void (*mutate)(PagedAttentionArgs*);
  };
  const Bad bad[] = {
      {"f32 dtype", [](PagedAttentionArgs* a) { a->dtype = DType::kF32; }},
      {"head_dim 96", [](PagedAttentionArgs* a) { a->head_dim = 96; }},
      {"head_dim 0", [](PagedAttentionArgs* a) { a->head_dim = 0; }},
      {"q_heads not a multiple", [](PagedAttentionArgs* a) { a->q_heads = 3; }},
      {"group of 9", [](PagedAttentionArgs* a) { a->q_heads = 18; }},
      {"kv_heads 0", [](PagedAttentionArgs* a) { a->kv_heads = 0; }},
      {"q_heads 0", [](PagedAttentionArgs* a) { a->q_heads = 0; }},
      {"rows 0", [](PagedAttentionArgs* a) { a->rows = 0; }},
      {"too many rows", [](PagedAttentionArgs* a) { a->rows = kMaxPagedAttentionRows + 1; }},
      {"null q", [](PagedAttentionArgs* a) { a->q = nullptr; }},
      {"null out", [](PagedAttentionArgs* a) { a->out = nullptr; }},
      {"misaligned q",
       [](PagedAttentionArgs* a) { a->q = reinterpret_cast<const void*>(uintptr_t{0x10002}); }},
      {"no blocks", [](PagedAttentionArgs* a) { a->blocks.clear(); }},
      {"too many blocks",
       [](PagedAttentionArgs* a) { a->blocks.resize(kMaxKernelBlocks + 1, a->blocks[0]); }},
      {"block of 0 tokens", [](PagedAttentionArgs* a) { a->blocks[0].tokens = 0; }},
      {"null k", [](PagedAttentionArgs* a) { a->blocks[0].k = nullptr; }},
      {"null v", [](PagedAttentionArgs* a) { a->blocks[0].v = nullptr; }},
      {"k only 8-byte aligned",
       [](PagedAttentionArgs* a) {
         a->blocks[0].k = reinterpret_cast<const void*>(uintptr_t{0x20008});
       }},
      {"v only 4-byte aligned",
       [](PagedAttentionArgs* a) {
         a->blocks[0].v = reinterpret_cast<const void*>(uintptr_t{0x30004});
       }},
      {"bad rope theta", [](PagedAttentionArgs* a) { a->rope.theta = 1.0; }},
      {"bad llama3 scaling",
       [](PagedAttentionArgs* a) {
         a->rope.llama3_scaling = true;
         a->rope.factor = 0;
       }},
      {"no workspace for a long context",
       [](PagedAttentionArgs* a) { a->blocks[0].tokens = 100000; }},
      {"workspace one byte short",
       [](PagedAttentionArgs* a) {
         a->blocks[0].tokens = 100000;
         a->workspace = reinterpret_cast<void*>(uintptr_t{0x50000});
         a->workspace_bytes = PagedAttentionWorkspaceBytes(8, 2, 4, 128, 100000) - 1;
       }},
      {"misaligned workspace",
       [](PagedAttentionArgs* a) {
         a->blocks[0].tokens = 100000;
         a->workspace = reinterpret_cast<void*>(uintptr_t{0x50002});
         a->workspace_bytes = PagedAttentionWorkspaceBytes(8, 2, 4, 128, 100000);
       }},
  };
  for (const Bad& b : bad) {
    PagedAttentionArgs a = FakeArgs();
    b.mutate(&a);
    const Status st = LaunchPagedAttention(a, nullptr);
    EXPECT_TRUE(st.IsInvalidArgument()) << b.what << ": " << st.ToString();
  }
}

}  // namespace
}  // namespace gpu
}  // namespace shotdb
