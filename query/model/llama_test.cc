// LlamaModel against HF transformers goldens (tests/scripts/make_model_fixtures.py), plus the
// K/V-context API's algebraic properties.
#include "query/model/llama.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>

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

TEST(LlamaTest, RotateKeysMatchesFloat64RotateHalf) {
  // Reference: rotate-half RoPE written out per element with default (unscaled) frequencies
  // f_i = theta^(-2i/hd): for i < hd/2 and angle a = position * f_i,
  //   out[i] = k[i] cos a - k[i + hd/2] sin a,  out[i + hd/2] = k[i + hd/2] cos a + k[i] sin a.
  // (The llama3-scaled frequencies are checked against HF by InverseFrequenciesMatchTransformers.)
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
  torch::Tensor expected = torch::empty_like(k);
  auto kin = k.accessor<double, 3>();
  auto out = expected.accessor<double, 3>();
  for (int64_t h = 0; h < kvh; ++h) {
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t i = 0; i < half; ++i) {
        const double a = static_cast<double>(positions[j]) *
                         std::pow(m->config().rope_theta, -2.0 * static_cast<double>(i) / hd);
        out[h][j][i] = kin[h][j][i] * std::cos(a) - kin[h][j][i + half] * std::sin(a);
        out[h][j][i + half] = kin[h][j][i + half] * std::cos(a) + kin[h][j][i] * std::sin(a);
      }
    }
  }
  EXPECT_LT(RelativeError(*got, expected), 1e-12);
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
      std::vector<LayerKV> pre, rotated;
      for (const LayerKV& kv : ctx->kv) {
        pre.push_back({kv.k.to(torch::kCUDA, dtype), kv.v.to(torch::kCUDA, dtype)});
        auto k = (*gpu)->RotateKeys(pre.back().k, ctx_pos.to(torch::kCUDA));
        ASSERT_TRUE(k.ok()) << k.status().ToString();
        rotated.push_back({*k, pre.back().v});
      }
      const double tolerance = dtype == torch::kFloat32 ? 1e-4 : 5e-2;
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
            EXPECT_LT(RelativeError(Logits(**gpu, got), expected), tolerance)
                << name << " " << c10::toString(dtype) << " T=" << t << " masked=" << masked
                << " rotated=" << use_rotated;
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
}

}  // namespace
}  // namespace shotdb
