// Float64 reference implementations of the kernels in rope_gather.h and paged_attention.h, for
// tests.
//
// Straightforward loops in double precision over tensors already converted to double; the kernels
// are checked against these with bf16/f16 tolerances. Plain C++, pure, thread-safe.
#ifndef SHOTDB_GPU_ROPE_REFERENCE_H_
#define SHOTDB_GPU_ROPE_REFERENCE_H_

#include <cstdint>
#include <vector>

namespace shotdb {
namespace gpu {

// Rotates one head_dim vector `x` to position `pos` with the rotate-half convention of HF Llama
// (i < d/2): out[i] = x[i] cos(pos f_i) - x[i + d/2] sin(pos f_i),
//            out[i + d/2] = x[i + d/2] cos(pos f_i) + x[i] sin(pos f_i).
// `inv_freq` holds d/2 frequencies f_i (RopeInvFreq); x and out hold d values and may alias.
void RotateHalfReference(const double* x, double* out, int64_t pos,
                         const std::vector<double>& inv_freq);

// One selected block: K and V as [kv_heads, tokens, head_dim], pre-RoPE.
struct ReferenceBlock {
  std::vector<double> k, v;
  uint32_t tokens = 0;
};

// Concatenates the blocks along tokens into k_out/v_out [kv_heads, total_tokens, head_dim],
// rotating K to positions first_position, first_position + 1, ... in concatenated order; V is
// copied unrotated. The outputs are resized.
void GatherRopeReference(const std::vector<ReferenceBlock>& blocks, uint32_t kv_heads,
                         uint32_t head_dim, const std::vector<double>& inv_freq,
                         int64_t first_position, std::vector<double>* k_out,
                         std::vector<double>* v_out);

// Attention of `rows` query tokens per query head over a context without mask, with grouped
// queries: q is [q_heads, rows, head_dim] (already rotated), k and v are
// [kv_heads, tokens, head_dim] (k already rotated); query head h uses kv head
// h / (q_heads / kv_heads). With s_j = q[h][r] . k_j / sqrt(head_dim):
//   out[h][r] = sum_j softmax(s)_j v_j,   lse[h][r] = ln sum_j exp(s_j).
// Resizes out to [q_heads, rows, head_dim] and lse to [q_heads, rows]. q_heads must be a multiple
// of kv_heads and tokens > 0.
void PagedAttentionReference(const std::vector<double>& q, const std::vector<double>& k,
                             const std::vector<double>& v, uint32_t q_heads, uint32_t kv_heads,
                             uint32_t rows, uint32_t tokens, uint32_t head_dim,
                             std::vector<double>* out, std::vector<double>* lse);

}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_ROPE_REFERENCE_H_
