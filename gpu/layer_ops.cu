// Kernels of layer_ops.h. Includes only CUDA headers and plain shotdb headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "gpu/cuda_util.h"
#include "gpu/kernel_common.cuh"
#include "gpu/layer_ops.h"
#include "gpu/rope_gather.h"  // kMaxKernelHeadDim

namespace shotdb {
namespace gpu {
namespace {

using internal::Load2;
using internal::SinCos;
using internal::Store2;

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float RoundTo(float x);
template <>
__device__ __forceinline__ float RoundTo<__nv_bfloat16>(float x) {
  return __bfloat162float(__float2bfloat16_rn(x));
}
template <>
__device__ __forceinline__ float RoundTo<__half>(float x) {
  return __half2float(__float2half_rn(x));
}

// The sum of `v` over the CTA (kThreads threads), returned to every thread.
__device__ __forceinline__ float CtaSum(float v) {
  __shared__ float partial[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total += partial[w];  // the same order in every thread
  return total;
}

// CTA r: row r. Two passes over the row (the second from L1/L2).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    RmsNormKernel(const T* x, int64_t x_row_stride, const T* weight, uint32_t width, float eps,
                  T* out) {
  const T* row = x + static_cast<int64_t>(blockIdx.x) * x_row_stride;
  T* dst = out + static_cast<int64_t>(blockIdx.x) * width;
  float sum = 0;
  for (uint32_t i = 2 * threadIdx.x; i < width; i += 2 * kThreads) {
    const float2 v = Load2(row + i);
    sum += v.x * v.x + v.y * v.y;
  }
  const float inv = rsqrtf(CtaSum(sum) / static_cast<float>(width) + eps);
  for (uint32_t i = 2 * threadIdx.x; i < width; i += 2 * kThreads) {
    const float2 v = Load2(row + i);
    const float2 w = Load2(weight + i);
    Store2(dst + i, make_float2(w.x * RoundTo<T>(v.x * inv), w.y * RoundTo<T>(v.y * inv)));
  }
}

// Passed by value (__grid_constant__): the inverse frequencies.
struct RopeTable {
  double inv_freq[kMaxKernelHeadDim / 2];
};

// CTA r: token r. The half-dimension's angles once in shared memory, then every head's pairs of
// adjacent elements (i, i + 1) with their partners (i + d/2, i + d/2 + 1).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    RopeQkKernel(const __grid_constant__ RopeTable tab, const T* qk, int64_t row_stride,
                 const int64_t* positions, uint32_t q_heads, uint32_t kv_heads, uint32_t head_dim,
                 uint32_t rows, T* q_out, T* k_out) {
  __shared__ float cos_s[kMaxKernelHeadDim / 2], sin_s[kMaxKernelHeadDim / 2];
  const uint32_t r = blockIdx.x, half = head_dim / 2;
  const int64_t pos = positions[r];
  for (uint32_t i = threadIdx.x; i < half; i += kThreads)
    SinCos(pos, tab.inv_freq[i], &sin_s[i], &cos_s[i]);
  __syncthreads();
  const T* src = qk + static_cast<int64_t>(r) * row_stride;
  const uint32_t pairs = half / 2, total = (q_heads + kv_heads) * pairs;
  for (uint32_t j = threadIdx.x; j < total; j += kThreads) {
    const uint32_t head = j / pairs, i = 2 * (j % pairs);
    const T* x = src + static_cast<int64_t>(head) * head_dim;
    T* dst = head < q_heads ? q_out + (static_cast<int64_t>(head) * rows + r) * head_dim
                            : k_out + (static_cast<int64_t>(head - q_heads) * rows + r) * head_dim;
    const float2 a = Load2(x + i), b = Load2(x + i + half);
    const float c0 = cos_s[i], s0 = sin_s[i], c1 = cos_s[i + 1], s1 = sin_s[i + 1];
    Store2(dst + i, make_float2(a.x * c0 - b.x * s0, a.y * c1 - b.y * s1));
    Store2(dst + i + half, make_float2(b.x * c0 + a.x * s0, b.y * c1 + a.y * s1));
  }
}

// Pairs of adjacent columns, grid-stride over rows * width / 2.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    SiluMulKernel(const T* gate_up, int64_t row_stride, uint32_t rows, uint32_t width, T* out) {
  const uint64_t pairs = static_cast<uint64_t>(rows) * (width / 2);
  for (uint64_t p = static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x; p < pairs;
       p += static_cast<uint64_t>(gridDim.x) * kThreads) {
    const uint64_t r = p / (width / 2), c = 2 * (p % (width / 2));
    const T* row = gate_up + static_cast<int64_t>(r) * row_stride;
    const float2 g = Load2(row + c), u = Load2(row + width + c);
    const float s0 = RoundTo<T>(g.x / (1.0f + expf(-g.x)));
    const float s1 = RoundTo<T>(g.y / (1.0f + expf(-g.y)));
    Store2(out + r * width + c, make_float2(s0 * u.x, s1 * u.y));
  }
}

bool Aligned4(const void* p) { return reinterpret_cast<uintptr_t>(p) % 4 == 0; }

Status CheckDType(DType d, const char* what) {
  if (d == DType::kBF16 || d == DType::kF16) return Status::OK();
  return Status::InvalidArgument(std::string(what) + ": dtype must be bf16 or f16, got " +
                                 std::string(DTypeName(d)));
}

}  // namespace

Status LaunchRmsNorm(const RmsNormArgs& a, cudaStream_t stream) {
  auto bad = [](const std::string& m) { return Status::InvalidArgument("RmsNorm: " + m); };
  SHOTDB_RETURN_IF_ERROR(CheckDType(a.dtype, "RmsNorm"));
  if (a.rows == 0 || a.rows > static_cast<uint32_t>(INT32_MAX)) {
    return bad("rows must be >= 1, got " + std::to_string(a.rows));
  }
  if (a.width < 2 || a.width > 65536 || a.width % 2 != 0) {
    return bad("width must be even and in 2..65536, got " + std::to_string(a.width));
  }
  if (a.x_row_stride < a.width || a.x_row_stride % 2 != 0) {
    return bad("x_row_stride must be even and >= width, got " + std::to_string(a.x_row_stride));
  }
  if (a.x == nullptr || a.weight == nullptr || a.out == nullptr)
    return bad("null x, weight or out");
  if (!Aligned4(a.x) || !Aligned4(a.weight) || !Aligned4(a.out)) {
    return bad("x, weight and out must be 4-byte aligned");
  }
  if (!(a.eps > 0)) return bad("eps must be > 0");
  if (a.dtype == DType::kBF16) {
    using T = __nv_bfloat16;
    RmsNormKernel<T><<<a.rows, kThreads, 0, stream>>>(static_cast<const T*>(a.x), a.x_row_stride,
                                                      static_cast<const T*>(a.weight), a.width,
                                                      a.eps, static_cast<T*>(a.out));
  } else {
    using T = __half;
    RmsNormKernel<T><<<a.rows, kThreads, 0, stream>>>(static_cast<const T*>(a.x), a.x_row_stride,
                                                      static_cast<const T*>(a.weight), a.width,
                                                      a.eps, static_cast<T*>(a.out));
  }
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return Status::OK();
}

Status LaunchRopeQk(const RopeQkArgs& a, cudaStream_t stream) {
  auto bad = [](const std::string& m) { return Status::InvalidArgument("RopeQk: " + m); };
  SHOTDB_RETURN_IF_ERROR(CheckDType(a.dtype, "RopeQk"));
  if (a.head_dim == 0 || a.head_dim % 4 != 0 || a.head_dim > kMaxKernelHeadDim) {
    return bad("head_dim must be a multiple of 4 in 4.." + std::to_string(kMaxKernelHeadDim) +
               ", got " + std::to_string(a.head_dim));
  }
  if (a.q_heads == 0 || a.kv_heads == 0 || a.q_heads > 4096 || a.kv_heads > 4096) {
    return bad("q_heads and kv_heads must be in 1..4096, got " + std::to_string(a.q_heads) +
               " and " + std::to_string(a.kv_heads));
  }
  if (a.rows == 0 || a.rows > static_cast<uint32_t>(INT32_MAX)) {
    return bad("rows must be >= 1, got " + std::to_string(a.rows));
  }
  const int64_t width = static_cast<int64_t>(a.q_heads + a.kv_heads) * a.head_dim;
  if (a.row_stride < width || a.row_stride % 2 != 0) {
    return bad("row_stride must be even and >= (q_heads + kv_heads) * head_dim = " +
               std::to_string(width) + ", got " + std::to_string(a.row_stride));
  }
  if (a.qk == nullptr || a.positions == nullptr || a.q_out == nullptr || a.k_out == nullptr) {
    return bad("null qk, positions, q_out or k_out");
  }
  if (!Aligned4(a.qk) || !Aligned4(a.q_out) || !Aligned4(a.k_out)) {
    return bad("qk, q_out and k_out must be 4-byte aligned");
  }
  SHOTDB_ASSIGN_OR_RETURN(std::vector<double> inv, RopeInvFreq(a.rope, a.head_dim));
  RopeTable tab{};
  std::copy(inv.begin(), inv.end(), tab.inv_freq);
  if (a.dtype == DType::kBF16) {
    using T = __nv_bfloat16;
    RopeQkKernel<T><<<a.rows, kThreads, 0, stream>>>(
        tab, static_cast<const T*>(a.qk), a.row_stride, a.positions, a.q_heads, a.kv_heads,
        a.head_dim, a.rows, static_cast<T*>(a.q_out), static_cast<T*>(a.k_out));
  } else {
    using T = __half;
    RopeQkKernel<T><<<a.rows, kThreads, 0, stream>>>(
        tab, static_cast<const T*>(a.qk), a.row_stride, a.positions, a.q_heads, a.kv_heads,
        a.head_dim, a.rows, static_cast<T*>(a.q_out), static_cast<T*>(a.k_out));
  }
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return Status::OK();
}

Status LaunchSiluMul(const SiluMulArgs& a, cudaStream_t stream) {
  auto bad = [](const std::string& m) { return Status::InvalidArgument("SiluMul: " + m); };
  SHOTDB_RETURN_IF_ERROR(CheckDType(a.dtype, "SiluMul"));
  if (a.rows == 0) return bad("rows must be >= 1");
  if (a.width < 2 || a.width % 2 != 0) {
    return bad("width must be even and >= 2, got " + std::to_string(a.width));
  }
  if (a.row_stride < 2 * static_cast<int64_t>(a.width) || a.row_stride % 2 != 0) {
    return bad("row_stride must be even and >= 2 * width, got " + std::to_string(a.row_stride));
  }
  if (a.gate_up == nullptr || a.out == nullptr) return bad("null gate_up or out");
  if (!Aligned4(a.gate_up) || !Aligned4(a.out))
    return bad("gate_up and out must be 4-byte aligned");
  const uint64_t pairs = static_cast<uint64_t>(a.rows) * (a.width / 2);
  const unsigned grid = static_cast<unsigned>(
      std::min<uint64_t>((pairs + kThreads - 1) / kThreads, uint64_t{132} * 16));
  if (a.dtype == DType::kBF16) {
    using T = __nv_bfloat16;
    SiluMulKernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(a.gate_up), a.row_stride,
                                                    a.rows, a.width, static_cast<T*>(a.out));
  } else {
    using T = __half;
    SiluMulKernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(a.gate_up), a.row_stride,
                                                    a.rows, a.width, static_cast<T*>(a.out));
  }
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return Status::OK();
}

}  // namespace gpu
}  // namespace shotdb
