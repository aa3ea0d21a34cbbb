// The gather kernel of rope_gather.h. Includes only CUDA headers and plain shotdb headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "gpu/cuda_util.h"
#include "gpu/kernel_common.cuh"
#include "gpu/rope_gather.h"

namespace shotdb {
namespace gpu {
namespace {

constexpr int kGatherWarps = 8;  // rows (one kv head, one token) per gather CTA

using internal::BlockTable;
using internal::FindBlock;
using internal::Load2;
using internal::SinCos;
using internal::Store2;

// One warp per output row (kv head h, token t): K rotated pairwise (lane handles pairs j, j+1 and
// their partners j + d/2, j+1 + d/2: 4-byte loads, a whole row per warp in one coalesced sweep),
// V copied as 32-bit words.
template <typename T>
__global__ void __launch_bounds__(kGatherWarps * 32)
    GatherRopeKernel(const __grid_constant__ BlockTable tab, int kv_heads, int head_dim,
                     uint32_t total, int64_t first_position, T* k_out, T* v_out) {
  __shared__ double s_inv[kMaxKernelHeadDim / 2];
  const int half = head_dim / 2;
  for (int i = threadIdx.x; i < half; i += blockDim.x) s_inv[i] = tab.inv_freq[i];
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint64_t row = static_cast<uint64_t>(blockIdx.x) * kGatherWarps + warp;
  if (row >= static_cast<uint64_t>(kv_heads) * total) return;
  const uint32_t h = static_cast<uint32_t>(row / total);
  const uint32_t t = static_cast<uint32_t>(row % total);
  const int b = FindBlock(tab, t);
  const uint32_t block_tokens = tab.offset[b + 1] - tab.offset[b];
  const size_t src = (static_cast<size_t>(h) * block_tokens + (t - tab.offset[b])) * head_dim;
  const size_t dst = static_cast<size_t>(row) * head_dim;
  const T* k = static_cast<const T*>(tab.k[b]) + src;
  T* ko = k_out + dst;
  const int64_t pos = first_position + t;
  for (int j = 2 * lane; j < half; j += 64) {
    const float2 x = Load2(k + j), y = Load2(k + j + half);
    float s0, c0, s1, c1;
    SinCos(pos, s_inv[j], &s0, &c0);
    SinCos(pos, s_inv[j + 1], &s1, &c1);
    Store2(ko + j, make_float2(x.x * c0 - y.x * s0, x.y * c1 - y.y * s1));
    Store2(ko + j + half, make_float2(y.x * c0 + x.x * s0, y.y * c1 + x.y * s1));
  }
  const uint32_t* vs = reinterpret_cast<const uint32_t*>(static_cast<const T*>(tab.v[b]) + src);
  uint32_t* vd = reinterpret_cast<uint32_t*>(v_out + dst);
  for (int w = lane; w < head_dim / 2; w += 32) vd[w] = vs[w];
}

}  // namespace

Status LaunchGatherRope(const GatherRopeArgs& args, cudaStream_t stream) {
  if (!internal::IsKernelDType(args.dtype)) {
    return Status::InvalidArgument("GatherRope: dtype must be bf16 or f16, got " +
                                   std::string(DTypeName(args.dtype)));
  }
  if (args.head_dim == 0 || args.head_dim % 4 != 0 || args.head_dim > kMaxKernelHeadDim ||
      args.kv_heads == 0) {
    return Status::InvalidArgument("GatherRope: head_dim must be a positive multiple of 4 up to " +
                                   std::to_string(kMaxKernelHeadDim) + " and kv_heads > 0, got " +
                                   std::to_string(args.head_dim) + " and " +
                                   std::to_string(args.kv_heads));
  }
  if (args.k_out == nullptr || args.v_out == nullptr) {
    return Status::InvalidArgument("GatherRope: null output");
  }
  BlockTable tab;
  SHOTDB_ASSIGN_OR_RETURN(
      uint32_t total,
      internal::BuildTable(args.blocks, args.rope, args.head_dim, 4, "GatherRope", &tab));
  const uint64_t rows = static_cast<uint64_t>(args.kv_heads) * total;
  const unsigned grid = static_cast<unsigned>((rows + kGatherWarps - 1) / kGatherWarps);
  const int kv = static_cast<int>(args.kv_heads), d = static_cast<int>(args.head_dim);
  if (args.dtype == DType::kBF16) {
    GatherRopeKernel<__nv_bfloat16><<<grid, kGatherWarps * 32, 0, stream>>>(
        tab, kv, d, total, args.first_position, static_cast<__nv_bfloat16*>(args.k_out),
        static_cast<__nv_bfloat16*>(args.v_out));
  } else {
    GatherRopeKernel<__half><<<grid, kGatherWarps * 32, 0, stream>>>(
        tab, kv, d, total, args.first_position, static_cast<__half*>(args.k_out),
        static_cast<__half*>(args.v_out));
  }
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return Status::OK();
}

}  // namespace gpu
}  // namespace shotdb
