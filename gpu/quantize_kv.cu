// Kernels of quantize_kv.h. Includes only CUDA headers and plain shotdb headers.
//
// Every step repeats KvFromFloat's (format/kv_values.cc) in the same float32 operations: the
// divisions are IEEE (__fdiv_rn), the maxima of absolute values are exact, the bfloat16 scale is
// rounded to nearest even and then up by hand as the host does, int8 codes are rounded to nearest
// even (__float2int_rn) after the same clamp, fp8 codes come from the hardware conversion, which
// rounds to nearest even and saturates to +-448 as FloatToFp8E4M3 does. quantize_kv_test.cc
// checks the bytes against the host's.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <string>

#include "format/kv_values.h"  // kI8TokenGroup, KvI8Groups, kI8Max, kFp8E4M3Max
#include "gpu/cuda_util.h"
#include "gpu/kernel_common.cuh"
#include "gpu/quantize_kv.h"

namespace shotdb {
namespace gpu {
namespace {

constexpr int kI8Threads = 128;  // channels of one (head, token group) at a time
constexpr int kF8Threads = 256;  // the elements of one head

using JobTable = internal::RecordTable<kMaxQuantizeJobs>;

__device__ __forceinline__ float Load(const __nv_bfloat16* p, uint64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ float Load(const __half* p, uint64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float Load(const float* p, uint64_t i) { return p[i]; }

__device__ __forceinline__ bool NotFinite(float x) { return !(fabsf(x) <= FLT_MAX); }

// I8Scale of format/kv_values.cc: amax / 127 rounded to the nearest bfloat16, then up one step if
// that fell below it; 1 for amax 0. amax is finite and >= 0.
__device__ __forceinline__ uint16_t I8ScaleBits(float amax) {
  if (amax == 0.f) return 0x3f80u;  // 1.0
  const float want = __fdiv_rn(amax, kI8Max);
  uint32_t x = __float_as_uint(want);
  x += 0x7fffu + ((x >> 16) & 1u);
  uint16_t b = static_cast<uint16_t>(x >> 16);
  if (__uint_as_float(static_cast<uint32_t>(b) << 16) < want) ++b;
  return b;
}

// CTA (x, job): x = head * groups + token group of the job (CTAs past the job's count return);
// each thread takes channels tid, tid + kI8Threads, ...: their amax over the group's tokens, the
// scale, then the codes (a second read of the same values, from cache).
template <typename T>
__global__ void __launch_bounds__(kI8Threads)
    I8Kernel(const __grid_constant__ JobTable tab, uint32_t kv_heads, uint32_t head_dim,
             uint32_t* __restrict__ not_finite) {
  const uint32_t job = blockIdx.y;
  const uint32_t tokens = tab.tokens[job];
  const uint64_t groups = KvI8Groups(tokens);
  if (blockIdx.x >= kv_heads * groups) return;
  const uint64_t head = blockIdx.x / groups, group = blockIdx.x % groups;
  const uint64_t per_head = static_cast<uint64_t>(tokens) * head_dim;
  const uint32_t first = static_cast<uint32_t>(group) * kI8TokenGroup;
  const uint32_t end = min(tokens, first + kI8TokenGroup);
  const T* const src = static_cast<const T*>(tab.src[job]) + head * per_head;
  uint8_t* const dst = static_cast<uint8_t*>(tab.dst[job]);
  uint16_t* const scales = reinterpret_cast<uint16_t*>(dst) + (head * groups + group) * head_dim;
  int8_t* const codes =
      reinterpret_cast<int8_t*>(dst + 2 * kv_heads * groups * head_dim) + head * per_head;
  bool bad = false;
  for (uint32_t d = threadIdx.x; d < head_dim; d += kI8Threads) {
    float amax = 0.f;
    for (uint32_t t = first; t < end; ++t) {
      const float x = Load(src, uint64_t{t} * head_dim + d);
      bad |= NotFinite(x);
      amax = fmaxf(amax, fabsf(x));
    }
    const uint16_t b = I8ScaleBits(amax);
    scales[d] = b;
    const float scale = __uint_as_float(static_cast<uint32_t>(b) << 16);
    for (uint32_t t = first; t < end; ++t) {
      const uint64_t i = uint64_t{t} * head_dim + d;
      const float q = fminf(fmaxf(__fdiv_rn(Load(src, i), scale), -kI8Max), kI8Max);
      codes[i] = static_cast<int8_t>(__float2int_rn(q));
    }
  }
  if (bad) not_finite[job] = 1;
}

// CTA (head, job): the head's amax (a block reduction), its float32 scale, then its codes.
template <typename T>
__global__ void __launch_bounds__(kF8Threads)
    F8Kernel(const __grid_constant__ JobTable tab, uint32_t kv_heads, uint32_t head_dim,
             uint32_t* __restrict__ not_finite) {
  const uint32_t job = blockIdx.y, head = blockIdx.x;
  const uint64_t per_head = static_cast<uint64_t>(tab.tokens[job]) * head_dim;
  const T* const src = static_cast<const T*>(tab.src[job]) + head * per_head;
  float* const scales = static_cast<float*>(tab.dst[job]);
  auto* const codes = reinterpret_cast<__nv_fp8_storage_t*>(scales + kv_heads) + head * per_head;
  float amax = 0.f;
  bool bad = false;
  for (uint64_t i = threadIdx.x; i < per_head; i += kF8Threads) {
    const float x = Load(src, i);
    bad |= NotFinite(x);
    amax = fmaxf(amax, fabsf(x));
  }
  __shared__ float warp_max[kF8Threads / 32];
  for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = warp_max[0];
  for (int w = 1; w < kF8Threads / 32; ++w) amax = fmaxf(amax, warp_max[w]);
  const float scale = amax > 0.f ? __fdiv_rn(amax, kFp8E4M3Max) : 1.f;
  if (threadIdx.x == 0) scales[head] = scale;
  for (uint64_t i = threadIdx.x; i < per_head; i += kF8Threads) {
    codes[i] = __nv_cvt_float_to_fp8(__fdiv_rn(Load(src, i), scale), __NV_SATFINITE, __NV_E4M3);
  }
  if (bad) not_finite[job] = 1;
}

template <typename T>
void Launch(DType stored, const JobTable& tab, uint32_t n, uint32_t ctas_x, uint32_t kv_heads,
            uint32_t head_dim, uint32_t* not_finite, cudaStream_t stream) {
  if (stored == DType::kI8) {
    I8Kernel<T><<<dim3(ctas_x, n), kI8Threads, 0, stream>>>(tab, kv_heads, head_dim, not_finite);
  } else {
    F8Kernel<T><<<dim3(kv_heads, n), kF8Threads, 0, stream>>>(tab, kv_heads, head_dim, not_finite);
  }
}

}  // namespace

Status LaunchQuantizeKv(const QuantizeKvArgs& a, cudaStream_t stream) {
  if (!IsScaledDType(a.stored) ||
      !(a.src_dtype == DType::kBF16 || a.src_dtype == DType::kF16 || a.src_dtype == DType::kF32)) {
    return Status::InvalidArgument(
        "LaunchQuantizeKv: bf16, f16 or f32 values into f8e4m3 or i8, "
        "not " +
        std::string(DTypeName(a.src_dtype)) + " into " + std::string(DTypeName(a.stored)));
  }
  if (a.kv_heads == 0 || a.head_dim == 0) {
    return Status::InvalidArgument("LaunchQuantizeKv: need kv_heads > 0 and head_dim > 0, got " +
                                   std::to_string(a.kv_heads) + " and " +
                                   std::to_string(a.head_dim));
  }
  if (a.jobs.empty()) return Status::OK();
  if (a.not_finite == nullptr || reinterpret_cast<uintptr_t>(a.not_finite) % 4 != 0) {
    return Status::InvalidArgument("LaunchQuantizeKv: not_finite must be 4-byte aligned memory");
  }
  const uintptr_t src_alignment = DTypeSize(a.src_dtype);
  for (size_t i = 0; i < a.jobs.size(); ++i) {
    const QuantizeKvJob& j = a.jobs[i];
    SHOTDB_RETURN_IF_ERROR(
        internal::CheckRecordJob(j, i, src_alignment, /*dst_alignment=*/4, "LaunchQuantizeKv"));
    if (uint64_t{a.kv_heads} * KvI8Groups(j.tokens) > 0x7fffffffu) {
      return Status::InvalidArgument("LaunchQuantizeKv: job " + std::to_string(i) +
                                     " has too many heads and tokens for one launch");
    }
  }
  SHOTDB_CUDA_RETURN_IF_ERROR(
      cudaMemsetAsync(a.not_finite, 0, a.jobs.size() * sizeof(uint32_t), stream));
  for (size_t first = 0; first < a.jobs.size(); first += kMaxQuantizeJobs) {
    const uint32_t n =
        static_cast<uint32_t>(std::min<size_t>(kMaxQuantizeJobs, a.jobs.size() - first));
    JobTable tab;
    internal::FillRecordTable(a.jobs, first, n, &tab);
    uint64_t ctas_x = 1;
    for (uint32_t i = 0; i < n; ++i) {
      ctas_x = std::max<uint64_t>(ctas_x, uint64_t{a.kv_heads} * KvI8Groups(tab.tokens[i]));
    }
    uint32_t* const flags = a.not_finite + first;
    const uint32_t x = static_cast<uint32_t>(ctas_x);
    switch (a.src_dtype) {
      case DType::kBF16:
        Launch<__nv_bfloat16>(a.stored, tab, n, x, a.kv_heads, a.head_dim, flags, stream);
        break;
      case DType::kF16:
        Launch<__half>(a.stored, tab, n, x, a.kv_heads, a.head_dim, flags, stream);
        break;
      default:
        Launch<float>(a.stored, tab, n, x, a.kv_heads, a.head_dim, flags, stream);
        break;
    }
    SHOTDB_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return Status::OK();
}

}  // namespace gpu
}  // namespace shotdb
