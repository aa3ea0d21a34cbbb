// A pool of page-locked ("pinned") host buffers of one fixed size, for host-to-device copies.
//
// cudaMemcpyAsync only runs asynchronously, at full PCIe speed, from pinned memory; pageable memory
// is first copied by the driver through its own small pinned buffers. Pinning is expensive
// (cudaHostAlloc of 64 MiB takes milliseconds), so the stager pins a few slabs once and reuses
// them. The pool allocates lazily, up to max_slabs, and keeps every slab until it is destroyed.
//
// The allocation itself goes through a HostAllocator so that the pool's bookkeeping can be tested
// on a machine without a GPU.
//
// Thread-safety: PinnedPool is thread-safe. A PinnedSlab is a plain handle (one owner at a time).
// The pool must outlive every slab acquired from it.
#ifndef SHOTDB_GPU_PINNED_POOL_H_
#define SHOTDB_GPU_PINNED_POOL_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "util/status.h"

namespace shotdb {
namespace gpu {

// Where the pool's memory comes from. Implementations must be thread-safe.
class HostAllocator {
 public:
  virtual ~HostAllocator() = default;
  // `bytes` bytes aligned to at least 256, or an error Status (IOError when out of memory).
  virtual Result<void*> Allocate(size_t bytes) = 0;
  // Releases memory returned by Allocate.
  virtual void Free(void* p) = 0;
};

// cudaHostAlloc / cudaFreeHost (portable pinned memory, usable with every device).
std::unique_ptr<HostAllocator> NewCudaHostAllocator();

class PinnedPool;

// One slab, returned to its pool when destroyed. Move-only.
class PinnedSlab {
 public:
  PinnedSlab() = default;  // holds nothing
  ~PinnedSlab() { Release(); }
  PinnedSlab(PinnedSlab&& o) noexcept;
  PinnedSlab& operator=(PinnedSlab&& o) noexcept;
  PinnedSlab(const PinnedSlab&) = delete;
  PinnedSlab& operator=(const PinnedSlab&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  bool valid() const { return data_ != nullptr; }
  // Returns the slab to the pool now (also done by the destructor). The caller must know that no
  // copy still reads it (e.g. after synchronizing the event recorded after the copy).
  void Release();

 private:
  friend class PinnedPool;
  PinnedSlab(PinnedPool* pool, uint8_t* data, size_t size)
      : pool_(pool), data_(data), size_(size) {}
  PinnedPool* pool_ = nullptr;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

class PinnedPool {
 public:
  struct Options {
    size_t slab_bytes = size_t(16) << 20;
    size_t max_slabs = 8;
  };
  struct Stats {
    uint64_t slabs_allocated = 0;  // pinned so far (never decreases while the pool lives)
    uint64_t slabs_in_use = 0;     // acquired and not yet released
    uint64_t peak_in_use = 0;
    uint64_t acquires = 0;  // successful Acquire calls
    uint64_t reuses = 0;    // of those, served by a previously released slab
    uint64_t bytes_allocated = 0;
  };

  // Returns the pool, or InvalidArgument if slab_bytes or max_slabs is 0. Allocates nothing yet.
  static Result<std::unique_ptr<PinnedPool>> Create(const Options& options,
                                                    std::unique_ptr<HostAllocator> allocator);
  // Same, with NewCudaHostAllocator().
  static Result<std::unique_ptr<PinnedPool>> Create(const Options& options);
  // Frees every slab. All slabs must have been released (a programming error otherwise).
  ~PinnedPool();
  PinnedPool(const PinnedPool&) = delete;
  PinnedPool& operator=(const PinnedPool&) = delete;

  // A free slab: the most recently released one if any (its pages are likely still in the TLB),
  // else a newly allocated one while fewer than max_slabs exist. Never blocks. Returns
  // FailedPrecondition "pinned pool exhausted" when all max_slabs slabs are in use, or the
  // allocator's error (IOError) if pinning fails.
  Result<PinnedSlab> Acquire();

  size_t slab_bytes() const { return options_.slab_bytes; }
  size_t max_slabs() const { return options_.max_slabs; }
  Stats stats() const;

 private:
  friend class PinnedSlab;
  PinnedPool(const Options& options, std::unique_ptr<HostAllocator> allocator)
      : options_(options), allocator_(std::move(allocator)) {}
  void Return(uint8_t* data);

  const Options options_;
  std::unique_ptr<HostAllocator> allocator_;
  mutable std::mutex mu_;
  std::vector<uint8_t*> all_;   // every slab allocated
  std::vector<uint8_t*> free_;  // released slabs, most recent last
  Stats stats_;
};

}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_PINNED_POOL_H_
