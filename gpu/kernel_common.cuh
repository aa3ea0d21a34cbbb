// Internal to gpu/*.cu: the block and record tables the kernels receive as parameters, their
// host-side validation, and small device helpers (16-bit loads/stores, RoPE angles, block lookup).
// Include only from .cu files (it needs the CUDA fp16/bf16 headers); no libtorch.
#ifndef SHOTDB_GPU_KERNEL_COMMON_CUH_
#define SHOTDB_GPU_KERNEL_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "format/dtype.h"
#include "gpu/rope.h"
#include "gpu/rope_gather.h"
#include "util/status.h"

namespace shotdb {
namespace gpu {
namespace internal {

// Passed by value as a __grid_constant__ parameter (CUDA 12.1+ allows 32 KiB of parameters): no
// upload per launch, and launches can be captured in a CUDA graph.
struct BlockTable {
  const void* k[kMaxKernelBlocks];
  const void* v[kMaxKernelBlocks];
  uint32_t offset[kMaxKernelBlocks + 1];  // offset[b]: first concatenated token of block b
  uint32_t num_blocks;
  double inv_freq[kMaxKernelHeadDim / 2];
};

// The records of one launch of the per-record kernels (unpack_kv.cu, quantize_kv.cu), passed by
// value as a __grid_constant__ parameter: record i is read from src[i], written to dst[i] and has
// tokens[i] tokens.
template <uint32_t kMax>
struct RecordTable {
  const void* src[kMax];
  void* dst[kMax];
  uint32_t tokens[kMax];
};

// InvalidArgument naming `launch` and job `index` if the job (any type with src, dst and tokens)
// has a null pointer, src not aligned to `src_alignment` bytes, dst not to `dst_alignment`, or 0
// tokens.
template <typename Job>
Status CheckRecordJob(const Job& j, size_t index, uintptr_t src_alignment, uintptr_t dst_alignment,
                      const char* launch) {
  if (j.src == nullptr || j.dst == nullptr || j.tokens == 0 ||
      reinterpret_cast<uintptr_t>(j.src) % src_alignment != 0 ||
      reinterpret_cast<uintptr_t>(j.dst) % dst_alignment != 0) {
    return Status::InvalidArgument(std::string(launch) + ": job " + std::to_string(index) +
                                   " has a null or misaligned pointer (src " +
                                   std::to_string(src_alignment) + ", dst " +
                                   std::to_string(dst_alignment) + " bytes) or 0 tokens");
  }
  return Status::OK();
}

// Fills `tab` with jobs[first, first + n) (any job type with src, dst and tokens).
template <uint32_t kMax, typename Job>
void FillRecordTable(const std::vector<Job>& jobs, size_t first, size_t n, RecordTable<kMax>* tab) {
  for (size_t i = 0; i < n; ++i) {
    const Job& j = jobs[first + i];
    tab->src[i] = j.src;
    tab->dst[i] = j.dst;
    tab->tokens[i] = j.tokens;
  }
}

inline bool IsKernelDType(DType t) { return t == DType::kBF16 || t == DType::kF16; }

// Validates the blocks (1..kMaxKernelBlocks, non-null, > 0 tokens, k and v aligned to
// `alignment` bytes) and the RoPE parameters, and fills the table; returns the total token count.
// Makes no CUDA call.
inline Result<uint32_t> BuildTable(const std::vector<KvBlockRef>& blocks, const RopeParams& rope,
                                   uint32_t head_dim, uintptr_t alignment, const char* what,
                                   BlockTable* tab) {
  if (blocks.empty() || blocks.size() > kMaxKernelBlocks) {
    return Status::InvalidArgument(std::string(what) + ": need 1.." +
                                   std::to_string(kMaxKernelBlocks) + " blocks, got " +
                                   std::to_string(blocks.size()));
  }
  SHOTDB_ASSIGN_OR_RETURN(std::vector<double> inv, RopeInvFreq(rope, head_dim));
  uint64_t total = 0;
  for (size_t b = 0; b < blocks.size(); ++b) {
    const KvBlockRef& r = blocks[b];
    if (r.k == nullptr || r.v == nullptr || r.tokens == 0) {
      return Status::InvalidArgument(std::string(what) + ": block " + std::to_string(b) +
                                     " has a null pointer or 0 tokens");
    }
    if (reinterpret_cast<uintptr_t>(r.k) % alignment != 0 ||
        reinterpret_cast<uintptr_t>(r.v) % alignment != 0) {
      return Status::InvalidArgument(std::string(what) + ": block " + std::to_string(b) +
                                     " pointers are not " + std::to_string(alignment) +
                                     "-byte aligned");
    }
    tab->k[b] = r.k;
    tab->v[b] = r.v;
    tab->offset[b] = static_cast<uint32_t>(total);
    total += r.tokens;
    if (total > UINT32_MAX / 2) {
      return Status::InvalidArgument(std::string(what) + ": more than 2^31 tokens");
    }
  }
  tab->offset[blocks.size()] = static_cast<uint32_t>(total);
  tab->num_blocks = static_cast<uint32_t>(blocks.size());
  for (size_t i = 0; i < inv.size(); ++i) tab->inv_freq[i] = inv[i];
  return static_cast<uint32_t>(total);
}

__device__ __forceinline__ float2 Load2(const __nv_bfloat16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
__device__ __forceinline__ float2 Load2(const __half* p) {
  return __half22float2(*reinterpret_cast<const __half2*>(p));
}
__device__ __forceinline__ void Store2(__nv_bfloat16* p, float2 v) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v.x, v.y);
}
__device__ __forceinline__ void Store2(__half* p, float2 v) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(v.x, v.y);
}

// pos * inv_freq reduced to [-pi, pi]: the product and its reduction mod 2*pi in float64 (a
// float32 product at position 1e5 would be off by ~1e-2 rad), rounded to float32.
__device__ __forceinline__ float ReducedAngle(int64_t pos, double inv_freq) {
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  double a = static_cast<double>(pos) * inv_freq;
  a -= rint(a * (1.0 / kTwoPi)) * kTwoPi;
  return static_cast<float>(a);
}

// sin and cos of pos * inv_freq: the angle reduced in float64, the trigonometry in float32.
__device__ __forceinline__ void SinCos(int64_t pos, double inv_freq, float* s, float* c) {
  sincosf(ReducedAngle(pos, inv_freq), s, c);
}

// SinCos with the trigonometry from the hardware approximation (__sincosf: absolute error below
// ~1e-6 for the reduced |angle| <= pi, against 2^-8 relative for a bf16 rounding), for kernels
// where it is on the critical path: the paged attention rotates every K tile it reads, and the
// precise sincosf was ~1/4 of its instructions (run M in docs/results.md).
__device__ __forceinline__ void SinCosFast(int64_t pos, double inv_freq, float* s, float* c) {
  __sincosf(ReducedAngle(pos, inv_freq), s, c);
}

// The block holding concatenated token t (offset[b] <= t < offset[b + 1]).
__device__ __forceinline__ int FindBlock(const BlockTable& tab, uint32_t t) {
  int lo = 0, hi = static_cast<int>(tab.num_blocks) - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tab.offset[mid] <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

}  // namespace internal
}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_KERNEL_COMMON_CUH_
