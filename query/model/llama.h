// LlamaModel: the Llama-family decoder forward pass (Llama 2/3, Mistral without sliding window,
// Qwen2) on libtorch, with an explicit key/value context so that callers (the DBSA pool encoder,
// retrieval + decode, generation) decide what each new token attends to and at which position.
//
// Conventions (the same as Hugging Face transformers, which the golden tests compare against):
//   - RMSNorm in at least float32, SwiGLU MLP, grouped-query attention (query head h reads
//     key/value head h / (num_heads / num_kv_heads)), softmax in at least float32;
//   - rotate-half RoPE: x * cos + rotate_half(x) * sin with angles position * inv_freq, where
//     inv_freq is theta^(-2i/head_dim), optionally llama3-scaled;
//   - K is exchanged **before RoPE**: LayerKV::k as stored and as returned by Forward never has
//     RoPE applied, so one stored K can be placed at any position ("re-RoPE"). Forward applies
//     RoPE to the context K at ForwardRequest::context_positions, unless the caller has already
//     done so (ForwardRequest::context_rotated, e.g. with RotateKeys once for many decode steps).
//     V has no position dependence.
//
// Thread-safety: a loaded LlamaModel is immutable; Forward is const and may be called from several
// threads at once (each call allocates its own activations).
#ifndef SHOTDB_QUERY_MODEL_LLAMA_H_
#define SHOTDB_QUERY_MODEL_LLAMA_H_

#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

#include "query/model/config.h"
#include "query/model/layer_kernels.h"
#include "query/model/weights.h"
#include "util/status.h"

namespace shotdb {

// Wall-clock milliseconds of one or more Forward calls, split by part and accumulated (Forward adds
// to the fields; it never resets them):
//   attention: attention RMSNorm, QKV projection, RoPE (including the RoPE tables and the mask),
//              attention itself and the output projection, summed over layers;
//   mlp:       MLP RMSNorm, gate/up projection, SiLU and down projection, summed over layers;
//   other:     token embedding, final RMSNorm and the LM head.
// Two parts of attention are also given apart (and included in it):
//   qkv:       attention RMSNorm and the QKV projection;
//   core:      RoPE and the attention itself (a ContextAttention's Attend and the merge, or the
//              eager / fused attention over context and new tokens).
// Measuring waits for the device at every part boundary (torch::cuda::synchronize() on CUDA),
// which serialises the host with the GPU and makes the call slower: for measurement only.
struct ForwardProfile {
  double attention_ms = 0, mlp_ms = 0, other_ms = 0;
  double qkv_ms = 0, core_ms = 0;  // parts of attention_ms
};

// One layer's keys (pre-RoPE) and values for T tokens, each [num_kv_heads, T, head_dim], in the
// model's dtype and on the model's device.
struct LayerKV {
  torch::Tensor k, v;
};

// Attention of new tokens over a context that the model does not receive as tensors, e.g. K/V
// pages on a GPU that a kernel reads where they lie (query/dbsa's device K/V source), and over the
// new tokens themselves. Every new token attends to every context token; the context's RoPE
// positions are the implementation's (DBSA: 0..C-1). Implementations combine the two parts
// flash-attention style, through the log-sum-exp of each (query/model/context_attention.h has the
// libtorch one and MergeWithContext).
class ContextAttention;

// One query of a batch: its context and the number of its new tokens (rows).
struct ContextPart {
  const ContextAttention* context;  // not owned
  int64_t rows;
};

class ContextAttention {
 public:
  virtual ~ContextAttention() = default;
  // C, the context's token count.
  virtual int64_t tokens() const = 0;
  // Layer `layer`'s attention output for the T new tokens: q is [num_heads, T, head_dim], RoPE
  // applied, contiguous; k (RoPE applied) and v are the new tokens' [num_kv_heads, T, head_dim]
  // (views; the last dimension contiguous); all in the model's dtype and on its device.
  // `allowed` [T, T] bool, contiguous, on the model's device: the new tokens each row may see.
  // Returns [T, num_heads * head_dim] in the model's dtype: per row and query head h,
  // softmax(q K^T / sqrt(head_dim)) V over the C context tokens and the allowed new tokens (K/V
  // head h / (num_heads / num_kv_heads)). The work may still be queued on the device's stream.
  virtual Result<torch::Tensor> Attend(int64_t layer, const torch::Tensor& q,
                                       const torch::Tensor& k, const torch::Tensor& v,
                                       const torch::Tensor& allowed) const = 0;
  // Optional: one attention for several queries at once. `parts` (this context among them) each
  // attend their own context with their own rows, the parts' rows stacked in order in q, k and v;
  // `allowed` is then [T, T] over all rows and must not let a row see another query's tokens.
  // What StackedContextAttention (context_attention.h) otherwise computes part by part, e.g. in
  // one kernel launch per layer instead of one per query. nullptr where this context has no such
  // form for these parts (the default). The parts must outlive the result.
  virtual std::unique_ptr<ContextAttention> Stack(const std::vector<ContextPart>& parts) const {
    (void)parts;
    return nullptr;
  }
};

struct ForwardRequest {
  // [T] int64, T >= 1: the new tokens, each in [0, vocab_size).
  torch::Tensor tokens;
  // [T] int64: RoPE positions of the new tokens (any values; they need not be consecutive).
  torch::Tensor positions;
  // Optional: per layer (num_layers entries) the cached pre-RoPE K and V of C context tokens. Not
  // owned; must outlive the call. K and V of every layer must have C columns. May be views (e.g.
  // a narrowed slice of a preallocated cache).
  const std::vector<LayerKV>* context = nullptr;
  // [C] int64, required with `context`: positions at which RoPE is applied to the context K.
  torch::Tensor context_positions;
  // The context K already has RoPE applied at context_positions (from RotateKeys, or the GPU
  // gather+RoPE kernel), so Forward uses it as is instead of rotating it again. A decode loop over
  // a fixed context rotates it once rather than once per step. context_positions is still
  // required (its length is C).
  bool context_rotated = false;
  // Alternative to `context` (not both; context_positions then stays empty): a context of C =
  // context_attention->tokens() tokens that the caller attends to. Not owned; must outlive the
  // call. Every row attends to the whole context: the mask, if any, is [T, T] (the new tokens'
  // columns only), or [T, C + T] allowing every context column.
  const ContextAttention* context_attention = nullptr;
  // Optional [T, C + T] bool on the model's device, true = query row may attend to key column
  // (columns: the C context tokens, then the T new tokens). Every row must allow at least one
  // column. Default: every context token plus the causal prefix of the new tokens.
  torch::Tensor mask;
  // Fill ForwardResult::kv with the new tokens' pre-RoPE K and V per layer.
  bool return_kv = false;
  // Return logits for every new token; otherwise only for the last one.
  bool all_logits = false;
  // Optional [R] int64 (any device): return logits for these rows of the new tokens only, in this
  // order (overrides all_logits). The LM head then runs on R rows, not T or 1.
  torch::Tensor logit_rows;
  // Optional, not owned: Forward adds its per-part wall time here (see ForwardProfile; adds device
  // synchronisations, so leave it null outside measurements).
  ForwardProfile* profile = nullptr;
};

struct ForwardResult {
  // [R, vocab] with logit_rows, [T, vocab] with all_logits, else [1, vocab]; float32 (float64 for
  // a float64 model).
  torch::Tensor logits;
  // With return_kv: num_layers entries, each [num_kv_heads, T, head_dim] (contiguous).
  std::vector<LayerKV> kv;
};

class LlamaModel {
 public:
  // Loads weights (see LoadWeights for `path` and the errors) and prepares the model on
  // options.device in options.dtype.
  static Result<std::unique_ptr<LlamaModel>> Load(const std::string& path,
                                                  const LoadOptions& options);
  // Builds a model from already loaded weights (tensors must match ExpectedWeightShapes and share
  // one device and floating dtype). InvalidArgument otherwise.
  // `layer_kernels` as LoadOptions::layer_kernels.
  static Result<std::unique_ptr<LlamaModel>> FromWeights(ModelWeights weights,
                                                         bool layer_kernels = true);

  LlamaModel(const LlamaModel&) = delete;
  LlamaModel& operator=(const LlamaModel&) = delete;

  const ModelConfig& config() const { return config_; }
  torch::Device device() const { return device_; }
  torch::ScalarType dtype() const { return dtype_; }
  // [head_dim / 2] RoPE inverse frequencies (after scaling), float64 on the CPU.
  const torch::Tensor& inv_freq() const { return inv_freq_; }

  // Runs the new tokens through all layers. Returns InvalidArgument (naming the field and the
  // expected shape/dtype/device) for a malformed request, and IOError when libtorch itself fails
  // (e.g. out of device memory). Runs without autograd.
  Result<ForwardResult> Forward(const ForwardRequest& request) const;

  // RoPE applied to keys, exactly as Forward applies it to a pre-RoPE context K: `k` is
  // [num_kv_heads, N, head_dim] pre-RoPE in the model's dtype and on its device, `positions` [N]
  // int64 (any device). Returns a new [num_kv_heads, N, head_dim] tensor (k is not modified); pass
  // it as context with ForwardRequest::context_rotated. InvalidArgument (naming the argument and
  // the expected shape) for malformed input; IOError when libtorch fails.
  Result<torch::Tensor> RotateKeys(const torch::Tensor& k, const torch::Tensor& positions) const;
  // RotateKeys of every layer's K (kv[l].k, replaced by the rotated tensor; V untouched) at the
  // same positions, with the RoPE tables computed once rather than once a layer. The results
  // equal RotateKeys' bit for bit. On error (RotateKeys' errors, naming the layer) `kv` is
  // unchanged, except with `in_place` if libtorch fails part way (then the layers already done
  // stay rotated). `in_place`: where the CPU loops apply (float32/float64 on the CPU, contiguous
  // K), each K is rotated in its own memory, so every other holder of those tensors sees them
  // rotated too; for a caller that owns them (a context built for one query), it saves a new
  // tensor a layer.
  Status RotateLayerKeys(std::vector<LayerKV>* kv, const torch::Tensor& positions,
                         bool in_place = false) const;

 private:
  // RotateKeys' argument checks.
  Status CheckKeys(const torch::Tensor& k, const torch::Tensor& positions) const;
  struct Layer {
    torch::Tensor attn_norm, wqkv, bqkv, wo, ffn_norm, w_gate_up, w_down;
  };
  LlamaModel() = default;

  Status Validate(const ForwardRequest& r) const;
  ForwardResult Run(const ForwardRequest& r) const;
  // Attention output [num_heads, T, head_dim] of rotated q [num_heads, T, hd] over the context
  // (rotated K, V of C tokens, or undefined for C = 0) and the new tokens' rotated K and V.
  // `allowed` is the bool mask [T, C+T]; `bias` its additive form [group*T, C+T] in the score dtype
  // for the eager path. An undefined bias selects the fused kernel (libtorch >= 2.1 on CUDA, see
  // Run).
  // `row_chunks` (eager path, may be empty): query rows split into chunks, each of which attends
  // only to the keys before its limit (a causal mask allows no more), so prefill skips the masked
  // half of the scores.
  struct RowChunk {
    int64_t first_row, rows, keys;  // keys: context + new-token columns the chunk may attend to
  };
  torch::Tensor Attend(const torch::Tensor& q, const torch::Tensor& ctx_k,
                       const torch::Tensor& ctx_v, const torch::Tensor& k, const torch::Tensor& v,
                       const torch::Tensor& allowed, const torch::Tensor& bias,
                       const std::vector<RowChunk>& row_chunks) const;
  // RMSNorm, RoPE of the new tokens' Q and K, and SiLU*up: through kernels_ where they apply, on
  // the CPU in float32/float64 RMSNorm and RoPE as loops (cpu_loops_), else as libtorch operations.
  // Errors of the kernels are thrown as KernelError (Forward returns them).
  torch::Tensor RmsNorm(const torch::Tensor& x, const torch::Tensor& w) const;
  std::pair<torch::Tensor, torch::Tensor> RopeQk(const torch::Tensor& qkv,
                                                 const torch::Tensor& positions,
                                                 const torch::Tensor& cos,
                                                 const torch::Tensor& sin) const;
  torch::Tensor SiluMul(const torch::Tensor& gate_up) const;
  // cos and sin, each [N, head_dim] in the model dtype, for positions [N].
  std::pair<torch::Tensor, torch::Tensor> RopeTables(const torch::Tensor& positions) const;

  ModelConfig config_;
  torch::Device device_ = torch::kCPU;
  torch::ScalarType dtype_ = torch::kFloat32;
  torch::Tensor inv_freq_;      // CPU float64, for inspection
  torch::Tensor inv_freq_dev_;  // on device_, float32 (float64 for float64 models)
  torch::Tensor embed_, final_norm_, lm_head_;
  std::vector<Layer> layers_;
  std::unique_ptr<LayerKernels> kernels_;  // null: the libtorch form (layer_kernels.h)
  // CPU float32/float64: RMSNorm and RoPE as one loop each (llama.cc) instead of libtorch ops.
  bool cpu_loops_ = false;
};

// RoPE inverse frequencies for `config` (default or llama3-scaled), [head_dim / 2] float64 CPU.
torch::Tensor RopeInverseFrequencies(const ModelConfig& config);

}  // namespace shotdb

#endif  // SHOTDB_QUERY_MODEL_LLAMA_H_
