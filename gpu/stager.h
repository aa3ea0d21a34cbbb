// Stager: the read path from the store to device memory, layer by layer.
//
//   raw records:   store (LMDB map, page-locked) --cudaMemcpyAsync--> page
//                  (threads verify checksums on the host while the DMA runs)
//   LZ4 records,   store (LMDB map) --decode / copy, parallel threads--> pinned slab
//   or no direct:      --cudaMemcpyAsync--> page
//   fp8 records:   either way into a landing buffer on the device, then one LaunchDequantizeKv
//                  per layer writes the pages in Options::fp8_pages (bf16 or f16): half the
//                  bytes cross PCIe, and the kernels read the same 16-bit pages as for bf16 tasks.
//
// For each requested layer, the selected blocks' K and V pages are looked up in a BlockPageCache;
// the misses are read from the Snapshot (zero-copy record views into the memory map). Codec::kRaw
// records are copied straight from the map, which a MapRegistry page-locks on first use
// (direct_from_map; see map_registry.h for why and when the device refuses). The others, or all
// records where registering is refused, are decoded by a pool of threads into pinned slabs
// (kRaw: a copy, plus the checksum check when verify_checksums; LZ4 codecs: decompression) and
// copied from there; while the threads fill slab i, the copy engine drains slab i - 1. Every copy
// runs on the Stager's copy stream. After the last copy of a layer, and after its checksums were
// verified, an event is recorded: a consumer waits for layer l (on the device, with
// StagedLayer::ready.WaitOn(its stream)) while later layers are still being read and copied.
//
// Direct copies read the map asynchronously: keep the Snapshot open until the last layer's event
// has completed (StageLayers itself waits for its copies when it fails).
//
// Cache pages are filled in stream order: every page staged through one Stager is ready once any
// event recorded on its stream afterwards has completed, including pages that hit because an
// earlier StageLayers filled them. Use one Stager per cache (CreateCache), or order other streams
// after the Stager's events.
//
// Thread-safety: a Stager is not thread-safe (one StageLayers at a time); the Snapshot is used only
// from the calling thread (the worker threads read record views, which the Snapshot keeps valid).
#ifndef SHOTDB_GPU_STAGER_H_
#define SHOTDB_GPU_STAGER_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/store.h"
#include "gpu/block_page_cache.h"
#include "gpu/map_registry.h"
#include "gpu/pinned_pool.h"
#include "gpu/rope_gather.h"
#include "gpu/stream.h"
#include "util/status.h"

namespace shotdb {
namespace gpu {

// One staged layer: the selected blocks' pages, in request order, and the event after which they
// hold the data (on the device timeline).
struct StagedLayer {
  uint32_t layer = 0;
  CudaEvent ready;
  std::vector<PageHandle> pages;   // pins the pages while the batch lives
  std::vector<KvBlockRef> blocks;  // pages[i].k()/v() and the block's token count: kernel input
};

struct StagedBatch {
  DType dtype = DType::kBF16;  // of the pages: the task's, or Options::fp8_pages for fp8 tasks
  uint32_t kv_heads = 0, head_dim = 0;
  std::vector<uint32_t> block_tokens;  // per requested block
  uint64_t total_tokens = 0;
  std::vector<StagedLayer> layers;  // in request order
  uint64_t pages_hit = 0, pages_filled = 0;
  uint64_t bytes_copied = 0;  // host -> device bytes this call enqueued
};

class Stager {
 public:
  struct Options {
    size_t slab_bytes = size_t(32) << 20;  // must hold the largest single K or V tensor
    size_t num_slabs = 4;                  // pinned slabs in flight
    int threads = 8;                       // decode / copy threads (>= 1)
    // Recompute record checksums while reading (raw codec; the LZ4 codecs always verify).
    bool verify_checksums = true;
    // Copy raw records straight from the page-locked store map (no slab, no CPU copy). Falls
    // back to the slabs, for good, if the map cannot be registered (see map_status()).
    bool direct_from_map = true;
    // Refuse tasks whose dtype the kernels do not take (bf16, f16). Off for plain staging of any
    // dtype (shotdb.Store.load_kv(device="cuda")); the batch's KvBlockRefs are then not kernel
    // input.
    bool kernel_dtypes_only = true;
    // The dtype scaled fp8 tasks (DType::kF8E4M3) are dequantised to in the pages: kBF16 or kF16.
    DType fp8_pages = DType::kBF16;
  };
  struct Stats {
    uint64_t pages_hit = 0, pages_filled = 0;
    uint64_t bytes_copied = 0;    // host -> device
    uint64_t bytes_from_map = 0;  // of which copied straight from the registered map
    double map_register_ms = 0;   // time spent page-locking the map
    uint64_t slabs_flushed = 0;
    uint64_t slab_waits = 0;  // times a slab had to wait for its earlier copies to finish
  };
  // Called after layer `index` (of the request) has been enqueued, e.g. to launch its consumer.
  using LayerCallback = std::function<Status(size_t index, const StagedLayer& layer)>;

  // Creates the copy stream, the pinned pool and the threads on the current device.
  // InvalidArgument for 0 slabs, slab bytes or threads; IOError from CUDA.
  static Result<std::unique_ptr<Stager>> Create(const Options& options);
  // Waits for the copies still in flight.
  ~Stager();
  Stager(const Stager&) = delete;
  Stager& operator=(const Stager&) = delete;

  // A cache whose pages are allocated stream-ordered on this Stager's stream. The Stager must
  // outlive it.
  Result<std::unique_ptr<BlockPageCache>> CreateCache(size_t budget_bytes);

  // Stages `layers` of `blocks` of `task` (both in the given order) into `cache`.
  // Returns the batch (events recorded; copies may still be running), or:
  //   NotFound           unknown task or block, or a missing record;
  //   InvalidArgument    empty or duplicate blocks, a layer >= the task's layer count, a tensor
  //                      larger than slab_bytes, or (kernel_dtypes_only) a task dtype the
  //                      kernels do not take (bf16, f16 and fp8 are taken);
  //   Corruption         a record fails its checks (names task, block, layer and K/V);
  //   FailedPrecondition the cache is exhausted by pinned pages;
  //   IOError            CUDA failures;
  //   or the callback's error. On error nothing of the failed layer stays cached.
  Result<StagedBatch> StageLayers(Snapshot* snapshot, const std::string& task,
                                  const std::vector<uint32_t>& blocks,
                                  const std::vector<uint32_t>& layers, BlockPageCache* cache,
                                  const LayerCallback& on_layer = {});

  cudaStream_t stream() const { return stream_.get(); }
  Stats stats() const { return stats_; }
  // OK while raw records may be copied straight from the map; otherwise why not (the
  // option is off, or the registration's error, e.g. NotSupported on devices without read-only
  // host registration).
  const Status& map_status() const { return map_status_; }
  const PinnedPool& pinned_pool() const { return *pool_; }

 private:
  class Workers;
  struct CopyJob {
    BlockRecordView view;
    std::string what;
    void* dst = nullptr;  // device
    size_t size = 0;
    size_t slab_offset = 0;
  };
  struct InFlight {
    PinnedSlab slab;
    CudaEvent done;
  };
  explicit Stager(const Options& options);
  Result<StagedBatch> Stage(Snapshot* snapshot, const std::string& task,
                            const std::vector<uint32_t>& blocks,
                            const std::vector<uint32_t>& layers, BlockPageCache* cache,
                            const LayerCallback& on_layer);
  // Registers the part of the snapshot's map not yet registered; false if direct copies are off.
  bool CoverMap(Snapshot* snapshot);
  // Enqueues a copy straight from the registered map.
  Status CopyFromMap(const CopyJob& job);
  // Verifies the checksums of the layer's direct copies (in parallel).
  Status VerifyDirect(const std::vector<CopyJob>& jobs);
  // Reads the jobs into `slab` in parallel, enqueues their copies and records the slab in flight.
  Status Flush(PinnedSlab slab, std::vector<CopyJob>* jobs);
  // A free slab, waiting for the oldest in-flight copies if the pool is exhausted.
  Result<PinnedSlab> AcquireSlab();
  Status WaitInFlight();

  const Options options_;
  CudaStream stream_;
  std::unique_ptr<DeviceAllocator> landing_;  // fp8 landing buffers, stream-ordered on stream_
  std::unique_ptr<PinnedPool> pool_;
  std::unique_ptr<Workers> workers_;
  std::unique_ptr<MapRegistry> map_;
  Status map_status_;
  std::deque<InFlight> in_flight_;
  std::vector<CudaEvent> spare_events_;
  Stats stats_;
};

}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_STAGER_H_
