// ContextAttention implementations on libtorch (the interface is in llama.h):
//
//   - TensorContextAttention: a context given as per-layer K/V tensors (the host K/V source, and
//     any device where the GPU kernels do not apply). K is rotated once, at construction, to the
//     context's positions; Attend computes scores, log-sum-exp and output in the accumulation
//     dtype (float32, float64 for float64 models), query head h reading K/V head h / group.
//   - StackedContextAttention: several queries' contexts for one batched Forward. The new tokens
//     are the queries' rows one after the other; rows [first_i, first_i + rows_i) attend to
//     context i and to their own query's tokens only. tokens() is the longest context; give
//     Forward a [T, T] mask that lets no row see another query's tokens. Where the first part's
//     context has a stacked form for the parts (ContextAttention::Stack: the device source's
//     pages, one kernel launch a layer for the batch) Attend uses it; else it attends part by
//     part.
//
// Thread-safety: Attend is const and re-entrant; the objects are immutable after construction.
#ifndef SHOTDB_QUERY_MODEL_CONTEXT_ATTENTION_H_
#define SHOTDB_QUERY_MODEL_CONTEXT_ATTENTION_H_

#include <torch/torch.h>

#include <memory>
#include <vector>

#include "query/model/llama.h"
#include "util/status.h"

namespace shotdb {

// The additive form of a bool attention mask `allowed` [T, N] (0 where allowed, -inf elsewhere) in
// `dtype`, repeated `group` times along the rows ([group*T, N]): eager grouped-query attention
// folds each K/V head's query heads into rows.
torch::Tensor AdditiveMask(const torch::Tensor& allowed, int64_t group, torch::ScalarType dtype);

// The libtorch merge (what LaunchMergeAttention does in one kernel on the GPU): the new tokens'
// attention among themselves (q [nh, T, hd] contiguous, k/v [kvh, T, hd], allowed [T, T] bool),
// combined with the context's result `ctx_out` [nh, T, hd] and `ctx_lse` [nh, T] (float32 or
// float64) through the log-sum-exps. Returns [T, nh * hd] in q's dtype; float32 arithmetic
// (float64 for float64 models).
torch::Tensor MergeWithContext(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& allowed,
                               const torch::Tensor& ctx_out, const torch::Tensor& ctx_lse);

class TensorContextAttention final : public ContextAttention {
 public:
  // `kv`: num_layers entries of [num_kv_heads, C, head_dim] in the model's dtype and device, K
  // pre-RoPE (rotated here to `positions` [C] int64) or already rotated (`rotated`). The tensors
  // become the object's: pre-RoPE K on the CPU is rotated in its own memory
  // (LlamaModel::RotateLayerKeys in place), so no other holder may need its pre-RoPE values.
  // InvalidArgument for malformed tensors (RotateKeys' errors).
  static Result<std::unique_ptr<TensorContextAttention>> Create(const LlamaModel& model,
                                                                std::vector<LayerKV> kv,
                                                                const torch::Tensor& positions,
                                                                bool rotated);
  int64_t tokens() const override { return tokens_; }
  Result<torch::Tensor> Attend(int64_t layer, const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& allowed) const override;

 private:
  TensorContextAttention(std::vector<LayerKV> kv, int64_t tokens, int64_t group)
      : kv_(std::move(kv)), tokens_(tokens), group_(group) {}
  std::vector<LayerKV> kv_;  // K rotated
  int64_t tokens_;
  int64_t group_;
};

class StackedContextAttention final : public ContextAttention {
 public:
  using Part = ContextPart;
  explicit StackedContextAttention(std::vector<Part> parts);
  // True when the parts are attended in one stacked form (ContextAttention::Stack).
  bool stacked() const { return stacked_ != nullptr; }
  int64_t tokens() const override { return tokens_; }
  // InvalidArgument if q's rows are not the parts' rows summed; a part's error otherwise.
  Result<torch::Tensor> Attend(int64_t layer, const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& allowed) const override;

 private:
  std::vector<Part> parts_;
  std::unique_ptr<ContextAttention> stacked_;  // the parts' stacked form, if they have one
  int64_t tokens_ = 0, rows_ = 0;
};

}  // namespace shotdb

#endif  // SHOTDB_QUERY_MODEL_CONTEXT_ATTENTION_H_
