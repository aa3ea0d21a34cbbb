// Host -> device staging throughput and the RoPE kernels' timings (docs/gpu.md).
//
//   h2d_bench [--mb N] [--block-tokens T] [--json FILE]
//
// 1. Copies: N MB from pinned memory with cudaMemcpyAsync (the ceiling), from pageable memory
//    (for reference), and through the Stager from a raw-codec store built in a temp dir, with
//    blocks of T tokens (default 1024: the NLU pool's 50-demonstration blocks average 998 tokens),
//    i.e. one record per block, layer and K/V of 8 x T x 128 bf16: straight from the registered
//    map and through pinned slabs, with and without checksum verification, each as GB/s and as a
//    ratio to the pinned copy (goal >= 0.9).
// 2. Kernels on Llama-3.1-8B shapes (8 kv heads, head_dim 128, 32 query heads, bf16) for pools of
//    30k and 90k tokens with 30% of the blocks selected: gather+RoPE, single-token attention
//    (LaunchPagedAttention, rows 1) over the gathered buffer, and the same attention rotating the
//    pages on the fly (paged_attention_bench measures that kernel's bandwidth in detail).
#include <cuda_runtime_api.h>
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "bench/bench_check.h"
#include "engine/store.h"
#include "gpu/cuda_util.h"
#include "gpu/paged_attention.h"
#include "gpu/rope_gather.h"
#include "gpu/stager.h"
#include "gpu/stream.h"

namespace shotdb {
namespace gpu {
namespace {

constexpr uint32_t kKvHeads = 8, kHeadDim = 128, kQHeads = 32, kBlockTokens = 256;
constexpr int kReps = 5;

struct Row {
  std::string name;
  double value;
  std::string unit;
  double ratio;  // to the row's baseline, or 0
};

double Seconds(std::chrono::steady_clock::time_point a) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
}

#define CHECK_OK(expr) SHOTDB_BENCH_CHECK_OK(expr)

using ::shotdb::bench::Must;

// Best of kReps of `fn` (which returns seconds).
template <typename F>
double Best(F fn) {
  double best = 1e30;
  for (int i = 0; i < kReps; ++i) best = std::min(best, fn());
  return best;
}

int Main(int argc, char** argv) {
  size_t mb = 1024;
  uint32_t block_tokens = 1024;
  std::string json;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--block-tokens") && i + 1 < argc) {
      block_tokens = static_cast<uint32_t>(std::strtoul(argv[++i], nullptr, 10));
    } else if (!std::strcmp(argv[i], "--mb") && i + 1 < argc) {
      mb = std::strtoul(argv[++i], nullptr, 10);
    } else if (!std::strcmp(argv[i], "--json") && i + 1 < argc) {
      json = argv[++i];
    } else {
      std::fprintf(stderr, "usage: h2d_bench [--mb N] [--block-tokens T] [--json FILE]\n");
      return 2;
    }
  }
  if (CudaDeviceCount() == 0) {
    std::fprintf(stderr, "h2d_bench: no CUDA device\n");
    return 1;
  }
  DeviceInfo dev = Must(QueryDevice(0));
  std::printf("device: %s, %d SMs\n", dev.name.c_str(), dev.multiprocessors);
  std::vector<Row> rows;

  // ---- store with `mb` MB of raw bf16 K/V in blocks of `block_tokens` tokens ----
  if (block_tokens == 0) {
    std::fprintf(stderr, "h2d_bench: --block-tokens must be > 0\n");
    return 2;
  }
  const size_t tensor_bytes = size_t(kKvHeads) * block_tokens * kHeadDim * 2;
  const uint32_t layers = 8;
  const uint32_t blocks =
      static_cast<uint32_t>(std::max<size_t>(1, (mb << 20) / (2 * tensor_bytes * layers)));
  const size_t bytes = size_t(blocks) * layers * 2 * tensor_bytes;
  const char* tmp = std::getenv("TMPDIR");
  std::string dir = std::string(tmp ? tmp : "/tmp") + "/h2d_bench_XXXXXX";
  std::vector<char> buf(dir.begin(), dir.end());
  buf.push_back('\0');
  dir = ::mkdtemp(buf.data());
  {
    Store::Options so;
    so.sync = false;
    auto store = Must(Store::Open(dir, so));
    TaskInfo task;
    task.name = "bench";
    task.model.architecture = "llama";
    task.model.dtype = DType::kBF16;
    task.model.tokenizer_hash = "bench";
    task.model.num_layers = layers;
    task.model.kv_heads = kKvHeads;
    task.model.head_dim = kHeadDim;
    task.codec = Codec::kRaw;
    task.prompt_template = "{text}\n{label}";
    CHECK_OK(store->CreateTask(task));
    std::vector<uint16_t> data(tensor_bytes / 2);
    for (size_t i = 0; i < data.size(); ++i)
      data[i] = static_cast<uint16_t>(0x3c00 + (i * 7919) % 977);
    for (uint32_t b = 0; b < blocks; ++b) {
      NewBlock nb;
      nb.model = task.model;
      nb.info.index = b;
      nb.info.position_offset = uint64_t(b) * block_tokens;
      nb.info.token_count = block_tokens;
      nb.info.demo_ids = {b};
      nb.info.text = "block " + std::to_string(b);
      nb.demos = {Demonstration{b, "block " + std::to_string(b), "x"}};
      nb.keys.assign(layers, data.data());
      nb.values.assign(layers, data.data());
      CHECK_OK(store->AppendBlock("bench", nb));
    }
  }
  auto store = Must(Store::Open(dir));
  std::printf("store: %u blocks of %u tokens x %u layers, %.1f MiB of K/V\n", blocks, block_tokens,
              layers, bytes / 1048576.0);

  // ---- raw copies ----
  CudaStream stream = Must(CudaStream::Create());
  DeviceBuffer dst = Must(DeviceBuffer::Allocate(bytes));
  void* pinned = nullptr;
  CHECK_OK(
      CudaStatus(cudaHostAlloc(&pinned, bytes, cudaHostAllocDefault), "cudaHostAlloc", "bench"));
  std::memset(pinned, 1, bytes);
  std::vector<uint8_t> pageable(bytes, 1);
  auto copy_from = [&](const void* src) {
    auto t0 = std::chrono::steady_clock::now();
    CHECK_OK(
        CudaStatus(cudaMemcpyAsync(dst.get(), src, bytes, cudaMemcpyHostToDevice, stream.get()),
                   "cudaMemcpyAsync", "bench"));
    CHECK_OK(stream.Synchronize());
    return Seconds(t0);
  };
  const double pinned_s = Best([&] { return copy_from(pinned); });
  const double pageable_s = Best([&] { return copy_from(pageable.data()); });
  const double pinned_gbs = bytes / pinned_s / 1e9;
  rows.push_back({"h2d pinned cudaMemcpyAsync", pinned_gbs, "GB/s", 1.0});
  rows.push_back(
      {"h2d pageable cudaMemcpyAsync", bytes / pageable_s / 1e9, "GB/s", pinned_s / pageable_s});
  cudaFreeHost(pinned);
  dst = DeviceBuffer();

  // ---- the stager, all misses (cache cleared between runs; pool memory stays warm) ----
  std::vector<uint32_t> all_blocks(blocks), all_layers(layers);
  for (uint32_t i = 0; i < blocks; ++i) all_blocks[i] = i;
  for (uint32_t i = 0; i < layers; ++i) all_layers[i] = i;
  struct Config {
    bool direct;
    bool verify;
    int threads;
    size_t slab_mb;
  };
  // Direct: DMA straight from the registered map (threads only verify checksums, overlapped with
  // the DMA). Slabs: the fill of slab i (threads copying from the map) overlaps the DMA of slab
  // i - 1, so it runs at min(fill rate, PCIe rate) and the thread count is the lever.
  for (const Config& c :
       {Config{true, false, 16, 32}, Config{true, true, 16, 32}, Config{true, true, 8, 32},
        Config{false, false, 16, 32}, Config{false, true, 16, 32}}) {
    const bool verify = c.verify;
    Stager::Options so;
    so.direct_from_map = c.direct;
    so.verify_checksums = verify;
    so.threads = c.threads;
    so.slab_bytes = c.slab_mb << 20;
    so.num_slabs = 4;
    auto stager = Must(Stager::Create(so));
    auto cache = Must(stager->CreateCache(bytes + (size_t(64) << 20)));
    auto snap = Must(store->BeginSnapshot());
    auto run = [&] {
      cache->Clear();
      auto t0 = std::chrono::steady_clock::now();
      StagedBatch batch =
          Must(stager->StageLayers(snap.get(), "bench", all_blocks, all_layers, cache.get()));
      CHECK_OK(batch.layers.back().ready.Synchronize());
      const double s = Seconds(t0);
      if (batch.bytes_copied != bytes) {
        std::fprintf(stderr, "stager copied %llu bytes, expected %zu\n",
                     static_cast<unsigned long long>(batch.bytes_copied), bytes);
        std::exit(1);
      }
      return s;
    };
    run();  // warm: page cache of the map, map registration, device pool, pinned slabs
    const Stager::Stats warm = stager->stats();
    const double s = Best(run);
    const Stager::Stats st = stager->stats();
    const double runs = static_cast<double>(st.pages_filled - warm.pages_filled) /
                        (static_cast<double>(blocks) * layers);
    std::printf(
        "  stager %s, verify %s, %d threads: per run %.0f copies, %.2f ms reading records, "
        "%.2f ms verifying, %.1f MB between records\n",
        c.direct ? "direct" : "slabs", verify ? "on" : "off", c.threads,
        (st.copies - warm.copies) / runs, (st.records_ms - warm.records_ms) / runs,
        (st.verify_ms - warm.verify_ms) / runs, (st.gap_bytes - warm.gap_bytes) / runs / 1e6);
    std::string path;
    if (c.direct && st.bytes_from_map > 0) {
      path = "direct from the registered map (registering " + std::to_string(bytes >> 20) +
             " MiB took " + std::to_string(static_cast<int>(st.map_register_ms)) + " ms)";
    } else if (c.direct) {
      path = "direct refused, slabs used: " + stager->map_status().ToString();
    } else {
      path = std::to_string(so.num_slabs) + " x " + std::to_string(c.slab_mb) + " MiB slabs";
    }
    rows.push_back({std::string("h2d stager raw codec, verify ") + (verify ? "on" : "off") + ", " +
                        std::to_string(c.threads) + " threads, " + path,
                    bytes / s / 1e9, "GB/s", pinned_s / s});
  }

  // ---- kernels ----
  CudaEvent e0 = Must(CudaEvent::Create(true)), e1 = Must(CudaEvent::Create(true));
  auto time_ms = [&](auto fn) {
    fn();  // warm-up
    return Best([&] {
      CHECK_OK(e0.Record(stream.get()));
      for (int i = 0; i < 10; ++i) fn();
      CHECK_OK(e1.Record(stream.get()));
      CHECK_OK(e1.Synchronize());
      return static_cast<double>(Must(e1.ElapsedMsSince(e0))) / 10;
    });
  };
  for (uint32_t pool_tokens : {30000u, 90000u}) {
    const uint32_t pool_blocks = pool_tokens / kBlockTokens;
    const uint32_t selected = pool_blocks * 3 / 10;
    const uint32_t total = selected * kBlockTokens;
    const size_t tensor = size_t(kKvHeads) * kBlockTokens * kHeadDim * 2;
    DeviceBuffer pool = Must(DeviceBuffer::Allocate(size_t(pool_blocks) * 2 * tensor));
    CHECK_OK(CudaStatus(cudaMemset(pool.get(), 0x3c, pool.size()), "cudaMemset", "bench"));
    std::vector<KvBlockRef> refs;
    for (uint32_t i = 0; i < selected; ++i) {  // every third block: scattered pages
      const size_t b = (size_t(i) * 10 / 3) % pool_blocks;
      refs.push_back({pool.as<uint8_t>() + 2 * b * tensor,
                      pool.as<uint8_t>() + (2 * b + 1) * tensor, kBlockTokens});
    }
    const size_t out_bytes = size_t(kKvHeads) * total * kHeadDim * 2;
    DeviceBuffer k_out = Must(DeviceBuffer::Allocate(out_bytes));
    DeviceBuffer v_out = Must(DeviceBuffer::Allocate(out_bytes));
    DeviceBuffer q = Must(DeviceBuffer::Allocate(kQHeads * kHeadDim * 2));
    CHECK_OK(CudaStatus(cudaMemset(q.get(), 0x3c, q.size()), "cudaMemset", "bench"));
    DeviceBuffer out = Must(DeviceBuffer::Allocate(kQHeads * kHeadDim * 4));
    const size_t ws_bytes = PagedAttentionWorkspaceBytes(kQHeads, kKvHeads, 1, kHeadDim, total);
    DeviceBuffer ws = Must(DeviceBuffer::Allocate(ws_bytes));
    RopeParams rope;
    rope.llama3_scaling = true;

    GatherRopeArgs g;
    g.dtype = DType::kBF16;
    g.kv_heads = kKvHeads;
    g.head_dim = kHeadDim;
    g.blocks = refs;
    g.rope = rope;
    g.k_out = k_out.get();
    g.v_out = v_out.get();
    PagedAttentionArgs a;
    a.dtype = DType::kBF16;
    a.q_heads = kQHeads;
    a.kv_heads = kKvHeads;
    a.head_dim = kHeadDim;
    a.rows = 1;
    a.q = q.get();
    a.rope = rope;
    a.out = out.as<float>();
    a.workspace = ws.get();
    a.workspace_bytes = ws_bytes;
    PagedAttentionArgs contiguous = a;
    contiguous.rotate_keys = false;
    contiguous.blocks = {{k_out.get(), v_out.get(), total}};
    a.blocks = refs;
    a.rotate_keys = true;

    const double gather_ms = time_ms([&] { CHECK_OK(LaunchGatherRope(g, stream.get())); });
    const double attn_ms =
        time_ms([&] { CHECK_OK(LaunchPagedAttention(contiguous, stream.get())); });
    const double fly_ms = time_ms([&] { CHECK_OK(LaunchPagedAttention(a, stream.get())); });
    const std::string tag = " (pool " + std::to_string(pool_tokens / 1000) + "k, " +
                            std::to_string(total) + " tokens selected)";
    const double moved = 2.0 * 2 * out_bytes;  // gather reads and writes K and V
    rows.push_back({"gather+rope" + tag, gather_ms * 1e3, "us", 0});
    rows.push_back({"  gather+rope bandwidth" + tag, moved / (gather_ms * 1e-3) / 1e9, "GB/s", 0});
    rows.push_back({"attention on gathered" + tag, attn_ms * 1e3, "us", 0});
    rows.push_back({"gather+rope then attention" + tag, (gather_ms + attn_ms) * 1e3, "us", 1.0});
    rows.push_back(
        {"attention, rope on the fly" + tag, fly_ms * 1e3, "us", (gather_ms + attn_ms) / fly_ms});
  }

  std::printf("\n%-72s %12s %6s %8s\n", "measurement", "value", "unit", "ratio");
  for (const Row& r : rows) {
    std::printf("%-72s %12.2f %6s", r.name.c_str(), r.value, r.unit.c_str());
    if (r.ratio > 0) std::printf(" %8.3f", r.ratio);
    std::printf("\n");
  }
  std::printf(
      "\nratio: copies vs pinned cudaMemcpyAsync (goal for the stager >= 0.9); "
      "on-the-fly attention as speedup over gather+rope then attention\n");
  if (!json.empty()) {
    std::ofstream f(json);
    f << "{\"device\": \"" << dev.name << "\", \"bytes\": " << bytes << ", \"rows\": [";
    for (size_t i = 0; i < rows.size(); ++i) {
      f << (i ? ", " : "") << "{\"name\": \"" << rows[i].name << "\", \"value\": " << rows[i].value
        << ", \"unit\": \"" << rows[i].unit << "\", \"ratio\": " << rows[i].ratio << "}";
    }
    f << "]}\n";
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return 0;
}

}  // namespace
}  // namespace gpu
}  // namespace shotdb

int main(int argc, char** argv) { return shotdb::gpu::Main(argc, argv); }
