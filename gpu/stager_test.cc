// Stages blocks of a real store to the device, through the pinned slabs and straight from the
// registered map, and compares every page, copied back, with the store's own DecodePayloadInto.
// Needs a GPU: skips otherwise.
#include "gpu/stager.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "engine/store_test_util.h"
#include "format/kv_values.h"
#include "gpu/cuda_util.h"
#include "gpu/test_util.h"

namespace shotdb {
namespace gpu {
namespace {

using testing_util::FlipInFile;
using testing_util::MakeBlock;
using testing_util::MakeTask;
using testing_util::SmallModel;
using testing_util::TempDir;

// Parameters: the task's codec, and whether raw records may be copied straight from the map.
class StagerTest : public ::testing::TestWithParam<std::tuple<Codec, bool>> {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
    model_ = SmallModel(DType::kBF16, 3);
    auto store = Store::Open(dir_.path());
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    store_ = std::move(*store);
    ASSERT_TRUE(store_->CreateTask(MakeTask("t", model_, codec())).ok());
    uint64_t pos = 0;
    for (uint32_t b = 0; b < 6; ++b) {
      // Tensors of 96..736 bytes (inside LMDB pages), and block 6 of 96 KiB (overflow pages).
      const uint32_t tokens = 3 + 5 * b;
      auto tb = MakeBlock(model_, 42, b, pos, tokens);
      blocks_.push_back(tb);
      ASSERT_TRUE(store_->AppendBlock("t", tb.block).ok());
      pos += tokens;
    }
    auto big = MakeBlock(model_, 42, 6, pos, 3000);
    blocks_.push_back(big);
    ASSERT_TRUE(store_->AppendBlock("t", big.block).ok());
  }

  Codec codec() const { return std::get<0>(GetParam()); }
  Stager::Options StagerOptions() const {
    Stager::Options o;
    o.direct_from_map = std::get<1>(GetParam());
    return o;
  }
  // Raw records come from the map exactly when direct copies are on and the device registered it.
  bool Direct(const Stager& stager) const {
    return codec() == Codec::kRaw && std::get<1>(GetParam()) && stager.map_status().ok();
  }
  void ExpectCopyPath(const Stager& stager) {
    const Stager::Stats s = stager.stats();
    if (Direct(stager)) {
      EXPECT_EQ(s.bytes_from_map, s.bytes_copied);
      EXPECT_EQ(s.slabs_flushed, 0u);
    } else {
      EXPECT_EQ(s.bytes_from_map, 0u);
    }
    if (std::get<1>(GetParam()) && !stager.map_status().ok()) {
      // The only acceptable reason: the device refuses read-only registration.
      EXPECT_TRUE(stager.map_status().IsNotSupported()) << stager.map_status().ToString();
    }
  }

  // A Stager with options `o`, a 4 MiB page cache of its own and a snapshot of the store (all
  // null after a failure, which is reported).
  struct Staging {
    std::unique_ptr<Stager> stager;
    std::unique_ptr<BlockPageCache> cache;  // destroyed before its stager
    std::unique_ptr<Snapshot> snap;
  };
  Staging MakeStaging(const Stager::Options& o) {
    Staging st;
    auto stager = Stager::Create(o);
    EXPECT_TRUE(stager.ok()) << stager.status().ToString();
    if (!stager.ok()) return st;
    auto cache = (*stager)->CreateCache(4 << 20);
    auto snap = store_->BeginSnapshot();
    EXPECT_TRUE(cache.ok()) << cache.status().ToString();
    EXPECT_TRUE(snap.ok()) << snap.status().ToString();
    if (!cache.ok() || !snap.ok()) return st;
    st.stager = std::move(*stager);
    st.cache = std::move(*cache);
    st.snap = std::move(*snap);
    return st;
  }

  // Every page of the batch equals the store's decoded tensor.
  void ExpectPagesMatch(Snapshot* snap, const StagedBatch& batch,
                        const std::vector<uint32_t>& blocks, cudaStream_t stream,
                        const std::string& task = "t") {
    for (const StagedLayer& l : batch.layers) {
      ASSERT_TRUE(l.ready.Synchronize().ok());
      for (size_t i = 0; i < blocks.size(); ++i) {
        const PageHandle& p = l.pages[i];
        for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
          const size_t n = kind == TensorKind::kKey ? p.k_bytes() : p.v_bytes();
          std::vector<uint8_t> want(n), got(n);
          ASSERT_TRUE(snap->DecodePayloadInto(task, blocks[i], l.layer, kind, want.data(), n).ok());
          ASSERT_EQ(cudaMemcpyAsync(got.data(), kind == TensorKind::kKey ? p.k() : p.v(), n,
                                    cudaMemcpyDeviceToHost, stream),
                    cudaSuccess);
          ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
          EXPECT_EQ(got, want) << "block " << blocks[i] << " layer " << l.layer << " "
                               << TensorKindName(kind);
        }
        EXPECT_EQ(l.blocks[i].tokens, batch.block_tokens[i]);
        EXPECT_EQ(l.blocks[i].k, p.k());
      }
    }
  }

  // Flips a byte in the middle of block 6's layer 1 V payload in the store file (closed for it and
  // reopened as store_).
  void DamageBlock6Layer1V() {
    store_.reset();
    const std::vector<uint8_t>& v = blocks_[6].tensors[2 * 1 + 1];
    if (codec() == Codec::kRaw) {
      ASSERT_TRUE(FlipInFile(dir_.path() + "/data.mdb",
                             std::vector<uint8_t>(v.begin() + 4096, v.begin() + 4096 + 64), 10));
    } else {
      // Compressed payloads: find the stored bytes through the record view.
      auto store = Store::Open(dir_.path());
      ASSERT_TRUE(store.ok());
      auto snap = (*store)->BeginSnapshot();
      ASSERT_TRUE(snap.ok());
      auto view = (*snap)->GetRecord("t", 6, 1, TensorKind::kValue);
      ASSERT_TRUE(view.ok());
      const std::vector<uint8_t> stored(view->payload + view->payload_size / 2,
                                        view->payload + view->payload_size / 2 + 32);
      snap->reset();
      store->reset();
      ASSERT_TRUE(FlipInFile(dir_.path() + "/data.mdb", stored, 5));
    }
    auto store = Store::Open(dir_.path());
    ASSERT_TRUE(store.ok());
    store_ = std::move(*store);
  }

  TempDir dir_;
  ModelFingerprint model_;
  std::unique_ptr<Store> store_;
  std::vector<testing_util::TestBlock> blocks_;
};

TEST_P(StagerTest, StagesLayersAndHitsTheCacheTheSecondTime) {
  Stager::Options o = StagerOptions();
  o.slab_bytes = 100 * 1024;  // block 6's tensors fill a slab each: many flushes, slabs reused
  o.num_slabs = 2;
  o.threads = 3;
  Staging st = MakeStaging(o);
  ASSERT_NE(st.snap, nullptr);
  const std::vector<uint32_t> blocks = {4, 6, 1, 5, 0};
  const std::vector<uint32_t> layers = {2, 0};
  std::vector<size_t> seen_layers;
  {
    auto batch = st.stager->StageLayers(st.snap.get(), "t", blocks, layers, st.cache.get(),
                                        [&](size_t i, const StagedLayer&) {
                                          seen_layers.push_back(i);
                                          return Status::OK();
                                        });
    ASSERT_TRUE(batch.ok()) << batch.status().ToString();
    EXPECT_EQ(seen_layers, (std::vector<size_t>{0, 1}));
    EXPECT_EQ(batch->pages_filled, 10u);
    EXPECT_EQ(batch->pages_hit, 0u);
    ExpectCopyPath(*st.stager);
    if (st.stager->stats().bytes_from_map == 0) {
      EXPECT_GT(st.stager->stats().slabs_flushed, 2u);
      EXPECT_EQ(st.stager->stats().copies, 2 * batch->pages_filled);  // one per record
    } else {
      // Block 6's K and V of a layer lie together in the map: one copy.
      EXPECT_LT(st.stager->stats().copies, 2 * batch->pages_filled);
    }
    ExpectPagesMatch(st.snap.get(), *batch, blocks, st.stager->stream());
  }
  auto again = st.stager->StageLayers(st.snap.get(), "t", {0, 2}, {0}, st.cache.get());
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->pages_hit, 1u);  // block 0 layer 0
  EXPECT_EQ(again->pages_filled, 1u);
  ExpectPagesMatch(st.snap.get(), *again, {0, 2}, st.stager->stream());
  // Every page hits and the stream has finished (ExpectPagesMatch waited for it): the layer needs
  // no event.
  auto hot = st.stager->StageLayers(st.snap.get(), "t", {0, 2}, {0}, st.cache.get());
  ASSERT_TRUE(hot.ok()) << hot.status().ToString();
  EXPECT_EQ(hot->pages_hit, 2u);
  EXPECT_EQ(hot->pages_filled, 0u);
  EXPECT_EQ(hot->layers[0].ready.get(), nullptr);
  ExpectPagesMatch(st.snap.get(), *hot, {0, 2}, st.stager->stream());
}

// A layer whose pages all hit needs no copy: the first is published (its on_layer call) once its
// own pages are pinned, before the other layers' are, and later ones as soon as theirs are, in
// request order; a layer with a miss waits for its copies and holds back the ones after it.
TEST_P(StagerTest, HotLayersArePublishedAsSoonAsTheirPagesArePinned) {
  Stager::Options o = StagerOptions();
  o.layer_groups = 1;  // one group: the direct path's layers would otherwise wait for its pins
  Staging st = MakeStaging(o);
  ASSERT_NE(st.snap, nullptr);
  const std::vector<uint32_t> blocks = {4, 6, 1};
  const uint64_t nb = blocks.size();
  {
    auto warm = st.stager->StageLayers(st.snap.get(), "t", blocks, {2, 0}, st.cache.get());
    ASSERT_TRUE(warm.ok()) << warm.status().ToString();
    ExpectPagesMatch(st.snap.get(), *warm, blocks, st.stager->stream());
  }
  ASSERT_EQ(st.cache->stats().pinned_pages, 0u);
  using Seen = std::vector<std::pair<size_t, uint64_t>>;
  Seen seen;  // (index, pages pinned at the call)
  // Request order: layer 2 (hot), layer 1 (cold), layer 0 (hot, but after a cold one).
  {
    auto batch =
        st.stager->StageLayers(st.snap.get(), "t", blocks, {2, 1, 0}, st.cache.get(),
                               [&](size_t i, const StagedLayer& layer) {
                                 EXPECT_EQ(layer.layer, (std::vector<uint32_t>{2, 1, 0})[i]);
                                 seen.emplace_back(i, st.cache->stats().pinned_pages);
                                 return Status::OK();
                               });
    ASSERT_TRUE(batch.ok()) << batch.status().ToString();
    EXPECT_EQ(seen, (Seen{{0, nb}, {1, 3 * nb}, {2, 3 * nb}}));
    EXPECT_EQ(batch->pages_hit, 2 * nb);
    EXPECT_EQ(batch->pages_filled, nb);
    ExpectCopyPath(*st.stager);
    ExpectPagesMatch(st.snap.get(), *batch, blocks, st.stager->stream());
  }  // its pins released
  ASSERT_EQ(st.cache->stats().pinned_pages, 0u);
  // All hot: each layer is published as it is pinned, the first before the others are pinned.
  seen.clear();
  const Stager::Stats before = st.stager->stats();
  auto hot = st.stager->StageLayers(st.snap.get(), "t", blocks, {0, 1, 2}, st.cache.get(),
                                    [&](size_t i, const StagedLayer&) {
                                      seen.emplace_back(i, st.cache->stats().pinned_pages);
                                      return Status::OK();
                                    });
  ASSERT_TRUE(hot.ok()) << hot.status().ToString();
  EXPECT_EQ(seen, (Seen{{0, nb}, {1, 3 * nb}, {2, 3 * nb}}));
  EXPECT_EQ(hot->pages_hit, 3 * nb);
  // The time to the first layer is counted, and is part of the call's.
  const Stager::Stats after = st.stager->stats();
  EXPECT_GT(after.first_layer_ms, before.first_layer_ms);
  EXPECT_LE(after.first_layer_ms - before.first_layer_ms, after.stage_ms - before.stage_ms);
  ExpectPagesMatch(st.snap.get(), *hot, blocks, st.stager->stream());
}

// The Stager remembers block lengths for a bounded number of tasks; past the bound it forgets
// them and reads them again, with the same pages and lengths as before.
TEST_P(StagerTest, ManyTasksKeepTheirBlockLengths) {
  constexpr uint32_t kTasks = 70;  // past Stager's bound of 64
  for (uint32_t i = 0; i < kTasks; ++i) {
    const std::string name = "many" + std::to_string(i);
    ASSERT_TRUE(store_->CreateTask(MakeTask(name, model_, codec())).ok());
    ASSERT_TRUE(store_->AppendBlock(name, MakeBlock(model_, i, 0, 0, 1 + i % 7).block).ok());
  }
  auto stager = Stager::Create(StagerOptions());
  ASSERT_TRUE(stager.ok()) << stager.status().ToString();
  auto cache = (*stager)->CreateCache(4 << 20);
  ASSERT_TRUE(cache.ok()) << cache.status().ToString();
  auto snap = store_->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  for (int round = 0; round < 2; ++round) {
    for (uint32_t i = 0; i < kTasks; i += round == 0 ? 1 : 9) {
      const std::string name = "many" + std::to_string(i);
      auto batch = (*stager)->StageLayers(snap->get(), name, {0}, {1}, cache->get());
      ASSERT_TRUE(batch.ok()) << name << ": " << batch.status().ToString();
      ASSERT_EQ(batch->block_tokens, (std::vector<uint32_t>{1 + i % 7})) << name;
      ExpectPagesMatch(snap->get(), *batch, {0}, (*stager)->stream(), name);
    }
  }
}

// A damaged payload byte is reported with the record's name, whichever path copies it, and the
// damaged page is not cached: staging it again reports it again.
TEST_P(StagerTest, CorruptRecordIsReportedAndNotCached) {
  DamageBlock6Layer1V();
  ASSERT_FALSE(HasFatalFailure());

  auto stager = Stager::Create(StagerOptions());
  ASSERT_TRUE(stager.ok());
  auto cache = (*stager)->CreateCache(4 << 20);
  ASSERT_TRUE(cache.ok());
  auto snap = store_->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  for (int attempt = 0; attempt < 2; ++attempt) {
    auto batch = (*stager)->StageLayers(snap->get(), "t", {0, 6}, {0, 1, 2}, cache->get());
    ASSERT_FALSE(batch.ok());
    EXPECT_TRUE(batch.status().IsCorruption()) << batch.status().ToString();
    EXPECT_NE(batch.status().message().find("block 6 layer 1 V"), std::string::npos)
        << batch.status().ToString();
  }
  // Layer 0 staged fine and stays cached; layer 1 of block 6 does not.
  auto layer0 = (*stager)->StageLayers(snap->get(), "t", {0, 6}, {0}, cache->get());
  ASSERT_TRUE(layer0.ok()) << layer0.status().ToString();
  EXPECT_EQ(layer0->pages_hit, 2u);
  ExpectPagesMatch(snap->get(), *layer0, {0, 6}, (*stager)->stream());
  if (Direct(**stager)) {
    // Straight from the map every layer is copied at once: each page whose two records verified
    // stays cached, block 0's layer 1 and layer 2 included; block 6's layer 1 is read again.
    auto rest = (*stager)->StageLayers(snap->get(), "t", {0, 6}, {1, 2}, cache->get());
    EXPECT_TRUE(rest.status().IsCorruption()) << rest.status().ToString();
    auto fine = (*stager)->StageLayers(snap->get(), "t", {0, 6}, {2}, cache->get());
    ASSERT_TRUE(fine.ok()) << fine.status().ToString();
    EXPECT_EQ(fine->pages_hit, 2u);
    auto block0 = (*stager)->StageLayers(snap->get(), "t", {0}, {1}, cache->get());
    ASSERT_TRUE(block0.ok()) << block0.status().ToString();
    EXPECT_EQ(block0->pages_hit, 1u);
  }
  ExpectCopyPath(**stager);
}

// Deferred verification: StageLayers returns before the checksums are checked; `verified` then
// names the damaged record, its page is invalidated (read again next time, and reported again),
// and the pages whose records passed stay cached.
TEST_P(StagerTest, DeferredVerificationReportsAndInvalidates) {
  if (codec() != Codec::kRaw) GTEST_SKIP() << "deferred only straight from the map (raw codec)";
  DamageBlock6Layer1V();
  ASSERT_FALSE(HasFatalFailure());
  Stager::Options o = StagerOptions();
  o.defer_verification = true;
  o.layer_groups = 2;
  Staging st = MakeStaging(o);
  ASSERT_NE(st.snap, nullptr);
  for (int attempt = 0; attempt < 2; ++attempt) {
    auto batch = st.stager->StageLayers(st.snap.get(), "t", {0, 6}, {0, 1, 2}, st.cache.get());
    if (!Direct(*st.stager)) {
      // Through the slabs the check is not deferred: the call itself reports it.
      ASSERT_FALSE(batch.ok());
      EXPECT_TRUE(batch.status().IsCorruption()) << batch.status().ToString();
      return;
    }
    ASSERT_TRUE(batch.ok()) << batch.status().ToString();
    ASSERT_TRUE(batch->verified.valid());
    const Status s = batch->verified.get();
    EXPECT_TRUE(s.IsCorruption()) << s.ToString();
    EXPECT_NE(s.message().find("block 6 layer 1 V"), std::string::npos) << s.ToString();
    EXPECT_EQ(batch->pages_filled, attempt == 0 ? 6u : 1u);  // the damaged page is read again
  }
  auto fine = st.stager->StageLayers(st.snap.get(), "t", {0, 6}, {0, 2}, st.cache.get());
  ASSERT_TRUE(fine.ok()) << fine.status().ToString();
  EXPECT_EQ(fine->pages_hit, 4u);
  EXPECT_FALSE(fine->verified.valid());  // nothing was read: nothing to check
  ExpectPagesMatch(st.snap.get(), *fine, {0, 6}, st.stager->stream());
}

TEST_P(StagerTest, RejectsBadRequests) {
  auto stager = Stager::Create({});
  ASSERT_TRUE(stager.ok());
  auto cache = (*stager)->CreateCache(1 << 20);
  ASSERT_TRUE(cache.ok());
  auto snap = store_->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  EXPECT_TRUE(
      (*stager)->StageLayers(snap->get(), "nope", {0}, {0}, cache->get()).status().IsNotFound());
  EXPECT_TRUE(
      (*stager)->StageLayers(snap->get(), "t", {9}, {0}, cache->get()).status().IsNotFound());
  EXPECT_TRUE((*stager)
                  ->StageLayers(snap->get(), "t", {1, 1}, {0}, cache->get())
                  .status()
                  .IsInvalidArgument());
  EXPECT_TRUE((*stager)
                  ->StageLayers(snap->get(), "t", {1}, {3}, cache->get())
                  .status()
                  .IsInvalidArgument());
  EXPECT_TRUE((*stager)
                  ->StageLayers(snap->get(), "t", {1}, {0, 2, 0}, cache->get())
                  .status()
                  .IsInvalidArgument());
  auto tiny = (*stager)->CreateCache(1024);  // a page of block 5 needs more
  ASSERT_TRUE(tiny.ok());
  auto r = (*stager)->StageLayers(snap->get(), "t", {5}, {0}, tiny->get());
  EXPECT_TRUE(r.status().IsFailedPrecondition()) << r.status().ToString();
}

// Straight from the map, records close together travel in one copy, into landing buffers of a
// bounded size, and each page still equals the store's tensor: blocks whose records lie in
// overflow pages, all layers, partly cached, with small landing buffers and with gaps refused.
TEST_P(StagerTest, AdjacentRecordsAreCopiedTogether) {
  ASSERT_TRUE(store_->CreateTask(MakeTask("big", model_, codec())).ok());
  const uint32_t kBlocks = 8, kTokens = 300;  // 9,600-byte records: LMDB overflow pages
  uint64_t pos = 0;
  for (uint32_t b = 0; b < kBlocks; ++b) {
    ASSERT_TRUE(store_->AppendBlock("big", MakeBlock(model_, 9, b, pos, kTokens).block).ok());
    pos += kTokens;
  }
  const std::vector<uint32_t> blocks = {5, 0, 7, 2, 1, 3, 6, 4};
  const uint64_t record = 2 * kTokens * 8 * 2;
  struct Case {
    size_t max_gap, landing;
    uint32_t groups;
  };
  for (const Case& c :
       {Case{size_t(32) << 10, size_t(256) << 20, 1}, Case{size_t(32) << 10, size_t(256) << 20, 3},
        Case{size_t(32) << 10, 40000, 1}, Case{0, size_t(256) << 20, 1}}) {
    Stager::Options o = StagerOptions();
    o.max_gap_bytes = c.max_gap;
    o.slab_bytes = 16 << 10;
    o.landing_bytes = c.landing;
    o.layer_groups = c.groups;
    Staging st = MakeStaging(o);
    ASSERT_NE(st.snap, nullptr);
    // Layer 1 of blocks 0 and 7 first: then the full request hits two pages and copies around
    // them.
    auto first = st.stager->StageLayers(st.snap.get(), "big", {0, 7}, {1}, st.cache.get());
    ASSERT_TRUE(first.ok()) << first.status().ToString();
    const uint64_t copies_before = st.stager->stats().copies;
    auto batch = st.stager->StageLayers(st.snap.get(), "big", blocks, {0, 1, 2}, st.cache.get());
    ASSERT_TRUE(batch.ok()) << batch.status().ToString();
    EXPECT_EQ(batch->pages_hit, 2u);
    EXPECT_EQ(batch->pages_filled, 3u * kBlocks - 2);
    EXPECT_EQ(batch->bytes_copied, 2 * batch->pages_filled * record);
    const Stager::Stats s = st.stager->stats();
    const uint64_t copies = s.copies - copies_before;
    if (!Direct(*st.stager)) {
      EXPECT_EQ(copies, 2 * batch->pages_filled);
    } else if (c.max_gap == 0) {
      EXPECT_EQ(copies, 2 * batch->pages_filled);  // a header lies between any two records
      EXPECT_EQ(s.gap_bytes, 0u);
    } else if (c.landing == 40000) {
      // A landing buffer holds 4 records: runs end there.
      EXPECT_GE(copies, 2 * batch->pages_filled / 4);
      EXPECT_LT(copies, 2 * batch->pages_filled / 2);
    } else if (c.groups == 3) {
      // A group per layer: a block's K and V of the layer travel together.
      EXPECT_GE(copies, 3u);
      EXPECT_LE(copies, 3u * kBlocks);
    } else {
      EXPECT_LE(copies, uint64_t{kBlocks});    // a run per block at most
      EXPECT_LT(s.gap_bytes, s.bytes_copied);  // page tails, headers and the cached pages
    }
    ExpectPagesMatch(st.snap.get(), *batch, blocks, st.stager->stream(), "big");
  }
}

// A task of a scaled dtype (fp8, int8): half the bytes cross PCIe, and each page holds the 16-bit
// values the host computes from the record (KvToFloat, then rounding to the page dtype), for bf16
// and f16 pages.
TEST_P(StagerTest, ScaledTaskIsDequantisedIntoSixteenBitPages) {
  for (DType stored : {DType::kF8E4M3, DType::kI8}) {
    SCOPED_TRACE(std::string(DTypeName(stored)));
    const std::string task(DTypeName(stored));
    const ModelFingerprint model = SmallModel(stored, 3);
    ASSERT_TRUE(store_->CreateTask(MakeTask(task, model, codec())).ok());
    std::vector<testing_util::TestBlock> blocks;
    uint64_t pos = 0;
    for (uint32_t b = 0; b < 4; ++b) {
      const uint32_t tokens = b == 2 ? 3000 : 3 + 5 * b;
      blocks.push_back(MakeBlock(model, 7, b, pos, tokens));
      ASSERT_TRUE(store_->AppendBlock(task, blocks.back().block).ok());
      pos += tokens;
    }
    for (DType pages : {DType::kBF16, DType::kF16}) {
      Stager::Options o = StagerOptions();
      o.scaled_pages = pages;
      o.slab_bytes = 64 * 1024;
      Staging st = MakeStaging(o);
      ASSERT_NE(st.snap, nullptr);
      const std::vector<uint32_t> order = {3, 0, 2, 1};
      auto batch = st.stager->StageLayers(st.snap.get(), task, order, {1, 2, 0}, st.cache.get());
      ASSERT_TRUE(batch.ok()) << batch.status().ToString();
      EXPECT_EQ(batch->dtype, pages);
      uint64_t record_bytes = 0;
      for (uint32_t b : order) {
        record_bytes += 3 * 2 * *KvRawBytes(stored, 2, blocks[b].block.info.token_count, 8);
      }
      EXPECT_EQ(batch->bytes_copied, record_bytes);
      for (const StagedLayer& l : batch->layers) {
        ASSERT_TRUE(l.ready.Synchronize().ok());
        for (size_t i = 0; i < order.size(); ++i) {
          const uint32_t tokens = blocks[order[i]].block.info.token_count;
          for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
            const std::vector<uint8_t>& raw =
                blocks[order[i]].tensors[2 * l.layer + (kind == TensorKind::kValue)];
            std::vector<float> values(2 * tokens * 8);
            KvToFloat(stored, 2, tokens, 8, raw.data(), values.data());
            std::vector<uint16_t> want(values.size());
            ConvertFromFloat(pages, values.data(), want.data(), values.size());
            const void* src = kind == TensorKind::kKey ? l.pages[i].k() : l.pages[i].v();
            Result<std::vector<uint16_t>> got = testing::FromDevice<uint16_t>(src, want.size());
            ASSERT_TRUE(got.ok()) << got.status().ToString();
            EXPECT_EQ(*got, want) << DTypeName(pages) << " block " << order[i] << " layer "
                                  << l.layer << " " << TensorKindName(kind);
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(CodecsAndPaths, StagerTest,
                         ::testing::Combine(::testing::Values(Codec::kRaw, Codec::kLz4,
                                                              Codec::kShuffleLz4),
                                            ::testing::Bool()),
                         [](const ::testing::TestParamInfo<std::tuple<Codec, bool>>& info) {
                           std::string name(CodecName(std::get<0>(info.param)));
                           name.erase(std::remove(name.begin(), name.end(), '-'), name.end());
                           return name + (std::get<1>(info.param) ? "Direct" : "Slabs");
                         });

}  // namespace
}  // namespace gpu
}  // namespace shotdb
