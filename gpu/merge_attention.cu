// Kernel of merge_attention.h. Includes only CUDA headers and plain shotdb headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <string>

#include "gpu/cuda_util.h"
#include "gpu/merge_attention.h"

namespace shotdb {
namespace gpu {
namespace {

__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) {
  return __float2half(x);
}

__device__ __forceinline__ float WarpSum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Block (32 threads) = one (row, query head); lane owns D / 32 consecutive dimensions.
template <typename T, int D>
__global__ void __launch_bounds__(32)
    MergeAttentionKernel(const MergeAttentionArgs a, float scale) {
  constexpr int kPer = D / 32;
  const int r = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
  const int group = static_cast<int>(a.q_heads / a.kv_heads), kvh = h / group;
  const int d0 = lane * kPer;
  const T* q = static_cast<const T*>(a.q) + h * a.q_head_stride + r * a.q_row_stride + d0;
  float qr[kPer], acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) qr[i] = ToFloat(q[i]) * scale;
  float m = -INFINITY, l = 0.f;
  if (a.ctx_out != nullptr) {
    const size_t row = static_cast<size_t>(h) * a.rows + r;
    m = a.ctx_lse[row];
    l = 1.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) acc[i] = a.ctx_out[row * D + d0 + i];
  } else {
#pragma unroll
    for (int i = 0; i < kPer; ++i) acc[i] = 0.f;
  }
  const T* kb = static_cast<const T*>(a.k) + kvh * a.k_head_stride + d0;
  const T* vb = static_cast<const T*>(a.v) + kvh * a.v_head_stride + d0;
  const uint8_t* mask = a.mask + static_cast<size_t>(r) * a.rows;
  for (int j = 0; j < static_cast<int>(a.rows); ++j) {
    if (!mask[j]) continue;  // uniform across the warp
    const T* k = kb + j * a.k_row_stride;
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) dot += qr[i] * ToFloat(k[i]);
    const float s = WarpSum(dot);
    const float mn = fmaxf(m, s);
    const float corr = __expf(m - mn), p = __expf(s - mn);
    l = l * corr + p;
    const T* v = vb + j * a.v_row_stride;
#pragma unroll
    for (int i = 0; i < kPer; ++i) acc[i] = acc[i] * corr + p * ToFloat(v[i]);
    m = mn;
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* out = static_cast<T*>(a.out) + (static_cast<size_t>(r) * a.q_heads + h) * D + d0;
#pragma unroll
  for (int i = 0; i < kPer; ++i) out[i] = FromFloat<T>(acc[i] * inv);
}

template <typename T>
void Launch(const MergeAttentionArgs& a, cudaStream_t stream) {
  const dim3 grid(a.rows, a.q_heads);
  const float scale = 1.0f / sqrtf(static_cast<float>(a.head_dim));
  if (a.head_dim == 128) {
    MergeAttentionKernel<T, 128><<<grid, 32, 0, stream>>>(a, scale);
  } else {
    MergeAttentionKernel<T, 64><<<grid, 32, 0, stream>>>(a, scale);
  }
}

}  // namespace

Status LaunchMergeAttention(const MergeAttentionArgs& a, cudaStream_t stream) {
  auto bad = [](const std::string& m) { return Status::InvalidArgument("MergeAttention: " + m); };
  if (a.dtype != DType::kBF16 && a.dtype != DType::kF16) {
    return bad("dtype must be bf16 or f16, got " + std::string(DTypeName(a.dtype)));
  }
  if (a.head_dim != 64 && a.head_dim != 128) {
    return bad("head_dim must be 64 or 128, got " + std::to_string(a.head_dim));
  }
  if (a.kv_heads == 0 || a.q_heads == 0 || a.q_heads % a.kv_heads != 0) {
    return bad("q_heads must be a positive multiple of kv_heads, got " + std::to_string(a.q_heads) +
               " and " + std::to_string(a.kv_heads));
  }
  if (a.rows == 0 || a.rows > 65535) {
    return bad("rows must be in 1..65535, got " + std::to_string(a.rows));
  }
  if (a.q == nullptr || a.k == nullptr || a.v == nullptr || a.mask == nullptr || a.out == nullptr) {
    return bad("null q, k, v, mask or out");
  }
  if ((a.ctx_out == nullptr) != (a.ctx_lse == nullptr)) {
    return bad("ctx_out and ctx_lse go together");
  }
  if (a.dtype == DType::kBF16) {
    Launch<__nv_bfloat16>(a, stream);
  } else {
    Launch<__half>(a, stream);
  }
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return Status::OK();
}

}  // namespace gpu
}  // namespace shotdb
