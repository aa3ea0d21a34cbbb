// Stager: the read path from the store to device memory.
//
//   raw records, map registered (direct_from_map; the usual case):
//       store (LMDB map, page-locked) --a cudaMemcpyAsync per run of adjacent records-->
//       landing buffer on the device --LaunchUnpackKv (a copy, or fp8/int8 -> 16 bits)--> pages
//       (threads verify the records' checksums on the host while the DMA runs, or later)
//   LZ4 records,   store (LMDB map) --decode / copy, parallel threads--> pinned slab
//   or no direct:      --cudaMemcpyAsync per record--> page (fp8/int8: a landing buffer, then
//                      LaunchUnpackKv per layer)
//
// For each requested layer, the selected blocks' pages (one per block and layer, holding its K and
// V) are looked up in a BlockPageCache; the misses are read from the Snapshot (zero-copy record
// views into the memory map). The blocks' token counts (the pages' sizes) are read from the store
// once per task and remembered, so a query whose pages all hit reads only the task's record.
//
// Straight from the map. A block's records are written together, so they lie next to each other
// in the map, separated by a record header and the rest of an LMDB page. The Stager reads the
// layers in Options::layer_groups groups, in request order; for each group it looks up the pages,
// reads the missing records' headers (one cursor walk a block, Snapshot::GetBlockRecords), sorts
// them by address and copies each run whose gaps are at most max_gap_bytes in ONE copy, into a
// stream-ordered landing buffer of at most landing_bytes; a kernel then moves each payload from
// the landing buffer to its page, and the group's layers get their events. A layer whose pages
// all hit needs no copy and gets its event and on_layer call as soon as it is pinned (in request
// order, after every earlier layer); the first layer is pinned alone, so that a hot query's
// consumer starts after its pins, not the group's (on both paths). A cold query of 300
// blocks x 32 layers (19,200 records) thus makes ~1,200 copies (4 groups) instead of 19,200: the
// per-copy cost on the host and in the copy engine, not PCIe, had bound cold queries
// (docs/results.md). The price is the gap bytes copied along (a few percent; Stats::gap_bytes).
// The records' checksums are verified by the worker threads after the last group is enqueued,
// while the DMA runs; with Options::defer_verification, in the background after StageLayers
// returned (StagedBatch::verified), so that the caller's forward overlaps it too.
//
// Through the slabs (compressed codecs, or where the device refuses to register the map): pool
// threads decode into pinned slabs (kRaw: a copy, plus the checksum check when verify_checksums;
// LZ4 codecs: decompression) and the copies run from there, layer by layer; while the threads fill
// slab i, the copy engine drains slab i - 1. After each layer's last copy an event is recorded: a
// consumer waits for layer l (on the device, with StagedLayer::ready.WaitOn(its stream)) while
// later layers are still being read and copied.
//
// Every copy and kernel runs on the Stager's copy stream. Direct copies (and a deferred
// verification) read the map asynchronously: keep the Snapshot open until the last layer's event
// has completed and StagedBatch::verified is ready (StageLayers itself waits for its copies when
// it fails).
//
// Cache pages are filled in stream order: every page staged through one Stager is ready once any
// event recorded on its stream afterwards has completed, including pages that hit because an
// earlier StageLayers filled them. A layer's event is left empty (ready at once) when the stream
// had nothing in flight at that point, e.g. a query whose pages all hit after earlier copies
// finished. Use one Stager per cache (CreateCache), or order other streams
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
#include <future>
#include <memory>
#include <string>
#include <unordered_map>
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
  CudaEvent ready;  // empty if the pages were ready when staged (nothing in flight on the stream)
  std::vector<PageHandle> pages;   // pins the pages while the batch lives
  std::vector<KvBlockRef> blocks;  // pages[i].k()/v() and the block's token count: kernel input
};

struct StagedBatch {
  StagedBatch() = default;
  // Releases the pins block by block (a block's pages in every layer, then the next block's), so
  // that a block's pages lie next to each other in the cache's LRU list, where the next pinning of
  // a page touches its neighbours. Layer by layer (the vectors' own order) scattered them: with the
  // CPU caches cold, releasing a 95k query's 9,600 pins took 0.80 ms that way against 0.37 block
  // by block (page_cache_bench, run Q in docs/results.md).
  ~StagedBatch();
  StagedBatch(StagedBatch&&) = default;
  StagedBatch& operator=(StagedBatch&&) = default;

  DType dtype = DType::kBF16;  // of the pages: the task's, or Options::scaled_pages for scaled ones
  uint32_t kv_heads = 0, head_dim = 0;
  std::vector<uint32_t> block_tokens;  // per requested block
  uint64_t total_tokens = 0;
  std::vector<StagedLayer> layers;  // in request order
  uint64_t pages_hit = 0, pages_filled = 0;
  uint64_t bytes_copied = 0;  // host -> device bytes this call enqueued
  // Options::defer_verification: the record checksums, still being verified when StageLayers
  // returned. get() waits and gives OK or the first Corruption (naming the record); until it
  // returned OK nothing computed from the pages may be trusted. Invalid (valid() == false) when
  // StageLayers verified them itself.
  std::shared_future<Status> verified;
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
    // Direct copies: records at most this far apart in the map are copied together (the bytes
    // between them cross PCIe too), ...
    size_t max_gap_bytes = size_t(32) << 10;
    // ... into landing buffers of at most this many bytes (>= slab_bytes; device memory beyond
    // the cache's budget, reused through a stream-ordered pool).
    size_t landing_bytes = size_t(256) << 20;
    // Direct copies: the layers are read and copied in this many groups, in request order; a
    // group's layers are ready (their events) once its copies are done, so a consumer starts on
    // them while later groups are in flight. More groups: more, smaller copies.
    uint32_t layer_groups = 4;
    // Direct copies: verify the checksums in the background and return at once, with
    // StagedBatch::verified to wait on (the pages count as filled at once; those whose records fail
    // are invalidated in the cache). The caller overlaps the check with its own work, e.g. the
    // forward that reads the pages, and must wait for it before it returns a result.
    bool defer_verification = false;
    // Refuse tasks whose dtype the kernels do not take (bf16, f16). Off for plain staging of any
    // dtype (shotdb.Store.load_kv(device="cuda")); the batch's KvBlockRefs are then not kernel
    // input.
    bool kernel_dtypes_only = true;
    // The dtype tasks of a scaled dtype (kF8E4M3, kI8: IsScaledDType) are dequantised to in the
    // pages: kBF16 or kF16.
    DType scaled_pages = DType::kBF16;
  };
  struct Stats {
    uint64_t pages_hit = 0, pages_filled = 0;
    uint64_t bytes_copied = 0;    // host -> device
    uint64_t bytes_from_map = 0;  // of which copied straight from the registered map
    uint64_t gap_bytes = 0;       // map bytes between records copied along (not in the above)
    uint64_t copies = 0;          // host -> device copy calls
    // Direct path, host wall time: looking up pages and reading record headers; verifying
    // checksums (while the copies run).
    double records_ms = 0, verify_ms = 0;
    double map_register_ms = 0;  // time spent page-locking the map
    // Host wall time in StageLayers, all paths; of it, pinning the pages (PinLayers); and from
    // StageLayers' entry to its first layer's on_layer call (what a consumer that starts on the
    // first layer waits for).
    double stage_ms = 0, pin_ms = 0, first_layer_ms = 0;
    uint64_t slabs_flushed = 0;
    uint64_t slab_waits = 0;  // times a slab had to wait for its earlier copies to finish
  };
  // Called after layer `index` (of the request) has been enqueued, e.g. to launch its consumer.
  // Straight from the map it may run before the layer's checksums are verified: what the consumer
  // computes counts only if StageLayers (and, deferred, StagedBatch::verified) then return OK.
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
  //   InvalidArgument    empty or duplicate blocks, a duplicate layer or one >= the task's layer
  //                      count, a tensor larger than slab_bytes, or (kernel_dtypes_only) a task
  //                      dtype the kernels do not take (bf16, f16, f8e4m3 and i8 are taken);
  //   Corruption         a record fails its checks (names task, block, layer and K/V);
  //   FailedPrecondition the cache is exhausted by pinned pages;
  //   IOError            CUDA failures;
  //   or the callback's error. On error no page whose records were not all read and verified
  //   stays cached (through the slabs: nothing of the failed layer).
  Result<StagedBatch> StageLayers(Snapshot* snapshot, const std::string& task,
                                  const std::vector<uint32_t>& blocks,
                                  const std::vector<uint32_t>& layers, BlockPageCache* cache,
                                  const LayerCallback& on_layer = {});

  // Waits for a deferred verification still running (StageLayers and the destructor do this
  // first). Call it before destroying a cache that a batch of this Stager staged into.
  void WaitPending();

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
  // The direct path (header comment): every missing page's records, in runs, from the map.
  Result<StagedBatch> StageFromMap(Snapshot* snapshot, const std::string& task,
                                   const TaskInfo& info, const std::vector<uint32_t>& blocks,
                                   const std::vector<uint32_t>& layers, BlockPageCache* cache,
                                   const LayerCallback& on_layer, uint32_t task_id,
                                   const std::vector<size_t>& page_bytes, StagedBatch batch);
  // Pins the pages of every block in layers[l0, l1), block by block (BlockPageCache::AcquireLayers:
  // one cache lookup per block, not per page), appending a StagedLayer per layer to batch->layers
  // with its pages and kernel block refs in block order; counts hits and fills.
  Status PinLayers(BlockPageCache* cache, uint32_t task_id, const std::vector<uint32_t>& blocks,
                   const std::vector<uint32_t>& layers, size_t l0, size_t l1,
                   const std::vector<size_t>& page_bytes, StagedBatch* batch);
  // After a layer's copies are enqueued: records staged->ready on the stream, or leaves it empty
  // if the stream has already finished all its work.
  Status MarkReady(StagedLayer* staged);
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
  std::unique_ptr<DeviceAllocator> landing_;  // fp8/int8 landing buffers, stream-ordered on stream_
  std::unique_ptr<PinnedPool> pool_;
  std::unique_ptr<Workers> workers_;
  std::unique_ptr<MapRegistry> map_;
  Status map_status_;
  std::deque<InFlight> in_flight_;
  std::vector<CudaEvent> spare_events_;
  std::shared_future<Status> pending_;  // the last deferred verification
  // Token counts of the blocks read so far, per task name@created_unix (a block never changes
  // once written): a query whose pages all hit reads nothing from the store but the task. At most
  // kMaxKnownTasks tasks; a new one past that empties it (the counts are read again as needed).
  static constexpr size_t kMaxKnownTasks = 64;
  std::unordered_map<std::string, std::vector<uint32_t>> block_tokens_;
  Stats stats_;
};

}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_STAGER_H_
