#include "util/heap_env.h"

#include <climits>

#ifdef __GLIBC__
#include <malloc.h>
#endif

namespace shotdb {

bool KeepFreedHeapMemory() {
#ifdef __GLIBC__
  // 32 MiB is the largest threshold glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); setting
  // either value also turns off its adaptive threshold.
  if (mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024) != 1) return false;
  return mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1;
#else
  return false;
#endif
}

}  // namespace shotdb
