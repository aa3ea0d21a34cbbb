// The new tokens' attention among themselves, merged with their attention over a context.
//
// A DBSA query's forward attends its new tokens (the prompt and the label tree) to the context,
// which LaunchPagedAttention computes from the pages as (out_ctx, lse_ctx) per query row and head,
// and to each other under a mask (causal prompt, tree for the labels). LaunchMergeAttention does
// the second part and the merge in one kernel, flash-attention style: it starts each row's online
// softmax from the context's result (running max lse_ctx, sum 1, accumulator out_ctx), then adds
// the new tokens the mask allows:
//
//   out[r][h] = (e^(lse_ctx - m) out_ctx + sum_j p_j v_j) / (e^(lse_ctx - m) + sum_j p_j),
//   p_j = e^(scale q[h][r] . k[h / group][j] - m),   scale = 1 / sqrt(head_dim),
//
// and writes the result in the dtype of q, in the layout the output projection reads:
// [rows, q_heads * head_dim]. One warp per (row, head); float32 arithmetic. On a GPU the libtorch
// equivalent is about 20 small kernels per layer, each costing more to launch than to run.
//
// Plain C++ header (the kernel lives in merge_attention.cu). Asynchronous on `stream`; argument
// errors are returned before any CUDA call. Thread-safe.
#ifndef SHOTDB_GPU_MERGE_ATTENTION_H_
#define SHOTDB_GPU_MERGE_ATTENTION_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "format/dtype.h"
#include "util/status.h"

namespace shotdb {
namespace gpu {

struct MergeAttentionArgs {
  DType dtype = DType::kBF16;          // of q, k, v and out: kBF16 or kF16
  uint32_t q_heads = 0, kv_heads = 0;  // q_heads a multiple of kv_heads
  uint32_t head_dim = 0;               // 64 or 128
  uint32_t rows = 0;                   // new tokens T >= 1
  // Element strides (head, row); the last dimension is contiguous. q: [q_heads, T, head_dim] with
  // RoPE applied; k (RoPE applied) and v: [kv_heads, T, head_dim], e.g. views into the QKV output.
  const void* q = nullptr;
  int64_t q_head_stride = 0, q_row_stride = 0;
  const void* k = nullptr;
  int64_t k_head_stride = 0, k_row_stride = 0;
  const void* v = nullptr;
  int64_t v_head_stride = 0, v_row_stride = 0;
  // [T, T] row-major, nonzero = row may attend to column (device memory).
  const uint8_t* mask = nullptr;
  // The context's result, [q_heads, T, head_dim] and [q_heads, T] float32, both null for no
  // context (then every row must allow at least one column).
  const float* ctx_out = nullptr;
  const float* ctx_lse = nullptr;
  void* out = nullptr;  // [T, q_heads * head_dim] in `dtype`
};

// InvalidArgument for an unsupported dtype or shape, null pointers (ctx_out and ctx_lse: both or
// neither) or a last dimension that is not contiguous; IOError if the launch fails.
Status LaunchMergeAttention(const MergeAttentionArgs& args, cudaStream_t stream);

}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_MERGE_ATTENTION_H_
