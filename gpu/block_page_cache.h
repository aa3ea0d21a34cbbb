// BlockPageCache: device-resident copies of stored K/V, one page per (task, block, layer) holding
// that layer's K and V of the block, kept under a byte budget with LRU eviction.
//
// A query stages the blocks BM25 selected; popular blocks (sink blocks, frequent demonstrations)
// recur across queries, and a hit saves the whole store -> host -> device path for them.
//
// Pinning. Acquire returns a PageHandle that pins the page: a pinned page is never evicted, so its
// device pointers stay valid while the handle lives. When a new page does not fit in the budget,
// unpinned pages are evicted least recently released first; if the budget cannot be met because
// the rest is pinned, Acquire fails (FailedPrecondition "page cache exhausted", the closest code
// util/status.h has to "resource exhausted") and changes nothing.
//
// Memory. The memory of a page that is dropped (evicted, cleared, discarded, invalidated) is kept
// for the next page of the same size instead of going back to the allocator, whose calls cost
// ~1-2 us each on the device (a cold 95k DBSA query stages 9,600 pages); a miss that needs room
// takes an evicted page's memory directly when the sizes match. Kept memory counts against the
// budget (bytes_in_use + bytes_recycled <= budget_bytes) and is freed first when room or device
// memory runs short, or by Trim.
//
// Filling. On a miss Acquire allocates the page and returns a handle with filled() == false: the
// caller enqueues the copies of K and V into k() and v() and then calls MarkFilled(). A handle
// destroyed before MarkFilled discards the page (e.g. the read failed), so a later Acquire misses
// again instead of returning garbage. The cache does not track when the device copies complete:
// pages are "filled" in stream order, so consumers must order their work after the copies (the
// Stager's per-layer events do this for everything staged through one Stager).
//
// Lookups. Pages are indexed by (task, block), then by layer: AcquireLayers pins one block's pages
// in several layers with one lookup and one lock (a hot 95k query pins 9,600 pages of 300 blocks;
// bench/page_cache_bench.cc).
//
// The policy is pure C++; device memory comes from a DeviceAllocator, so that the policy is tested
// on machines without a GPU with a fake allocator.
//
// Thread-safety: BlockPageCache is thread-safe. A PageHandle is a plain handle (one owner at a
// time); the cache must outlive every handle.
#ifndef SHOTDB_GPU_BLOCK_PAGE_CACHE_H_
#define SHOTDB_GPU_BLOCK_PAGE_CACHE_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "util/status.h"

namespace shotdb {
namespace gpu {

// Which page: `task` is an id from BlockPageCache::InternTask.
struct PageKey {
  uint32_t task = 0;
  uint32_t block = 0;
  uint32_t layer = 0;
  bool operator==(const PageKey& o) const {
    return task == o.task && block == o.block && layer == o.layer;
  }
};

// The bit mixer of the cache's hashes (MurmurHash3's 64-bit finalizer steps).
inline size_t MixPageBits(uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  return static_cast<size_t>(h);
}

struct PageKeyHash {
  size_t operator()(const PageKey& k) const {
    return MixPageBits((static_cast<uint64_t>(k.task) << 40) ^
                       (static_cast<uint64_t>(k.layer) << 32) ^ k.block);
  }
};

// Where pages live. Implementations must be thread-safe.
class DeviceAllocator {
 public:
  virtual ~DeviceAllocator() = default;
  // `bytes` (> 0) bytes aligned to at least 256, or an error (IOError when out of memory).
  virtual Result<void*> Allocate(size_t bytes) = 0;
  // Releases memory from Allocate.
  virtual void Free(void* p) = 0;
};

// Stream-ordered allocations (cudaMallocFromPoolAsync / cudaFreeAsync on `stream`, which must
// outlive the allocator) from a private memory pool on the current device that keeps freed
// memory for reuse instead of returning it to the driver: after warm-up an allocation costs
// microseconds and never synchronizes. Memory is usable on `stream` at once, on other streams
// after an event recorded on `stream`. IOError if the pool cannot be created.
Result<std::unique_ptr<DeviceAllocator>> NewCudaPoolAllocator(cudaStream_t stream);

class BlockPageCache;

// Pins one page while it lives. Move-only.
class PageHandle {
 public:
  PageHandle() = default;
  ~PageHandle() { Reset(); }
  PageHandle(PageHandle&& o) noexcept;
  PageHandle& operator=(PageHandle&& o) noexcept;
  PageHandle(const PageHandle&) = delete;
  PageHandle& operator=(const PageHandle&) = delete;

  bool valid() const { return cache_ != nullptr; }
  const PageKey& key() const { return key_; }
  // Device pointers to the page's K (k_bytes) and V (v_bytes); V starts 256-byte aligned.
  void* k() const { return k_; }
  void* v() const { return v_; }
  size_t k_bytes() const { return k_bytes_; }
  size_t v_bytes() const { return v_bytes_; }
  // False for a page this handle must fill (a miss).
  bool filled() const { return filled_; }
  // Declares the page's contents written (in stream order); later Acquires hit it.
  void MarkFilled();
  // Unpins now (an unfilled page is discarded); the handle becomes invalid.
  void Reset();

 private:
  friend class BlockPageCache;
  BlockPageCache* cache_ = nullptr;
  void* entry_ = nullptr;  // the cache's entry of the page (stable while pinned)
  PageKey key_;
  void* k_ = nullptr;
  void* v_ = nullptr;
  size_t k_bytes_ = 0, v_bytes_ = 0;
  bool filled_ = false;
};

class BlockPageCache {
 public:
  struct Options {
    size_t budget_bytes = size_t(4) << 30;
  };
  struct Stats {
    uint64_t hits = 0;
    uint64_t misses = 0;        // Acquires that allocated a page
    uint64_t evictions = 0;     // pages evicted to make room (Clear not counted)
    uint64_t exhausted = 0;     // Acquires refused because pinned pages fill the budget
    uint64_t discarded = 0;     // pages dropped unfilled
    uint64_t bytes_in_use = 0;  // allocated page bytes (K and V, alignment included)
    // Memory of dropped pages kept for new pages of the same size (no allocator call); with
    // bytes_in_use never above the budget.
    uint64_t bytes_recycled = 0;
    uint64_t pages = 0;
    uint64_t pinned_pages = 0;
    uint64_t budget_bytes = 0;
  };

  // InvalidArgument if the budget is 0 or the allocator is null.
  static Result<std::unique_ptr<BlockPageCache>> Create(const Options& options,
                                                        std::unique_ptr<DeviceAllocator> allocator);
  // Frees every page. No handle may be alive (a programming error otherwise).
  ~BlockPageCache();
  BlockPageCache(const BlockPageCache&) = delete;
  BlockPageCache& operator=(const BlockPageCache&) = delete;

  // A small id for the task `name` (the same name gives the same id for the cache's lifetime).
  // Callers that delete and recreate a task must include something that changes, e.g. its
  // created_unix, in `name` (the Stager does), or Clear() the cache.
  uint32_t InternTask(const std::string& name);

  // Pins the page `key` and returns its handle:
  //   hit:  filled() == true; the page becomes most recently used.
  //   miss: a new page of k_bytes + v_bytes (each rounded up to 256) is allocated after evicting
  //         unpinned pages, least recently used first, until it fits the budget; filled() == false.
  // Errors (nothing changes): InvalidArgument if k_bytes or v_bytes is 0, or a hit's sizes differ
  // from the request; FailedPrecondition if the page is being filled through another handle, or
  // "page cache exhausted" if the page cannot fit because pinned pages hold the rest of the budget
  // (also when it is larger than the whole budget); the allocator's error (IOError) otherwise.
  Result<PageHandle> Acquire(const PageKey& key, size_t k_bytes, size_t v_bytes);

  // Acquire of the pages of one block in n layers (all of the same K/V sizes), under one lock and
  // with one lookup of the block: out[i] becomes the handle that Acquire({task, block,
  // layers[i]}, k_bytes, v_bytes) would return (what out[i] held before is released first). On
  // an error the first error is returned and none of the n handles stays valid: pages this call
  // allocated are discarded, hits unpinned (as if each handle had been Reset).
  Status AcquireLayers(uint32_t task, uint32_t block, const uint32_t* layers, size_t n,
                       size_t k_bytes, size_t v_bytes, PageHandle* out);

  // True if `key` is cached and filled (does not count as a hit, does not touch the LRU order).
  bool Contains(const PageKey& key) const;
  // Drops every unpinned page (its memory is kept for new pages, as for evicted ones; Trim gives
  // it back); pinned pages stay. Returns the number dropped.
  size_t Clear();
  // Frees the memory kept for reuse (Stats::bytes_recycled). Returns the bytes freed.
  size_t Trim();
  // The page of `key` turned out bad after MarkFilled (its records failed a check that ran while
  // it was in use): later Acquires miss it; it is freed now if unpinned, else when its last handle
  // goes (Stats::discarded). Nothing if the page is not cached.
  void Invalidate(const PageKey& key);
  Stats stats() const;

 private:
  friend class PageHandle;
  // An entry's address is stable until it is erased (which only happens unpinned), so a handle
  // reaches it without a lookup. Unpinned pages form the LRU list through
  // `newer` / `older`: pinning and unpinning allocate nothing (a hot 95k query pins and unpins
  // 9,600 pages; bench/page_cache_bench.cc).
  struct Entry {
    bool present = false;  // a cached page (else an empty slot of its block's chunk)
    PageKey key;
    void* ptr = nullptr;
    size_t k_bytes = 0, v_bytes = 0, bytes = 0;
    int refs = 0;
    bool filled = false;
    Entry* newer = nullptr;  // LRU neighbours, valid iff refs == 0
    Entry* older = nullptr;
  };
  // The cached pages of one (task, block), by layer, in chunks of kChunkLayers entries allocated
  // together: a block's pages are pinned and released together (the Stager's order), so their
  // entries, and mostly their LRU neighbours, lie next to each other in memory, where one
  // allocation each scattered them (a hot 95k query pins 32 layers of 300 blocks; with the CPU
  // caches cold, bench/page_cache_bench.cc --cold-cpu-cache 1).
  static constexpr uint32_t kChunkLayers = 32;
  struct BlockPages {
    std::vector<std::unique_ptr<Entry[]>> chunks;  // chunk c: layers [c, c + 1) * kChunkLayers
    uint32_t count = 0;                            // present entries
    // The layer's page, or null.
    Entry* Find(uint32_t layer) const {
      const size_t c = layer / kChunkLayers;
      if (c >= chunks.size() || chunks[c] == nullptr) return nullptr;
      Entry* e = &chunks[c][layer % kChunkLayers];
      return e->present ? e : nullptr;
    }
    // The layer's slot (its chunk allocated if needed); its address is stable while the block
    // exists.
    Entry* Slot(uint32_t layer) {
      const size_t c = layer / kChunkLayers;
      if (c >= chunks.size()) chunks.resize(c + 1);
      if (chunks[c] == nullptr) chunks[c].reset(new Entry[kChunkLayers]);
      return &chunks[c][layer % kChunkLayers];
    }
  };
  static uint64_t BlockId(uint32_t task, uint32_t block) {
    return (static_cast<uint64_t>(task) << 32) | block;
  }
  struct BlockIdHash {
    size_t operator()(uint64_t id) const { return MixPageBits(id); }
  };
  using BlockMap = std::unordered_map<uint64_t, BlockPages, BlockIdHash>;
  BlockPageCache(const Options& options, std::unique_ptr<DeviceAllocator> allocator)
      : options_(options), allocator_(std::move(allocator)) {}
  Entry* FindLocked(const PageKey& key) const;
  // Acquire under the lock, `found` being the key's entry (null if none).
  Status AcquireLocked(const PageKey& key, size_t k_bytes, size_t v_bytes, Entry* found,
                       PageHandle* h);
  void Unpin(void* entry);
  void MarkFilled(void* entry);
  void LruUnlinkLocked(Entry* e);
  void LruPushNewestLocked(Entry* e);
  // Removes the entry (which must be unpinned and out of the LRU list); its memory is kept for a
  // page of the same size (`recycle`) or freed.
  void EraseLocked(Entry* e, bool recycle = true);
  // Evicts the least recently released unpinned page (there must be one); its memory is
  // returned if it is `take_bytes` long (for a new page of that size), else freed (null).
  void* EvictOldestLocked(size_t take_bytes);
  void* PopRecycledLocked(size_t bytes);  // null if none of that size
  void FreeOneRecycledLocked();

  const Options options_;
  std::unique_ptr<DeviceAllocator> allocator_;
  mutable std::mutex mu_;
  BlockMap blocks_;
  Entry* lru_newest_ = nullptr;  // unpinned pages, most recently released ...
  Entry* lru_oldest_ = nullptr;  // ... to least recently
  uint64_t lru_bytes_ = 0;       // their bytes: what eviction can free
  std::unordered_map<std::string, uint32_t> task_ids_;
  std::unordered_map<size_t, std::vector<void*>> recycled_;  // freed page memory, by size
  Stats stats_;
};

}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_BLOCK_PAGE_CACHE_H_
