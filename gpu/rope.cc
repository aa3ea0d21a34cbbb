#include "gpu/rope.h"

#include <cmath>
#include <string>

namespace shotdb {
namespace gpu {

Result<std::vector<double>> RopeInvFreq(const RopeParams& params, uint32_t head_dim) {
  if (head_dim == 0 || head_dim % 2 != 0) {
    return Status::InvalidArgument("RoPE: head_dim must be even and > 0, got " +
                                   std::to_string(head_dim));
  }
  if (!(params.theta > 1.0)) {
    return Status::InvalidArgument("RoPE: theta must be > 1, got " + std::to_string(params.theta));
  }
  if (params.llama3_scaling &&
      (!(params.factor > 0) || !(params.high_freq_factor > params.low_freq_factor))) {
    return Status::InvalidArgument(
        "RoPE llama3 scaling: need factor > 0 and high_freq_factor > low_freq_factor, got "
        "factor " +
        std::to_string(params.factor) + ", low " + std::to_string(params.low_freq_factor) +
        ", high " + std::to_string(params.high_freq_factor));
  }
  const double kPi = 3.14159265358979323846;
  std::vector<double> inv(head_dim / 2);
  for (uint32_t i = 0; i < head_dim / 2; ++i) {
    inv[i] = std::pow(params.theta, -2.0 * i / head_dim);
  }
  if (!params.llama3_scaling) return inv;
  const double old_len = params.original_max_position_embeddings;
  const double low_wavelen = old_len / params.low_freq_factor;
  const double high_wavelen = old_len / params.high_freq_factor;
  for (double& f : inv) {
    const double wavelen = 2 * kPi / f;
    if (wavelen < high_wavelen) continue;
    if (wavelen > low_wavelen) {
      f /= params.factor;
      continue;
    }
    const double s = (old_len / wavelen - params.low_freq_factor) /
                     (params.high_freq_factor - params.low_freq_factor);
    f = (1 - s) * f / params.factor + s * f;
  }
  return inv;
}

}  // namespace gpu
}  // namespace shotdb
