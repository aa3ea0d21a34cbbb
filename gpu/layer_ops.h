// The pointwise steps of a Llama layer's forward, each in one kernel: RMSNorm, RoPE of the new
// tokens' Q and K, and SwiGLU's SiLU(gate) * up.
//
// A DBSA query's forward runs 32 layers over ~16 new tokens. Written as libtorch operations these
// steps take ~20 kernels a layer (RMSNorm alone is 8: a cast, pow, mean, add, rsqrt, two products
// and a cast back), each costing ~8 us to launch and run on the H200 for a few kilobytes of work,
// more than the layer's GEMMs read at that size (docs/results.md, run F). Here each is one kernel.
//
// Numerics (the golden tests' reference is Hugging Face transformers, query/model/llama.h):
//   RMSNorm   y = x * rsqrt(mean(x^2) + eps) in float32, rounded to the dtype, then weight * y
//             rounded again: the two roundings of HF's `weight * hidden.to(input_dtype)`.
//   RoPE      rotate-half layout: for i < d/2, with a = pos * inv_freq[i] reduced mod 2*pi in
//             float64 and its sine/cosine in float32 (as rope_gather.h),
//               out[i]       = x[i] cos a - x[i + d/2] sin a
//               out[i + d/2] = x[i + d/2] cos a + x[i] sin a
//             in float32, rounded once (libtorch's eager RoPE rounds cos, sin and three products
//             to the 16-bit dtype: this is closer to the float64 value).
//   SiLU*up   s = silu(gate) rounded to the dtype (libtorch's in-place silu_), then s * up rounded.
//
// Plain C++ header (the kernels live in layer_ops.cu). Launches are asynchronous on `stream`;
// argument errors are returned before any CUDA call (so they work without a GPU), launch errors
// as IOError. Thread-safety: the functions are thread-safe.
#ifndef SHOTDB_GPU_LAYER_OPS_H_
#define SHOTDB_GPU_LAYER_OPS_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "format/dtype.h"
#include "gpu/rope.h"
#include "util/status.h"

namespace shotdb {
namespace gpu {

struct RmsNormArgs {
  DType dtype = DType::kBF16;    // of x, weight and out: kBF16 or kF16
  uint32_t rows = 0;             // >= 1
  uint32_t width = 0;            // hidden size: even, 2..65536
  const void* x = nullptr;       // [rows, x_row_stride] (elements); 4-byte aligned, stride even
  int64_t x_row_stride = 0;      // >= width
  const void* weight = nullptr;  // [width]
  float eps = 1e-5f;             // > 0
  void* out = nullptr;           // [rows, width] contiguous; may not overlap x
};
// out[r] = weight * normalise(x[r]) (header comment). InvalidArgument for a bad dtype, shape,
// stride or pointer; IOError if the launch fails.
Status LaunchRmsNorm(const RmsNormArgs& args, cudaStream_t stream);

struct RopeQkArgs {
  DType dtype = DType::kBF16;  // kBF16 or kF16
  uint32_t q_heads = 0, kv_heads = 0;
  uint32_t head_dim = 0;  // a multiple of 4, at most 256
  uint32_t rows = 0;      // new tokens T >= 1
  // [T, row_stride] (elements): Q's q_heads * head_dim columns, then K's kv_heads * head_dim,
  // e.g. the fused QKV projection's output. 4-byte aligned, row_stride even.
  const void* qk = nullptr;
  int64_t row_stride = 0;
  const int64_t* positions = nullptr;  // [T] on the device: each token's RoPE position (>= 0)
  RopeParams rope;
  void* q_out = nullptr;  // [q_heads, T, head_dim] contiguous
  void* k_out = nullptr;  // [kv_heads, T, head_dim] contiguous
};
// Q and K rotated to their positions and laid out per head (header comment). InvalidArgument for
// a bad dtype, shape, stride, pointer or RoPE parameters; IOError if the launch fails.
Status LaunchRopeQk(const RopeQkArgs& args, cudaStream_t stream);

struct SiluMulArgs {
  DType dtype = DType::kBF16;  // kBF16 or kF16
  uint32_t rows = 0;           // >= 1
  uint32_t width = 0;          // intermediate size: even, >= 2
  // [rows, row_stride] (elements): gate in columns [0, width), up in [width, 2 * width), e.g. the
  // fused gate/up projection's output. 4-byte aligned, row_stride even and >= 2 * width.
  const void* gate_up = nullptr;
  int64_t row_stride = 0;
  void* out = nullptr;  // [rows, width] contiguous
};
// out = silu(gate) * up (header comment). InvalidArgument for a bad dtype, shape, stride or
// pointer; IOError if the launch fails.
Status LaunchSiluMul(const SiluMulArgs& args, cudaStream_t stream);

}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_LAYER_OPS_H_
