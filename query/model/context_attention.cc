#include "query/model/context_attention.h"

#include <algorithm>
#include <cmath>

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
  if (!rotated) {
    for (LayerKV& layer : kv) {
      SHOTDB_ASSIGN_OR_RETURN(layer.k, model.RotateKeys(layer.k, positions));
    }
  }
  return std::unique_ptr<TensorContextAttention>(
      new TensorContextAttention(std::move(kv), tokens, c.num_heads / c.num_kv_heads));
}

Status TensorContextAttention::Attend(int64_t layer, const torch::Tensor& q, torch::Tensor* out,
                                      torch::Tensor* lse) const {
  try {
    const LayerKV& kv = kv_.at(static_cast<size_t>(layer));
    const int64_t nh = q.size(0), t = q.size(1), hd = q.size(2), kvh = kv.k.size(0);
    const auto acc = q.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
    // Each K/V head's query group folded into rows: the context is never repeated or copied.
    torch::Tensor qg = q.reshape({kvh, group_ * t, hd});
    torch::Tensor scores = torch::matmul(qg, kv.k.transpose(1, 2)).to(acc) /
                           std::sqrt(static_cast<double>(hd));  // [kvh, g*T, C]
    torch::Tensor l = torch::logsumexp(scores, -1, /*keepdim=*/true);
    torch::Tensor probs = (scores - l).exp_().to(q.scalar_type());
    *out = torch::matmul(probs, kv.v).to(acc).view({nh, t, hd});
    *lse = l.view({nh, t});
    return Status::OK();
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
}

Status StackedContextAttention::Attend(int64_t layer, const torch::Tensor& q, torch::Tensor* out,
                                       torch::Tensor* lse) const {
  if (q.size(1) != rows_) {
    return Status::InvalidArgument("StackedContextAttention: q has " + std::to_string(q.size(1)) +
                                   " rows, the parts " + std::to_string(rows_));
  }
  if (parts_.size() == 1) return parts_.front().context->Attend(layer, q, out, lse);
  std::vector<torch::Tensor> outs, lses;
  int64_t first = 0;
  for (const Part& p : parts_) {
    torch::Tensor o, l;
    SHOTDB_RETURN_IF_ERROR(
        p.context->Attend(layer, q.narrow(1, first, p.rows).contiguous(), &o, &l));
    outs.push_back(o);
    lses.push_back(l);
    first += p.rows;
  }
  *out = torch::cat(outs, 1);
  *lse = torch::cat(lses, 1);
  return Status::OK();
}

}  // namespace shotdb
