// Rotary position embedding (RoPE) parameters and inverse frequencies, as in Hugging Face Llama.
//
// shotdb stores K before RoPE, so that a block can be placed at any position at query time; the
// kernels in rope_gather.h and paged_attention.h and the float64 reference in rope_reference.h
// all take their frequencies from RopeInvFreq. Plain C++ (no CUDA), thread-safe, pure.
#ifndef SHOTDB_GPU_ROPE_H_
#define SHOTDB_GPU_ROPE_H_

#include <cstdint>
#include <vector>

#include "util/status.h"

namespace shotdb {
namespace gpu {

struct RopeParams {
  double theta = 500000.0;  // rope_theta (Llama 3: 500000)
  // rope_scaling {"rope_type": "llama3", ...}: Llama 3.1's frequency-dependent scaling.
  bool llama3_scaling = false;
  double factor = 8.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  double original_max_position_embeddings = 8192.0;
};

// The head_dim / 2 inverse frequencies in float64:
//   inv_freq[i] = theta^(-2i / head_dim)
// and, with llama3_scaling (HF `_compute_llama3_parameters`), with wavelen = 2*pi / inv_freq[i],
// low = original_max / low_freq_factor and high = original_max / high_freq_factor:
//   wavelen < high            -> unchanged (high frequencies)
//   wavelen > low             -> inv_freq / factor
//   otherwise, with s = (original_max / wavelen - low_freq_factor) /
//                        (high_freq_factor - low_freq_factor):
//                             -> (1 - s) * inv_freq / factor + s * inv_freq
// InvalidArgument if head_dim is 0 or odd, theta <= 1, or (with scaling) factor <= 0 or
// high_freq_factor <= low_freq_factor.
Result<std::vector<double>> RopeInvFreq(const RopeParams& params, uint32_t head_dim);

}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_ROPE_H_
