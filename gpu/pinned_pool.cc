#include "gpu/pinned_pool.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cassert>
#include <utility>

#include "gpu/cuda_util.h"

namespace shotdb {
namespace gpu {
namespace {

class CudaHostAllocator : public HostAllocator {
 public:
  Result<void*> Allocate(size_t bytes) override {
    void* p = nullptr;
    SHOTDB_CUDA_RETURN_IF_ERROR(cudaHostAlloc(&p, bytes, cudaHostAllocPortable));
    return p;
  }
  void Free(void* p) override { cudaFreeHost(p); }
};

}  // namespace

std::unique_ptr<HostAllocator> NewCudaHostAllocator() {
  return std::make_unique<CudaHostAllocator>();
}

PinnedSlab::PinnedSlab(PinnedSlab&& o) noexcept
    : pool_(std::exchange(o.pool_, nullptr)),
      data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)) {}

PinnedSlab& PinnedSlab::operator=(PinnedSlab&& o) noexcept {
  if (this != &o) {
    Release();
    pool_ = std::exchange(o.pool_, nullptr);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

void PinnedSlab::Release() {
  if (data_ != nullptr) pool_->Return(data_);
  pool_ = nullptr;
  data_ = nullptr;
  size_ = 0;
}

Result<std::unique_ptr<PinnedPool>> PinnedPool::Create(const Options& options,
                                                       std::unique_ptr<HostAllocator> allocator) {
  if (options.slab_bytes == 0 || options.max_slabs == 0) {
    return Status::InvalidArgument("PinnedPool: slab_bytes and max_slabs must be > 0, got " +
                                   std::to_string(options.slab_bytes) + " and " +
                                   std::to_string(options.max_slabs));
  }
  if (allocator == nullptr) return Status::InvalidArgument("PinnedPool: null allocator");
  return std::unique_ptr<PinnedPool>(new PinnedPool(options, std::move(allocator)));
}

Result<std::unique_ptr<PinnedPool>> PinnedPool::Create(const Options& options) {
  return Create(options, NewCudaHostAllocator());
}

PinnedPool::~PinnedPool() {
  assert(free_.size() == all_.size() && "PinnedPool destroyed with slabs in use");
  for (uint8_t* p : all_) allocator_->Free(p);
}

Result<PinnedSlab> PinnedPool::Acquire() {
  std::lock_guard<std::mutex> lock(mu_);
  uint8_t* data = nullptr;
  if (!free_.empty()) {
    data = free_.back();
    free_.pop_back();
    ++stats_.reuses;
  } else if (all_.size() < options_.max_slabs) {
    SHOTDB_ASSIGN_OR_RETURN(void* p, allocator_->Allocate(options_.slab_bytes));
    data = static_cast<uint8_t*>(p);
    all_.push_back(data);
    ++stats_.slabs_allocated;
    stats_.bytes_allocated += options_.slab_bytes;
  } else {
    return Status::FailedPrecondition("pinned pool exhausted: all " +
                                      std::to_string(options_.max_slabs) + " slabs of " +
                                      std::to_string(options_.slab_bytes) + " bytes are in use");
  }
  ++stats_.acquires;
  ++stats_.slabs_in_use;
  stats_.peak_in_use = std::max(stats_.peak_in_use, stats_.slabs_in_use);
  return PinnedSlab(this, data, options_.slab_bytes);
}

void PinnedPool::Return(uint8_t* data) {
  std::lock_guard<std::mutex> lock(mu_);
  free_.push_back(data);
  --stats_.slabs_in_use;
}

PinnedPool::Stats PinnedPool::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace gpu
}  // namespace shotdb
