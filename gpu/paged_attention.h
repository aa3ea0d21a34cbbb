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

// ---- a batch of queries over the union of their blocks ----
//
// LaunchPagedAttentionBatch computes, in one launch, what LaunchPagedAttention computes for each
// of several queries (rotate_keys true): DBSA's batched queries (DbsaSession::AskBatch) attend a
// layer in one launch instead of one per query. The batch's blocks are given once, as their
// union (`blocks`, e.g. in the order they were staged); each query names its blocks, as indices
// into the union, in its own concatenation order, and places them at first_position + 0..C_i-1.
// Query i's rows of q, out and lse follow those of queries 0..i-1: q is [q_heads, R, head_dim]
// with R the rows of all queries.
//
// Each query's context is cut into the same number of splits; a CTA takes one query, kv head and
// split, as LaunchPagedAttention's do, reading its block table from device memory (the layout)
// instead of its parameters. Each query reads its own blocks: reading them in the union's order,
// so that the CTAs of queries sharing a block would read it together through L2, was measured
// slower (docs/results.md, run W: this kernel is not bound by memory bandwidth, and splits of the
// union leave the queries' CTAs unequal work).
struct PagedBatchQuery {
  uint32_t rows = 0;             // its query tokens, >= 1
  std::vector<uint32_t> blocks;  // 1..kMaxKernelBlocks indices into the union (repeats allowed)
  int64_t first_position = 0;    // >= 0; first_position + C_i <= 2^31 - 1
};

// The layer-independent part of a batch: each query's blocks, positions and splits. Built on the
// host once per batch; the caller copies `words` to device memory once and passes that copy to
// every launch whose union has the same token counts (every layer of a forward).
struct PagedBatchLayout {
  uint32_t q_heads = 0, kv_heads = 0, head_dim = 0;
  uint32_t queries = 0;
  uint32_t rows = 0;                   // R, the queries' rows summed
  std::vector<uint32_t> block_tokens;  // the union's blocks, in union order
  // The plan (derived): the CTA shape for the longest query, splits per query.
  int wm = 0;
  uint32_t m_tiles = 0, splits = 0, segments = 0;
  std::vector<uint32_t> words;  // for the device, 4-byte words
};

// Validates the shapes and queries (InvalidArgument naming the query and field) and lays the
// batch out. `splits`: parts of each query's context, in whole tiles of 64 tokens (a part may be
// empty); 0 picks about one wave of CTAs, each split at least 8 x the query vectors per kv head
// in tokens. Makes no CUDA call other than asking the device's SM count (as
// PagedAttentionWorkspaceBytes).
Result<PagedBatchLayout> MakePagedBatchLayout(uint32_t q_heads, uint32_t kv_heads,
                                              uint32_t head_dim,
                                              const std::vector<uint32_t>& block_tokens,
                                              const std::vector<PagedBatchQuery>& queries,
                                              uint32_t splits = 0);

// Scratch bytes of a batch's launch: its splits' partial results (0 for one split).
size_t PagedBatchWorkspaceBytes(const PagedBatchLayout& layout);

struct PagedBatchArgs {
  DType dtype = DType::kBF16;  // of q, K and V: kBF16 or kF16
  const PagedBatchLayout* layout = nullptr;
  const void* layout_words = nullptr;  // device copy of layout->words, 4-byte aligned
  // This launch's pages of the union, token counts equal to layout->block_tokens; k and v 16-byte
  // aligned, pre-RoPE.
  std::vector<KvBlockRef> blocks;
  RopeParams rope;
  const void* q = nullptr;  // [q_heads, R, head_dim], rotated to the queries' positions
  float* out = nullptr;     // [q_heads, R, head_dim] float32
  float* lse = nullptr;     // [q_heads, R] float32; may be null
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// Enqueues the batch's attention (and the merge of the splits, if more than one).
// InvalidArgument for a dtype, blocks, pointers, workspace or RoPE parameters that do not fit the
// layout; IOError if a launch fails.
Status LaunchPagedAttentionBatch(const PagedBatchArgs& args, cudaStream_t stream);

}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_PAGED_ATTENTION_H_
