// The gather kernel: the selected blocks' stored (pre-RoPE) K/V pages as contiguous attention
// inputs, and the page reference both kernels of gpu/ take.
//
// DBSA stores each block's K before RoPE and re-applies RoPE at query time at new, contiguous
// positions (the selected blocks are concatenated in their retrieval order). LaunchGatherRope
// copies the blocks' K/V in one pass into contiguous [kv_heads, total_tokens, head_dim] buffers,
// rotating K to positions first_position + 0..L-1 (what a standard attention kernel or libtorch
// then consumes). The alternative that reads the pages in place and rotates K on the fly is
// LaunchPagedAttention (paged_attention.h).
// RoPE is the rotate-half convention of HF Llama with frequencies from RopeInvFreq (rope.h); the
// angle pos * inv_freq is formed in float64 and reduced mod 2*pi before the float sin/cos, so
// positions in the hundreds of thousands keep full float accuracy. Arithmetic is float32.
//
// Plain C++ header (the kernel lives in rope_gather.cu). Launches are asynchronous on `stream`;
// argument errors are returned before anything is enqueued, launch errors as IOError.
// Thread-safety: the functions are thread-safe.
#ifndef SHOTDB_GPU_ROPE_GATHER_H_
#define SHOTDB_GPU_ROPE_GATHER_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "format/dtype.h"
#include "gpu/rope.h"
#include "util/status.h"

namespace shotdb {
namespace gpu {

// The block table travels as a kernel parameter (no upload, graph-capturable), which bounds it.
constexpr uint32_t kMaxKernelBlocks = 1024;
constexpr uint32_t kMaxKernelHeadDim = 256;

// One block's pages on the device: k and v are [kv_heads, tokens, head_dim] in the kernel dtype
// (e.g. a PageHandle's k()/v()), 4-byte aligned (16-byte for LaunchPagedAttention).
struct KvBlockRef {
  const void* k = nullptr;
  const void* v = nullptr;
  uint32_t tokens = 0;
};

struct GatherRopeArgs {
  DType dtype = DType::kBF16;  // kBF16 or kF16, for inputs and outputs
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;           // a multiple of 4, at most kMaxKernelHeadDim
  std::vector<KvBlockRef> blocks;  // 1..kMaxKernelBlocks, in concatenation order
  RopeParams rope;
  int64_t first_position = 0;
  // [kv_heads, total_tokens, head_dim] each, device memory not overlapping the inputs.
  void* k_out = nullptr;
  void* v_out = nullptr;
};

// Enqueues the gather + RoPE. InvalidArgument for an unsupported dtype, a bad head_dim, no or too
// many blocks, a block with 0 tokens or null pointers, null outputs, or bad RoPE parameters;
// IOError if the launch fails.
Status LaunchGatherRope(const GatherRopeArgs& args, cudaStream_t stream);

}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_ROPE_GATHER_H_
