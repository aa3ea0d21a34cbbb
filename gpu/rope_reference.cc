#include "gpu/rope_reference.h"

#include <algorithm>
#include <cmath>
#include <cstddef>

namespace shotdb {
namespace gpu {

void RotateHalfReference(const double* x, double* out, int64_t pos,
                         const std::vector<double>& inv_freq) {
  const size_t half = inv_freq.size();
  for (size_t i = 0; i < half; ++i) {
    const double angle = static_cast<double>(pos) * inv_freq[i];
    const double c = std::cos(angle), s = std::sin(angle);
    const double a = x[i], b = x[i + half];
    out[i] = a * c - b * s;
    out[i + half] = b * c + a * s;
  }
}

void GatherRopeReference(const std::vector<ReferenceBlock>& blocks, uint32_t kv_heads,
                         uint32_t head_dim, const std::vector<double>& inv_freq,
                         int64_t first_position, std::vector<double>* k_out,
                         std::vector<double>* v_out) {
  size_t total = 0;
  for (const ReferenceBlock& b : blocks) total += b.tokens;
  k_out->assign(static_cast<size_t>(kv_heads) * total * head_dim, 0.0);
  v_out->assign(k_out->size(), 0.0);
  size_t offset = 0;
  for (const ReferenceBlock& b : blocks) {
    for (uint32_t h = 0; h < kv_heads; ++h) {
      for (uint32_t t = 0; t < b.tokens; ++t) {
        const size_t src = (static_cast<size_t>(h) * b.tokens + t) * head_dim;
        const size_t dst = (static_cast<size_t>(h) * total + offset + t) * head_dim;
        RotateHalfReference(&b.k[src], &(*k_out)[dst],
                            first_position + static_cast<int64_t>(offset + t), inv_freq);
        std::copy(&b.v[src], &b.v[src] + head_dim, &(*v_out)[dst]);
      }
    }
    offset += b.tokens;
  }
}

void PagedAttentionReference(const std::vector<double>& q, const std::vector<double>& k,
                             const std::vector<double>& v, uint32_t q_heads, uint32_t kv_heads,
                             uint32_t rows, uint32_t tokens, uint32_t head_dim,
                             std::vector<double>* out, std::vector<double>* lse) {
  out->assign(static_cast<size_t>(q_heads) * rows * head_dim, 0.0);
  lse->assign(static_cast<size_t>(q_heads) * rows, 0.0);
  const uint32_t group = q_heads / kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  std::vector<double> scores(tokens);
  for (uint32_t h = 0; h < q_heads; ++h) {
    const size_t kv = h / group;
    for (uint32_t r = 0; r < rows; ++r) {
      const size_t qv = static_cast<size_t>(h) * rows + r;
      const double* qh = &q[qv * head_dim];
      double max_score = -INFINITY;
      for (uint32_t t = 0; t < tokens; ++t) {
        const double* kt = &k[(kv * tokens + t) * head_dim];
        double dot = 0;
        for (uint32_t i = 0; i < head_dim; ++i) dot += qh[i] * kt[i];
        scores[t] = dot * scale;
        max_score = std::max(max_score, scores[t]);
      }
      double sum = 0;
      for (double& s : scores) {
        s = std::exp(s - max_score);
        sum += s;
      }
      double* oh = &(*out)[qv * head_dim];
      for (uint32_t t = 0; t < tokens; ++t) {
        const double w = scores[t] / sum;
        const double* vt = &v[(kv * tokens + t) * head_dim];
        for (uint32_t i = 0; i < head_dim; ++i) oh[i] += w * vt[i];
      }
      (*lse)[qv] = max_score + std::log(sum);
    }
  }
}

}  // namespace gpu
}  // namespace shotdb
