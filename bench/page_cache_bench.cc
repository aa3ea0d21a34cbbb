// What a hot DBSA query's page lookups cost on the host: pinning every selected block's page in
// every layer (the Stager does this before any copy or kernel), and the release of those pins when
// the query's batch goes, against a bare std::unordered_map lookup of the same keys measured in the
// same run (the floor for a hash lookup per page). Two ways to pin: BlockPageCache::Acquire page by
// page, layer by layer (the Stager until run M), and AcquireLayers block by block (one lookup and
// one lock a block for all its layers: the Stager since run M). AcquireLayers' pins are released
// two ways: layer by layer (a StagedBatch's order until run Q: its layers' handles in turn) and
// block by block (since run Q); the order of release is the order of the LRU list, whose
// neighbours the next pin of a page touches.
//
//   build/bench/page_cache_bench [--blocks 300] [--layers 32] [--pool-blocks 3200] [--queries 50]
//                                [--cold-cpu-cache 0|1]
//
// --cold-cpu-cache 1 reads a 256 MiB buffer before each pinning and each release, as a query's
// forward does between them in a serving process, so the cache's entries come from memory, not
// from the CPU caches.
//
// The default shape is the 95k-token pool of docs/results.md (runs I-K): 300 selected blocks of
// ~95 tokens, 32 layers, 9,600 pages a query, 102,400 pages resident. Page memory comes from a fake
// allocator (the policy only; no device needed). Prints ns per page and the ratio to the floor.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "bench/bench_check.h"
#include "gpu/block_page_cache.h"

namespace shotdb {
namespace {

// Hands out distinct fake addresses; nothing is touched.
class FakeAllocator final : public gpu::DeviceAllocator {
 public:
  Result<void*> Allocate(size_t bytes) override {
    next_ += (bytes + 255) / 256 * 256;
    return reinterpret_cast<void*>(next_);
  }
  void Free(void*) override {}

 private:
  uintptr_t next_ = uintptr_t(1) << 40;
};

double NsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
}

int Main(int argc, char** argv) {
  uint32_t blocks = 300, layers = 32, pool_blocks = 3200, queries = 50, cold = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const uint32_t value = static_cast<uint32_t>(std::strtoul(argv[i + 1], nullptr, 10));
    if (flag == "--blocks") {
      blocks = value;
    } else if (flag == "--layers") {
      layers = value;
    } else if (flag == "--pool-blocks") {
      pool_blocks = value;
    } else if (flag == "--queries") {
      queries = value;
    } else if (flag == "--cold-cpu-cache") {
      cold = value;
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  if (blocks == 0 || blocks > pool_blocks || layers == 0 || queries == 0) {
    std::fprintf(stderr, "need 0 < --blocks <= --pool-blocks, --layers > 0, --queries > 0\n");
    return 2;
  }
  // Pages of a 95-token block of Llama-3.1-8B: 8 heads x 95 x 128 x bf16 for K and for V.
  const size_t half = size_t(8) * 95 * 128 * 2;
  gpu::BlockPageCache::Options options;
  options.budget_bytes = size_t(pool_blocks) * layers * 2 * (half + 256);
  auto cache = bench::Must(gpu::BlockPageCache::Create(options, std::make_unique<FakeAllocator>()));
  const uint32_t task = cache->InternTask("bench@0");
  std::unordered_map<gpu::PageKey, uint32_t, gpu::PageKeyHash> bare;
  for (uint32_t b = 0; b < pool_blocks; ++b) {
    for (uint32_t l = 0; l < layers; ++l) {
      gpu::PageHandle h = bench::Must(cache->Acquire({task, b, l}, half, half));
      h.MarkFilled();
      bare.emplace(gpu::PageKey{task, b, l}, b);
    }
  }
  std::mt19937 rng(7);
  uint64_t sink = 0;
  std::vector<uint32_t> all(pool_blocks);
  std::iota(all.begin(), all.end(), 0u);
  double acquire_ns = 0, release_ns = 0, bare_ns = 0, layers_ns = 0, layers_release_ns = 0;
  double by_layer_ns = 0, by_layer_release_ns = 0;  // AcquireLayers, released layer by layer
  std::vector<uint64_t> evict(cold ? (size_t(256) << 20) / 8 : 0, 1);
  auto chill = [&] {  // reads the buffer: the CPU caches hold it, not the page cache's entries
    uint64_t x = 0;
    for (size_t i = 0; i < evict.size(); i += 8) x += evict[i];
    sink += x;
  };
  std::vector<uint32_t> layer_ids(layers);
  std::iota(layer_ids.begin(), layer_ids.end(), 0u);
  for (uint32_t q = 0; q < queries; ++q) {
    std::shuffle(all.begin(), all.end(), rng);
    const std::vector<uint32_t> selected(all.begin(), all.begin() + blocks);
    // Layer by layer, every block: the Stager's order.
    chill();
    auto t0 = std::chrono::steady_clock::now();
    for (uint32_t l = 0; l < layers; ++l) {
      for (uint32_t b : selected) sink += bare.find(gpu::PageKey{task, b, l})->second;
    }
    bare_ns += NsSince(t0);
    std::vector<gpu::PageHandle> pins;
    pins.reserve(size_t(blocks) * layers);
    chill();
    t0 = std::chrono::steady_clock::now();
    for (uint32_t l = 0; l < layers; ++l) {
      for (uint32_t b : selected) {
        pins.push_back(bench::Must(cache->Acquire({task, b, l}, half, half)));
        if (!pins.back().filled()) return 1;
      }
    }
    acquire_ns += NsSince(t0);
    chill();
    t0 = std::chrono::steady_clock::now();
    pins.clear();
    release_ns += NsSince(t0);
    // Block by block, every layer at once (into pins, block-major): the ns it took.
    auto pin_by_block = [&]() -> double {
      pins.resize(size_t(blocks) * layers);
      chill();
      const auto start = std::chrono::steady_clock::now();
      for (size_t i = 0; i < selected.size(); ++i) {
        SHOTDB_BENCH_CHECK_OK(cache->AcquireLayers(task, selected[i], layer_ids.data(), layers,
                                                   half, half, pins.data() + i * layers));
      }
      const double ns = NsSince(start);
      for (const gpu::PageHandle& h : pins) {
        if (!h.filled()) {
          std::fprintf(stderr, "a resident page came back unfilled\n");
          std::exit(1);
        }
      }
      return ns;
    };
    // Released layer by layer.
    by_layer_ns += pin_by_block();
    chill();
    t0 = std::chrono::steady_clock::now();
    for (uint32_t l = 0; l < layers; ++l) {
      for (size_t i = 0; i < selected.size(); ++i) pins[i * layers + l].Reset();
    }
    by_layer_release_ns += NsSince(t0);
    // Released block by block.
    layers_ns += pin_by_block();
    chill();
    t0 = std::chrono::steady_clock::now();
    pins.clear();
    layers_release_ns += NsSince(t0);
  }
  const double pages = double(queries) * blocks * layers;
  std::printf("page cache: %u pages resident, %u blocks x %u layers a query, %u queries%s\n",
              pool_blocks * layers, blocks, layers, queries, cold ? ", CPU caches cold" : "");
  std::printf("  bare hash lookup (floor) %7.1f ns/page\n", bare_ns / pages);
  std::printf("  Acquire (hit)            %7.1f ns/page  %5.1fx the floor\n", acquire_ns / pages,
              acquire_ns / bare_ns);
  std::printf("  release                  %7.1f ns/page  %5.1fx the floor\n", release_ns / pages,
              release_ns / bare_ns);
  std::printf("  AcquireLayers (hit), after release by layer\n");
  std::printf("                           %7.1f ns/page  %5.1fx the floor\n", by_layer_ns / pages,
              by_layer_ns / bare_ns);
  std::printf("  release layer by layer   %7.1f ns/page  %5.1fx the floor\n",
              by_layer_release_ns / pages, by_layer_release_ns / bare_ns);
  std::printf("  AcquireLayers (hit), after release by block\n");
  std::printf("                           %7.1f ns/page  %5.1fx the floor\n", layers_ns / pages,
              layers_ns / bare_ns);
  std::printf("  release block by block   %7.1f ns/page  %5.1fx the floor\n",
              layers_release_ns / pages, layers_release_ns / bare_ns);
  std::printf(
      "  per query: Acquire %.2f + release %.2f ms; AcquireLayers %.2f + release by layer %.2f "
      "ms; AcquireLayers %.2f + release by block %.2f ms; floor %.2f ms   [%llu]\n",
      acquire_ns / queries / 1e6, release_ns / queries / 1e6, by_layer_ns / queries / 1e6,
      by_layer_release_ns / queries / 1e6, layers_ns / queries / 1e6,
      layers_release_ns / queries / 1e6, bare_ns / queries / 1e6,
      static_cast<unsigned long long>(sink % 10));
  return 0;
}

}  // namespace
}  // namespace shotdb

int main(int argc, char** argv) { return shotdb::Main(argc, argv); }
