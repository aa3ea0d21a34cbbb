// Kernels of paged_attention.h. Includes only CUDA headers and plain shotdb headers.
//
// Layout of the work (docs/gpu.md has the reasoning):
//   - M = group * rows query vectors share each kv head; they are contiguous in q ([q_heads, rows,
//     d] with the group's heads adjacent) and in out. A CTA takes one kv head, one tile of 16 * WM
//     of those vectors and one split of the context (`chunk` tokens). Up to 64 vectors: 4 warps,
//     WM = 1, 2 or 4 along M and the other 4 / WM warps splitting each K/V tile's tokens, 2 CTAs
//     an SM. 65-80 vectors (a DBSA prompt of 17-20 rows at group 4): 8 warps, four on vector
//     tiles 0-3 and four sharing tile 4's tokens (WM = 5, "mixed"). More: 8 warps along M (128
//     vectors a tile). 8-warp CTAs run 1 an SM; a prompt of up to 32 rows loads and rotates each
//     K/V tile once, not in two CTAs.
//   - K/V tiles of kTileN tokens stream through a cp.async ring of 3-4 tiles in shared memory
//     (16-byte copies, rows padded by 16 bytes so ldmatrix is conflict-free); a tile may straddle
//     blocks (each thread keeps a cursor into the block table). K is rotated in place in shared
//     memory one tile ahead: while the warps compute tile i, the producers rotate tile i + 1, with
//     one barrier a tile. The angles advance by rotation from row to row and tile to tile. The
//     producers are all threads, except in the mixed layout: there warps 4-7 load and rotate and
//     warps 0-3 only compute.
//   - S = Q K^T and O += P V on the tensor cores (mma.sync m16n8k16, bf16/f16 in, float32
//     accumulators), online softmax in float32 in the log2 domain, P kept in registers.
//   - The context is cut into as many splits as fill the GPU's resident CTA slots once (SMs x
//     CTAs an SM): one wave, no tail, and each CTA streams a long run of tiles, so the pipeline's
//     fill and the epilogue are paid once per CTA (run M in docs/results.md: one wave against
//     ~1024 CTAs took 28k tokens from 109 to 62 us).
//   - Each CTA writes its split's (max, sum, unnormalized O) per query vector; a second kernel
//     merges the splits into out and lse, one CTA per query vector with its warps over the splits.
//     With one split the CTA writes out and lse itself.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "gpu/cuda_util.h"
#include "gpu/kernel_common.cuh"
#include "gpu/paged_attention.h"

namespace shotdb {
namespace gpu {
namespace {

using internal::BlockTable;
using internal::FindBlock;
using internal::SinCos;
using internal::SinCosFast;

constexpr int kTileN = 64;           // tokens per K/V tile
constexpr int kPad = 8;              // elements of padding per shared-memory row (16 bytes)
constexpr int kOutPad = 8;           // floats of padding per row of the epilogue's O buffer
constexpr uint32_t kMinChunk = 128;  // tokens per split at least
// CTAs of 4 warps (up to 64 query vectors): 2 an SM (__launch_bounds__, registers and the
// shared-memory ring allow 2); of 8 warps (65-128 vectors, or more in several tiles): 1.
constexpr int CtasPerSm(int warps) { return warps == 4 ? 2 : 1; }
constexpr uint32_t kDefaultSms = 132;  // an H100/H200, when no device can be asked
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kLog2e = 1.44269504088896341f;

// ---- how the work is cut ----

struct Plan {
  uint32_t m = 0;        // query vectors per kv head: group * rows
  int wm = 1;            // 16-vector tiles along M a CTA: 1, 2 or 4 (4 warps); 5 or 8 (8 warps;
                         // 5: see PagedAttentionKernel's kMixed)
  uint32_t m_tiles = 0;  // CTAs along M per kv head and split
  uint32_t chunk = 0;    // tokens per split, a multiple of kTileN
  uint32_t splits = 0;
};

// Multiprocessors of the current device, asked once per device.
uint64_t Multiprocessors() {
  static std::atomic<uint32_t> sms[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    cudaGetLastError();  // no device: plan for a large GPU
    return kDefaultSms;
  }
  uint32_t n = sms[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    const Result<DeviceInfo> info = QueryDevice(dev);
    if (!info.ok() || info->multiprocessors <= 0) cudaGetLastError();
    n = info.ok() && info->multiprocessors > 0 ? static_cast<uint32_t>(info->multiprocessors)
                                               : kDefaultSms;
    sms[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

Plan MakePlan(uint32_t q_heads, uint32_t kv_heads, uint32_t rows, uint64_t total) {
  Plan p;
  p.m = q_heads / kv_heads * rows;
  p.wm = p.m <= 16 ? 1 : p.m <= 32 ? 2 : p.m <= 64 ? 4 : p.m <= 80 ? 5 : 8;
  const uint32_t m_tile = 16u * p.wm;
  p.m_tiles = (p.m + m_tile - 1) / m_tile;
  // One wave of CTAs (measured best against 1/2 and 2 waves, run M), but each split long enough
  // that writing and reading back its partial results (2 * M * (d + 2) floats) stays small next
  // to its K/V (2 * chunk * d 16-bit values): chunk >= 8 M keeps that below ~1/4.
  const uint64_t ctas_per_split = static_cast<uint64_t>(kv_heads) * p.m_tiles;
  const uint64_t slots = Multiprocessors() * CtasPerSm(p.wm >= 5 ? 8 : 4);
  const uint64_t target_splits = std::max<uint64_t>(1, slots / ctas_per_split);
  uint64_t chunk = (total + target_splits - 1) / target_splits;
  chunk = std::max<uint64_t>(chunk, kMinChunk);
  chunk = std::max<uint64_t>(chunk, 8ull * p.m);
  chunk = (chunk + kTileN - 1) / kTileN * kTileN;
  if (chunk > total) chunk = (total + kTileN - 1) / kTileN * kTileN;
  p.chunk = static_cast<uint32_t>(chunk);
  p.splits = static_cast<uint32_t>((total + chunk - 1) / chunk);
  return p;
}

template <int D>
constexpr size_t StageElems() {
  return static_cast<size_t>(kTileN) * (D + kPad);  // one K or V tile
}

// K/V tiles in the cp.async ring: the tile being computed, the next one (rotated meanwhile) and
// the ones in flight. Four where the shared memory allows (one 8-warp CTA an SM, or head_dim 64):
// copies then have two tiles' time to land. Two 4-warp CTAs of head_dim 128 fit three.
template <int D, int NW>
constexpr int Stages() {
  return NW == 8 || D == 64 ? 4 : 3;
}

template <int D, int NW>
constexpr size_t SmemBytes() {
  return Stages<D, NW>() * 2 * StageElems<D>() * 2;  // 16-bit elements
}

// The epilogue reuses the ring for the warps' partial results.
template <int D, int NW>
constexpr size_t EpilogueBytes() {
  return (static_cast<size_t>(NW) * 16 * (D + kOutPad) + 2 * NW * 16) * sizeof(float);
}
static_assert(EpilogueBytes<64, 4>() <= SmemBytes<64, 4>(), "epilogue must fit in the ring");
static_assert(EpilogueBytes<128, 4>() <= SmemBytes<128, 4>(), "epilogue must fit in the ring");
static_assert(EpilogueBytes<64, 8>() <= SmemBytes<64, 8>(), "epilogue must fit in the ring");
static_assert(EpilogueBytes<128, 8>() <= SmemBytes<128, 8>(), "epilogue must fit in the ring");
static_assert(2 * SmemBytes<128, 4>() <= 220 * 1024, "two 4-warp CTAs must fit an SM");

// ---- device helpers ----

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void LdMatrixX4(uint32_t* r, const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s)
               : "memory");
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t* r, const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s)
               : "memory");
}

// c (16x8 float) += a (16x16, row) * b (16x8, col).
template <typename T>
__device__ __forceinline__ void Mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void Mma<__nv_bfloat16>(float* c, const uint32_t* a, uint32_t b0,
                                                   uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void Mma<__half>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one 32-bit register of two 16-bit values (a in the low half).
template <typename T>
__device__ __forceinline__ uint32_t Pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t Pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t Pack2<__half>(float a, float b) {
  const __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// 2^x by the hardware's approximation (MUFU.EX2; results below 2^-126 flush to 0, which a softmax
// weight beside a weight of 1 can lose), without exp2f's extra steps for subnormal results.
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float2 Unpack2(uint32_t u, __nv_bfloat16) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
}
__device__ __forceinline__ float2 Unpack2(uint32_t u, __half) {
  return __half22float2(*reinterpret_cast<const __half2*>(&u));
}

// ---- the split kernel ----

// Where a batch's layout words are (PagedBatchLayout::words): per query its rows, first row,
// first position, first segment (one more entry: the end) and split bounds (splits + 1 offsets
// into its context); then per segment (a query's block, in the query's order) its union block
// and its first and end tokens in the query's context.
struct BatchWords {
  uint32_t nq, splits, segments;
  __host__ __device__ uint32_t rows(uint32_t i) const { return i; }
  __host__ __device__ uint32_t first(uint32_t i) const { return nq + i; }
  __host__ __device__ uint32_t position(uint32_t i) const { return 2 * nq + i; }
  __host__ __device__ uint32_t seg(uint32_t i) const { return 3 * nq + i; }
  __host__ __device__ uint32_t bound(uint32_t i, uint32_t s) const {
    return 4 * nq + 1 + i * (splits + 1) + s;
  }
  __host__ __device__ uint32_t seg_block(uint32_t j) const {
    return 4 * nq + 1 + nq * (splits + 1) + j;
  }
  __host__ __device__ uint32_t seg_start(uint32_t j) const { return seg_block(j) + segments; }
  __host__ __device__ uint32_t seg_end(uint32_t j) const { return seg_block(j) + 2 * segments; }
  __host__ __device__ uint32_t size() const { return seg_block(0) + 3 * segments; }
};

// CTA (m tile, [query,] kv head, split), flattened into blockIdx.x with the m tile fastest, so
// that the CTAs reading the same K/V (one query's m tiles) run together and share it through L2.
//
// One query (kBatch false): its rows are all of q's (`rows_all`), its tokens the concatenation
// of tab's blocks, token t at first_position + t. A batch (kBatch true): tab holds the union; the
// CTA's query takes its rows, first position, blocks (segments) and split bounds from `lw`
// (BatchWords), token t of its concatenation at its first position + t.
template <typename T, int D, int WM, int NW, bool kBatch>
__global__ void __launch_bounds__(NW * 32, CtasPerSm(NW))
    PagedAttentionKernel(const __grid_constant__ BlockTable tab, const T* __restrict__ q,
                         uint32_t group, uint32_t rows_all, uint32_t m_tiles, uint32_t kv_heads,
                         uint32_t total, uint32_t chunk, uint32_t splits, int64_t first_position,
                         bool rotate, float scale_log2, float* __restrict__ out,
                         float* __restrict__ lse, float* __restrict__ ws_acc,
                         float* __restrict__ ws_ml, const uint32_t* __restrict__ lw,
                         BatchWords bw) {
  constexpr int kWarps = NW;
  constexpr int kThreads = NW * 32;
  // WM = 5 (kMixed, 8 warps, 65-80 query vectors: an 18-row DBSA prompt has 72): warps 0-3 take
  // vector tiles 0-3 over all of a K/V tile's tokens, warps 4-7 share tile 4, 16 tokens each, and
  // are the producers (below). Every scheduler (warp w runs on scheduler w % 4) then holds the same
  // tensor-core work. As 8 warps along M, tile 4's warp shared a scheduler with tile 0's, which
  // did twice the others' work.
  constexpr bool kMixed = WM == 5;
  static_assert(!kMixed || NW == 8, "the mixed layout has 8 warps");
  constexpr int WN = kMixed ? 1 : kWarps / WM;  // warps along the tile's tokens (kMixed: tiles 0-3)
  constexpr int kNw = kTileN / WN;              // tokens of a tile per warp: 16, 32 or 64
  constexpr int kStages = Stages<D, NW>();
  constexpr int kRs = D + kPad;  // shared-memory row stride, elements
  constexpr int kKc = D / 16;    // k steps of Q K^T
  constexpr int kOn = D / 8;     // n tiles of O
  static_assert(kNw % 16 == 0, "a warp's tokens must be whole k steps of P V");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const ring = reinterpret_cast<T*>(smem_raw);
  __shared__ float2 s_step[D / 2];  // (cos, sin) of kRotRows * inv_freq

  const uint32_t bx = blockIdx.x;
  const uint32_t mt = bx % m_tiles;
  uint32_t rest = bx / m_tiles;
  uint32_t qi = 0;
  if constexpr (kBatch) {
    qi = rest % bw.nq;
    rest /= bw.nq;
  }
  const uint32_t kvh = rest % kv_heads;
  const uint32_t split = rest / kv_heads;
  // The CTA's query: its rows (of rows_all, from first_row) and its tokens in this split.
  uint32_t rows_q = rows_all, first_row = 0, start = 0, end = 0, seg_lo = 0, seg_hi = 0;
  if constexpr (kBatch) {
    rows_q = lw[bw.rows(qi)];
    first_row = lw[bw.first(qi)];
    first_position = lw[bw.position(qi)];
    start = lw[bw.bound(qi, split)];
    end = lw[bw.bound(qi, split + 1)];
    seg_lo = lw[bw.seg(qi)];
    seg_hi = lw[bw.seg(qi + 1)];
  } else {
    start = split * chunk;
    end = min(start + chunk, total);
  }
  const uint32_t m_total = group * rows_q;  // the query's vectors per kv head
  if (mt * (16u * WM) >= m_total) return;   // a shorter query of a batch: no vectors here
  const int ntiles = static_cast<int>((end - start + kTileN - 1) / kTileN);
  // Query vector v of kv head kvh (head kvh * group + v / rows_q, row v % rows_q) in q, out, lse.
  auto vec_index = [&](uint32_t v) -> size_t {
    return (static_cast<size_t>(kvh) * group + v / rows_q) * rows_all + first_row + v % rows_q;
  };

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tg = lane % 4;  // mma fragment coordinates

  // -- the producers: the threads that load and rotate K/V tiles. All of them, except in the mixed
  // layout, where warps 4-7 (a quarter of warps 0-3's tensor-core work each) load and rotate alone
  // and warps 0-3 only compute: every scheduler then holds one warp of each kind, and the
  // rotation is off the longest warps' path (run AA in docs/results.md).
  constexpr int kProducers = kMixed ? kThreads / 2 : kThreads;
  const int ptid = tid - (kThreads - kProducers);  // < 0: not a producer
  const bool producer = ptid >= 0;

  // -- K/V tile loads: producer copies 16-byte pieces `lc` of rows lr, lr + kLoadRows, ... --
  constexpr int kLoadCols = D / 8;
  constexpr int kLoadRows = kProducers / kLoadCols;
  static_assert(kTileN % kLoadRows == 0, "whole tiles of load rows");
  const int lc = (producer ? ptid : 0) % kLoadCols, lr = (producer ? ptid : 0) / kLoadCols;
  // Block (one query) or segment (a batch) of the thread's next token; monotone.
  int cursor = 0;
  if constexpr (kBatch) {
    int lo = static_cast<int>(seg_lo), hi = static_cast<int>(seg_hi) - 1;
    const uint32_t t = start + lr;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (lw[bw.seg_start(mid)] <= t) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    cursor = lo;
  } else {
    cursor = FindBlock(tab, start + lr);
  }
  auto load_tile = [&](int tile, int stage) {
    T* const sk = ring + static_cast<size_t>(stage) * 2 * StageElems<D>();
    T* const sv = sk + StageElems<D>();
    const uint32_t t0 = start + static_cast<uint32_t>(tile) * kTileN;
#pragma unroll
    for (int i = 0; i < kTileN / kLoadRows; ++i) {
      const int n = lr + i * kLoadRows;
      const uint32_t t = t0 + n;
      T* const dk = sk + n * kRs + lc * 8;
      T* const dv = sv + n * kRs + lc * 8;
      if (t < end) {
        uint32_t block = 0, in_block = 0;
        if constexpr (kBatch) {
          while (t >= lw[bw.seg_end(cursor)]) ++cursor;
          block = lw[bw.seg_block(cursor)];
          in_block = t - lw[bw.seg_start(cursor)];
        } else {
          while (t >= tab.offset[cursor + 1]) ++cursor;
          block = static_cast<uint32_t>(cursor);
          in_block = t - tab.offset[cursor];
        }
        const uint32_t block_tokens = tab.offset[block + 1] - tab.offset[block];
        const size_t off =
            (static_cast<size_t>(kvh) * block_tokens + in_block) * D + static_cast<size_t>(lc) * 8;
        CpAsync16(dk, static_cast<const T*>(tab.k[block]) + off);
        CpAsync16(dv, static_cast<const T*>(tab.v[block]) + off);
      } else {  // past the split: zeros (never NaN garbage in P V)
        *reinterpret_cast<uint4*>(dk) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(dv) = make_uint4(0, 0, 0, 0);
      }
    }
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (producer && s < ntiles) load_tile(s, s);
    CpAsyncCommit();
  }

  // -- RoPE in shared memory: producer rotates pairs 8 rc..8 rc+7 of rows rr, rr + kRotRows, ... --
  // Its angles advance from row to row (and tile to tile) by a rotation of kRotRows tokens, and
  // are computed afresh every kReseedTiles tiles, so the float32 steps never drift far (at most
  // kReseedTiles * kTileN / kRotRows steps: < 1e-5 rad, against 2^-8 for a bf16 rounding).
  constexpr int kRotCols = D / 16;
  constexpr int kRotRows = kProducers / kRotCols;
  static_assert(kTileN % kRotRows == 0, "whole tiles of rotation rows");
  constexpr int kReseedTiles = 16;
  const int rc = (producer ? ptid : 0) % kRotCols, rr = (producer ? ptid : 0) / kRotCols;
  float cs[8], sn[8];
  if (rotate) {
    for (int i = tid; i < D / 2; i += kThreads) {
      const double f = tab.inv_freq[i];
      float st, ct;
      SinCos(kRotRows, f, &st, &ct);
      s_step[i] = make_float2(ct, st);
    }
  }
  // Rotates tile `tile` (in stage `stage`) in place; tiles are rotated in order.
  auto rotate_tile = [&](int tile, int stage) {
    T* const sk = ring + static_cast<size_t>(stage) * 2 * StageElems<D>();
    if (tile % kReseedTiles == 0) {
      const int64_t pos =
          first_position + static_cast<int64_t>(start) + static_cast<int64_t>(tile) * kTileN + rr;
#pragma unroll
      for (int e = 0; e < 8; ++e) SinCosFast(pos, tab.inv_freq[8 * rc + e], &sn[e], &cs[e]);
    }
#pragma unroll
    for (int p = 0; p < kTileN / kRotRows; ++p) {
      T* const row = sk + (rr + p * kRotRows) * kRs;
      uint4 xa = *reinterpret_cast<const uint4*>(row + 8 * rc);
      uint4 ya = *reinterpret_cast<const uint4*>(row + D / 2 + 8 * rc);
      uint32_t* const xw = reinterpret_cast<uint32_t*>(&xa);
      uint32_t* const yw = reinterpret_cast<uint32_t*>(&ya);
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const float2 x = Unpack2(xw[w], T()), y = Unpack2(yw[w], T());
        const float c0 = cs[2 * w], s0 = sn[2 * w], c1 = cs[2 * w + 1], s1 = sn[2 * w + 1];
        xw[w] = Pack2<T>(x.x * c0 - y.x * s0, x.y * c1 - y.y * s1);
        yw[w] = Pack2<T>(y.x * c0 + x.x * s0, y.y * c1 + x.y * s1);
      }
      *reinterpret_cast<uint4*>(row + 8 * rc) = xa;
      *reinterpret_cast<uint4*>(row + D / 2 + 8 * rc) = ya;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float2 st = s_step[8 * rc + e];
        const float c = cs[e] * st.x - sn[e] * st.y;
        sn[e] = sn[e] * st.x + cs[e] * st.y;
        cs[e] = c;
      }
    }
  };

  // -- this warp's query vectors as mma A fragments, straight from global (rows >= M are 0) --
  const int wm = kMixed ? min(warp, 4) : warp / WN;  // the warp's vector tile
  const uint32_t row0 = mt * (16u * WM) + 16u * wm;
  const bool warp_active = row0 < m_total;
  uint32_t qf[kKc][4];
  {
    const uint32_t ra = row0 + g, rb = row0 + g + 8;
    const T* const qa = ra < m_total ? q + vec_index(ra) * D : nullptr;
    const T* const qb = rb < m_total ? q + vec_index(rb) * D : nullptr;
#pragma unroll
    for (int kc = 0; kc < kKc; ++kc) {
      const int c = kc * 16 + 2 * tg;
      qf[kc][0] = qa != nullptr ? *reinterpret_cast<const uint32_t*>(qa + c) : 0u;
      qf[kc][1] = qb != nullptr ? *reinterpret_cast<const uint32_t*>(qb + c) : 0u;
      qf[kc][2] = qa != nullptr ? *reinterpret_cast<const uint32_t*>(qa + c + 8) : 0u;
      qf[kc][3] = qb != nullptr ? *reinterpret_cast<const uint32_t*>(qb + c + 8) : 0u;
    }
  }

  float o[kOn][4];
#pragma unroll
  for (int i = 0; i < kOn; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running max of rows g and g + 8 (log2 domain)
  float l_run[2] = {0.f, 0.f};              // this thread's part of the running sums
  // The warp's first token within a tile.
  const int n0 = kMixed ? (warp < 4 ? 0 : (warp - 4) * 16) : (warp % WN) * kNw;

  // S = Q K^T, online softmax and O += P V over the warp's kN tokens of tile `it`.
  auto compute = [&](int it, auto tokens) {
    const T* const sk = ring + static_cast<size_t>(it % kStages) * 2 * StageElems<D>();
    const T* const sv = sk + StageElems<D>();
    const uint32_t t0 = start + static_cast<uint32_t>(it) * kTileN;
    constexpr int kN = decltype(tokens)::value;
    constexpr int kSnw = kN / 8;  // n tiles of S
    // S = Q K^T over the warp's kN tokens.
    float s[kSnw][4];
#pragma unroll
    for (int i = 0; i < kSnw; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < kKc; ++kc) {
#pragma unroll
      for (int np = 0; np < kN / 16; ++np) {
        uint32_t b[4];
        const int n = n0 + np * 16 + (lane & 7) + ((lane >> 4) & 1) * 8;
        LdMatrixX4(b, sk + n * kRs + kc * 16 + ((lane >> 3) & 1) * 8);
        Mma<T>(s[2 * np], qf[kc], b[0], b[1]);
        Mma<T>(s[2 * np + 1], qf[kc], b[2], b[3]);
      }
    }
    // Mask tokens past the split (the last tile only).
    if (t0 + kTileN > end) {
#pragma unroll
      for (int nt = 0; nt < kSnw; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (t0 + n0 + nt * 8 + 2 * tg + (e & 1) >= end) s[nt][e] = -INFINITY;
        }
      }
    }
    // Online softmax per row (r = 0: row g, elements 0, 1; r = 1: row g + 8, elements 2, 3), in
    // the log2 domain: the max is taken on the raw scores (scale_log2 > 0 keeps their order) and
    // the scale folded into the exponent's fma.
    float corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx2[2] = {s[0][2 * r], s[0][2 * r + 1]};  // two chains, not one
#pragma unroll
      for (int nt = 1; nt < kSnw; ++nt) {
        mx2[0] = fmaxf(mx2[0], s[nt][2 * r]);
        mx2[1] = fmaxf(mx2[1], s[nt][2 * r + 1]);
      }
      float mx = fmaxf(m_run[r], fmaxf(mx2[0], mx2[1]) * scale_log2);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float ref = mx == -INFINITY ? 0.f : mx;  // no token yet: keep everything 0
      corr[r] = Exp2(m_run[r] - ref);
      m_run[r] = mx;
      float sum2[2] = {0.f, 0.f};
#pragma unroll
      for (int nt = 0; nt < kSnw; ++nt) {
        s[nt][2 * r] = Exp2(fmaf(s[nt][2 * r], scale_log2, -ref));
        s[nt][2 * r + 1] = Exp2(fmaf(s[nt][2 * r + 1], scale_log2, -ref));
        sum2[0] += s[nt][2 * r];
        sum2[1] += s[nt][2 * r + 1];
      }
      const float sum = sum2[0] + sum2[1];
      l_run[r] = l_run[r] * corr[r] + sum;
    }
    // Rescale O only where a row's max moved (corr is exactly 1 where it did not: most tiles
    // once the largest scores have been seen).
    if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
      for (int i = 0; i < kOn; ++i) {
        o[i][0] *= corr[0];
        o[i][1] *= corr[0];
        o[i][2] *= corr[1];
        o[i][3] *= corr[1];
      }
    }
    // O += P V, P converted in registers from the S accumulators to A fragments.
#pragma unroll
    for (int kc = 0; kc < kN / 16; ++kc) {
      uint32_t pa[4];
      pa[0] = Pack2<T>(s[2 * kc][0], s[2 * kc][1]);
      pa[1] = Pack2<T>(s[2 * kc][2], s[2 * kc][3]);
      pa[2] = Pack2<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]);
      pa[3] = Pack2<T>(s[2 * kc + 1][2], s[2 * kc + 1][3]);
      const int n = n0 + kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        LdMatrixX4Trans(b, sv + n * kRs + dp * 16 + (lane >> 4) * 8);
        Mma<T>(o[2 * dp], pa, b[0], b[1]);
        Mma<T>(o[2 * dp + 1], pa, b[2], b[3]);
      }
    }
  };
  auto compute_tile = [&](int it) {
    if (!warp_active) return;
    if constexpr (kMixed) {
      if (warp >= 4) {
        compute(it, std::integral_constant<int, 16>());
      } else {
        compute(it, std::integral_constant<int, kNw>());
      }
    } else {
      compute(it, std::integral_constant<int, kNw>());
    }
  };

  // Tile 0 rotated before the loop; then each iteration rotates the next tile while the warps
  // compute the current one, one barrier a tile.
  CpAsyncWait<kStages - 2>();
  __syncthreads();  // tile 0 has landed; s_step is written
  if (producer && rotate && ntiles > 0) rotate_tile(0, 0);
  for (int it = 0; it < ntiles; ++it) {
    CpAsyncWait<kStages - 3>();  // tile it + 1 has landed (this thread's copies)
    __syncthreads();  // ... everyone's; tile it is rotated; tile it - 1 is consumed by all warps
    if (producer) {
      if (it + kStages - 1 < ntiles) load_tile(it + kStages - 1, (it + kStages - 1) % kStages);
    }
    CpAsyncCommit();
    if (producer && rotate && it + 1 < ntiles) rotate_tile(it + 1, (it + 1) % kStages);
    compute_tile(it);
  }

  // -- epilogue: merge the warps sharing rows, then write the result or the split's partial --
  CpAsyncWait<0>();
  __syncthreads();                                         // the ring is free
  float* const sm_o = reinterpret_cast<float*>(smem_raw);  // [kWarps][16][D + kOutPad]
  float* const sm_m = sm_o + kWarps * 16 * (D + kOutPad);  // [kWarps][16]
  float* const sm_l = sm_m + kWarps * 16;                  // [kWarps][16]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (tg == 0) {
      sm_m[warp * 16 + g + 8 * r] = m_run[r];
      sm_l[warp * 16 + g + 8 * r] = l;
    }
    float* const orow = sm_o + (warp * 16 + g + 8 * r) * (D + kOutPad);
#pragma unroll
    for (int i = 0; i < kOn; ++i) {
      *reinterpret_cast<float2*>(orow + i * 8 + 2 * tg) = make_float2(o[i][2 * r], o[i][2 * r + 1]);
    }
  }
  __syncthreads();
  for (int idx = tid; idx < 16 * WM * D; idx += kThreads) {
    const int row = idx / D, d = idx % D;
    const uint32_t mrow = mt * (16u * WM) + row;
    if (mrow >= m_total) break;  // rows grow with idx
    const int tile = row / 16, r = row % 16;
    const int w0 = kMixed ? tile : tile * WN;         // first warp on these rows
    const int wc = kMixed ? (tile < 4 ? 1 : 4) : WN;  // warps on these rows
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < wc; ++w) mx = fmaxf(mx, sm_m[(w0 + w) * 16 + r]);
    // No token at all (a batch's query with none in this split): a partial of sum 0, max -inf,
    // which the merge weighs 0.
    const float ref = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < wc; ++w) {
      const float f = exp2f(sm_m[(w0 + w) * 16 + r] - ref);  // a warp without tokens: m = -inf
      sum += sm_l[(w0 + w) * 16 + r] * f;
      acc += sm_o[((w0 + w) * 16 + r) * (D + kOutPad) + d] * f;
    }
    const size_t qv = vec_index(mrow);
    if (splits == 1) {
      out[qv * D + d] = acc / sum;
      if (d == 0 && lse != nullptr) lse[qv] = (mx + log2f(sum)) * kLn2;
    } else {
      const size_t slot = qv * splits + split;
      ws_acc[slot * D + d] = acc;
      if (d == 0) {
        ws_ml[slot * 2] = mx;
        ws_ml[slot * 2 + 1] = sum;
      }
    }
  }
}

// ---- the merge of the splits: one CTA per query vector ----
//
// Warp w merges splits w, w + kMergeWarps, ... (each lane D / 32 adjacent floats, so a split's row
// is one coalesced read), then the warps merge through shared memory. Many warps per vector keep
// enough reads in flight: one warp walking ~100 splits alone was ~25 us (run M).

constexpr int kMergeWarps = 8;

template <int D>
__global__ void __launch_bounds__(kMergeWarps * 32)
    MergeSplitsKernel(const float* __restrict__ ws_acc, const float* __restrict__ ws_ml,
                      uint32_t splits, float* __restrict__ out, float* __restrict__ lse) {
  constexpr int kPer = D / 32;
  static_assert(kPer == 2 || kPer == 4, "head_dim 64 or 128");
  using Vec = typename std::conditional<kPer == 4, float4, float2>::type;
  const size_t qv = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* const ml = ws_ml + qv * splits * 2;
  __shared__ float s_red[kMergeWarps];
  __shared__ float s_acc[kMergeWarps][D];

  float mx = -INFINITY;
  for (uint32_t s = threadIdx.x; s < splits; s += kMergeWarps * 32) mx = fmaxf(mx, ml[2 * s]);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (lane == 0) s_red[warp] = mx;
  __syncthreads();
  mx = s_red[0];
#pragma unroll
  for (int w = 1; w < kMergeWarps; ++w) mx = fmaxf(mx, s_red[w]);
  __syncthreads();  // s_red is reused below

  float acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0.f;
  float sum = 0.f;
  const float* const a = ws_acc + qv * splits * D + lane * kPer;
#pragma unroll 4
  for (uint32_t s = warp; s < splits; s += kMergeWarps) {
    const float f = exp2f(ml[2 * s] - mx);
    sum += ml[2 * s + 1] * f;
    const Vec x = *reinterpret_cast<const Vec*>(a + static_cast<size_t>(s) * D);
    const float* const xf = reinterpret_cast<const float*>(&x);
#pragma unroll
    for (int i = 0; i < kPer; ++i) acc[i] += xf[i] * f;
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) s_acc[warp][lane * kPer + i] = acc[i];
  if (lane == 0) s_red[warp] = sum;  // every lane of a warp has the same sum
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kMergeWarps; ++w) total += s_red[w];
  const float inv = 1.f / total;
  for (int d = threadIdx.x; d < D; d += kMergeWarps * 32) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kMergeWarps; ++w) v += s_acc[w][d];
    out[qv * D + d] = v * inv;
  }
  if (threadIdx.x == 0 && lse != nullptr) lse[qv] = (mx + log2f(total)) * kLn2;
}

// ---- host side ----

// What a launch passes to the kernels besides the block table.
struct Launch {
  const void* q = nullptr;
  uint32_t q_heads = 0, kv_heads = 0, rows_all = 0;
  uint32_t total = 0;  // one query: its tokens
  int64_t first_position = 0;
  bool rotate = true;
  float* out = nullptr;
  float* lse = nullptr;
  float* ws_acc = nullptr;
  float* ws_ml = nullptr;
  const uint32_t* lw = nullptr;  // a batch's layout words
  BatchWords bw{};
  uint32_t queries = 1;
};

// The fields both entry points fill the same way; the workspace holds the splits' partial
// outputs, then their (max, sum) pairs.
Launch CommonLaunch(const void* q, uint32_t q_heads, uint32_t kv_heads, uint32_t rows_all,
                    uint32_t head_dim, uint32_t splits, uint32_t total, float* out, float* lse,
                    void* workspace) {
  Launch l;
  l.q = q;
  l.q_heads = q_heads;
  l.kv_heads = kv_heads;
  l.rows_all = rows_all;
  l.total = total;
  l.out = out;
  l.lse = lse;
  l.ws_acc = static_cast<float*>(workspace);
  l.ws_ml = l.ws_acc == nullptr
                ? nullptr
                : l.ws_acc + static_cast<size_t>(q_heads) * rows_all * splits * head_dim;
  return l;
}

template <typename T, int D, int WM, int NW, bool kBatch>
Status LaunchSplits(const BlockTable& tab, const Launch& l, const Plan& p, cudaStream_t stream) {
  auto* kernel = &PagedAttentionKernel<T, D, WM, NW, kBatch>;
  constexpr size_t kSmem = SmemBytes<D, NW>();
  SHOTDB_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  const uint64_t grid = static_cast<uint64_t>(p.m_tiles) * l.queries * l.kv_heads * p.splits;
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(D));
  kernel<<<static_cast<unsigned>(grid), NW * 32, kSmem, stream>>>(
      tab, static_cast<const T*>(l.q), l.q_heads / l.kv_heads, l.rows_all, p.m_tiles, l.kv_heads,
      l.total, p.chunk, p.splits, l.first_position, l.rotate, scale_log2, l.out, l.lse, l.ws_acc,
      l.ws_ml, l.lw, l.bw);
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return Status::OK();
}

template <typename T, int D, bool kBatch>
Status LaunchTyped(const BlockTable& tab, const Launch& l, const Plan& p, cudaStream_t stream) {
  switch (p.wm) {
    case 1:
      SHOTDB_RETURN_IF_ERROR((LaunchSplits<T, D, 1, 4, kBatch>(tab, l, p, stream)));
      break;
    case 2:
      SHOTDB_RETURN_IF_ERROR((LaunchSplits<T, D, 2, 4, kBatch>(tab, l, p, stream)));
      break;
    case 4:
      SHOTDB_RETURN_IF_ERROR((LaunchSplits<T, D, 4, 4, kBatch>(tab, l, p, stream)));
      break;
    case 5:
      SHOTDB_RETURN_IF_ERROR((LaunchSplits<T, D, 5, 8, kBatch>(tab, l, p, stream)));
      break;
    default:
      SHOTDB_RETURN_IF_ERROR((LaunchSplits<T, D, 8, 8, kBatch>(tab, l, p, stream)));
      break;
  }
  if (p.splits > 1) {
    const size_t qvecs = static_cast<size_t>(l.q_heads) * l.rows_all;
    MergeSplitsKernel<D><<<static_cast<unsigned>(qvecs), kMergeWarps * 32, 0, stream>>>(
        l.ws_acc, l.ws_ml, p.splits, l.out, l.lse);
    SHOTDB_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return Status::OK();
}

template <bool kBatch>
Status LaunchAny(DType dtype, uint32_t head_dim, const BlockTable& tab, const Launch& l,
                 const Plan& p, cudaStream_t stream) {
  if (dtype == DType::kBF16) {
    return head_dim == 128 ? LaunchTyped<__nv_bfloat16, 128, kBatch>(tab, l, p, stream)
                           : LaunchTyped<__nv_bfloat16, 64, kBatch>(tab, l, p, stream);
  }
  return head_dim == 128 ? LaunchTyped<__half, 128, kBatch>(tab, l, p, stream)
                         : LaunchTyped<__half, 64, kBatch>(tab, l, p, stream);
}

// The checks both entry points make: dtype, head_dim, heads.
Status CheckShape(const char* what, DType dtype, uint32_t q_heads, uint32_t kv_heads,
                  uint32_t head_dim) {
  if (!internal::IsKernelDType(dtype)) {
    return Status::InvalidArgument(std::string(what) + ": dtype must be bf16 or f16, got " +
                                   std::string(DTypeName(dtype)));
  }
  if (head_dim != 64 && head_dim != 128) {
    return Status::InvalidArgument(std::string(what) + ": head_dim must be 64 or 128, got " +
                                   std::to_string(head_dim));
  }
  if (kv_heads == 0 || q_heads == 0 || q_heads % kv_heads != 0 ||
      q_heads / kv_heads > kMaxPagedAttentionGroup) {
    return Status::InvalidArgument(
        std::string(what) + ": q_heads must be a positive multiple of kv_heads with at most " +
        std::to_string(kMaxPagedAttentionGroup) + " query heads per kv head, got " +
        std::to_string(q_heads) + " and " + std::to_string(kv_heads));
  }
  return Status::OK();
}

Plan BatchPlan(const PagedBatchLayout& layout) {
  Plan p;
  p.wm = layout.wm;
  p.m_tiles = layout.m_tiles;
  p.chunk = 0;  // per query, in the layout words
  p.splits = layout.splits;
  return p;
}

}  // namespace

size_t PagedAttentionWorkspaceBytes(uint32_t q_heads, uint32_t kv_heads, uint32_t rows,
                                    uint32_t head_dim, uint64_t total_tokens) {
  if (kv_heads == 0 || q_heads == 0 || rows == 0 || total_tokens == 0) return 0;
  const Plan p = MakePlan(q_heads, kv_heads, rows, total_tokens);
  if (p.splits <= 1) return 0;
  return static_cast<size_t>(q_heads) * rows * p.splits * (head_dim + 2) * sizeof(float);
}

Status LaunchPagedAttention(const PagedAttentionArgs& args, cudaStream_t stream) {
  SHOTDB_RETURN_IF_ERROR(
      CheckShape("PagedAttention", args.dtype, args.q_heads, args.kv_heads, args.head_dim));
  if (args.rows == 0 || args.rows > kMaxPagedAttentionRows) {
    return Status::InvalidArgument("PagedAttention: rows must be 1.." +
                                   std::to_string(kMaxPagedAttentionRows) + ", got " +
                                   std::to_string(args.rows));
  }
  if (args.q == nullptr || args.out == nullptr) {
    return Status::InvalidArgument("PagedAttention: null q or out");
  }
  if (reinterpret_cast<uintptr_t>(args.q) % 4 != 0) {
    return Status::InvalidArgument("PagedAttention: q is not 4-byte aligned");
  }
  BlockTable tab;
  SHOTDB_ASSIGN_OR_RETURN(
      uint32_t total,
      internal::BuildTable(args.blocks, args.rope, args.head_dim, 16, "PagedAttention", &tab));
  const Plan plan = MakePlan(args.q_heads, args.kv_heads, args.rows, total);
  const uint64_t ctas = static_cast<uint64_t>(plan.m_tiles) * args.kv_heads * plan.splits;
  if (ctas > static_cast<uint64_t>(INT32_MAX)) {
    return Status::InvalidArgument("PagedAttention: " + std::to_string(ctas) +
                                   " CTAs exceed the grid limit");
  }
  const size_t need =
      PagedAttentionWorkspaceBytes(args.q_heads, args.kv_heads, args.rows, args.head_dim, total);
  if (need > 0 && (args.workspace == nullptr || args.workspace_bytes < need)) {
    return Status::InvalidArgument(
        "PagedAttention: workspace holds " +
        std::to_string(args.workspace == nullptr ? 0 : args.workspace_bytes) + " bytes, need " +
        std::to_string(need));
  }
  if (reinterpret_cast<uintptr_t>(args.workspace) % 4 != 0) {
    return Status::InvalidArgument("PagedAttention: workspace is not 4-byte aligned");
  }
  Launch l = CommonLaunch(args.q, args.q_heads, args.kv_heads, args.rows, args.head_dim,
                          plan.splits, total, args.out, args.lse, args.workspace);
  l.first_position = args.first_position;
  l.rotate = args.rotate_keys;
  return LaunchAny<false>(args.dtype, args.head_dim, tab, l, plan, stream);
}

Result<PagedBatchLayout> MakePagedBatchLayout(uint32_t q_heads, uint32_t kv_heads,
                                              uint32_t head_dim,
                                              const std::vector<uint32_t>& block_tokens,
                                              const std::vector<PagedBatchQuery>& queries,
                                              uint32_t splits) {
  const std::string what = "PagedAttentionBatch";
  SHOTDB_RETURN_IF_ERROR(CheckShape(what.c_str(), DType::kBF16, q_heads, kv_heads, head_dim));
  if (block_tokens.empty() || block_tokens.size() > kMaxKernelBlocks) {
    return Status::InvalidArgument(what + ": need 1.." + std::to_string(kMaxKernelBlocks) +
                                   " union blocks, got " + std::to_string(block_tokens.size()));
  }
  std::vector<uint64_t> uoff(block_tokens.size() + 1, 0);  // union offsets
  for (size_t b = 0; b < block_tokens.size(); ++b) {
    if (block_tokens[b] == 0) {
      return Status::InvalidArgument(what + ": union block " + std::to_string(b) + " has 0 tokens");
    }
    uoff[b + 1] = uoff[b] + block_tokens[b];
  }
  const uint64_t union_total = uoff.back();
  if (union_total > UINT32_MAX / 2) {
    return Status::InvalidArgument(what + ": more than 2^31 union tokens");
  }
  if (queries.empty() || queries.size() > kMaxPagedAttentionRows) {
    return Status::InvalidArgument(what + ": need 1.." + std::to_string(kMaxPagedAttentionRows) +
                                   " queries, got " + std::to_string(queries.size()));
  }
  PagedBatchLayout out;
  out.q_heads = q_heads;
  out.kv_heads = kv_heads;
  out.head_dim = head_dim;
  out.queries = static_cast<uint32_t>(queries.size());
  out.block_tokens = block_tokens;
  uint64_t rows = 0, segments = 0;
  uint32_t max_rows = 0;
  std::vector<uint64_t> context(queries.size(), 0);
  for (size_t i = 0; i < queries.size(); ++i) {
    const PagedBatchQuery& q = queries[i];
    const std::string name = what + ": query " + std::to_string(i);
    if (q.rows == 0) return Status::InvalidArgument(name + " has 0 rows");
    if (q.blocks.empty() || q.blocks.size() > kMaxKernelBlocks) {
      return Status::InvalidArgument(name + " needs 1.." + std::to_string(kMaxKernelBlocks) +
                                     " blocks, got " + std::to_string(q.blocks.size()));
    }
    for (size_t k = 0; k < q.blocks.size(); ++k) {
      if (q.blocks[k] >= block_tokens.size()) {
        return Status::InvalidArgument(name + ": block " + std::to_string(k) + " is union block " +
                                       std::to_string(q.blocks[k]) + " of " +
                                       std::to_string(block_tokens.size()));
      }
      context[i] += block_tokens[q.blocks[k]];
    }
    if (q.first_position < 0 ||
        static_cast<uint64_t>(q.first_position) + context[i] > static_cast<uint64_t>(INT32_MAX)) {
      return Status::InvalidArgument(name + ": positions " + std::to_string(q.first_position) +
                                     ".." + std::to_string(q.first_position + context[i]) +
                                     " leave 0..2^31-1");
    }
    rows += q.rows;
    max_rows = std::max(max_rows, q.rows);
    segments += q.blocks.size();
  }
  if (rows > kMaxPagedAttentionRows) {
    return Status::InvalidArgument(what + ": " + std::to_string(rows) + " rows, at most " +
                                   std::to_string(kMaxPagedAttentionRows));
  }
  out.rows = static_cast<uint32_t>(rows);
  out.segments = static_cast<uint32_t>(segments);

  // The CTA shape for the longest query; each query's context cut into `splits` parts.
  const Plan shape = MakePlan(q_heads, kv_heads, max_rows, 1);
  out.wm = shape.wm;
  out.m_tiles = shape.m_tiles;
  const uint64_t ctas_per_split = static_cast<uint64_t>(kv_heads) * shape.m_tiles * queries.size();
  uint64_t min_context = UINT64_MAX;
  for (uint64_t c : context) min_context = std::min(min_context, c);
  if (splits == 0) {
    // About one wave of CTAs (as MakePlan), but each split at least 8 M tokens of the shortest
    // context, so that its partial result stays small next to its K/V.
    const uint64_t slots = Multiprocessors() * CtasPerSm(shape.wm >= 5 ? 8 : 4);
    const uint64_t share = min_context / std::max<uint64_t>(8ull * shape.m, kMinChunk);
    splits = static_cast<uint32_t>(
        std::max<uint64_t>(1, std::min<uint64_t>(slots / ctas_per_split, share)));
  }
  out.splits = splits;
  if (ctas_per_split * out.splits > static_cast<uint64_t>(INT32_MAX)) {
    return Status::InvalidArgument(what + ": " + std::to_string(ctas_per_split * out.splits) +
                                   " CTAs exceed the grid limit");
  }

  const BatchWords bw{out.queries, out.splits, out.segments};
  out.words.assign(bw.size(), 0);
  uint32_t first_row = 0, seg = 0;
  for (size_t i = 0; i < queries.size(); ++i) {
    const PagedBatchQuery& q = queries[i];
    out.words[bw.rows(i)] = q.rows;
    out.words[bw.first(i)] = first_row;
    out.words[bw.position(i)] = static_cast<uint32_t>(q.first_position);
    out.words[bw.seg(i)] = seg;
    first_row += q.rows;
    uint32_t local = 0;
    for (uint32_t b : q.blocks) {
      out.words[bw.seg_block(seg)] = b;
      out.words[bw.seg_start(seg)] = local;
      local += block_tokens[b];
      out.words[bw.seg_end(seg)] = local;
      ++seg;
    }
    // Split s starts at token s * chunk of the context: parts of whole tiles, the last shorter
    // (empty when the context is shorter than splits tiles).
    const uint64_t chunk = (context[i] + splits - 1) / splits;
    const uint64_t step = (chunk + kTileN - 1) / kTileN * kTileN;
    for (uint32_t s = 0; s <= splits; ++s) {
      out.words[bw.bound(i, s)] = static_cast<uint32_t>(std::min<uint64_t>(context[i], step * s));
    }
  }
  out.words[bw.seg(queries.size())] = seg;
  return out;
}

size_t PagedBatchWorkspaceBytes(const PagedBatchLayout& layout) {
  if (layout.splits <= 1) return 0;
  return static_cast<size_t>(layout.q_heads) * layout.rows * layout.splits * (layout.head_dim + 2) *
         sizeof(float);
}

Status LaunchPagedAttentionBatch(const PagedBatchArgs& args, cudaStream_t stream) {
  const std::string what = "PagedAttentionBatch";
  if (args.layout == nullptr || args.layout_words == nullptr ||
      reinterpret_cast<uintptr_t>(args.layout_words) % 4 != 0) {
    return Status::InvalidArgument(what +
                                   ": null layout, or layout_words null or not 4-byte "
                                   "aligned");
  }
  const PagedBatchLayout& lay = *args.layout;
  SHOTDB_RETURN_IF_ERROR(
      CheckShape(what.c_str(), args.dtype, lay.q_heads, lay.kv_heads, lay.head_dim));
  if (args.blocks.size() != lay.block_tokens.size()) {
    return Status::InvalidArgument(what + ": " + std::to_string(args.blocks.size()) +
                                   " blocks, the layout's union has " +
                                   std::to_string(lay.block_tokens.size()));
  }
  for (size_t b = 0; b < args.blocks.size(); ++b) {
    if (args.blocks[b].tokens != lay.block_tokens[b]) {
      return Status::InvalidArgument(what + ": block " + std::to_string(b) + " has " +
                                     std::to_string(args.blocks[b].tokens) +
                                     " tokens, the layout " + std::to_string(lay.block_tokens[b]));
    }
  }
  if (args.q == nullptr || args.out == nullptr) {
    return Status::InvalidArgument(what + ": null q or out");
  }
  if (reinterpret_cast<uintptr_t>(args.q) % 4 != 0) {
    return Status::InvalidArgument(what + ": q is not 4-byte aligned");
  }
  BlockTable tab;
  SHOTDB_ASSIGN_OR_RETURN(uint32_t total, internal::BuildTable(args.blocks, args.rope, lay.head_dim,
                                                               16, what.c_str(), &tab));
  const size_t need = PagedBatchWorkspaceBytes(lay);
  if (need > 0 && (args.workspace == nullptr || args.workspace_bytes < need ||
                   reinterpret_cast<uintptr_t>(args.workspace) % 4 != 0)) {
    return Status::InvalidArgument(
        what + ": workspace holds " +
        std::to_string(args.workspace == nullptr ? 0 : args.workspace_bytes) +
        " bytes (4-byte aligned), need " + std::to_string(need));
  }
  Launch l = CommonLaunch(args.q, lay.q_heads, lay.kv_heads, lay.rows, lay.head_dim, lay.splits,
                          total, args.out, args.lse, args.workspace);
  l.lw = static_cast<const uint32_t*>(args.layout_words);
  l.bw = BatchWords{lay.queries, lay.splits, lay.segments};
  l.queries = lay.queries;
  return LaunchAny<true>(args.dtype, lay.head_dim, tab, l, BatchPlan(lay), stream);
}

}  // namespace gpu
}  // namespace shotdb
