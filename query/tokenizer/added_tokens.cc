#include "query/tokenizer/added_tokens.h"

#include <xxhash.h>

#include <algorithm>
#include <cstring>

namespace shotdb {

AddedTokenMatcher::AddedTokenMatcher(const std::vector<AddedToken>& tokens) {
  for (const AddedToken& t : tokens) {
    if (t.content.empty()) continue;
    by_first_byte_[static_cast<unsigned char>(t.content[0])].push_back(t);
  }
  for (auto& list : by_first_byte_) {
    std::stable_sort(list.begin(), list.end(), [](const AddedToken& a, const AddedToken& b) {
      return a.content.size() > b.content.size();
    });
  }
}

std::vector<TextFragment> AddedTokenMatcher::Split(std::string_view text,
                                                   bool parse_special) const {
  std::vector<TextFragment> out;
  size_t start = 0;  // beginning of the pending ordinary text
  size_t i = 0;
  while (i < text.size()) {
    const AddedToken* hit = nullptr;
    for (const AddedToken& t : by_first_byte_[static_cast<unsigned char>(text[i])]) {
      if (t.special && !parse_special) continue;
      if (text.compare(i, t.content.size(), t.content) == 0) {
        hit = &t;
        break;
      }
    }
    if (hit == nullptr) {
      ++i;
      continue;
    }
    if (i > start) out.push_back({text.substr(start, i - start), -1});
    out.push_back({text.substr(i, hit->content.size()), hit->id});
    i += hit->content.size();
    start = i;
  }
  if (start < text.size()) out.push_back({text.substr(start), -1});
  return out;
}

bool IsValidUtf8(std::string_view text) {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  const auto* end = p + text.size();
  while (p < end) {
    unsigned char c = *p;
    if (c < 0x80) {
      ++p;
      continue;
    }
    size_t n = Utf8SequenceLength(c);
    if (n == 1 || static_cast<size_t>(end - p) < n) return false;
    uint32_t cp = c & (0x7F >> n);
    for (size_t k = 1; k < n; ++k) {
      if ((p[k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[k] & 0x3F);
    }
    static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    p += n;
  }
  return true;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

FingerprintHasher::FingerprintHasher() : state_(XXH3_createState()) {
  XXH3_128bits_reset(static_cast<XXH3_state_t*>(state_));
}

FingerprintHasher::~FingerprintHasher() { XXH3_freeState(static_cast<XXH3_state_t*>(state_)); }

void FingerprintHasher::AddString(std::string_view s) {
  AddInt(static_cast<int64_t>(s.size()));
  XXH3_128bits_update(static_cast<XXH3_state_t*>(state_), s.data(), s.size());
}

void FingerprintHasher::AddInt(int64_t v) {
  unsigned char b[8];
  for (int k = 0; k < 8; ++k)
    b[k] = static_cast<unsigned char>(static_cast<uint64_t>(v) >> (8 * k));
  XXH3_128bits_update(static_cast<XXH3_state_t*>(state_), b, sizeof(b));
}

void FingerprintHasher::AddFloat(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  AddInt(bits);
}

std::string FingerprintHasher::HexDigest() const {
  XXH128_hash_t h = XXH3_128bits_digest(static_cast<XXH3_state_t*>(state_));
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  for (uint64_t word : {h.high64, h.low64}) {
    for (int k = 15; k >= 0; --k) out.push_back(kHex[(word >> (4 * k)) & 0xF]);
  }
  return out;
}

}  // namespace shotdb
