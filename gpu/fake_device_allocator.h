// Test code only: host memory standing in for device memory behind a DeviceAllocator, so the page
// cache and the staged batches' policies are tested without a GPU. Tracks every live allocation
// and its size in a map the test owns, and fails like cudaMalloc beyond a capacity.
#ifndef SHOTDB_GPU_FAKE_DEVICE_ALLOCATOR_H_
#define SHOTDB_GPU_FAKE_DEVICE_ALLOCATOR_H_

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <map>

#include "gpu/block_page_cache.h"
#include "util/status.h"

namespace shotdb {
namespace gpu {
namespace testing {

class FakeDeviceAllocator : public DeviceAllocator {
 public:
  // `live` (owned by the test) receives every allocation; `capacity` plays the device's free
  // memory.
  explicit FakeDeviceAllocator(std::map<void*, size_t>* live, size_t capacity = SIZE_MAX)
      : live_(live), capacity_(capacity) {}
  Result<void*> Allocate(size_t bytes) override {
    size_t used = 0;
    for (const auto& kv : *live_) used += kv.second;
    if (used + bytes > capacity_) return Status::IOError("fake device: out of memory");
    void* p = std::aligned_alloc(256, bytes);
    (*live_)[p] = bytes;
    return p;
  }
  void Free(void* p) override {
    EXPECT_EQ(live_->erase(p), 1u) << "freed twice or never allocated";
    std::free(p);
  }

 private:
  std::map<void*, size_t>* live_;
  size_t capacity_;
};

}  // namespace testing
}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_FAKE_DEVICE_ALLOCATOR_H_
