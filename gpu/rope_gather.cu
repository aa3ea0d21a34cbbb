// Kernels of rope_gather.h. Includes only CUDA headers and plain shotdb headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <string>

#include "gpu/cuda_util.h"
#include "gpu/rope_gather.h"

namespace shotdb {
namespace gpu {
namespace {

constexpr int kGatherWarps = 8;  // rows (one kv head, one token) per gather CTA
constexpr int kAttnWarps = 4;    // warps per attention CTA
constexpr int kAttnChunk = 128;  // tokens per attention CTA (one split)
constexpr int kMaxGroup = 8;     // query heads per kv head

// Passed by value as a __grid_constant__ parameter (CUDA 12.1+ allows 32 KiB of parameters).
struct BlockTable {
  const void* k[kMaxKernelBlocks];
  const void* v[kMaxKernelBlocks];
  uint32_t offset[kMaxKernelBlocks + 1];  // offset[b]: first concatenated token of block b
  uint32_t num_blocks;
  double inv_freq[kMaxKernelHeadDim / 2];
};

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
__device__ __forceinline__ float Load1(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float Load1(const __half* p) { return __half2float(*p); }

// sin and cos of pos * inv_freq: the product and its reduction mod 2*pi in float64 (a float32
// product at position 1e5 would be off by ~1e-2 rad), the trigonometry in float32.
__device__ __forceinline__ void SinCos(int64_t pos, double inv_freq, float* s, float* c) {
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  double a = static_cast<double>(pos) * inv_freq;
  a -= rint(a * (1.0 / kTwoPi)) * kTwoPi;
  sincosf(static_cast<float>(a), s, c);
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

__device__ __forceinline__ float WarpSum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Loads the lane's NP elements of the first half (j0..j0+NP-1) into x[0..NP) and their partners
// (j0 + D/2 ...) into x[NP..2NP).
template <typename T, int D>
__device__ __forceinline__ void LoadLane(const T* row, int j0, float* x) {
  constexpr int kNp = D / 64;
  if constexpr (kNp % 2 == 0) {
#pragma unroll
    for (int i = 0; i < kNp; i += 2) {
      const float2 a = Load2(row + j0 + i), b = Load2(row + D / 2 + j0 + i);
      x[i] = a.x;
      x[i + 1] = a.y;
      x[kNp + i] = b.x;
      x[kNp + i + 1] = b.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kNp; ++i) {
      x[i] = Load1(row + j0 + i);
      x[kNp + i] = Load1(row + D / 2 + j0 + i);
    }
  }
}

// Flash-decoding split: CTA (split, kv head) runs an online softmax over its kAttnChunk tokens for
// the group of query heads sharing the kv head (each warp a strided subset of the tokens), merges
// its warps in shared memory and writes (max, sum, unnormalized output) per query head.
template <typename T, int D, bool kRotate>
__global__ void __launch_bounds__(kAttnWarps * 32)
    DecodeAttentionKernel(const __grid_constant__ BlockTable tab, const T* q, int group,
                          uint32_t total, int64_t first_position, float scale, int num_splits,
                          float* ws_ml, float* ws_acc) {
  constexpr int kNp = D / 64;
  __shared__ float s_m[kAttnWarps][kMaxGroup], s_l[kAttnWarps][kMaxGroup];
  __shared__ float s_acc[kAttnWarps][kMaxGroup][D];
  const int split = blockIdx.x, kvh = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j0 = lane * kNp;

  float qr[kMaxGroup][2 * kNp];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g < group) {
      LoadLane<T, D>(q + static_cast<size_t>(kvh * group + g) * D, j0, qr[g]);
#pragma unroll
      for (int i = 0; i < 2 * kNp; ++i) qr[g][i] *= scale;
    }
  }
  double inv[kNp];
#pragma unroll
  for (int i = 0; i < kNp; ++i) inv[i] = tab.inv_freq[j0 + i];

  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][2 * kNp];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 2 * kNp; ++i) acc[g][i] = 0.f;
  }

  const uint32_t start = static_cast<uint32_t>(split) * kAttnChunk;
  const uint32_t end = min(start + kAttnChunk, total);
  for (uint32_t t = start + warp; t < end; t += kAttnWarps) {
    const int b = FindBlock(tab, t);
    const uint32_t block_tokens = tab.offset[b + 1] - tab.offset[b];
    const size_t src =
        (static_cast<size_t>(kvh) * block_tokens + (t - tab.offset[b])) * static_cast<size_t>(D);
    float kx[2 * kNp], vx[2 * kNp];
    LoadLane<T, D>(static_cast<const T*>(tab.k[b]) + src, j0, kx);
    LoadLane<T, D>(static_cast<const T*>(tab.v[b]) + src, j0, vx);
    if constexpr (kRotate) {
      const int64_t pos = first_position + t;
#pragma unroll
      for (int i = 0; i < kNp; ++i) {
        float s, c;
        SinCos(pos, inv[i], &s, &c);
        const float x = kx[i], y = kx[kNp + i];
        kx[i] = x * c - y * s;
        kx[kNp + i] = y * c + x * s;
      }
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g < group) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < 2 * kNp; ++i) dot += qr[g][i] * kx[i];
        dot = WarpSum(dot);
        const float mn = fmaxf(m[g], dot);
        const float corr = __expf(m[g] - mn);
        const float p = __expf(dot - mn);
        l[g] = l[g] * corr + p;
#pragma unroll
        for (int i = 0; i < 2 * kNp; ++i) acc[g][i] = acc[g][i] * corr + p * vx[i];
        m[g] = mn;
      }
    }
  }

#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g < group) {
      if (lane == 0) {
        s_m[warp][g] = m[g];
        s_l[warp][g] = l[g];
      }
#pragma unroll
      for (int i = 0; i < kNp; ++i) {
        s_acc[warp][g][j0 + i] = acc[g][i];
        s_acc[warp][g][D / 2 + j0 + i] = acc[g][kNp + i];
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < group * D; idx += blockDim.x) {
    const int g = idx / D, d = idx % D;
    float mx = -INFINITY;
    for (int w = 0; w < kAttnWarps; ++w) mx = fmaxf(mx, s_m[w][g]);
    float sum = 0.f, a = 0.f;
    for (int w = 0; w < kAttnWarps; ++w) {
      // A warp without tokens has m = -inf and contributes exp(-inf) = 0.
      const float f = __expf(s_m[w][g] - mx);
      sum += s_l[w][g] * f;
      a += s_acc[w][g][d] * f;
    }
    const size_t slot = static_cast<size_t>(kvh * group + g) * num_splits + split;
    ws_acc[slot * D + d] = a;
    if (d == 0) {
      ws_ml[slot * 2] = mx;
      ws_ml[slot * 2 + 1] = sum;
    }
  }
}

// One CTA per query head: merges the splits' partial softmaxes.
__global__ void CombineSplitsKernel(const float* ws_ml, const float* ws_acc, int num_splits,
                                    int head_dim, float* out) {
  const int h = blockIdx.x;
  const float* ml = ws_ml + static_cast<size_t>(h) * num_splits * 2;
  float mx = -INFINITY;
  for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, ml[2 * s]);
  float sum = 0.f;
  for (int s = 0; s < num_splits; ++s) sum += ml[2 * s + 1] * __expf(ml[2 * s] - mx);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float a = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      a +=
          ws_acc[(static_cast<size_t>(h) * num_splits + s) * head_dim + d] * __expf(ml[2 * s] - mx);
    }
    out[static_cast<size_t>(h) * head_dim + d] = a / sum;
  }
}

bool IsKernelDType(DType t) { return t == DType::kBF16 || t == DType::kF16; }

// Validates the blocks and fills the table; returns the total token count.
Result<uint32_t> BuildTable(const std::vector<KvBlockRef>& blocks, const RopeParams& rope,
                            uint32_t head_dim, const char* what, BlockTable* tab) {
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
    if (reinterpret_cast<uintptr_t>(r.k) % 4 != 0 || reinterpret_cast<uintptr_t>(r.v) % 4 != 0) {
      return Status::InvalidArgument(std::string(what) + ": block " + std::to_string(b) +
                                     " pointers are not 4-byte aligned");
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

uint32_t NumSplits(uint64_t total_tokens) {
  return static_cast<uint32_t>((total_tokens + kAttnChunk - 1) / kAttnChunk);
}

template <typename T, int D>
void LaunchAttention(const BlockTable& tab, const DecodeAttentionArgs& a, uint32_t total,
                     uint32_t splits, float* ws_ml, float* ws_acc, cudaStream_t stream) {
  const dim3 grid(splits, a.kv_heads);
  const int group = static_cast<int>(a.q_heads / a.kv_heads);
  const float scale = 1.0f / sqrtf(static_cast<float>(D));
  const T* q = static_cast<const T*>(a.q);
  if (a.rotate_keys) {
    DecodeAttentionKernel<T, D, true><<<grid, kAttnWarps * 32, 0, stream>>>(
        tab, q, group, total, a.first_position, scale, static_cast<int>(splits), ws_ml, ws_acc);
  } else {
    DecodeAttentionKernel<T, D, false><<<grid, kAttnWarps * 32, 0, stream>>>(
        tab, q, group, total, a.first_position, scale, static_cast<int>(splits), ws_ml, ws_acc);
  }
}

}  // namespace

Status LaunchGatherRope(const GatherRopeArgs& args, cudaStream_t stream) {
  if (!IsKernelDType(args.dtype)) {
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
  SHOTDB_ASSIGN_OR_RETURN(uint32_t total,
                          BuildTable(args.blocks, args.rope, args.head_dim, "GatherRope", &tab));
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

size_t DecodeAttentionWorkspaceBytes(uint32_t q_heads, uint32_t head_dim, uint64_t total_tokens) {
  return static_cast<size_t>(q_heads) * NumSplits(total_tokens) * (2 + head_dim) * sizeof(float);
}

Status LaunchDecodeAttention(const DecodeAttentionArgs& args, cudaStream_t stream) {
  if (!IsKernelDType(args.dtype)) {
    return Status::InvalidArgument("DecodeAttention: dtype must be bf16 or f16, got " +
                                   std::string(DTypeName(args.dtype)));
  }
  if (args.head_dim != 64 && args.head_dim != 128) {
    return Status::InvalidArgument("DecodeAttention: head_dim must be 64 or 128, got " +
                                   std::to_string(args.head_dim));
  }
  if (args.kv_heads == 0 || args.q_heads % args.kv_heads != 0 || args.q_heads == 0 ||
      args.q_heads / args.kv_heads > kMaxGroup) {
    return Status::InvalidArgument(
        "DecodeAttention: q_heads must be a multiple of kv_heads with at most " +
        std::to_string(kMaxGroup) + " query heads per kv head, got " +
        std::to_string(args.q_heads) + " and " + std::to_string(args.kv_heads));
  }
  if (args.q == nullptr || args.out == nullptr || args.workspace == nullptr) {
    return Status::InvalidArgument("DecodeAttention: null q, out or workspace");
  }
  BlockTable tab;
  SHOTDB_ASSIGN_OR_RETURN(
      uint32_t total, BuildTable(args.blocks, args.rope, args.head_dim, "DecodeAttention", &tab));
  const size_t need = DecodeAttentionWorkspaceBytes(args.q_heads, args.head_dim, total);
  if (args.workspace_bytes < need) {
    return Status::InvalidArgument("DecodeAttention: workspace holds " +
                                   std::to_string(args.workspace_bytes) + " bytes, need " +
                                   std::to_string(need));
  }
  const uint32_t splits = NumSplits(total);
  float* ws_ml = static_cast<float*>(args.workspace);
  float* ws_acc = ws_ml + static_cast<size_t>(args.q_heads) * splits * 2;
  if (args.dtype == DType::kBF16) {
    if (args.head_dim == 128) {
      LaunchAttention<__nv_bfloat16, 128>(tab, args, total, splits, ws_ml, ws_acc, stream);
    } else {
      LaunchAttention<__nv_bfloat16, 64>(tab, args, total, splits, ws_ml, ws_acc, stream);
    }
  } else {
    if (args.head_dim == 128) {
      LaunchAttention<__half, 128>(tab, args, total, splits, ws_ml, ws_acc, stream);
    } else {
      LaunchAttention<__half, 64>(tab, args, total, splits, ws_ml, ws_acc, stream);
    }
  }
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  CombineSplitsKernel<<<args.q_heads, 128, 0, stream>>>(ws_ml, ws_acc, static_cast<int>(splits),
                                                        static_cast<int>(args.head_dim), args.out);
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return Status::OK();
}

}  // namespace gpu
}  // namespace shotdb
