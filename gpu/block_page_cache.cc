#include "gpu/block_page_cache.h"

#include <cassert>
#include <cstdint>
#include <utility>

#include "gpu/cuda_util.h"

namespace shotdb {
namespace gpu {
namespace {

constexpr size_t kAlign = 256;
size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

std::string KeyName(const PageKey& k) {
  return "page (task " + std::to_string(k.task) + ", block " + std::to_string(k.block) +
         ", layer " + std::to_string(k.layer) + ")";
}

class CudaPoolAllocator : public DeviceAllocator {
 public:
  CudaPoolAllocator(cudaMemPool_t pool, cudaStream_t stream) : pool_(pool), stream_(stream) {}
  ~CudaPoolAllocator() override {
    cudaStreamSynchronize(stream_);
    cudaMemPoolDestroy(pool_);
  }
  Result<void*> Allocate(size_t bytes) override {
    void* p = nullptr;
    SHOTDB_CUDA_RETURN_IF_ERROR(cudaMallocFromPoolAsync(&p, bytes, pool_, stream_));
    return p;
  }
  void Free(void* p) override { cudaFreeAsync(p, stream_); }

 private:
  cudaMemPool_t pool_;
  cudaStream_t stream_;
};

}  // namespace

Result<std::unique_ptr<DeviceAllocator>> NewCudaPoolAllocator(cudaStream_t stream) {
  int device = 0;
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  cudaMemPoolProps props = {};
  props.allocType = cudaMemAllocationTypePinned;
  props.location.type = cudaMemLocationTypeDevice;
  props.location.id = device;
  cudaMemPool_t pool = nullptr;
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaMemPoolCreate(&pool, &props));
  // Keep freed memory in the pool: the cache's budget bounds it, and returning it to the driver
  // would make the next allocation synchronize.
  uint64_t threshold = UINT64_MAX;
  cudaError_t err = cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold);
  if (err != cudaSuccess) {
    cudaMemPoolDestroy(pool);
    return CudaStatus(err, "cudaMemPoolSetAttribute", "NewCudaPoolAllocator");
  }
  return std::unique_ptr<DeviceAllocator>(new CudaPoolAllocator(pool, stream));
}

PageHandle::PageHandle(PageHandle&& o) noexcept
    : cache_(std::exchange(o.cache_, nullptr)),
      entry_(o.entry_),
      key_(o.key_),
      k_(o.k_),
      v_(o.v_),
      k_bytes_(o.k_bytes_),
      v_bytes_(o.v_bytes_),
      filled_(o.filled_) {}

PageHandle& PageHandle::operator=(PageHandle&& o) noexcept {
  if (this != &o) {
    Reset();
    cache_ = std::exchange(o.cache_, nullptr);
    entry_ = o.entry_;
    key_ = o.key_;
    k_ = o.k_;
    v_ = o.v_;
    k_bytes_ = o.k_bytes_;
    v_bytes_ = o.v_bytes_;
    filled_ = o.filled_;
  }
  return *this;
}

void PageHandle::MarkFilled() {
  if (cache_ == nullptr || filled_) return;
  cache_->MarkFilled(entry_);
  filled_ = true;
}

void PageHandle::Reset() {
  if (cache_ != nullptr) cache_->Unpin(entry_);
  cache_ = nullptr;
  entry_ = nullptr;
  k_ = v_ = nullptr;
}

Result<std::unique_ptr<BlockPageCache>> BlockPageCache::Create(
    const Options& options, std::unique_ptr<DeviceAllocator> allocator) {
  if (options.budget_bytes == 0) {
    return Status::InvalidArgument("BlockPageCache: budget_bytes must be > 0");
  }
  if (allocator == nullptr) return Status::InvalidArgument("BlockPageCache: null allocator");
  auto cache = std::unique_ptr<BlockPageCache>(new BlockPageCache(options, std::move(allocator)));
  cache->stats_.budget_bytes = options.budget_bytes;
  return cache;
}

BlockPageCache::~BlockPageCache() {
  assert(stats_.pinned_pages == 0 && "BlockPageCache destroyed with pinned pages");
  for (auto& kv : blocks_) {
    for (const auto& chunk : kv.second.chunks) {
      if (chunk == nullptr) continue;
      for (uint32_t i = 0; i < kChunkLayers; ++i) {
        if (chunk[i].present) allocator_->Free(chunk[i].ptr);
      }
    }
  }
  for (auto& kv : recycled_) {
    for (void* p : kv.second) allocator_->Free(p);
  }
}

uint32_t BlockPageCache::InternTask(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = task_ids_.emplace(name, static_cast<uint32_t>(task_ids_.size())).first;
  return it->second;
}

BlockPageCache::Entry* BlockPageCache::FindLocked(const PageKey& key) const {
  auto it = blocks_.find(BlockId(key.task, key.block));
  return it == blocks_.end() ? nullptr : it->second.Find(key.layer);
}

Result<PageHandle> BlockPageCache::Acquire(const PageKey& key, size_t k_bytes, size_t v_bytes) {
  if (k_bytes == 0 || v_bytes == 0) {
    return Status::InvalidArgument(KeyName(key) + ": K and V sizes must be > 0, got " +
                                   std::to_string(k_bytes) + " and " + std::to_string(v_bytes));
  }
  std::lock_guard<std::mutex> lock(mu_);
  PageHandle h;
  SHOTDB_RETURN_IF_ERROR(AcquireLocked(key, k_bytes, v_bytes, FindLocked(key), &h));
  return h;
}

Status BlockPageCache::AcquireLayers(uint32_t task, uint32_t block, const uint32_t* layers,
                                     size_t n, size_t k_bytes, size_t v_bytes, PageHandle* out) {
  for (size_t i = 0; i < n; ++i) out[i].Reset();
  if (k_bytes == 0 || v_bytes == 0) {
    return Status::InvalidArgument(KeyName(PageKey{task, block, n > 0 ? layers[0] : 0}) +
                                   ": K and V sizes must be > 0, got " + std::to_string(k_bytes) +
                                   " and " + std::to_string(v_bytes));
  }
  std::unique_lock<std::mutex> lock(mu_);
  auto it = blocks_.find(BlockId(task, block));
  for (size_t i = 0; i < n; ++i) {
    const PageKey key{task, block, layers[i]};
    // A miss inserts into blocks_ (which may rehash): look the block up again after one.
    Entry* found = nullptr;
    if (it != blocks_.end()) found = it->second.Find(key.layer);
    Status s = AcquireLocked(key, k_bytes, v_bytes, found, &out[i]);
    if (!s.ok()) {
      lock.unlock();  // Reset takes the lock
      for (size_t j = 0; j < i; ++j) out[j].Reset();
      return s;
    }
    if (found == nullptr) it = blocks_.find(BlockId(task, block));
  }
  return Status::OK();
}

Status BlockPageCache::AcquireLocked(const PageKey& key, size_t k_bytes, size_t v_bytes,
                                     Entry* found, PageHandle* h) {
  h->key_ = key;
  h->k_bytes_ = k_bytes;
  h->v_bytes_ = v_bytes;
  if (found != nullptr) {
    Entry& e = *found;
    if (e.k_bytes != k_bytes || e.v_bytes != v_bytes) {
      return Status::InvalidArgument(KeyName(key) + ": cached with K/V sizes " +
                                     std::to_string(e.k_bytes) + "/" + std::to_string(e.v_bytes) +
                                     ", requested " + std::to_string(k_bytes) + "/" +
                                     std::to_string(v_bytes));
    }
    if (!e.filled) {
      return Status::FailedPrecondition(KeyName(key) + " is being filled through another handle");
    }
    if (e.refs == 0) {
      LruUnlinkLocked(&e);
      ++stats_.pinned_pages;
    }
    ++e.refs;
    ++stats_.hits;
    h->cache_ = this;
    h->entry_ = &e;
    h->k_ = e.ptr;
    h->v_ = static_cast<uint8_t*>(e.ptr) + AlignUp(k_bytes);
    h->filled_ = true;
    return Status::OK();
  }

  const size_t bytes = AlignUp(k_bytes) + AlignUp(v_bytes);
  // Check before evicting anything, so that a refused Acquire leaves the cache as it was.
  const uint64_t pinned_bytes = stats_.bytes_in_use - lru_bytes_;
  if (bytes > options_.budget_bytes || pinned_bytes + bytes > options_.budget_bytes) {
    ++stats_.exhausted;
    return Status::FailedPrecondition("page cache exhausted: " + KeyName(key) + " needs " +
                                      std::to_string(bytes) + " bytes; budget " +
                                      std::to_string(options_.budget_bytes) + ", pinned " +
                                      std::to_string(pinned_bytes) + " bytes in " +
                                      std::to_string(stats_.pinned_pages) + " pages");
  }
  // Memory of the same size, freed earlier, avoids a call into the allocator (a driver call for
  // device memory, ~1-2 us: 9,600 pages are staged for a cold 95k query).
  void* ptr = PopRecycledLocked(bytes);
  // Room for it within the budget: recycled memory first, then least recently used pages (a
  // victim of the same size gives its memory directly).
  while (ptr == nullptr &&
         stats_.bytes_in_use + stats_.bytes_recycled + bytes > options_.budget_bytes) {
    if (stats_.bytes_recycled > 0) {
      FreeOneRecycledLocked();
      continue;
    }
    ptr = EvictOldestLocked(bytes);
  }
  if (ptr == nullptr) {
    Result<void*> allocated = allocator_->Allocate(bytes);
    // The device can run out before the budget does (other allocators share it, e.g. libtorch's
    // caching allocator): give back recycled memory, then unpinned pages, oldest first, until the
    // allocation fits.
    while (!allocated.ok() && (stats_.bytes_recycled > 0 || lru_oldest_ != nullptr)) {
      if (stats_.bytes_recycled > 0) {
        FreeOneRecycledLocked();
      } else {
        EvictOldestLocked(/*take_bytes=*/0);  // no page has 0 bytes: always freed
      }
      allocated = allocator_->Allocate(bytes);
    }
    SHOTDB_ASSIGN_OR_RETURN(ptr, std::move(allocated));
  }
  BlockPages& bp = blocks_[BlockId(key.task, key.block)];
  Entry* const stored = bp.Slot(key.layer);
  *stored = Entry{};
  stored->present = true;
  stored->key = key;
  stored->ptr = ptr;
  stored->k_bytes = k_bytes;
  stored->v_bytes = v_bytes;
  stored->bytes = bytes;
  stored->refs = 1;
  ++bp.count;
  stats_.bytes_in_use += bytes;
  ++stats_.pages;
  ++stats_.pinned_pages;
  ++stats_.misses;
  h->cache_ = this;
  h->entry_ = stored;
  h->k_ = ptr;
  h->v_ = static_cast<uint8_t*>(ptr) + AlignUp(k_bytes);
  h->filled_ = false;
  return Status::OK();
}

bool BlockPageCache::Contains(const PageKey& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  const Entry* e = FindLocked(key);
  return e != nullptr && e->filled;
}

size_t BlockPageCache::Clear() {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  while (lru_oldest_ != nullptr) {
    Entry* e = lru_oldest_;
    LruUnlinkLocked(e);
    EraseLocked(e);
    ++n;
  }
  return n;
}

size_t BlockPageCache::Trim() {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t freed = stats_.bytes_recycled;
  while (stats_.bytes_recycled > 0) FreeOneRecycledLocked();
  recycled_.clear();
  return freed;
}

BlockPageCache::Stats BlockPageCache::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void BlockPageCache::MarkFilled(void* entry) {
  std::lock_guard<std::mutex> lock(mu_);
  static_cast<Entry*>(entry)->filled = true;
}

void BlockPageCache::Invalidate(const PageKey& key) {
  std::lock_guard<std::mutex> lock(mu_);
  Entry* e = FindLocked(key);
  if (e == nullptr) return;
  e->filled = false;
  if (e->refs > 0) return;  // Unpin discards it
  LruUnlinkLocked(e);
  EraseLocked(e);
  ++stats_.discarded;
}

void BlockPageCache::Unpin(void* entry) {
  std::lock_guard<std::mutex> lock(mu_);
  Entry* e = static_cast<Entry*>(entry);
  assert(e->refs > 0);
  if (--e->refs > 0) return;
  --stats_.pinned_pages;
  if (!e->filled) {
    EraseLocked(e);
    ++stats_.discarded;
    return;
  }
  LruPushNewestLocked(e);
}

void BlockPageCache::LruUnlinkLocked(Entry* e) {
  (e->newer != nullptr ? e->newer->older : lru_newest_) = e->older;
  (e->older != nullptr ? e->older->newer : lru_oldest_) = e->newer;
  e->newer = e->older = nullptr;
  lru_bytes_ -= e->bytes;
}

void BlockPageCache::LruPushNewestLocked(Entry* e) {
  e->newer = nullptr;
  e->older = lru_newest_;
  (lru_newest_ != nullptr ? lru_newest_->newer : lru_oldest_) = e;
  lru_newest_ = e;
  lru_bytes_ += e->bytes;
}

void* BlockPageCache::EvictOldestLocked(size_t take_bytes) {
  Entry* victim = lru_oldest_;
  LruUnlinkLocked(victim);
  ++stats_.evictions;
  void* taken = nullptr;
  if (victim->bytes == take_bytes) {
    taken = victim->ptr;
    victim->ptr = nullptr;  // not freed: the caller's now
  }
  EraseLocked(victim, /*recycle=*/false);
  return taken;
}

void* BlockPageCache::PopRecycledLocked(size_t bytes) {
  auto it = recycled_.find(bytes);
  if (it == recycled_.end() || it->second.empty()) return nullptr;
  void* p = it->second.back();
  it->second.pop_back();
  stats_.bytes_recycled -= bytes;
  return p;
}

void BlockPageCache::FreeOneRecycledLocked() {
  for (auto it = recycled_.begin(); it != recycled_.end(); ++it) {
    if (it->second.empty()) continue;
    allocator_->Free(it->second.back());
    it->second.pop_back();
    stats_.bytes_recycled -= it->first;
    return;
  }
}

void BlockPageCache::EraseLocked(Entry* e, bool recycle) {
  void* p = e->ptr;
  if (p != nullptr && recycle) {
    // The page's bytes were within the budget while in use, so in use + recycled stays within it.
    recycled_[e->bytes].push_back(p);
    stats_.bytes_recycled += e->bytes;
  } else if (p != nullptr) {
    allocator_->Free(p);
  }
  stats_.bytes_in_use -= e->bytes;
  --stats_.pages;
  auto it = blocks_.find(BlockId(e->key.task, e->key.block));
  assert(it != blocks_.end());
  *e = Entry{};                                    // an empty slot
  if (--it->second.count == 0) blocks_.erase(it);  // frees its chunks
}

}  // namespace gpu
}  // namespace shotdb
