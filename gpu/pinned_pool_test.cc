#include "gpu/pinned_pool.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <set>

namespace shotdb {
namespace gpu {
namespace {

// Plain host memory standing in for cudaHostAlloc; counts live allocations, can be made to fail.
class FakeHostAllocator : public HostAllocator {
 public:
  explicit FakeHostAllocator(int* live, bool fail = false) : live_(live), fail_(fail) {}
  Result<void*> Allocate(size_t bytes) override {
    if (fail_) return Status::IOError("fake: out of pinned memory");
    ++*live_;
    return std::aligned_alloc(256, (bytes + 255) / 256 * 256);
  }
  void Free(void* p) override {
    --*live_;
    std::free(p);
  }

 private:
  int* live_;
  bool fail_;
};

TEST(PinnedPoolTest, AllocatesLazilyReusesAndRefusesBeyondMax) {
  int live = 0;
  {
    auto pool = PinnedPool::Create({1024, 2}, std::make_unique<FakeHostAllocator>(&live));
    ASSERT_TRUE(pool.ok()) << pool.status().ToString();
    EXPECT_EQ(live, 0);
    auto a = (*pool)->Acquire();
    auto b = (*pool)->Acquire();
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(live, 2);
    EXPECT_NE(a->data(), b->data());
    EXPECT_EQ(a->size(), 1024u);
    auto c = (*pool)->Acquire();
    ASSERT_FALSE(c.ok());
    EXPECT_TRUE(c.status().IsFailedPrecondition()) << c.status().ToString();

    uint8_t* a_data = a->data();
    a->Release();
    EXPECT_FALSE(a->valid());
    auto d = (*pool)->Acquire();
    ASSERT_TRUE(d.ok());
    EXPECT_EQ(d->data(), a_data);  // the released slab, no new allocation
    EXPECT_EQ(live, 2);
    PinnedPool::Stats s = (*pool)->stats();
    EXPECT_EQ(s.slabs_allocated, 2u);
    EXPECT_EQ(s.acquires, 3u);
    EXPECT_EQ(s.reuses, 1u);
    EXPECT_EQ(s.slabs_in_use, 2u);
    EXPECT_EQ(s.peak_in_use, 2u);
    EXPECT_EQ(s.bytes_allocated, 2048u);
  }
  EXPECT_EQ(live, 0);  // the pool freed every slab
}

TEST(PinnedPoolTest, MovedSlabReturnsOnce) {
  int live = 0;
  auto pool = PinnedPool::Create({64, 1}, std::make_unique<FakeHostAllocator>(&live));
  ASSERT_TRUE(pool.ok());
  {
    auto a = (*pool)->Acquire();
    ASSERT_TRUE(a.ok());
    PinnedSlab moved = std::move(*a);
    EXPECT_FALSE(a->valid());
    EXPECT_TRUE(moved.valid());
    EXPECT_EQ((*pool)->stats().slabs_in_use, 1u);
  }
  EXPECT_EQ((*pool)->stats().slabs_in_use, 0u);
  EXPECT_TRUE((*pool)->Acquire().ok());
}

TEST(PinnedPoolTest, RejectsBadOptionsAndPropagatesAllocatorErrors) {
  int live = 0;
  EXPECT_TRUE(PinnedPool::Create({0, 2}, std::make_unique<FakeHostAllocator>(&live))
                  .status()
                  .IsInvalidArgument());
  EXPECT_TRUE(PinnedPool::Create({64, 0}, std::make_unique<FakeHostAllocator>(&live))
                  .status()
                  .IsInvalidArgument());
  auto pool = PinnedPool::Create({64, 2}, std::make_unique<FakeHostAllocator>(&live, true));
  ASSERT_TRUE(pool.ok());
  auto a = (*pool)->Acquire();
  EXPECT_TRUE(a.status().IsIOError()) << a.status().ToString();
  EXPECT_EQ((*pool)->stats().slabs_in_use, 0u);
}

}  // namespace
}  // namespace gpu
}  // namespace shotdb
