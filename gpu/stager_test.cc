// Stages blocks of a real store to the device and compares every page, copied back, with the
// store's own DecodePayloadInto. Needs a GPU: skips otherwise.
#include "gpu/stager.h"

#include <gtest/gtest.h>

#include "engine/store_test_util.h"
#include "gpu/cuda_util.h"

namespace shotdb {
namespace gpu {
namespace {

using testing_util::MakeBlock;
using testing_util::MakeTask;
using testing_util::SmallModel;
using testing_util::TempDir;

class StagerTest : public ::testing::TestWithParam<Codec> {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
    model_ = SmallModel(DType::kBF16, 3);
    auto store = Store::Open(dir_.path());
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    store_ = std::move(*store);
    ASSERT_TRUE(store_->CreateTask(MakeTask("t", model_, GetParam())).ok());
    uint64_t pos = 0;
    for (uint32_t b = 0; b < 6; ++b) {
      const uint32_t tokens = 3 + 5 * b;  // tensors of 96..736 bytes
      auto tb = MakeBlock(model_, 42, b, pos, tokens);
      ASSERT_TRUE(store_->AppendBlock("t", tb.block).ok());
      pos += tokens;
    }
  }

  // Every page of the batch equals the store's decoded tensor.
  void ExpectPagesMatch(Snapshot* snap, const StagedBatch& batch,
                        const std::vector<uint32_t>& blocks, cudaStream_t stream) {
    for (const StagedLayer& l : batch.layers) {
      ASSERT_TRUE(l.ready.Synchronize().ok());
      for (size_t i = 0; i < blocks.size(); ++i) {
        const PageHandle& p = l.pages[i];
        for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
          const size_t n = kind == TensorKind::kKey ? p.k_bytes() : p.v_bytes();
          std::vector<uint8_t> want(n), got(n);
          ASSERT_TRUE(snap->DecodePayloadInto("t", blocks[i], l.layer, kind, want.data(), n).ok());
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

  TempDir dir_;
  ModelFingerprint model_;
  std::unique_ptr<Store> store_;
};

TEST_P(StagerTest, StagesLayersAndHitsTheCacheTheSecondTime) {
  Stager::Options o;
  o.slab_bytes = 2048;  // a few tensors per slab: many flushes and slab reuse
  o.num_slabs = 2;
  o.threads = 3;
  auto stager = Stager::Create(o);
  ASSERT_TRUE(stager.ok()) << stager.status().ToString();
  auto cache = (*stager)->CreateCache(1 << 20);
  ASSERT_TRUE(cache.ok()) << cache.status().ToString();
  auto snap = store_->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  const std::vector<uint32_t> blocks = {4, 1, 5, 0};
  const std::vector<uint32_t> layers = {2, 0};
  std::vector<size_t> seen_layers;
  {
    auto batch = (*stager)->StageLayers(snap->get(), "t", blocks, layers, cache->get(),
                                        [&](size_t i, const StagedLayer&) {
                                          seen_layers.push_back(i);
                                          return Status::OK();
                                        });
    ASSERT_TRUE(batch.ok()) << batch.status().ToString();
    EXPECT_EQ(seen_layers, (std::vector<size_t>{0, 1}));
    EXPECT_EQ(batch->pages_filled, 8u);
    EXPECT_EQ(batch->pages_hit, 0u);
    EXPECT_GT((*stager)->stats().slabs_flushed, 2u);
    ExpectPagesMatch(snap->get(), *batch, blocks, (*stager)->stream());
  }
  auto again = (*stager)->StageLayers(snap->get(), "t", {0, 2}, {0}, cache->get());
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->pages_hit, 1u);  // block 0 layer 0
  EXPECT_EQ(again->pages_filled, 1u);
  ExpectPagesMatch(snap->get(), *again, {0, 2}, (*stager)->stream());
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
  auto tiny = (*stager)->CreateCache(1024);  // a page of block 5 needs more
  ASSERT_TRUE(tiny.ok());
  auto r = (*stager)->StageLayers(snap->get(), "t", {5}, {0}, tiny->get());
  EXPECT_TRUE(r.status().IsFailedPrecondition()) << r.status().ToString();
}

INSTANTIATE_TEST_SUITE_P(Codecs, StagerTest,
                         ::testing::Values(Codec::kRaw, Codec::kLz4, Codec::kShuffleLz4));

}  // namespace
}  // namespace gpu
}  // namespace shotdb
