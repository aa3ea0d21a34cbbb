#include "query/dbsa/prompt.h"

#include <algorithm>
#include <numeric>

namespace shotdb {

namespace {
uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
}  // namespace

std::vector<std::vector<size_t>> GroupIntoBlocks(size_t count, size_t per_block, uint64_t seed) {
  std::vector<size_t> order(count);
  std::iota(order.begin(), order.end(), size_t{0});
  uint64_t state = seed;
  for (size_t i = count; i > 1; --i) {
    // Multiply-shift maps a 64-bit draw onto [0, i) with negligible bias for i << 2^32.
    const size_t j =
        static_cast<size_t>((static_cast<unsigned __int128>(SplitMix64(&state)) * i) >> 64);
    std::swap(order[i - 1], order[j]);
  }
  std::vector<std::vector<size_t>> blocks;
  if (per_block == 0) return blocks;
  for (size_t b = 0; b < count; b += per_block) {
    blocks.emplace_back(order.begin() + b, order.begin() + std::min(count, b + per_block));
  }
  return blocks;
}

}  // namespace shotdb
