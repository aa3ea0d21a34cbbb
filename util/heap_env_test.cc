#include "util/heap_env.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>

#ifdef __GLIBC__
#include <malloc.h>
#endif

// AddressSanitizer brings its own allocator (mallopt does nothing there, mallinfo2 reports zeros).
#if defined(__SANITIZE_ADDRESS__)
#define SHOTDB_TEST_OWN_ALLOCATOR 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SHOTDB_TEST_OWN_ALLOCATOR 1
#endif
#endif

namespace shotdb {
namespace {

// After KeepFreedHeapMemory, a freed 16 MiB block stays in the heap (glibc's free-space count
// grows by it) instead of being unmapped, and the next allocation of that size reuses it.
TEST(HeapEnvTest, FreedBlocksStayInTheHeap) {
#if defined(SHOTDB_TEST_OWN_ALLOCATOR)
  GTEST_SKIP() << "the sanitizer's allocator replaces glibc's";
#elif defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
  ASSERT_TRUE(KeepFreedHeapMemory());
  constexpr size_t kBytes = size_t(16) << 20;
  void* p = std::malloc(kBytes);
  ASSERT_NE(p, nullptr);
  std::memset(p, 1, kBytes);                        // touched: its pages are resident
  const size_t mapped_before = mallinfo2().hblkhd;  // bytes in mmapped blocks
  const size_t free_before = mallinfo2().fordblks;  // free bytes kept in the heap
  std::free(p);
  EXPECT_EQ(mallinfo2().hblkhd, mapped_before) << "the block was mmapped, not from the heap";
  EXPECT_GE(mallinfo2().fordblks, free_before + kBytes) << "the freed block left the heap";
  void* q = std::malloc(kBytes);
  ASSERT_NE(q, nullptr);
  EXPECT_LT(mallinfo2().fordblks, free_before + kBytes);  // taken from the kept memory
  std::free(q);
#else
  GTEST_SKIP() << "not glibc >= 2.33";
#endif
}

}  // namespace
}  // namespace shotdb
