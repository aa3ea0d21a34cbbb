// LlamaModel against HF transformers goldens (tests/scripts/make_model_fixtures.py), plus the
// K/V-context API's algebraic properties.
#include "query/model/llama.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>

#include "query/model/context_attention.h"
#include "query/model/test_util.h"

namespace shotdb {
namespace {

using testing::FixtureDir;
using testing::ReadGolden;
using testing::RelativeError;

std::unique_ptr<LlamaModel> LoadOrDie(const std::string& path,
                                      torch::ScalarType dtype = torch::kFloat32) {
  LoadOptions opts;
  opts.dtype = dtype;
  auto m = LlamaModel::Load(path, opts);
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  return m.ok() ? std::move(m).value() : nullptr;
}

ForwardRequest Whole(const torch::Tensor& tokens, int64_t start = 0) {
  ForwardRequest r;
  r.tokens = tokens;
  r.positions = torch::arange(start, start + tokens.size(0), torch::kInt64);
  r.all_logits = true;
  return r;
}

torch::Tensor Logits(const LlamaModel& m, const ForwardRequest& r) {
  auto out = m.Forward(r);
  EXPECT_TRUE(out.ok()) << out.status().ToString();
  return out.ok() ? out->logits : torch::Tensor();
}

class GoldenTest : public ::testing::TestWithParam<const char*> {};

TEST_P(GoldenTest, Float32LogitsMatchTransformers) {
  const std::string dir = FixtureDir(GetParam());
  auto golden = ReadGolden(dir + "/golden.safetensors");
  ASSERT_TRUE(golden.count("logits"));
  auto m = LoadOrDie(dir);
  ASSERT_NE(m, nullptr);
  torch::Tensor logits = Logits(*m, Whole(golden["tokens"]));
  ASSERT_EQ(logits.sizes(), golden["logits"].sizes());
  EXPECT_LT(RelativeError(logits, golden["logits"]), 1e-4);
  // Only-last-logits mode returns the last row.
  ForwardRequest last = Whole(golden["tokens"]);
  last.all_logits = false;
  torch::Tensor one = Logits(*m, last);
  ASSERT_EQ(one.size(0), 1);
  EXPECT_LT(RelativeError(one[0], golden["logits"][-1]), 1e-4);
}

TEST_P(GoldenTest, Float64LogitsMatchTransformersAndFloat32) {
  const std::string dir = FixtureDir(GetParam());
  auto golden = ReadGolden(dir + "/golden.safetensors");
  auto m64 = LoadOrDie(dir, torch::kFloat64);
  auto m32 = LoadOrDie(dir);
  ASSERT_TRUE(m64 && m32);
  torch::Tensor l64 = Logits(*m64, Whole(golden["tokens"]));
  EXPECT_EQ(l64.scalar_type(), torch::kFloat64);
  // HF's float64 run still computes RoPE angles and RMSNorm in float32, so agreement is ~1e-6.
  EXPECT_LT(RelativeError(l64, golden["logits_f64"]), 1e-5);
  EXPECT_LT(RelativeError(Logits(*m32, Whole(golden["tokens"])), l64), 1e-4);
}

TEST_P(GoldenTest, PreRopeKeysAndValuesMatchProjections) {
  const std::string dir = FixtureDir(GetParam());
  auto golden = ReadGolden(dir + "/golden.safetensors");
  auto m = LoadOrDie(dir);
  ASSERT_NE(m, nullptr);
  ForwardRequest r = Whole(golden["tokens"]);
  r.return_kv = true;
  auto out = m->Forward(r);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  ASSERT_EQ(static_cast<int64_t>(out->kv.size()), m->config().num_layers);
  for (size_t l = 0; l < out->kv.size(); ++l) {
    const std::string i = std::to_string(l);
    EXPECT_LT(RelativeError(out->kv[l].k, golden["k." + i]), 1e-5) << "layer " << l;
    EXPECT_LT(RelativeError(out->kv[l].v, golden["v." + i]), 1e-5) << "layer " << l;
  }
}

TEST_P(GoldenTest, InverseFrequenciesMatchTransformers) {
  const std::string dir = FixtureDir(GetParam());
  auto golden = ReadGolden(dir + "/golden.safetensors");
  auto m = LoadOrDie(dir);
  ASSERT_NE(m, nullptr);
  EXPECT_LT(RelativeError(m->inv_freq(), golden["inv_freq"]), 1e-6);
}

TEST_P(GoldenTest, ContextSplitAnywhereEqualsOneForward) {
  const std::string dir = FixtureDir(GetParam());
  auto golden = ReadGolden(dir + "/golden.safetensors");
  auto m = LoadOrDie(dir);
  ASSERT_NE(m, nullptr);
  const torch::Tensor tokens = golden["tokens"];
  const int64_t n = tokens.size(0);
  torch::Tensor full = Logits(*m, Whole(tokens));
  for (int64_t split : {int64_t{1}, int64_t{7}, n - 1}) {
    ForwardRequest head = Whole(tokens.narrow(0, 0, split));
    head.return_kv = true;
    auto first = m->Forward(head);
    ASSERT_TRUE(first.ok());
    ForwardRequest tail = Whole(tokens.narrow(0, split, n - split), split);
    tail.context = &first->kv;
    tail.context_positions = torch::arange(split, torch::kInt64);
    torch::Tensor rest = Logits(*m, tail);
    EXPECT_LT(RelativeError(rest, full.narrow(0, split, n - split)), 1e-5) << "split " << split;
  }
}

TEST_P(GoldenTest, ExplicitCausalMaskEqualsDefault) {
  const std::string dir = FixtureDir(GetParam());
  auto golden = ReadGolden(dir + "/golden.safetensors");
  auto m = LoadOrDie(dir);
  ASSERT_NE(m, nullptr);
  const torch::Tensor tokens = golden["tokens"];
  const int64_t n = tokens.size(0), split = 10;
  ForwardRequest head = Whole(tokens.narrow(0, 0, split));
  head.return_kv = true;
  auto first = m->Forward(head);
  ASSERT_TRUE(first.ok());
  ForwardRequest tail = Whole(tokens.narrow(0, split, n - split), split);
  tail.context = &first->kv;
  tail.context_positions = torch::arange(split, torch::kInt64);
  torch::Tensor by_default = Logits(*m, tail);
  tail.mask = torch::ones({n - split, n}, torch::kBool).tril(split);
  EXPECT_TRUE(torch::equal(Logits(*m, tail), by_default));
  // A mask that hides the context must change the answer (the mask is honoured).
  tail.mask.narrow(1, 0, split).fill_(false);
  EXPECT_GT(RelativeError(Logits(*m, tail), by_default), 1e-3);
}

// ---- A dense float64 forward written out from the weights, independent of LlamaModel::Run -------

// All N tokens at `positions`, attention restricted by the bool `mask` [N, N] (true = may attend);
// returns float64 logits [N, vocab]. Plain HF Llama math: RMSNorm, rotate-half RoPE with the
// model's inverse frequencies, per-head softmax attention, SwiGLU.
torch::Tensor ReferenceForward(const ModelWeights& w, const torch::Tensor& tokens,
                               const torch::Tensor& positions, const torch::Tensor& mask) {
  const ModelConfig& c = w.config;
  auto W = [&](const std::string& name) { return w.tensors.at(name).to(torch::kFloat64); };
  auto L = [&](int64_t l, const std::string& s) {
    return W("model.layers." + std::to_string(l) + "." + s);
  };
  auto norm = [&](const torch::Tensor& x, const torch::Tensor& g) {
    return g * x * torch::rsqrt(x.pow(2).mean(-1, true) + c.rms_norm_eps);
  };
  const int64_t n = tokens.size(0), hd = c.head_dim, group = c.num_heads / c.num_kv_heads;
  torch::Tensor angles = torch::outer(positions.to(torch::kFloat64), RopeInverseFrequencies(c));
  torch::Tensor cos = torch::cat({angles, angles}, -1).cos(),
                sin = torch::cat({angles, angles}, -1).sin();
  auto rope = [&](const torch::Tensor& x) {  // [heads, N, hd]
    auto h = x.chunk(2, -1);
    return x * cos + torch::cat({-h[1], h[0]}, -1) * sin;
  };
  torch::Tensor x = W("model.embed_tokens.weight").index_select(0, tokens);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    torch::Tensor h = norm(x, L(l, "input_layernorm.weight"));
    auto proj = [&](const char* name, int64_t heads) {
      torch::Tensor y = torch::matmul(h, L(l, std::string("self_attn.") + name + ".weight").t());
      if (c.attention_bias) y = y + L(l, std::string("self_attn.") + name + ".bias");
      return y.view({n, heads, hd}).transpose(0, 1);
    };
    torch::Tensor q = rope(proj("q_proj", c.num_heads)), k = rope(proj("k_proj", c.num_kv_heads));
    torch::Tensor v = proj("v_proj", c.num_kv_heads);
    std::vector<torch::Tensor> heads;
    for (int64_t head = 0; head < c.num_heads; ++head) {
      torch::Tensor s = torch::matmul(q[head], k[head / group].t()) / std::sqrt(double(hd));
      s = s.masked_fill(mask.logical_not(), -INFINITY);
      heads.push_back(torch::matmul(torch::softmax(s, -1), v[head / group]));
    }
    x = x + torch::matmul(torch::cat(heads, -1), L(l, "self_attn.o_proj.weight").t());
    h = norm(x, L(l, "post_attention_layernorm.weight"));
    x = x + torch::matmul(torch::silu(torch::matmul(h, L(l, "mlp.gate_proj.weight").t())) *
                              torch::matmul(h, L(l, "mlp.up_proj.weight").t()),
                          L(l, "mlp.down_proj.weight").t());
  }
  return torch::matmul(norm(x, W("model.norm.weight")), W("lm_head.weight").t());
}

ModelWeights WeightsOrDie(const std::string& dir) {
  LoadOptions opts;
  opts.dtype = torch::kFloat64;
  auto w = LoadWeights(dir, opts);
  EXPECT_TRUE(w.ok()) << w.status().ToString();
  return w.ok() ? std::move(w).value() : ModelWeights();
}

// The reference agrees with HF transformers' goldens (so it can judge the paths below).
TEST_P(GoldenTest, ReferenceForwardMatchesTransformers) {
  const std::string dir = FixtureDir(GetParam());
  auto golden = ReadGolden(dir + "/golden.safetensors");
  const ModelWeights w = WeightsOrDie(dir);
  const torch::Tensor tokens = golden["tokens"];
  const int64_t n = tokens.size(0);
  torch::Tensor ref = ReferenceForward(w, tokens, torch::arange(n, torch::kInt64),
                                       torch::ones({n, n}, torch::kBool).tril());
  EXPECT_LT(
      RelativeError(ref.to(torch::kFloat32), golden["logits"].view_as(ref).to(torch::kFloat32)),
      1e-5);
}

// Prefill long enough for the CPU's row-chunked attention (>= 256 new tokens), with the causal
// default and with a mask that lets early rows see late columns (the chunks' key limits must
// follow the mask, not assume causality).
TEST_P(GoldenTest, RowChunkedPrefillEqualsDenseReference) {
  const std::string dir = FixtureDir(GetParam());
  const ModelWeights w = WeightsOrDie(dir);
  auto m = LoadOrDie(dir, torch::kFloat64);
  ASSERT_NE(m, nullptr);
  torch::manual_seed(7);
  const int64_t n = 300;
  const torch::Tensor tokens = torch::randint(m->config().vocab_size, {n}, torch::kInt64);
  const torch::Tensor positions = torch::arange(n, torch::kInt64) + 5;
  ForwardRequest r;
  r.tokens = tokens;
  r.positions = positions;
  r.all_logits = true;
  torch::Tensor causal = torch::ones({n, n}, torch::kBool).tril();
  EXPECT_LT(RelativeError(Logits(*m, r), ReferenceForward(w, tokens, positions, causal)), 1e-10);
  torch::Tensor mask = causal.clone();
  mask[3][n - 1] = true;                     // row 3 (first chunk) sees the last token
  mask[140][200] = true;                     // row 140 (second chunk) sees a column of the third
  mask[299].narrow(0, 0, 100).fill_(false);  // the last row skips the first 100
  r.mask = mask;
  torch::Tensor got = Logits(*m, r), want = ReferenceForward(w, tokens, positions, mask);
  EXPECT_LT(RelativeError(got, want), 1e-10);
  EXPECT_GT(RelativeError(got, ReferenceForward(w, tokens, positions, causal)), 1e-6);
}

// ContextAttention computed densely in float64 from K/V tensors (rotated at 0..C-1), as the GPU
// kernel computes it from pages.
class TensorContextAttention : public ContextAttention {
 public:
  TensorContextAttention(std::vector<LayerKV> rotated, int64_t group)
      : kv_(std::move(rotated)), group_(group) {}
  int64_t tokens() const override { return kv_.front().k.size(1); }
  Result<torch::Tensor> Attend(int64_t layer, const torch::Tensor& q, const torch::Tensor& k_new,
                               const torch::Tensor& v_new,
                               const torch::Tensor& allowed) const override {
    ++calls;
    if (fail_layer == layer) {
      return Status::IOError("injected failure at layer " + std::to_string(layer));
    }
    const LayerKV& kv = kv_[static_cast<size_t>(layer)];
    torch::Tensor k = kv.k.to(torch::kFloat64).repeat_interleave(group_, 0);
    torch::Tensor v = kv.v.to(torch::kFloat64).repeat_interleave(group_, 0);
    torch::Tensor s = torch::matmul(q.to(torch::kFloat64), k.transpose(1, 2)) /
                      std::sqrt(static_cast<double>(q.size(2)));
    // The context's part in float32, as the GPU kernel hands it over; the merge is the product's.
    return MergeWithContext(q, k_new, v_new, allowed,
                            torch::matmul(torch::softmax(s, -1), v).to(torch::kFloat32),
                            torch::logsumexp(s, -1).to(torch::kFloat32));
  }
  mutable int calls = 0;
  int64_t fail_layer = -1;

 private:
  std::vector<LayerKV> kv_;
  int64_t group_;
};

// A prompt and a label-tree-like mask over a context given as ContextAttention equals the same
// context given as tensors and the dense reference over context + prompt (float32 partial results
// from the context side bound the agreement to ~1e-6).
TEST_P(GoldenTest, ContextAttentionMergeEqualsDenseReference) {
  const std::string dir = FixtureDir(GetParam());
  const ModelWeights w = WeightsOrDie(dir);
  auto m = LoadOrDie(dir, torch::kFloat64);
  ASSERT_NE(m, nullptr);
  torch::manual_seed(11);
  const int64_t c = 40, t = 9, vocab = m->config().vocab_size;
  const torch::Tensor ctx_tokens = torch::randint(vocab, {c}, torch::kInt64);
  const torch::Tensor tokens = torch::randint(vocab, {t}, torch::kInt64);
  ForwardRequest head;
  head.tokens = ctx_tokens;
  head.positions = torch::arange(c, torch::kInt64);
  head.return_kv = true;
  auto first = m->Forward(head);
  ASSERT_TRUE(first.ok());
  std::vector<LayerKV> rotated;
  for (const LayerKV& kv : first->kv) {
    auto k = m->RotateKeys(kv.k, torch::arange(c, torch::kInt64));
    ASSERT_TRUE(k.ok());
    rotated.push_back({*k, kv.v});
  }
  // New rows: a causal prompt of 5, then two branches of 2 (tree attention).
  torch::Tensor mask = torch::zeros({t, c + t}, torch::kBool);
  mask.narrow(1, 0, c).fill_(true);
  for (int64_t i = 0; i < 5; ++i) mask[i].narrow(0, c, i + 1).fill_(true);
  for (int64_t i : {5, 6, 7, 8}) mask[i].narrow(0, c, 5).fill_(true);
  mask[5][c + 5] = mask[6][c + 5] = mask[6][c + 6] = true;
  mask[7][c + 7] = mask[8][c + 7] = mask[8][c + 8] = true;
  const torch::Tensor positions =
      torch::tensor({40, 41, 42, 43, 44, 45, 46, 45, 46}, torch::kInt64);

  ForwardRequest dense;
  dense.tokens = tokens;
  dense.positions = positions;
  dense.context = &rotated;
  dense.context_positions = torch::arange(c, torch::kInt64);
  dense.context_rotated = true;
  dense.mask = mask;
  dense.all_logits = true;
  TensorContextAttention paged(rotated, m->config().num_heads / m->config().num_kv_heads);
  ForwardRequest hooked = dense;
  hooked.context = nullptr;
  hooked.context_positions = torch::Tensor();
  hooked.context_rotated = false;
  hooked.context_attention = &paged;
  torch::Tensor got = Logits(*m, hooked);
  EXPECT_EQ(paged.calls, m->config().num_layers);
  EXPECT_LT(RelativeError(got, Logits(*m, dense)), 1e-6);
  // Dense reference over context + new tokens.
  torch::Tensor all_mask = torch::zeros({c + t, c + t}, torch::kBool);
  all_mask.narrow(0, 0, c).narrow(1, 0, c).copy_(torch::ones({c, c}, torch::kBool).tril());
  all_mask.narrow(0, c, t).copy_(mask);
  torch::Tensor ref =
      ReferenceForward(w, torch::cat({ctx_tokens, tokens}),
                       torch::cat({torch::arange(c, torch::kInt64), positions}), all_mask)
          .narrow(0, c, t);
  EXPECT_LT(RelativeError(got, ref), 1e-6);
  // The same mask without the (implied) context columns; and a row that sees no new token, only
  // the context, against the dense reference with that row's mask.
  ForwardRequest short_mask = hooked;
  short_mask.mask = mask.narrow(1, c, t).contiguous();
  EXPECT_LT(RelativeError(Logits(*m, short_mask), got), 1e-12);
  short_mask.mask[0][0] = false;
  all_mask[c][c] = false;
  torch::Tensor alone =
      ReferenceForward(w, torch::cat({ctx_tokens, tokens}),
                       torch::cat({torch::arange(c, torch::kInt64), positions}), all_mask)
          .narrow(0, c, t);
  torch::Tensor got_alone = Logits(*m, short_mask);
  EXPECT_LT(RelativeError(got_alone, alone), 1e-6);
  EXPECT_GT(RelativeError(got_alone, ref), 1e-6);

  // The hook's error is Forward's; a mask hiding a context column is refused.
  paged.fail_layer = 1;
  auto failed = m->Forward(hooked);
  ASSERT_FALSE(failed.ok());
  EXPECT_NE(failed.status().ToString().find("injected failure at layer 1"), std::string::npos);
  paged.fail_layer = -1;
  hooked.mask = mask.clone();
  hooked.mask[2][3] = false;
  EXPECT_TRUE(m->Forward(hooked).status().IsInvalidArgument());
  hooked.mask = mask;
  hooked.context = &rotated;
  hooked.context_positions = torch::arange(c, torch::kInt64);
  EXPECT_TRUE(m->Forward(hooked).status().IsInvalidArgument());  // both contexts
}

INSTANTIATE_TEST_SUITE_P(Tiny, GoldenTest,
                         ::testing::Values("tiny_llama", "tiny_llama3", "tiny_qwen2"));

TEST(LlamaGgufTest, UnpermutedGgufMatchesTransformers) {
  const std::string dir = FixtureDir("tiny_llama");
  auto golden = ReadGolden(dir + "/golden.safetensors");
  auto m = LoadOrDie(dir + "/tiny_llama.gguf");
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->config().num_kv_heads, 2);
  EXPECT_FALSE(m->config().tie_word_embeddings);
  EXPECT_LT(RelativeError(Logits(*m, Whole(golden["tokens"])), golden["logits"]), 1e-4);
}

TEST(LlamaGgufTest, UnpermuteInvertsLlamaCppPermutation) {
  // llama.cpp: w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2).reshape(out, in).
  const int64_t n_head = 3, hd = 8, in = 5;
  torch::Tensor w = torch::randn({n_head * hd, in});
  torch::Tensor permuted =
      w.reshape({n_head, 2, hd / 2, in}).transpose(1, 2).reshape({n_head * hd, in});
  EXPECT_FALSE(torch::equal(permuted, w));
  EXPECT_TRUE(torch::equal(UnpermuteGgufQK(permuted, n_head), w));
}

TEST(LlamaTest, ShiftingAllPositionsKeepsLogits) {
  // RoPE encodes relative positions only: the same tokens at 100.. and at 0.. agree. This is what
  // lets DBSA store K before RoPE and place blocks anywhere.
  auto golden = ReadGolden(FixtureDir("tiny_llama") + "/golden.safetensors");
  auto m = LoadOrDie(FixtureDir("tiny_llama"), torch::kFloat64);
  ASSERT_NE(m, nullptr);
  torch::Tensor a = Logits(*m, Whole(golden["tokens"]));
  torch::Tensor b = Logits(*m, Whole(golden["tokens"], 100));
  EXPECT_LT(RelativeError(b, a), 1e-9);
}

// Reference: rotate-half RoPE written out per element with default (unscaled) frequencies
// f_i = theta^(-2i/hd): for i < hd/2 and angle a = position * f_i,
//   out[i] = k[i] cos a - k[i + hd/2] sin a,  out[i + hd/2] = k[i + hd/2] cos a + k[i] sin a.
// (The llama3-scaled frequencies are checked against HF by InverseFrequenciesMatchTransformers.)
torch::Tensor RopeReference(const torch::Tensor& k, const std::vector<int64_t>& positions,
                            double theta) {
  const int64_t kvh = k.size(0), n = k.size(1), hd = k.size(2), half = hd / 2;
  torch::Tensor expected = torch::empty_like(k);
  auto kin = k.accessor<double, 3>();
  auto out = expected.accessor<double, 3>();
  for (int64_t h = 0; h < kvh; ++h) {
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t i = 0; i < half; ++i) {
        const double a =
            static_cast<double>(positions[j]) * std::pow(theta, -2.0 * static_cast<double>(i) / hd);
        out[h][j][i] = kin[h][j][i] * std::cos(a) - kin[h][j][i + half] * std::sin(a);
        out[h][j][i + half] = kin[h][j][i + half] * std::cos(a) + kin[h][j][i] * std::sin(a);
      }
    }
  }
  return expected;
}

TEST(LlamaTest, RotateKeysMatchesFloat64RotateHalf) {
  auto m = LoadOrDie(FixtureDir("tiny_llama"), torch::kFloat64);
  ASSERT_NE(m, nullptr);
  ASSERT_EQ(m->config().rope_scaling.type, RopeScaling::Type::kNone);
  const int64_t kvh = m->config().num_kv_heads, hd = m->config().head_dim, half = hd / 2;
  const std::vector<int64_t> positions = {0, 5, 1000, 77, 3, 40000};
  const int64_t n = static_cast<int64_t>(positions.size());
  torch::manual_seed(1);
  torch::Tensor k = torch::randn({kvh, n, hd}, torch::kFloat64);
  auto got = m->RotateKeys(k, torch::tensor(positions, torch::kInt64));
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ASSERT_EQ(got->sizes(), k.sizes());
  EXPECT_LT(RelativeError(*got, RopeReference(k, positions, m->config().rope_theta)), 1e-12);
  // Position 0 is the identity.
  EXPECT_TRUE(torch::allclose(got->select(1, 0), k.select(1, 0), 0, 1e-15));

  EXPECT_TRUE(m->RotateKeys(k.to(torch::kFloat32), torch::tensor(positions, torch::kInt64))
                  .status()
                  .IsInvalidArgument());
  EXPECT_TRUE(m->RotateKeys(k, torch::arange(n - 1, torch::kInt64)).status().IsInvalidArgument());
  EXPECT_TRUE(m->RotateKeys(k.narrow(2, 0, half), torch::tensor(positions, torch::kInt64))
                  .status()
                  .IsInvalidArgument());
}

// RotateLayerKeys: every layer's K against the reference (one table serves all layers), V left
// as it was, in place the same values; a malformed layer is named and leaves every layer as it
// was.
TEST(LlamaTest, RotateLayerKeysRotatesEveryLayerOrNone) {
  auto m = LoadOrDie(FixtureDir("tiny_llama"), torch::kFloat64);
  ASSERT_NE(m, nullptr);
  const int64_t kvh = m->config().num_kv_heads, hd = m->config().head_dim;
  const std::vector<int64_t> positions = {7, 0, 123456, 9, 31};
  const torch::Tensor pos = torch::tensor(positions, torch::kInt64);
  torch::manual_seed(2);
  std::vector<LayerKV> kv(3);
  for (LayerKV& layer : kv) {
    layer = {torch::randn({kvh, 5, hd}, torch::kFloat64),
             torch::randn({kvh, 5, hd}, torch::kFloat64)};
  }
  const std::vector<LayerKV> before = kv;  // the same tensors
  std::vector<torch::Tensor> copies;
  for (const LayerKV& layer : kv) copies.push_back(layer.k.clone());
  ASSERT_TRUE(m->RotateLayerKeys(&kv, pos).ok());
  for (size_t l = 0; l < kv.size(); ++l) {
    EXPECT_LT(RelativeError(kv[l].k, RopeReference(copies[l], positions, m->config().rope_theta)),
              1e-12)
        << "layer " << l;
    EXPECT_TRUE(kv[l].v.equal(before[l].v)) << "layer " << l;
    EXPECT_TRUE(before[l].k.equal(copies[l])) << "layer " << l;  // the input K is not modified
  }

  // In place: the same values bit for bit, in the input's own memory.
  std::vector<LayerKV> own(kv.size());
  for (size_t l = 0; l < kv.size(); ++l) own[l] = {copies[l].clone(), before[l].v};
  std::vector<const void*> memory;
  for (const LayerKV& layer : own) memory.push_back(layer.k.data_ptr());
  ASSERT_TRUE(m->RotateLayerKeys(&own, pos, /*in_place=*/true).ok());
  for (size_t l = 0; l < kv.size(); ++l) {
    EXPECT_TRUE(own[l].k.equal(kv[l].k)) << "layer " << l;
    EXPECT_EQ(own[l].k.data_ptr(), memory[l]) << "layer " << l;
  }

  std::vector<LayerKV> bad = before;
  bad[1].k = bad[1].k.to(torch::kFloat32);
  const Status s = m->RotateLayerKeys(&bad, pos);
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_NE(s.message().find("layer 1"), std::string::npos) << s.ToString();
  for (size_t l = 0; l < bad.size(); ++l) {  // not rotated (layer 1 is the float32 copy)
    EXPECT_TRUE(bad[l].k.equal(l == 1 ? copies[l].to(torch::kFloat32) : copies[l]))
        << "layer " << l;
  }
  std::vector<LayerKV> none;
  EXPECT_TRUE(m->RotateLayerKeys(&none, pos).ok());
}

TEST(LlamaTest, PreRotatedContextGivesTheSameLogits) {
  for (const char* name : {"tiny_llama", "tiny_llama3", "tiny_qwen2"}) {
    auto golden = ReadGolden(FixtureDir(name) + "/golden.safetensors");
    auto m = LoadOrDie(FixtureDir(name), torch::kFloat64);
    ASSERT_NE(m, nullptr);
    const torch::Tensor tokens = golden["tokens"];
    const int64_t n = tokens.size(0), split = 9;
    ForwardRequest head = Whole(tokens.narrow(0, 0, split));
    head.return_kv = true;
    auto first = m->Forward(head);
    ASSERT_TRUE(first.ok());
    // Non-contiguous context positions, so RoPE placement matters.
    const torch::Tensor ctx_pos = torch::arange(split, torch::kInt64) * 3 + 50;
    std::vector<LayerKV> rotated;
    for (const LayerKV& kv : first->kv) {
      auto k = m->RotateKeys(kv.k, ctx_pos);
      ASSERT_TRUE(k.ok()) << k.status().ToString();
      rotated.push_back({*k, kv.v});
    }
    ForwardRequest tail = Whole(tokens.narrow(0, split, n - split), 100);
    tail.context = &first->kv;
    tail.context_positions = ctx_pos;
    torch::Tensor plain = Logits(*m, tail);
    ForwardRequest pre = tail;
    pre.context = &rotated;
    pre.context_rotated = true;
    EXPECT_LT(RelativeError(Logits(*m, pre), plain), 1e-12) << name;
    // Rotating an already rotated context (flag unset) changes the answer: the flag is honoured.
    pre.context_rotated = false;
    EXPECT_GT(RelativeError(Logits(*m, pre), plain), 1e-6) << name;

    // A custom mask: every row keeps a scattered subset of the context and its causal prefix.
    const int64_t t = n - split;
    torch::Tensor mask = torch::ones({t, split + t}, torch::kBool).tril(split);
    for (int64_t row = 0; row < t; ++row) {
      for (int64_t col = 0; col < split; ++col) {
        if ((row + col) % 3 == 0) mask[row][col] = false;
      }
    }
    tail.mask = mask;
    pre.mask = mask;
    pre.context_rotated = true;
    torch::Tensor masked = Logits(*m, tail);
    EXPECT_GT(RelativeError(masked, plain), 1e-6) << name;
    EXPECT_LT(RelativeError(Logits(*m, pre), masked), 1e-12) << name;
  }
}

// On the CPU in float32/float64, RMSNorm and RoPE run as loops (LoadOptions::layer_kernels, the
// default); `false` runs them as libtorch operations. RoPE does the same operations in the same
// order (bit-identical keys); RMSNorm sums its mean in double, in another order (float32 logits
// measured within ~1.2e-6 relative, float64 within rounding).
TEST(LlamaTest, CpuLoopsMatchLibtorchOps) {
  for (const char* name : {"tiny_llama", "tiny_llama3", "tiny_qwen2"}) {
    for (torch::ScalarType dtype : {torch::kFloat32, torch::kFloat64}) {
      LoadOptions opts;
      opts.dtype = dtype;
      auto loops = LlamaModel::Load(FixtureDir(name), opts);
      opts.layer_kernels = false;
      auto ops = LlamaModel::Load(FixtureDir(name), opts);
      ASSERT_TRUE(loops.ok() && ops.ok());
      const double tolerance = dtype == torch::kFloat32 ? 1e-5 : 1e-12;
      torch::manual_seed(11);
      const int64_t c = 40, t = 23;
      const torch::Tensor all =
          torch::randint(0, (*ops)->config().vocab_size, {c + t}, torch::kInt64);
      ForwardRequest head = Whole(all.narrow(0, 0, c));
      head.return_kv = true;
      auto ctx = (*ops)->Forward(head);
      ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
      EXPECT_LT(RelativeError(Logits(**loops, Whole(all.narrow(0, 0, c))), ctx->logits), tolerance)
          << name << " " << c10::toString(dtype);
      // New tokens over the pre-RoPE context at scattered positions (the context's RoPE too).
      const torch::Tensor ctx_pos = torch::arange(c, torch::kInt64) * 5 + 3;
      ForwardRequest tail = Whole(all.narrow(0, c, t), 9000);
      tail.context = &ctx->kv;
      tail.context_positions = ctx_pos;
      EXPECT_LT(RelativeError(Logits(**loops, tail), Logits(**ops, tail)), tolerance)
          << name << " " << c10::toString(dtype);
      // RotateKeys, also on a strided view (every other key).
      for (const torch::Tensor& k : {ctx->kv[0].k, ctx->kv[1]
                                                       .k.narrow(1, 0, c / 2 * 2)
                                                       .view({ctx->kv[1].k.size(0), c / 2, 2, -1})
                                                       .select(2, 0)}) {
        const torch::Tensor pos = torch::arange(k.size(1), torch::kInt64) * 7 + 100000;
        auto a = (*loops)->RotateKeys(k, pos);
        auto b = (*ops)->RotateKeys(k, pos);
        ASSERT_TRUE(a.ok() && b.ok());
        EXPECT_TRUE(torch::equal(*a, *b)) << name << " " << c10::toString(dtype);
      }
    }
  }
}

// On CUDA (skips without a GPU): new tokens over a context, through the eager attention (few new
// tokens) and the fused scaled_dot_product_attention path (>= 64 new tokens, libtorch >= 2.1),
// pre-RoPE and pre-rotated context, default and custom mask, all against the CPU in float64.
TEST(LlamaTest, CudaForwardMatchesCpuFloat64) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  for (const char* name : {"tiny_llama", "tiny_llama3", "tiny_qwen2"}) {
    auto cpu = LoadOrDie(FixtureDir(name), torch::kFloat64);
    ASSERT_NE(cpu, nullptr);
    torch::manual_seed(7);
    const int64_t c = 150;
    const torch::Tensor all = torch::randint(0, cpu->config().vocab_size, {c + 100}, torch::kInt64);
    ForwardRequest head = Whole(all.narrow(0, 0, c));
    head.return_kv = true;
    auto ctx = cpu->Forward(head);
    ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
    const torch::Tensor ctx_pos = torch::arange(c, torch::kInt64) * 2 + 7;
    for (torch::ScalarType dtype : {torch::kFloat32, torch::kBFloat16}) {
      LoadOptions opts;
      opts.dtype = dtype;
      opts.device = torch::Device("cuda");
      auto gpu = LlamaModel::Load(FixtureDir(name), opts);
      ASSERT_TRUE(gpu.ok()) << gpu.status().ToString();
      opts.layer_kernels = false;  // the same model with the pointwise steps as libtorch ops
      auto plain = LlamaModel::Load(FixtureDir(name), opts);
      ASSERT_TRUE(plain.ok()) << plain.status().ToString();
      std::vector<LayerKV> pre, rotated;
      for (const LayerKV& kv : ctx->kv) {
        pre.push_back({kv.k.to(torch::kCUDA, dtype), kv.v.to(torch::kCUDA, dtype)});
        auto k = (*gpu)->RotateKeys(pre.back().k, ctx_pos.to(torch::kCUDA));
        ASSERT_TRUE(k.ok()) << k.status().ToString();
        rotated.push_back({*k, pre.back().v});
      }
      // bf16: the largest logit error over these random tiny models measured 0.017-0.058 on the
      // H200 (2026-12-01), with the pointwise steps as kernels and as libtorch ops alike.
      const double tolerance = dtype == torch::kFloat32 ? 1e-4 : 8e-2;
      for (int64_t t : {5, 100}) {
        ForwardRequest want = Whole(all.narrow(0, c, t), 2 * c + 10);
        want.context = &ctx->kv;
        want.context_positions = ctx_pos;
        torch::Tensor mask = torch::ones({t, c + t}, torch::kBool).tril(c);
        for (int64_t row = 0; row < t; ++row) {
          for (int64_t col = row % 4; col < c; col += 4) mask[row][col] = false;
        }
        for (bool masked : {false, true}) {
          if (masked) want.mask = mask;
          const torch::Tensor expected = Logits(*cpu, want);
          for (bool use_rotated : {false, true}) {
            ForwardRequest got = want;
            got.tokens = want.tokens.to(torch::kCUDA);
            got.positions = want.positions.to(torch::kCUDA);
            got.context = use_rotated ? &rotated : &pre;
            got.context_rotated = use_rotated;
            got.context_positions = ctx_pos.to(torch::kCUDA);
            if (masked) got.mask = mask.to(torch::kCUDA);
            const double err = RelativeError(Logits(**gpu, got), expected);
            std::printf("  %s %s T=%lld masked=%d rotated=%d: error %.4f (libtorch ops %.4f)\n",
                        name, c10::toString(dtype), static_cast<long long>(t), masked, use_rotated,
                        err, RelativeError(Logits(**plain, got), expected));
            EXPECT_LT(RelativeError(Logits(**plain, got), expected), tolerance) << name;
            EXPECT_LT(err, tolerance) << name << " " << c10::toString(dtype) << " T=" << t
                                      << " masked=" << masked << " rotated=" << use_rotated;
          }
        }
      }
    }
  }
}

TEST(LlamaTest, ProfileSplitsTheCallsWallTime) {
  auto golden = ReadGolden(FixtureDir("tiny_llama") + "/golden.safetensors");
  auto m = LoadOrDie(FixtureDir("tiny_llama"));
  ASSERT_NE(m, nullptr);
  const torch::Tensor tokens = golden["tokens"];
  const int64_t n = tokens.size(0), split = 10;
  ForwardRequest head = Whole(tokens.narrow(0, 0, split));
  head.return_kv = true;
  auto first = m->Forward(head);
  ASSERT_TRUE(first.ok());
  ForwardRequest tail = Whole(tokens.narrow(0, split, n - split), split);
  tail.context = &first->kv;
  tail.context_positions = torch::arange(split, torch::kInt64);
  torch::Tensor unprofiled = Logits(*m, tail);
  ForwardProfile profile;
  tail.profile = &profile;
  const auto start = std::chrono::steady_clock::now();
  torch::Tensor profiled = Logits(*m, tail);
  const double wall_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  EXPECT_TRUE(torch::equal(profiled, unprofiled));  // profiling changes no result
  EXPECT_GT(profile.attention_ms, 0);
  EXPECT_GT(profile.mlp_ms, 0);
  EXPECT_GT(profile.other_ms, 0);
  EXPECT_LE(profile.attention_ms + profile.mlp_ms + profile.other_ms, wall_ms + 1e-3);
  // Accumulates over calls.
  const double attention = profile.attention_ms;
  Logits(*m, tail);
  EXPECT_GT(profile.attention_ms, attention);
}

TEST(LlamaTest, RejectsMalformedRequests) {
  auto m = LoadOrDie(FixtureDir("tiny_llama"));
  ASSERT_NE(m, nullptr);
  torch::Tensor tokens = torch::tensor({1, 2, 3}, torch::kInt64);
  ForwardRequest r = Whole(tokens);
  r.tokens = tokens.to(torch::kInt32);
  EXPECT_TRUE(m->Forward(r).status().IsInvalidArgument());
  r = Whole(tokens);
  r.positions = torch::arange(2, torch::kInt64);
  EXPECT_TRUE(m->Forward(r).status().IsInvalidArgument());
  r = Whole(tokens);
  r.mask = torch::ones({3, 4}, torch::kBool);
  EXPECT_TRUE(m->Forward(r).status().IsInvalidArgument());
  r.mask = torch::zeros({3, 3}, torch::kBool);
  EXPECT_TRUE(m->Forward(r).status().IsInvalidArgument());
  std::vector<LayerKV> one_layer = {{torch::zeros({2, 1, 16}), torch::zeros({2, 1, 16})}};
  r = Whole(tokens);
  r.context = &one_layer;
  r.context_positions = torch::zeros({1}, torch::kInt64);
  Status s = m->Forward(r).status();
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("layers"), std::string::npos) << s.ToString();
}

TEST(LlamaTest, WrongTensorShapeNamesTheTensor) {
  auto w = LoadWeights(FixtureDir("tiny_llama"), LoadOptions());
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  w->tensors["model.layers.1.mlp.up_proj.weight"] = torch::zeros({3, 3});
  Status s = LlamaModel::FromWeights(std::move(w).value()).status();
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("model.layers.1.mlp.up_proj.weight"), std::string::npos);
}

TEST(ModelConfigTest, ParsesAndRejects) {
  const std::string base =
      R"({"model_type":"llama","num_hidden_layers":2,"hidden_size":64,"num_attention_heads":4,)"
      R"("num_key_value_heads":2,"intermediate_size":128,"vocab_size":256,)";
  auto ok = ParseHfConfig(base + R"("rope_theta":5e5,"rope_scaling":{"rope_type":"llama3",)"
                                 R"("factor":8,"low_freq_factor":1,"high_freq_factor":4,)"
                                 R"("original_max_position_embeddings":64}})",
                          "cfg");
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ok->head_dim, 16);
  EXPECT_EQ(ok->rope_theta, 5e5);
  EXPECT_EQ(ok->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_TRUE(ParseHfConfig(base + R"("rope_scaling":{"rope_type":"yarn","factor":4}})", "cfg")
                  .status()
                  .IsNotSupported());
  Status missing = ParseHfConfig(R"({"model_type":"llama"})", "cfg.json").status();
  EXPECT_TRUE(missing.IsInvalidArgument());
  EXPECT_NE(missing.message().find("num_hidden_layers"), std::string::npos);
  std::string uneven = base + "}";
  uneven.replace(uneven.find("\"num_key_value_heads\":2"), 23, "\"num_key_value_heads\":3");
  uneven.replace(uneven.rfind(','), 1, "");
  EXPECT_TRUE(ParseHfConfig(uneven, "cfg").status().IsInvalidArgument());
  EXPECT_TRUE(ParseHfConfig("{not json", "cfg").status().IsInvalidArgument());
  // Boolean fields of another type name the field (a fuzzer's input once threw out of here).
  for (const char* field :
       {"attention_bias", "mlp_bias", "tie_word_embeddings", "use_sliding_window"}) {
    Status s = ParseHfConfig(base + "\"" + field + "\":\"float32\"}", "cfg.json").status();
    EXPECT_TRUE(s.IsInvalidArgument()) << field << ": " << s.ToString();
    EXPECT_NE(s.message().find(field), std::string::npos) << s.ToString();
  }
  auto null_bias = ParseHfConfig(base + R"("attention_bias":null})", "cfg");
  ASSERT_TRUE(null_bias.ok()) << null_bias.status().ToString();
  EXPECT_FALSE(null_bias->attention_bias);
}

}  // namespace
}  // namespace shotdb
