// CudaEvent without an event: it stands for finished work, on machines with or without a GPU
// (none of these calls reaches CUDA).
#include "gpu/stream.h"

#include <gtest/gtest.h>

#include <utility>

namespace shotdb {
namespace gpu {
namespace {

TEST(CudaEventTest, EmptyEventIsFinishedWork) {
  CudaEvent none;
  EXPECT_EQ(none.get(), nullptr);
  EXPECT_TRUE(none.WaitOn(nullptr).ok());
  EXPECT_TRUE(none.Synchronize().ok());
  const Result<bool> done = none.Query();
  ASSERT_TRUE(done.ok()) << done.status().ToString();
  EXPECT_TRUE(*done);
  CudaEvent moved(std::move(none));
  EXPECT_EQ(moved.get(), nullptr);
  EXPECT_TRUE(moved.WaitOn(nullptr).ok());
}

}  // namespace
}  // namespace gpu
}  // namespace shotdb
