// How demonstrations are grouped into blocks (the text formats are engine/prompt_format.h).
#ifndef SHOTDB_QUERY_DBSA_PROMPT_H_
#define SHOTDB_QUERY_DBSA_PROMPT_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "engine/prompt_format.h"

namespace shotdb {

// Groups `count` demonstrations into blocks of `per_block` (the last block may be smaller) after a
// seeded shuffle. The shuffle is our own Fisher-Yates over a splitmix64 stream, so the grouping is
// identical on every platform and standard library (std::shuffle's algorithm is unspecified);
// `build` relies on that to resume an interrupted run.
std::vector<std::vector<size_t>> GroupIntoBlocks(size_t count, size_t per_block, uint64_t seed);

}  // namespace shotdb

#endif  // SHOTDB_QUERY_DBSA_PROMPT_H_
