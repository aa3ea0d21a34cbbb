#include "gpu/block_page_cache.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <set>

#include "gpu/fake_device_allocator.h"

namespace shotdb {
namespace gpu {
namespace {

using testing::FakeDeviceAllocator;

class BlockPageCacheTest : public ::testing::Test {
 protected:
  void Make(size_t budget, size_t device_capacity = SIZE_MAX) {
    auto c = BlockPageCache::Create({budget},
                                    std::make_unique<FakeDeviceAllocator>(&live_, device_capacity));
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    cache_ = std::move(*c);
  }
  // Acquires a 256+256-byte page and fills it.
  PageHandle Fill(uint32_t block) {
    auto h = cache_->Acquire({0, block, 0}, 256, 256);
    EXPECT_TRUE(h.ok()) << h.status().ToString();
    EXPECT_FALSE(h->filled());
    h->MarkFilled();
    return std::move(*h);
  }
  size_t LiveBytes() const {
    size_t n = 0;
    for (const auto& kv : live_) n += kv.second;
    return n;
  }
  std::map<void*, size_t> live_;
  std::unique_ptr<BlockPageCache> cache_;
};

TEST_F(BlockPageCacheTest, MissThenHitSamePointers) {
  Make(4096);
  void *k, *v;
  {
    auto h = cache_->Acquire({1, 2, 3}, 100, 300);
    ASSERT_TRUE(h.ok());
    EXPECT_FALSE(h->filled());
    k = h->k();
    v = h->v();
    EXPECT_EQ(static_cast<uint8_t*>(v) - static_cast<uint8_t*>(k), 256);  // V 256-aligned after K
    h->MarkFilled();
  }
  EXPECT_TRUE(cache_->Contains({1, 2, 3}));
  auto h = cache_->Acquire({1, 2, 3}, 100, 300);
  ASSERT_TRUE(h.ok());
  EXPECT_TRUE(h->filled());
  EXPECT_EQ(h->k(), k);
  EXPECT_EQ(h->v(), v);
  BlockPageCache::Stats s = cache_->stats();
  EXPECT_EQ(s.hits, 1u);
  EXPECT_EQ(s.misses, 1u);
  EXPECT_EQ(s.bytes_in_use, 256u + 512u);
  EXPECT_EQ(s.bytes_in_use, LiveBytes());
  EXPECT_EQ(s.pinned_pages, 1u);
}

TEST_F(BlockPageCacheTest, UnfilledPageIsDiscarded) {
  Make(4096);
  {
    auto h = cache_->Acquire({0, 1, 0}, 256, 256);
    ASSERT_TRUE(h.ok());
    auto again = cache_->Acquire({0, 1, 0}, 256, 256);
    EXPECT_TRUE(again.status().IsFailedPrecondition()) << again.status().ToString();
  }
  EXPECT_FALSE(cache_->Contains({0, 1, 0}));
  EXPECT_EQ(cache_->stats().discarded, 1u);
  EXPECT_EQ(cache_->stats().bytes_in_use, 0u);
  EXPECT_EQ(cache_->stats().bytes_recycled, 512u);  // kept for the next page of its size
  EXPECT_EQ(LiveBytes(), 512u);
  auto h = cache_->Acquire({0, 1, 0}, 256, 256);
  ASSERT_TRUE(h.ok());
  EXPECT_FALSE(h->filled());
  EXPECT_EQ(live_.size(), 1u);  // the same memory, no new allocation
  EXPECT_EQ(cache_->stats().bytes_recycled, 0u);
}

// Dropped pages' memory serves new pages of the same size without an allocation, counts against
// the budget, is freed first when room or device memory runs short, and is given back by Trim.
TEST_F(BlockPageCacheTest, DroppedPagesMemoryIsReusedWithinTheBudget) {
  Make(3 * 512);
  std::set<void*> old;
  for (uint32_t b = 0; b < 3; ++b) old.insert(Fill(b).k());
  EXPECT_EQ(cache_->Clear(), 3u);
  EXPECT_EQ(cache_->stats().bytes_recycled, 3 * 512u);
  EXPECT_EQ(LiveBytes(), 3 * 512u);
  PageHandle a = Fill(10);
  EXPECT_EQ(old.count(a.k()), 1u);  // reused
  EXPECT_EQ(live_.size(), 3u);
  // A 768-byte page: two recycled 512-byte pieces must go for it to fit the budget.
  auto big = cache_->Acquire({0, 11, 0}, 512, 256);
  ASSERT_TRUE(big.ok()) << big.status().ToString();
  EXPECT_EQ(cache_->stats().bytes_in_use, 512u + 768u);
  EXPECT_EQ(cache_->stats().bytes_recycled, 0u);
  EXPECT_EQ(LiveBytes(), 512u + 768u);
  big->MarkFilled();
  big->Reset();
  a.Reset();
  EXPECT_EQ(cache_->Clear(), 2u);
  EXPECT_EQ(cache_->stats().bytes_recycled, 512u + 768u);
  EXPECT_EQ(cache_->Trim(), 512u + 768u);
  EXPECT_TRUE(live_.empty());
  EXPECT_EQ(cache_->stats().bytes_recycled, 0u);
}

// When the device runs short before the budget does, kept memory is freed first.
TEST_F(BlockPageCacheTest, KeptMemoryIsFreedWhenTheDeviceRunsShort) {
  Make(8192, /*device_capacity=*/3 * 512);
  for (uint32_t b = 0; b < 3; ++b) Fill(b).Reset();
  EXPECT_EQ(cache_->Clear(), 3u);                   // 1536 bytes kept: the device is full
  auto big = cache_->Acquire({0, 9, 0}, 768, 256);  // 1024 bytes: no kept piece of that size
  ASSERT_TRUE(big.ok()) << big.status().ToString();
  EXPECT_EQ(cache_->stats().bytes_in_use, 1024u);
  EXPECT_EQ(cache_->stats().bytes_in_use + cache_->stats().bytes_recycled, LiveBytes());
  EXPECT_LE(LiveBytes(), 3 * 512u);
}

// A page found bad after it was marked filled: unpinned, it is freed at once; pinned, it is no
// longer found and is freed with its last handle. Other pages are untouched.
TEST_F(BlockPageCacheTest, InvalidatedPagesAreNoLongerFound) {
  Make(4096);
  Fill(1);  // unpinned at once
  PageHandle pinned = Fill(2);
  PageHandle other = Fill(3);
  cache_->Invalidate({0, 1, 0});
  cache_->Invalidate({0, 2, 0});
  cache_->Invalidate({0, 9, 0});  // not cached: nothing
  EXPECT_FALSE(cache_->Contains({0, 1, 0}));
  EXPECT_FALSE(cache_->Contains({0, 2, 0}));
  EXPECT_TRUE(cache_->Contains({0, 3, 0}));
  EXPECT_EQ(cache_->stats().discarded, 1u);
  EXPECT_EQ(cache_->stats().pages, 2u);
  EXPECT_EQ(cache_->stats().bytes_in_use, 2 * 512u);
  pinned.Reset();
  EXPECT_EQ(cache_->stats().discarded, 2u);
  EXPECT_EQ(cache_->stats().bytes_in_use, 512u);
  EXPECT_EQ(cache_->stats().bytes_recycled, 2 * 512u);
  auto again = cache_->Acquire({0, 1, 0}, 256, 256);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_FALSE(again->filled());  // read again
  EXPECT_EQ(cache_->stats().bytes_in_use + cache_->stats().bytes_recycled, LiveBytes());
  EXPECT_EQ(LiveBytes(), 3 * 512u);
}

TEST_F(BlockPageCacheTest, EvictsLeastRecentlyUsedUnpinned) {
  Make(3 * 512);
  Fill(0).Reset();
  Fill(1).Reset();
  Fill(2).Reset();
  // Touch 0: order by recency is now 0, 2, 1 (most recent first).
  {
    auto h = cache_->Acquire({0, 0, 0}, 256, 256);
    ASSERT_TRUE(h.ok() && h->filled());
  }
  Fill(3).Reset();  // evicts 1
  EXPECT_TRUE(cache_->Contains({0, 0, 0}));
  EXPECT_FALSE(cache_->Contains({0, 1, 0}));
  EXPECT_TRUE(cache_->Contains({0, 2, 0}));
  EXPECT_TRUE(cache_->Contains({0, 3, 0}));
  Fill(4).Reset();  // evicts 2
  EXPECT_FALSE(cache_->Contains({0, 2, 0}));
  EXPECT_TRUE(cache_->Contains({0, 0, 0}));
  EXPECT_EQ(cache_->stats().evictions, 2u);
  EXPECT_EQ(cache_->stats().bytes_in_use, LiveBytes());
}

// The device fills up before the budget: the cache gives back least recently used unpinned pages
// until the allocation succeeds, and reports the device's error when only pinned pages remain.
TEST_F(BlockPageCacheTest, DeviceOutOfMemoryEvictsUnpinnedPages) {
  Make(/*budget=*/10 * 512, /*device_capacity=*/3 * 512);
  Fill(0).Reset();
  Fill(1).Reset();
  PageHandle pinned = Fill(2);
  Fill(3).Reset();  // the device is full: evicts 0, the least recently used
  EXPECT_FALSE(cache_->Contains({0, 0, 0}));
  EXPECT_TRUE(cache_->Contains({0, 1, 0}));
  EXPECT_TRUE(cache_->Contains({0, 3, 0}));
  EXPECT_EQ(cache_->stats().evictions, 1u);
  PageHandle pinned2 = Fill(4);  // evicts 1
  PageHandle pinned3 = Fill(5);  // evicts 3
  auto refused = cache_->Acquire({0, 6, 0}, 256, 256);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("out of memory"), std::string::npos);
  EXPECT_TRUE(cache_->Contains({0, 2, 0}));
  EXPECT_EQ(cache_->stats().bytes_in_use, LiveBytes());
}

TEST_F(BlockPageCacheTest, PinnedPagesAreNeverEvictedAndExhaustionChangesNothing) {
  Make(2 * 512);
  PageHandle a = Fill(0);
  PageHandle b = Fill(1);
  std::memset(a.k(), 0xAB, 256);
  auto c = cache_->Acquire({0, 2, 0}, 256, 256);
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(c.status().IsFailedPrecondition()) << c.status().ToString();
  EXPECT_NE(c.status().message().find("exhausted"), std::string::npos);
  EXPECT_EQ(cache_->stats().exhausted, 1u);
  EXPECT_EQ(cache_->stats().pages, 2u);
  EXPECT_EQ(static_cast<uint8_t*>(a.k())[255], 0xAB);  // still allocated, untouched
  b.Reset();
  auto d = cache_->Acquire({0, 2, 0}, 256, 256);  // evicts b, not the pinned a
  ASSERT_TRUE(d.ok());
  EXPECT_TRUE(cache_->Contains({0, 0, 0}));
  EXPECT_FALSE(cache_->Contains({0, 1, 0}));
  EXPECT_EQ(live_.count(a.k()), 1u);
}

TEST_F(BlockPageCacheTest, RejectsOversizeAndMismatchedRequests) {
  Make(1024);
  EXPECT_TRUE(cache_->Acquire({0, 0, 0}, 1024, 1).status().IsFailedPrecondition());
  EXPECT_TRUE(cache_->Acquire({0, 0, 0}, 0, 1).status().IsInvalidArgument());
  Fill(5).Reset();
  EXPECT_TRUE(cache_->Acquire({0, 5, 0}, 256, 128).status().IsInvalidArgument());
  EXPECT_TRUE(BlockPageCache::Create({0}, std::make_unique<FakeDeviceAllocator>(&live_))
                  .status()
                  .IsInvalidArgument());
}

TEST_F(BlockPageCacheTest, ClearKeepsPinnedPages) {
  Make(4096);
  PageHandle a = Fill(0);
  Fill(1).Reset();
  Fill(2).Reset();
  EXPECT_EQ(cache_->Clear(), 2u);
  EXPECT_TRUE(cache_->Contains({0, 0, 0}));
  EXPECT_EQ(cache_->stats().pages, 1u);
  EXPECT_EQ(cache_->Trim(), 2 * 512u);
  EXPECT_EQ(live_.size(), 1u);
}

// AcquireLayers pins what page-by-page Acquire would: hits keep their memory, misses are new and
// unfilled, and the stats count the same.
TEST_F(BlockPageCacheTest, AcquireLayersMatchesAcquire) {
  Make(64 * 512);
  void* k0 = nullptr;
  void* k2 = nullptr;
  for (uint32_t layer : {0u, 2u}) {
    auto h = cache_->Acquire({1, 5, layer}, 256, 256);
    ASSERT_TRUE(h.ok()) << h.status().ToString();
    h->MarkFilled();
    (layer == 0 ? k0 : k2) = h->k();
  }
  const uint32_t layers[] = {3, 0, 1, 2};
  PageHandle out[4];
  ASSERT_TRUE(cache_->AcquireLayers(1, 5, layers, 4, 256, 256, out).ok());
  EXPECT_FALSE(out[0].filled());
  EXPECT_TRUE(out[1].filled());
  EXPECT_FALSE(out[2].filled());
  EXPECT_TRUE(out[3].filled());
  EXPECT_EQ(out[1].k(), k0);
  EXPECT_EQ(out[3].k(), k2);
  for (int i = 0; i < 4; ++i) {
    EXPECT_TRUE(out[i].valid());
    EXPECT_EQ(out[i].key().task, 1u);
    EXPECT_EQ(out[i].key().block, 5u);
    EXPECT_EQ(out[i].key().layer, layers[i]);
    EXPECT_EQ(static_cast<uint8_t*>(out[i].v()) - static_cast<uint8_t*>(out[i].k()), 256);
  }
  BlockPageCache::Stats st = cache_->stats();
  EXPECT_EQ(st.hits, 2u);
  EXPECT_EQ(st.misses, 4u);  // two by Acquire, two here
  EXPECT_EQ(st.pinned_pages, 4u);
  EXPECT_EQ(st.pages, 4u);
  EXPECT_FALSE(cache_->Contains({1, 5, 3}));  // being filled
  out[0].MarkFilled();
  out[2].MarkFilled();
  for (PageHandle& h : out) h.Reset();
  for (uint32_t layer : layers) EXPECT_TRUE(cache_->Contains({1, 5, layer})) << layer;
  EXPECT_FALSE(cache_->Contains({1, 6, 0}));
  EXPECT_FALSE(cache_->Contains({2, 5, 0}));
  EXPECT_EQ(cache_->stats().pinned_pages, 0u);
  // Handles held before the call are released first.
  PageHandle again[2];
  again[0] = Fill(9);
  ASSERT_TRUE(cache_->AcquireLayers(1, 5, layers, 2, 256, 256, again).ok());
  EXPECT_TRUE(again[0].filled() && again[1].filled());
  EXPECT_EQ(cache_->stats().pinned_pages, 2u);
}

// An error part way leaves nothing of the call pinned: its new pages are discarded, its hits
// unpinned, and the cache holds what it held before.
TEST_F(BlockPageCacheTest, AcquireLayersFailureReleasesEverything) {
  Make(3 * 512);
  {
    auto h = cache_->Acquire({0, 7, 1}, 256, 256);
    ASSERT_TRUE(h.ok());
    h->MarkFilled();
  }
  PageHandle outside = Fill(8);  // pinned by the test: 1 page of the budget's 3 left to the call
  const uint32_t layers[] = {1, 0, 2};
  PageHandle out[3];
  Status s = cache_->AcquireLayers(0, 7, layers, 3, 256, 256, out);
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(s.IsFailedPrecondition()) << s.ToString();
  EXPECT_NE(s.message().find("exhausted"), std::string::npos) << s.ToString();
  for (const PageHandle& h : out) EXPECT_FALSE(h.valid());
  BlockPageCache::Stats st = cache_->stats();
  EXPECT_EQ(st.pinned_pages, 1u);  // `outside`
  EXPECT_EQ(st.discarded, 1u);     // layer 0's page, allocated by the call
  EXPECT_TRUE(cache_->Contains({0, 7, 1}));
  EXPECT_FALSE(cache_->Contains({0, 7, 0}));
  EXPECT_EQ(st.bytes_in_use + st.bytes_recycled, LiveBytes());
  // A size that differs from a cached page's, in the middle of the call.
  const uint32_t mixed[] = {5, 1};
  s = cache_->AcquireLayers(0, 7, mixed, 2, 256, 128, out);
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_EQ(cache_->stats().pinned_pages, 1u);
  EXPECT_TRUE(cache_->AcquireLayers(0, 7, mixed, 2, 0, 256, out).IsInvalidArgument());
}

TEST_F(BlockPageCacheTest, InternTaskIsStable) {
  Make(1024);
  const uint32_t a = cache_->InternTask("nlu@1"), b = cache_->InternTask("other@1");
  EXPECT_NE(a, b);
  EXPECT_EQ(cache_->InternTask("nlu@1"), a);
}

// Random operations against an independent model of the policy: a recency list of unpinned
// pages and a set of pinned ones, with byte accounting.
TEST_F(BlockPageCacheTest, RandomOperationsMatchModel) {
  const size_t kBudget = 8 * 1024;
  Make(kBudget);
  std::mt19937 rng(7);
  std::map<uint32_t, PageHandle> held;     // pinned by the test
  std::vector<uint32_t> recency;           // model: unpinned cached blocks, most recent first
  std::map<uint32_t, size_t> model_bytes;  // model: every cached block's bytes
  auto bytes_of = [](uint32_t block) { return size_t(256) * (1 + block % 4) + 256; };
  auto model_total = [&] {
    size_t n = 0;
    for (auto& kv : model_bytes) n += kv.second;
    return n;
  };
  for (int step = 0; step < 3000; ++step) {
    if (rng() % 100 == 0) {  // drop every unpinned page; their memory is kept
      for (uint32_t r : recency) model_bytes.erase(r);
      EXPECT_EQ(cache_->Clear(), recency.size());
      recency.clear();
    }
    const uint32_t block = rng() % 40;
    if (held.count(block) != 0 && rng() % 2 == 0) {
      held.erase(block);  // unpin
      recency.insert(recency.begin(), block);
      continue;
    }
    if (held.count(block) != 0) continue;
    auto h = cache_->Acquire({0, block, 0}, 256 * (1 + block % 4), 256);
    const bool cached = model_bytes.count(block) != 0;
    if (cached) {
      ASSERT_TRUE(h.ok());
      EXPECT_TRUE(h->filled());
      recency.erase(std::find(recency.begin(), recency.end(), block));
    } else {
      size_t pinned = model_total();
      for (uint32_t r : recency) pinned -= model_bytes[r];
      if (pinned + bytes_of(block) > kBudget) {
        EXPECT_TRUE(h.status().IsFailedPrecondition());
        continue;
      }
      ASSERT_TRUE(h.ok()) << h.status().ToString();
      EXPECT_FALSE(h->filled());
      while (model_total() + bytes_of(block) > kBudget) {
        model_bytes.erase(recency.back());
        recency.pop_back();
      }
      model_bytes[block] = bytes_of(block);
      h->MarkFilled();
    }
    held.emplace(block, std::move(*h));
    if (held.size() > 6) {  // keep some pages unpinned
      auto it = held.begin();
      std::advance(it, rng() % held.size());
      recency.insert(recency.begin(), it->first);
      held.erase(it);
    }
    const BlockPageCache::Stats st = cache_->stats();
    ASSERT_EQ(st.bytes_in_use, model_total());
    ASSERT_EQ(LiveBytes(), st.bytes_in_use + st.bytes_recycled);
    ASSERT_LE(st.bytes_in_use + st.bytes_recycled, kBudget);
  }
  for (auto& kv : model_bytes) EXPECT_TRUE(cache_->Contains({0, kv.first, 0})) << kv.first;
}

}  // namespace
}  // namespace gpu
}  // namespace shotdb
