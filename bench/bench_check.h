// Fail-fast helpers shared by the benchmarks: a benchmark that meets an error prints it (file,
// line, Status) and exits 1 rather than measuring something else.
#ifndef SHOTDB_BENCH_BENCH_CHECK_H_
#define SHOTDB_BENCH_BENCH_CHECK_H_

#include <cstdio>
#include <cstdlib>
#include <utility>

#include "util/status.h"

#define SHOTDB_BENCH_CHECK_OK(expr)                                                   \
  do {                                                                                \
    ::shotdb::Status s_ = (expr);                                                     \
    if (!s_.ok()) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, s_.ToString().c_str()); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

namespace shotdb {
namespace bench {

// The value of `r`, or exits with its error.
template <typename T>
T Must(Result<T> r) {
  SHOTDB_BENCH_CHECK_OK(r.status());
  return std::move(r).value();
}

}  // namespace bench
}  // namespace shotdb

#endif  // SHOTDB_BENCH_BENCH_CHECK_H_
