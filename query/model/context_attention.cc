#include "query/model/context_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace shotdb {

Result<std::unique_ptr<TensorContextAttention>> TensorContextAttention::Create(
    const LlamaModel& model, std::vector<LayerKV> kv, const torch::Tensor& positions,
    bool rotated) {
  const ModelConfig& c = model.config();
  if (static_cast<int64_t>(kv.size()) != c.num_layers || !kv.front().k.defined() ||
      kv.front().k.dim() != 3) {
    return Status::InvalidArgument("TensorContextAttention: need " + std::to_string(c.num_layers) +
                                   " layers of [kv_heads, C, " + std::to_string(c.head_dim) +
                                   "] K/V");
  }
  const int64_t tokens = kv.front().k.size(1);
  // `kv` is ours: rotated in place where the CPU loops apply.
  if (!rotated) SHOTDB_RETURN_IF_ERROR(model.RotateLayerKeys(&kv, positions, /*in_place=*/true));
  return std::unique_ptr<TensorContextAttention>(
      new TensorContextAttention(std::move(kv), tokens, c.num_heads / c.num_kv_heads));
}

torch::Tensor AdditiveMask(const torch::Tensor& allowed, int64_t group, torch::ScalarType dtype) {
  return torch::zeros(allowed.sizes(), allowed.options().dtype(dtype))
      .masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity())
      .repeat({group, 1});
}

torch::Tensor MergeWithContext(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& allowed,
                               const torch::Tensor& ctx_out, const torch::Tensor& ctx_lse) {
  const int64_t nh = q.size(0), t = q.size(1), hd = q.size(2), kvh = k.size(0);
  const int64_t group = nh / kvh;
  const auto acc = q.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  const torch::Tensor bias = AdditiveMask(allowed, group, acc);
  // Scores [kvh, g*T, T]; m, the larger of each row's maxima (finite: the context's lse is).
  torch::Tensor scores =
      torch::baddbmm(bias, q.reshape({kvh, group * t, hd}).to(acc), k.to(acc).transpose(1, 2), 1.0,
                     1.0 / std::sqrt(static_cast<double>(hd)));
  const torch::Tensor c_lse = ctx_lse.to(acc).view({kvh, group * t, 1});
  const torch::Tensor m = torch::maximum(std::get<0>(scores.max(-1, /*keepdim=*/true)), c_lse);
  scores.sub_(m).exp_();
  const torch::Tensor w_ctx = (c_lse - m).exp_();
  torch::Tensor num = torch::baddbmm(ctx_out.to(acc).view({kvh, group * t, hd}) * w_ctx, scores,
                                     v.to(acc));  // the context's part + sum_j p_j v_j
  num.div_(scores.sum(-1, /*keepdim=*/true).add_(w_ctx));
  return num.view({nh, t, hd}).transpose(0, 1).reshape({t, nh * hd}).to(q.scalar_type());
}

Result<torch::Tensor> TensorContextAttention::Attend(int64_t layer, const torch::Tensor& q,
                                                     const torch::Tensor& k, const torch::Tensor& v,
                                                     const torch::Tensor& allowed) const {
  try {
    const LayerKV& kv = kv_.at(static_cast<size_t>(layer));
    const int64_t nh = q.size(0), t = q.size(1), hd = q.size(2), kvh = kv.k.size(0);
    const auto acc = q.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
    // Each K/V head's query group folded into rows: the context is never repeated or copied.
    torch::Tensor qg = q.reshape({kvh, group_ * t, hd});
    torch::Tensor scores = torch::matmul(qg, kv.k.transpose(1, 2)).to(acc) /
                           std::sqrt(static_cast<double>(hd));  // [kvh, g*T, C]
    torch::Tensor lse = torch::logsumexp(scores, -1, /*keepdim=*/true);
    torch::Tensor probs = (scores - lse).exp_().to(q.scalar_type());
    torch::Tensor out = torch::matmul(probs, kv.v).to(acc).view({nh, t, hd});
    return MergeWithContext(q, k, v, allowed, out, lse.view({nh, t}));
  } catch (const c10::Error& e) {
    return Status::IOError(std::string("TensorContextAttention: libtorch failed: ") +
                           e.what_without_backtrace());
  }
}

StackedContextAttention::StackedContextAttention(std::vector<Part> parts)
    : parts_(std::move(parts)) {
  for (const Part& p : parts_) {
    tokens_ = std::max(tokens_, p.context->tokens());
    rows_ += p.rows;
  }
  if (parts_.size() > 1) stacked_ = parts_.front().context->Stack(parts_);
}

Result<torch::Tensor> StackedContextAttention::Attend(int64_t layer, const torch::Tensor& q,
                                                      const torch::Tensor& k,
                                                      const torch::Tensor& v,
                                                      const torch::Tensor& allowed) const {
  if (q.size(1) != rows_) {
    return Status::InvalidArgument("StackedContextAttention: q has " + std::to_string(q.size(1)) +
                                   " rows, the parts " + std::to_string(rows_));
  }
  if (parts_.size() == 1) return parts_.front().context->Attend(layer, q, k, v, allowed);
  if (stacked_ != nullptr) return stacked_->Attend(layer, q, k, v, allowed);
  std::vector<torch::Tensor> outs;
  int64_t first = 0;
  for (const Part& p : parts_) {
    SHOTDB_ASSIGN_OR_RETURN(
        torch::Tensor out,
        p.context->Attend(layer, q.narrow(1, first, p.rows).contiguous(),
                          k.narrow(1, first, p.rows), v.narrow(1, first, p.rows),
                          allowed.narrow(0, first, p.rows).narrow(1, first, p.rows).contiguous()));
    outs.push_back(std::move(out));
    first += p.rows;
  }
  return torch::cat(outs, 0);
}

}  // namespace shotdb
