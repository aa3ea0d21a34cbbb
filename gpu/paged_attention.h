// Attention of a few query tokens over a context held in stored (pre-RoPE) K/V pages, in place.
//
// DBSA concatenates the selected blocks in retrieval order and places them at new, contiguous
// positions first_position + 0..L-1. LaunchPagedAttention reads the blocks' pages where they lie
// (no gathered copy), rotates K to those positions while it reads it (rotate_keys), and computes,
// for every query row of every query head, attention over the whole context with no mask:
//
//   out[h][r] = softmax(scale * q[h][r] . K^T) V         (scale = 1 / sqrt(head_dim))
//   lse[h][r] = ln sum_j exp(scale * q[h][r] . K_j)
//
// The caller attends over its own new tokens (causally) separately and merges the two results
// flash-attention style: with lse_c / o_c from here and lse_n / o_n over the new tokens,
// lse = logaddexp(lse_c, lse_n) and o = exp(lse_c - lse) o_c + exp(lse_n - lse) o_n. Decode of one
// token is rows == 1.
//
// The kernel splits the context over CTAs (flash-decoding) and merges the splits in a second
// kernel through `workspace`; within a CTA all query rows of all query heads sharing a kv head
// (group * rows vectors) are multiplied against each K/V tile on the tensor cores, so every page is
// read from memory once (docs/gpu.md). Products are in the input dtype (K is rounded to it after
// the rotation, the softmax weights before multiplying V) with float32 accumulation; softmax,
// `out` and `lse` are float32. RoPE is that of rope_gather.h (angles reduced in float64), with
// the sine and cosine from the hardware approximation every 16 tiles of 64 tokens and advanced by
// float32 rotations in between (error < ~1e-5 rad, far below a bf16 rounding's 2^-8).
//
// Plain C++ header (the kernels live in paged_attention.cu). Launches are asynchronous on
// `stream`; argument errors are returned before any launch (the only CUDA calls before them ask
// the device's SM count, and tolerate no device: they work without a GPU), launch errors as
// IOError. Thread-safety: the functions are thread-safe.
#ifndef SHOTDB_GPU_PAGED_ATTENTION_H_
#define SHOTDB_GPU_PAGED_ATTENTION_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "format/dtype.h"
#include "gpu/rope.h"
#include "gpu/rope_gather.h"  // KvBlockRef, kMaxKernelBlocks
#include "util/status.h"

namespace shotdb {
namespace gpu {

constexpr uint32_t kMaxPagedAttentionGroup = 8;        // query heads per kv head
constexpr uint32_t kMaxPagedAttentionRows = 1u << 16;  // query tokens per launch

struct PagedAttentionArgs {
  DType dtype = DType::kBF16;  // of q, K and V: kBF16 or kF16
  uint32_t q_heads = 0;        // a multiple of kv_heads, at most 8 query heads per kv head
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;  // 64 or 128
  uint32_t rows = 0;      // query tokens, 1..kMaxPagedAttentionRows
  // [q_heads, rows, head_dim] contiguous, already rotated to the queries' positions; 4-byte
  // aligned.
  const void* q = nullptr;
  // 1..kMaxKernelBlocks pages, each [kv_heads, tokens, head_dim], k and v 16-byte aligned, in
  // concatenation order.
  std::vector<KvBlockRef> blocks;
  // True: K pages are pre-RoPE and token i of the concatenation is rotated to first_position + i
  // while it is read. False: K is used as stored (e.g. LaunchGatherRope's output as one block).
  bool rotate_keys = true;
  RopeParams rope;  // validated even when rotate_keys is false
  int64_t first_position = 0;
  float* out = nullptr;  // [q_heads, rows, head_dim] float32
  float* lse = nullptr;  // [q_heads, rows] float32 natural-log sum of exp; may be null
  // Scratch of at least PagedAttentionWorkspaceBytes(...) bytes (may be null when that is 0).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// Scratch bytes LaunchPagedAttention needs for these shapes on the current device: the splits'
// partial results (0 when the context is short enough for a single split; the split count follows
// the device's SM count, asked once per device, or an H200's 132 SMs without one). Assumes shapes
// LaunchPagedAttention accepts.
size_t PagedAttentionWorkspaceBytes(uint32_t q_heads, uint32_t kv_heads, uint32_t rows,
                                    uint32_t head_dim, uint64_t total_tokens);

// Enqueues the attention (and the merge of the splits, if more than one). InvalidArgument for an
// unsupported dtype or shape, bad blocks (see KvBlockRef), null or misaligned pointers, a too
// small workspace or bad RoPE parameters; IOError if a launch fails.
Status LaunchPagedAttention(const PagedAttentionArgs& args, cudaStream_t stream);

}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_PAGED_ATTENTION_H_
