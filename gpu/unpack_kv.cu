// Kernel of unpack_kv.h. Includes only CUDA headers and plain shotdb headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "format/kv_values.h"  // kI8TokenGroup, KvI8Groups
#include "gpu/cuda_util.h"
#include "gpu/kernel_common.cuh"
#include "gpu/unpack_kv.h"

namespace shotdb {
namespace gpu {
namespace {

using internal::Store2;

constexpr int kThreads = 256;
constexpr uint32_t kMaxCtasPerJob = 64;  // a grid-stride loop covers longer records

using JobTable = internal::RecordTable<kMaxUnpackJobs>;

__device__ __forceinline__ float2 Fp8x2ToFloat2(uint16_t two_codes) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(two_codes, __NV_E4M3);
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}

// CTA (x, job): groups of 4 elements x * kThreads + tid, stepping by gridDim.x * kThreads.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    Fp8Kernel(const __grid_constant__ JobTable tab, uint32_t kv_heads, uint32_t head_dim) {
  const uint32_t job = blockIdx.y;
  const uint64_t per_head = static_cast<uint64_t>(tab.tokens[job]) * head_dim;  // % 4 == 0
  const uint64_t groups = kv_heads * per_head / 4;
  const float* scales = static_cast<const float*>(tab.src[job]);
  const uint32_t* codes = reinterpret_cast<const uint32_t*>(scales + kv_heads);
  T* const dst = static_cast<T*>(tab.dst[job]);
  for (uint64_t g = static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x; g < groups;
       g += static_cast<uint64_t>(gridDim.x) * kThreads) {
    const float scale = scales[g * 4 / per_head];
    const uint32_t four = codes[g];
    // A multiply alone (no add to contract into an FMA): the same rounding as the host's.
    const float2 lo = Fp8x2ToFloat2(static_cast<uint16_t>(four & 0xffffu));
    const float2 hi = Fp8x2ToFloat2(static_cast<uint16_t>(four >> 16));
    Store2(dst + 4 * g, make_float2(__fmul_rn(lo.x, scale), __fmul_rn(lo.y, scale)));
    Store2(dst + 4 * g + 2, make_float2(__fmul_rn(hi.x, scale), __fmul_rn(hi.y, scale)));
  }
}

// The same grid for scaled int8: a group's 4 elements are 4 consecutive channels of one head and
// token (head_dim % 4 == 0), each multiplied by its (head, token group, channel) bfloat16 scale
// (exact in float32).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    I8Kernel(const __grid_constant__ JobTable tab, uint32_t kv_heads, uint32_t head_dim) {
  const uint32_t job = blockIdx.y;
  const uint64_t per_head = static_cast<uint64_t>(tab.tokens[job]) * head_dim;
  const uint64_t groups = kv_heads * per_head / 4;
  const uint64_t token_groups = KvI8Groups(tab.tokens[job]);
  // [kv_heads][token_groups][head_dim]
  const auto* scales = static_cast<const __nv_bfloat16*>(tab.src[job]);
  const uint32_t* codes =
      reinterpret_cast<const uint32_t*>(scales + kv_heads * token_groups * head_dim);
  T* const dst = static_cast<T*>(tab.dst[job]);
  for (uint64_t g = static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x; g < groups;
       g += static_cast<uint64_t>(gridDim.x) * kThreads) {
    const uint64_t e = 4 * g;
    const uint64_t head = e / per_head, token = e % per_head / head_dim;
    const __nv_bfloat16* s =
        scales + (head * token_groups + token / kI8TokenGroup) * head_dim + e % head_dim;
    const uint32_t four = codes[g];
    float v[4];
    for (int i = 0; i < 4; ++i) {
      const auto code = static_cast<int8_t>(static_cast<uint8_t>(four >> (8 * i)));
      v[i] = __fmul_rn(static_cast<float>(code), __bfloat162float(s[i]));
    }
    Store2(dst + e, make_float2(v[0], v[1]));
    Store2(dst + e + 2, make_float2(v[2], v[3]));
  }
}

// The same grid over 8-byte words: a plain copy of `elem`-byte values (src and dst 8-byte aligned);
// the last bytes of a payload that is not a whole number of words are copied one by one.
__global__ void __launch_bounds__(kThreads)
    CopyKernel(const __grid_constant__ JobTable tab, uint32_t kv_heads, uint32_t head_dim,
               uint32_t elem) {
  const uint32_t job = blockIdx.y;
  const uint64_t bytes = uint64_t{kv_heads} * tab.tokens[job] * head_dim * elem;
  const uint2* src = static_cast<const uint2*>(tab.src[job]);
  uint2* const dst = static_cast<uint2*>(tab.dst[job]);
  for (uint64_t g = static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x; g < bytes / 8;
       g += static_cast<uint64_t>(gridDim.x) * kThreads) {
    dst[g] = src[g];
  }
  if (blockIdx.x == 0 && threadIdx.x < bytes % 8) {
    const uint64_t i = bytes / 8 * 8 + threadIdx.x;
    static_cast<uint8_t*>(tab.dst[job])[i] = static_cast<const uint8_t*>(tab.src[job])[i];
  }
}

}  // namespace

Status LaunchUnpackKv(const UnpackKvArgs& a, cudaStream_t stream) {
  const bool copy = a.stored == a.dtype;
  if (!copy && !(IsScaledDType(a.stored) && internal::IsKernelDType(a.dtype))) {
    return Status::InvalidArgument(
        "LaunchUnpackKv: payloads must be the pages' dtype, or f8e4m3 or i8 into bf16 or f16 "
        "pages, not " +
        std::string(DTypeName(a.stored)) + " into " + std::string(DTypeName(a.dtype)));
  }
  const uint32_t elem = static_cast<uint32_t>(DTypeSize(a.stored));
  if (a.kv_heads == 0 || a.head_dim == 0 || elem == 0 || (!copy && a.head_dim % 4 != 0)) {
    return Status::InvalidArgument(
        "LaunchUnpackKv: need kv_heads > 0, head_dim > 0 (a multiple of 4 for f8e4m3 and i8) and a "
        "known dtype, got kv_heads " +
        std::to_string(a.kv_heads) + ", head_dim " + std::to_string(a.head_dim));
  }
  const uintptr_t src_alignment = copy ? 8 : 4;
  for (size_t i = 0; i < a.jobs.size(); ++i) {
    SHOTDB_RETURN_IF_ERROR(internal::CheckRecordJob(a.jobs[i], i, src_alignment,
                                                    /*dst_alignment=*/8, "LaunchUnpackKv"));
  }
  for (size_t first = 0; first < a.jobs.size(); first += kMaxUnpackJobs) {
    const size_t n = std::min<size_t>(kMaxUnpackJobs, a.jobs.size() - first);
    JobTable tab;
    internal::FillRecordTable(a.jobs, first, n, &tab);
    uint64_t most = 0;
    for (size_t i = 0; i < n; ++i) {
      // Threads: a group of 4 values each (scaled dtypes), or an 8-byte word.
      const uint64_t values = uint64_t{a.kv_heads} * tab.tokens[i] * a.head_dim;
      most = std::max<uint64_t>(most, copy ? values * elem / 8 : values / 4);
    }
    const uint32_t ctas = static_cast<uint32_t>(std::max<uint64_t>(
        1, std::min<uint64_t>(kMaxCtasPerJob, (most + kThreads - 1) / kThreads)));
    const dim3 grid(ctas, static_cast<uint32_t>(n));
    if (copy) {
      CopyKernel<<<grid, kThreads, 0, stream>>>(tab, a.kv_heads, a.head_dim, elem);
    } else if (a.stored == DType::kI8) {
      if (a.dtype == DType::kBF16) {
        I8Kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(tab, a.kv_heads, a.head_dim);
      } else {
        I8Kernel<__half><<<grid, kThreads, 0, stream>>>(tab, a.kv_heads, a.head_dim);
      }
    } else if (a.dtype == DType::kBF16) {
      Fp8Kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(tab, a.kv_heads, a.head_dim);
    } else {
      Fp8Kernel<__half><<<grid, kThreads, 0, stream>>>(tab, a.kv_heads, a.head_dim);
    }
    SHOTDB_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return Status::OK();
}

}  // namespace gpu
}  // namespace shotdb
