// StagedBatch's release order: a block's pages in every layer, then the next block's, so that the
// cache's LRU list holds a block's pages together (stager.h). Observed through eviction, oldest
// first, with host memory standing in for the device (runs without a GPU).
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <utility>

#include "gpu/block_page_cache.h"
#include "gpu/fake_device_allocator.h"
#include "gpu/stager.h"

namespace shotdb {
namespace gpu {
namespace {

TEST(StagedBatchTest, ReleasesBlockByBlock) {
  constexpr size_t kHalf = 256;  // K and V bytes of every page: 512 bytes a page
  std::map<void*, size_t> live;  // declared first: the cache frees into it
  auto cache = BlockPageCache::Create({6 * 2 * kHalf},
                                      std::make_unique<testing::FakeDeviceAllocator>(&live));
  ASSERT_TRUE(cache.ok()) << cache.status().ToString();
  const uint32_t task = (*cache)->InternTask("t@0");
  {
    // Blocks 0, 1, 2 in layers 0 and 1, held as the Stager holds them: per layer, per block.
    StagedBatch batch;
    batch.block_tokens = {1, 1, 1};
    for (uint32_t layer : {0u, 1u}) {
      StagedLayer staged;
      staged.layer = layer;
      for (uint32_t block : {0u, 1u, 2u}) {
        Result<PageHandle> h = (*cache)->Acquire({task, block, layer}, kHalf, kHalf);
        ASSERT_TRUE(h.ok()) << h.status().ToString();
        h->MarkFilled();
        staged.pages.push_back(std::move(*h));
      }
      batch.layers.push_back(std::move(staged));
    }
  }  // released: the LRU list, oldest first, must be (0,0) (0,1) (1,0) (1,1) (2,0) (2,1)
  EXPECT_EQ((*cache)->stats().pinned_pages, 0u);
  // Two new pages evict the two oldest: block 0's, both layers (by layer it would be block 0's
  // and block 1's layer 0).
  for (uint32_t layer : {0u, 1u}) {
    Result<PageHandle> h = (*cache)->Acquire({task, 9, layer}, kHalf, kHalf);
    ASSERT_TRUE(h.ok()) << h.status().ToString();
    h->MarkFilled();
  }
  EXPECT_FALSE((*cache)->Contains({task, 0, 0}));
  EXPECT_FALSE((*cache)->Contains({task, 0, 1}));
  EXPECT_TRUE((*cache)->Contains({task, 1, 0}));
  EXPECT_TRUE((*cache)->Contains({task, 1, 1}));
  EXPECT_TRUE((*cache)->Contains({task, 2, 0}));
  EXPECT_TRUE((*cache)->Contains({task, 2, 1}));
}

}  // namespace
}  // namespace gpu
}  // namespace shotdb
