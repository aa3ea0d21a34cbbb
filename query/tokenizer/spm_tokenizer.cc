#include "query/tokenizer/spm_tokenizer.h"

#include <cstdio>
#include <queue>

namespace shotdb {

namespace {

constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";  // U+2581 "▁"

}  // namespace

Result<std::unique_ptr<SpmVocabTokenizer>> SpmVocabTokenizer::Create(SpmVocab vocab,
                                                                     const std::string& source) {
  const size_t n = vocab.pieces.size();
  if (vocab.scores.size() != n || vocab.types.size() != n) {
    return Status::Corruption(source + ": tokenizer has " + std::to_string(n) + " tokens but " +
                              std::to_string(vocab.scores.size()) + " scores and " +
                              std::to_string(vocab.types.size()) + " token types");
  }
  for (int32_t id : {vocab.unk_id, vocab.bos_id, vocab.eos_id}) {
    if (id < -1 || id >= static_cast<int64_t>(n)) {
      return Status::Corruption(source + ": bos/eos/unk id " + std::to_string(id) +
                                " outside the vocabulary of " + std::to_string(n));
    }
  }
  std::unique_ptr<SpmVocabTokenizer> t(new SpmVocabTokenizer());
  std::fill(std::begin(t->byte_ids_), std::end(t->byte_ids_), -1);
  std::vector<AddedToken> added;
  std::unordered_map<std::string, int32_t> seen;
  for (size_t i = 0; i < n; ++i) {
    const int32_t id = static_cast<int32_t>(i);
    const std::string& p = vocab.pieces[i];
    if (!seen.emplace(p, id).second) {
      return Status::Corruption(source + ": token " + std::to_string(id) + " \"" + p +
                                "\" duplicates token " + std::to_string(seen[p]));
    }
    switch (vocab.types[i]) {
      case SpmTokenType::kNormal:
      case SpmTokenType::kUnused:
      case SpmTokenType::kUndefined:
        t->mergeable_.emplace(p, id);
        break;
      case SpmTokenType::kUserDefined:
        t->mergeable_.emplace(p, id);
        added.push_back({id, p, false});
        break;
      case SpmTokenType::kControl:
        added.push_back({id, p, true});
        break;
      case SpmTokenType::kByte: {
        // Exactly "<0xHH>". (sscanf's %X would also take "<0x-7>", a sign, and index out of
        // bounds: found by fuzz/fuzz_spm_model.)
        const auto hex = [](char c) {
          return c >= '0' && c <= '9'   ? c - '0'
                 : c >= 'A' && c <= 'F' ? c - 'A' + 10
                 : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                        : -1;
        };
        if (p.size() != 6 || p.compare(0, 3, "<0x") != 0 || p[5] != '>' || hex(p[3]) < 0 ||
            hex(p[4]) < 0) {
          return Status::Corruption(source + ": byte token " + std::to_string(id) + " \"" + p +
                                    "\" is not of the form <0xHH>");
        }
        t->byte_ids_[hex(p[3]) * 16 + hex(p[4])] = id;
        break;
      }
      case SpmTokenType::kUnknown:
        break;
    }
  }
  t->added_ = AddedTokenMatcher(added);

  FingerprintHasher h;
  h.AddString("shotdb-spm-vocab-v1");
  h.AddInt(static_cast<int64_t>(n));
  for (size_t i = 0; i < n; ++i) {
    h.AddString(vocab.pieces[i]);
    h.AddFloat(vocab.scores[i]);
    h.AddInt(static_cast<int32_t>(vocab.types[i]));
  }
  h.AddInt(vocab.unk_id);
  h.AddInt(vocab.bos_id);
  h.AddInt(vocab.add_bos);
  h.AddInt(vocab.add_space_prefix);
  t->fingerprint_ = h.HexDigest();
  t->vocab_ = std::move(vocab);
  return t;
}

void SpmVocabTokenizer::EncodeFragment(std::string_view text, bool space_prefix,
                                       std::vector<int32_t>* out) const {
  std::string s;
  if (space_prefix) s += kSpaceSymbol;
  for (char c : text) {
    if (c == ' ') {
      s += kSpaceSymbol;
    } else {
      s.push_back(c);
    }
  }
  // Symbols are byte ranges of `s` in a doubly linked list; a merged-away symbol has len 0.
  struct Symbol {
    size_t start;
    size_t len;
    int32_t prev;
    int32_t next;
  };
  std::vector<Symbol> syms;
  for (size_t i = 0; i < s.size();) {
    size_t len = std::min(Utf8SequenceLength(static_cast<unsigned char>(s[i])), s.size() - i);
    int32_t k = static_cast<int32_t>(syms.size());
    syms.push_back({i, len, k - 1, k + 1});
    i += len;
  }
  if (syms.empty()) return;
  syms.back().next = -1;

  struct Candidate {
    float score;
    int32_t left;
    size_t len;  // combined length, to recognise a stale candidate
    bool operator<(const Candidate& o) const {
      return score != o.score ? score < o.score : left > o.left;
    }
  };
  std::priority_queue<Candidate> agenda;
  auto piece = [&](int32_t k) { return std::string_view(s).substr(syms[k].start, syms[k].len); };
  auto push = [&](int32_t left) {
    int32_t right = syms[left].next;
    if (right < 0) return;
    size_t len = syms[left].len + syms[right].len;
    auto it = mergeable_.find(std::string(std::string_view(s).substr(syms[left].start, len)));
    if (it != mergeable_.end()) agenda.push({vocab_.scores[it->second], left, len});
  };
  // Pieces of unused type are merged through but then split back into the two halves they were
  // made from, as sentencepiece does.
  std::unordered_map<std::string, std::pair<std::string, std::string>> unused_halves;
  for (int32_t k = 0; k + 1 < static_cast<int32_t>(syms.size()); ++k) push(k);
  while (!agenda.empty()) {
    Candidate c = agenda.top();
    agenda.pop();
    Symbol& l = syms[c.left];
    if (l.len == 0 || l.next < 0 || l.len + syms[l.next].len != c.len) continue;
    Symbol& r = syms[l.next];
    const std::string merged(std::string_view(s).substr(l.start, c.len));
    if (vocab_.types[mergeable_.at(merged)] == SpmTokenType::kUnused) {
      unused_halves.emplace(merged,
                            std::make_pair(std::string(piece(c.left)), std::string(piece(l.next))));
    }
    l.len = c.len;
    r.len = 0;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = c.left;
    if (l.prev >= 0) push(l.prev);
    push(c.left);
  }

  auto emit = [&](const std::string& p, auto&& self) -> void {
    auto it = mergeable_.find(p);
    if (it != mergeable_.end()) {
      auto halves = unused_halves.find(p);
      if (vocab_.types[it->second] == SpmTokenType::kUnused && halves != unused_halves.end()) {
        self(halves->second.first, self);
        self(halves->second.second, self);
      } else {
        out->push_back(it->second);
      }
      return;
    }
    // No piece: one byte piece per UTF-8 byte (byte fallback), else the unknown token.
    bool all_bytes = true;
    for (char c : p) all_bytes = all_bytes && byte_ids_[static_cast<unsigned char>(c)] >= 0;
    if (all_bytes) {
      for (char c : p) out->push_back(byte_ids_[static_cast<unsigned char>(c)]);
    } else if (vocab_.unk_id >= 0) {
      out->push_back(vocab_.unk_id);
    }
  };
  for (int32_t k = 0; k >= 0; k = syms[k].next) emit(std::string(piece(k)), emit);
}

Result<std::vector<int32_t>> SpmVocabTokenizer::Encode(std::string_view text, bool add_bos,
                                                       bool parse_special) const {
  if (!IsValidUtf8(text)) {
    return Status::InvalidArgument("SpmVocabTokenizer::Encode: text is not valid UTF-8");
  }
  std::vector<int32_t> ids;
  if (add_bos && vocab_.bos_id >= 0) ids.push_back(vocab_.bos_id);
  bool after_special = true;  // the start of the text counts as following a special token
  for (const TextFragment& f : added_.Split(text, parse_special)) {
    if (f.token_id >= 0) {
      ids.push_back(f.token_id);
      after_special = vocab_.types[f.token_id] == SpmTokenType::kControl;
      continue;
    }
    EncodeFragment(f.text, vocab_.add_space_prefix && after_special, &ids);
    after_special = false;
  }
  return ids;
}

std::string SpmVocabTokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string out;
  bool strip_space = vocab_.add_space_prefix;  // the next text may start with the dummy prefix
  for (int32_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= vocab_.pieces.size()) continue;
    const std::string& p = vocab_.pieces[id];
    switch (vocab_.types[id]) {
      case SpmTokenType::kControl:
        out += p;
        strip_space = vocab_.add_space_prefix;
        continue;
      case SpmTokenType::kByte: {
        unsigned value = 0;
        if (std::sscanf(p.c_str(), "<0x%2X>", &value) == 1) out.push_back(static_cast<char>(value));
        strip_space = false;
        continue;
      }
      default:
        break;
    }
    std::string text;
    for (size_t i = 0; i < p.size();) {
      if (p.compare(i, kSpaceSymbol.size(), kSpaceSymbol) == 0) {
        text.push_back(' ');
        i += kSpaceSymbol.size();
      } else {
        text.push_back(p[i++]);
      }
    }
    if (strip_space && !text.empty() && text[0] == ' ') text.erase(0, 1);
    strip_space = false;
    out += text;
  }
  return out;
}

std::string SpmVocabTokenizer::TokenText(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= vocab_.pieces.size()) return "";
  return vocab_.pieces[id];
}

}  // namespace shotdb
