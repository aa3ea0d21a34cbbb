// LaunchPagedAttention's memory bandwidth on Llama-3.1-8B shapes, as a ratio to the device's own
// copy bandwidth measured in the same run (docs/gpu.md).
//
//   paged_attention_bench [--reps N] [--block-tokens N] [--rows 1,8,32,128] [--no-rotate]
//                         [--json FILE]
//   paged_attention_bench --batch 1,4,16,64 [--rows 18] [--reps N]   (batched launches; below)
//
// Shape: 32 query heads, 8 kv heads, head_dim 128, bf16, RoPE with Llama-3 scaling applied on
// the fly (rotate_keys), contexts of 4k, 28k and 128k tokens in blocks of 1000 tokens, each block's
// K and V a separate cudaMalloc (as pages of the block cache are), and 1, 8, 32 and 128 query rows
// (4 to 512 query vectors per kv head). Each measurement is the median over N launches (cudaEvent
// around one LaunchPagedAttention: the split kernel plus, when the context is split, the merge),
// with L2 flushed before every launch, so K/V come from HBM. Bandwidth counts the K/V bytes read
// once (what an ideal kernel reads); the ratio is to a device-to-device cudaMemcpyAsync of 2 GiB,
// counting its read and write bytes (the goal is >= 0.7). --no-rotate launches with rotate_keys
// false (K taken as already rotated): the same reads and tensor-core work without RoPE on the fly,
// which measures what the rotation costs.
//
// Self-check: K and V are constant-byte fills, so every output element must equal V's value
// (whatever the softmax weights are) and lse must be ln(tokens) within 0.01 (every score is
// ~1e-2); a run that fails this exits with status 1 before timing.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_check.h"
#include "format/dtype.h"
#include "gpu/cuda_util.h"
#include "gpu/paged_attention.h"
#include "gpu/stream.h"

namespace shotdb {
namespace gpu {
namespace {

constexpr uint32_t kQHeads = 32, kKvHeads = 8, kHeadDim = 128;

#define CHECK_OK(expr) SHOTDB_BENCH_CHECK_OK(expr)
#define CHECK_CUDA(call) CHECK_OK(CudaStatus((call), #call, "paged_attention_bench"))

using ::shotdb::bench::Must;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

struct Row {
  uint32_t context, rows, splits;
  double us, kv_bytes, gbs, ratio;
};

// Pages of `tokens` tokens each, every block's K and V a separate allocation filled with constant
// bytes: K 0x3c (bf16 ~0.0114), V 0x3f (0.74609375).
struct FilledPages {
  std::vector<DeviceBuffer> buffers;
  std::vector<KvBlockRef> blocks;
};
FilledPages Fill(const std::vector<uint32_t>& tokens) {
  FilledPages p;
  for (uint32_t t : tokens) {
    const size_t bytes = size_t(kKvHeads) * t * kHeadDim * 2;
    DeviceBuffer k = Must(DeviceBuffer::Allocate(bytes));
    DeviceBuffer v = Must(DeviceBuffer::Allocate(bytes));
    CHECK_CUDA(cudaMemset(k.get(), 0x3c, bytes));
    CHECK_CUDA(cudaMemset(v.get(), 0x3f, bytes));
    p.blocks.push_back({k.get(), v.get(), t});
    p.buffers.push_back(std::move(k));
    p.buffers.push_back(std::move(v));
  }
  return p;
}
constexpr float kVValue = 0.74609375f;

// The self-check: with constant K and V every output equals V's value and lse is ln(context)
// (all scores ~0). False (and a message naming `what`) otherwise.
bool SelfCheck(const DeviceBuffer& out, const DeviceBuffer& lse, size_t qvecs, double context,
               const std::string& what) {
  std::vector<float> got(qvecs * kHeadDim), got_lse(qvecs);
  CHECK_CUDA(cudaMemcpy(got.data(), out.get(), got.size() * 4, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(got_lse.data(), lse.get(), got_lse.size() * 4, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(std::fabs(got[i] - kVValue) <= 1e-2 * kVValue)) {
      std::fprintf(stderr, "self-check failed: %s out[%zu] = %g, want %g\n", what.c_str(), i,
                   got[i], kVValue);
      return false;
    }
  }
  for (size_t i = 0; i < got_lse.size(); ++i) {
    if (!(std::fabs(got_lse[i] - std::log(context)) <= 1e-2)) {
      std::fprintf(stderr, "self-check failed: %s lse[%zu] = %g, want %g\n", what.c_str(), i,
                   got_lse[i], std::log(context));
      return false;
    }
  }
  return true;
}

// --batch: DBSA's shape (a pool of 1000 blocks of 95 tokens; each query selects 300 of them, ~28.5k
// tokens, in its own order, and has `rows` rows). Per batch size B: B LaunchPagedAttention calls
// (one per query) against one LaunchPagedAttentionBatch over the union (the queries' blocks in
// union order, or in their own order). Same self-check as above.
template <typename MedianMs>
int BatchBench(const std::vector<uint32_t>& batches, const std::vector<uint32_t>& row_counts,
               int reps, double copy_gbs, MedianMs& median_ms, CudaStream& stream) {
  constexpr uint32_t kPool = 1000, kBlockTokens = 95, kPicked = 300;
  const std::vector<uint32_t> tokens(kPool, kBlockTokens);
  const FilledPages pages = Fill(tokens);
  const std::vector<KvBlockRef>& blocks = pages.blocks;
  const uint32_t rows = row_counts.empty() ? 18 : row_counts.front();
  const double context = double(kPicked) * kBlockTokens;
  const double kv_query = 2.0 * kKvHeads * context * kHeadDim * 2;  // bytes one query reads
  const double kv_pool = 2.0 * kKvHeads * kPool * kBlockTokens * kHeadDim * 2;
  std::printf("batched: pool %u blocks of %u tokens, %u picked a query (%.0f tokens), rows %u\n",
              kPool, kBlockTokens, kPicked, context, rows);
  std::printf("%6s %12s %12s %9s %12s %12s %9s\n", "batch", "B single us", "batch us", "speedup",
              "floor us", "union fl us", "vs floor");
  std::mt19937 rng(7);
  for (uint32_t batch : batches) {
    std::vector<PagedBatchQuery> queries;
    std::vector<bool> used(kPool, false);
    for (uint32_t i = 0; i < batch; ++i) {
      std::vector<uint32_t> all(kPool);
      for (uint32_t b = 0; b < kPool; ++b) all[b] = b;
      std::shuffle(all.begin(), all.end(), rng);
      all.resize(kPicked);
      for (uint32_t b : all) used[b] = true;
      queries.push_back(PagedBatchQuery{rows, all, 0});
    }
    const double union_blocks = double(std::count(used.begin(), used.end(), true));
    const size_t qvecs = size_t(kQHeads) * rows * batch;
    DeviceBuffer q = Must(DeviceBuffer::Allocate(qvecs * kHeadDim * 2));
    CHECK_CUDA(cudaMemset(q.get(), 0x3c, q.size()));
    DeviceBuffer out = Must(DeviceBuffer::Allocate(qvecs * kHeadDim * 4));
    DeviceBuffer lse = Must(DeviceBuffer::Allocate(qvecs * 4));
    // B single launches, each over its query's blocks in its order.
    const size_t ws1 = PagedAttentionWorkspaceBytes(kQHeads, kKvHeads, rows, kHeadDim,
                                                    uint64_t(kPicked) * kBlockTokens);
    std::vector<PagedAttentionArgs> singles(batch);
    DeviceBuffer ws_single = Must(DeviceBuffer::Allocate(ws1));
    for (uint32_t i = 0; i < batch; ++i) {
      PagedAttentionArgs& a = singles[i];
      a.dtype = DType::kBF16;
      a.q_heads = kQHeads;
      a.kv_heads = kKvHeads;
      a.head_dim = kHeadDim;
      a.rows = rows;
      a.q = q.as<uint8_t>() + size_t(i) * kQHeads * rows * kHeadDim * 2;
      for (uint32_t b : queries[i].blocks) a.blocks.push_back(blocks[b]);
      a.rope.llama3_scaling = true;
      a.out = out.as<float>() + size_t(i) * kQHeads * rows * kHeadDim;
      a.lse = lse.as<float>() + size_t(i) * kQHeads * rows;
      a.workspace = ws_single.get();
      a.workspace_bytes = ws1;
    }
    auto singles_fn = [&] {
      for (const PagedAttentionArgs& a : singles) CHECK_OK(LaunchPagedAttention(a, stream.get()));
    };
    double batch_us = 0;
    {
      const PagedBatchLayout layout =
          Must(MakePagedBatchLayout(kQHeads, kKvHeads, kHeadDim, tokens, queries));
      DeviceBuffer words = Must(DeviceBuffer::Allocate(layout.words.size() * 4));
      CHECK_CUDA(cudaMemcpy(words.get(), layout.words.data(), layout.words.size() * 4,
                            cudaMemcpyHostToDevice));
      const size_t wsb = PagedBatchWorkspaceBytes(layout);
      DeviceBuffer ws = Must(DeviceBuffer::Allocate(wsb));
      PagedBatchArgs a;
      a.dtype = DType::kBF16;
      a.layout = &layout;
      a.layout_words = words.get();
      a.blocks = blocks;
      a.rope.llama3_scaling = true;
      a.q = q.get();
      a.out = out.as<float>();
      a.lse = lse.as<float>();
      a.workspace = ws.get();
      a.workspace_bytes = wsb;
      auto fn = [&] { CHECK_OK(LaunchPagedAttentionBatch(a, stream.get())); };
      CHECK_CUDA(cudaMemset(out.get(), 0, out.size()));
      fn();
      CHECK_OK(stream.Synchronize());
      if (!SelfCheck(out, lse, qvecs, context, "batch " + std::to_string(batch))) return 1;
      batch_us = median_ms(reps, fn) * 1e3;
      std::printf("  batch %u: %u splits\n", batch, layout.splits);
    }
    const double single_us = median_ms(reps, singles_fn) * 1e3;
    const double floor_us = batch * kv_query / (copy_gbs * 1e9) * 1e6;
    const double union_floor_us = union_blocks / kPool * kv_pool / (copy_gbs * 1e9) * 1e6;
    std::printf("%6u %12.1f %12.1f %8.2fx %12.1f %12.1f %8.2fx\n", batch, single_us, batch_us,
                single_us / batch_us, floor_us, union_floor_us, batch_us / floor_us);
    std::printf("       per query: single %.1f us, batch %.1f us (%.0f GB/s, %.2f of copy)\n",
                single_us / batch, batch_us / batch, kv_query * batch / (batch_us * 1e-6) / 1e9,
                kv_query * batch / (batch_us * 1e-6) / 1e9 / copy_gbs);
  }
  return 0;
}

int Main(int argc, char** argv) {
  int reps = 50;
  uint32_t block_tokens = 1000;  // tokens per page (DBSA blocks of k = 50 short demos: ~100)
  std::vector<uint32_t> row_counts = {1, 8, 32, 128};
  std::vector<uint32_t> batches;  // --batch: the batched launch instead of the contexts above
  std::string json;
  bool rotate = true;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else if (!std::strcmp(argv[i], "--block-tokens") && i + 1 < argc) {
      block_tokens = static_cast<uint32_t>(std::max(1, std::atoi(argv[++i])));
    } else if (!std::strcmp(argv[i], "--rows") && i + 1 < argc) {
      row_counts.clear();
      for (char* p = std::strtok(argv[++i], ","); p != nullptr; p = std::strtok(nullptr, ",")) {
        row_counts.push_back(static_cast<uint32_t>(std::max(1, std::atoi(p))));
      }
    } else if (!std::strcmp(argv[i], "--batch") && i + 1 < argc) {
      for (char* p = std::strtok(argv[++i], ","); p != nullptr; p = std::strtok(nullptr, ",")) {
        batches.push_back(static_cast<uint32_t>(std::max(1, std::atoi(p))));
      }
    } else if (!std::strcmp(argv[i], "--json") && i + 1 < argc) {
      json = argv[++i];
    } else if (!std::strcmp(argv[i], "--no-rotate")) {
      rotate = false;
    } else {
      std::fprintf(stderr,
                   "usage: paged_attention_bench [--reps N] [--block-tokens N] [--rows 1,8,32,128] "
                   "[--no-rotate] [--batch 1,4,16,64] [--json FILE]\n");
      return 2;
    }
  }
  if (CudaDeviceCount() == 0) {
    std::fprintf(stderr, "paged_attention_bench: no CUDA device\n");
    return 1;
  }
  const DeviceInfo dev = Must(QueryDevice(0));
  std::printf("device: %s, %d SMs, L2 %.0f MiB\n", dev.name.c_str(), dev.multiprocessors,
              dev.l2_cache_bytes / 1048576.0);
  CudaStream stream = Must(CudaStream::Create());
  CudaEvent e0 = Must(CudaEvent::Create(true)), e1 = Must(CudaEvent::Create(true));
  // Times `fn` (enqueues on the stream) between two events, L2 flushed before; median of reps.
  const size_t flush_bytes = std::max<size_t>(2 * dev.l2_cache_bytes, size_t(64) << 20);
  DeviceBuffer flush = Must(DeviceBuffer::Allocate(flush_bytes));
  auto median_ms = [&](int n, auto fn) {
    std::vector<double> ms;
    for (int i = 0; i < n; ++i) {
      CHECK_CUDA(cudaMemsetAsync(flush.get(), i & 0xff, flush_bytes, stream.get()));
      CHECK_OK(e0.Record(stream.get()));
      fn();
      CHECK_OK(e1.Record(stream.get()));
      CHECK_OK(e1.Synchronize());
      ms.push_back(Must(e1.ElapsedMsSince(e0)));
    }
    return Median(ms);
  };

  // ---- the ceiling: device-to-device copy of 2 GiB (read + write) ----
  double copy_gbs = 0;
  {
    const size_t bytes = size_t(2) << 30;
    DeviceBuffer src = Must(DeviceBuffer::Allocate(bytes));
    DeviceBuffer dst = Must(DeviceBuffer::Allocate(bytes));
    CHECK_CUDA(cudaMemset(src.get(), 1, bytes));
    auto copy = [&] {
      CHECK_CUDA(
          cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice, stream.get()));
    };
    copy();  // warm-up
    const double ms = median_ms(std::max(5, reps / 5), copy);
    copy_gbs = 2.0 * bytes / (ms * 1e-3) / 1e9;
    std::printf("device-to-device cudaMemcpyAsync, 2 GiB: %.3f ms, %.0f GB/s (read + write)\n", ms,
                copy_gbs);
  }

  // K/V fills (Fill): bf16 0x3c3c (~0.0114) for K and q, 0x3f3f (0.74609375) for V.
  if (!batches.empty() && !rotate) {
    std::fprintf(stderr,
                 "paged_attention_bench: --no-rotate is for single launches, not --batch\n");
    return 2;
  }
  if (!batches.empty()) return BatchBench(batches, row_counts, reps, copy_gbs, median_ms, stream);
  std::vector<Row> rows_out;
  for (uint32_t context : {4096u, 28672u, 131072u}) {
    if ((context + block_tokens - 1) / block_tokens > kMaxKernelBlocks) continue;
    std::vector<uint32_t> tokens;
    for (uint32_t first = 0; first < context; first += block_tokens) {
      tokens.push_back(std::min(block_tokens, context - first));
    }
    const FilledPages pages = Fill(tokens);
    const std::vector<KvBlockRef>& blocks = pages.blocks;
    const double kv_bytes = 2.0 * kKvHeads * context * kHeadDim * 2;
    for (uint32_t rows : row_counts) {
      const size_t qvecs = size_t(kQHeads) * rows;
      DeviceBuffer q = Must(DeviceBuffer::Allocate(qvecs * kHeadDim * 2));
      CHECK_CUDA(cudaMemset(q.get(), 0x3c, q.size()));
      DeviceBuffer out = Must(DeviceBuffer::Allocate(qvecs * kHeadDim * 4));
      DeviceBuffer lse = Must(DeviceBuffer::Allocate(qvecs * 4));
      const size_t ws_bytes =
          PagedAttentionWorkspaceBytes(kQHeads, kKvHeads, rows, kHeadDim, context);
      DeviceBuffer ws = Must(DeviceBuffer::Allocate(ws_bytes));
      PagedAttentionArgs a;
      a.dtype = DType::kBF16;
      a.q_heads = kQHeads;
      a.kv_heads = kKvHeads;
      a.head_dim = kHeadDim;
      a.rows = rows;
      a.q = q.get();
      a.blocks = blocks;
      a.rotate_keys = rotate;
      a.rope.llama3_scaling = true;
      a.out = out.as<float>();
      a.lse = lse.as<float>();
      a.workspace = ws.get();
      a.workspace_bytes = ws_bytes;
      auto launch = [&] { CHECK_OK(LaunchPagedAttention(a, stream.get())); };

      launch();
      CHECK_OK(stream.Synchronize());
      if (!SelfCheck(out, lse, qvecs, context,
                     "context " + std::to_string(context) + " rows " + std::to_string(rows))) {
        return 1;
      }

      const double ms = median_ms(reps, launch);
      Row r;
      r.context = context;
      r.rows = rows;
      r.splits = ws_bytes == 0 ? 1 : static_cast<uint32_t>(ws_bytes / (qvecs * (kHeadDim + 2) * 4));
      r.us = ms * 1e3;
      r.kv_bytes = kv_bytes;
      r.gbs = kv_bytes / (ms * 1e-3) / 1e9;
      r.ratio = r.gbs / copy_gbs;
      rows_out.push_back(r);
      std::printf("  context %6u rows %3u: %9.1f us, %7.1f MB of K/V, %6.0f GB/s, %.2f of copy\n",
                  context, rows, r.us, kv_bytes / 1e6, r.gbs, r.ratio);
    }
  }

  std::printf("\n%8s %5s %7s %10s %10s %8s %7s\n", "context", "rows", "splits", "time us", "K/V MB",
              "GB/s", "ratio");
  for (const Row& r : rows_out) {
    std::printf("%8u %5u %7u %10.1f %10.1f %8.0f %7.2f\n", r.context, r.rows, r.splits, r.us,
                r.kv_bytes / 1e6, r.gbs, r.ratio);
  }
  std::printf(
      "\nratio: K/V bytes per second over the device-to-device copy's read+write bytes per "
      "second (%.0f GB/s); goal >= 0.7. Median of %d launches, L2 flushed before each.%s\n",
      copy_gbs, reps, rotate ? "" : " K not rotated (--no-rotate).");
  if (!json.empty()) {
    std::ofstream f(json);
    f << "{\"device\": \"" << dev.name << "\", \"copy_gbs\": " << copy_gbs << ", \"reps\": " << reps
      << ", \"rotate_keys\": " << (rotate ? "true" : "false") << ", \"rows\": [";
    for (size_t i = 0; i < rows_out.size(); ++i) {
      const Row& r = rows_out[i];
      f << (i ? ", " : "") << "{\"context\": " << r.context << ", \"rows\": " << r.rows
        << ", \"splits\": " << r.splits << ", \"us\": " << r.us
        << ", \"kv_bytes\": " << static_cast<uint64_t>(r.kv_bytes) << ", \"gbs\": " << r.gbs
        << ", \"ratio\": " << r.ratio << "}";
    }
    f << "]}\n";
  }
  return 0;
}

}  // namespace
}  // namespace gpu
}  // namespace shotdb

int main(int argc, char** argv) { return shotdb::gpu::Main(argc, argv); }
