#include "query/tokenizer/bpe_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <climits>
#include <fstream>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>

namespace shotdb {

const char kGpt2PreTokenizerRegex[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

namespace {

constexpr char kLlama3PreTokenizerRegex[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// GPT-2's reversible byte <-> printable code point table: printable Latin-1 bytes map to
// themselves, the other 68 bytes to U+0100.. in byte order, so that no token contains whitespace
// or control characters.
std::array<uint32_t, 256> ByteToCodePoint() {
  std::array<uint32_t, 256> table{};
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    table[b] = printable ? b : next++;
  }
  return table;
}

// Decodes one UTF-8 code point at `s[*i]`, advancing *i; invalid lead bytes decode as themselves.
uint32_t NextCodePoint(std::string_view s, size_t* i) {
  auto c = static_cast<unsigned char>(s[*i]);
  size_t n = Utf8SequenceLength(c);
  if (n == 1 || *i + n > s.size()) {
    ++*i;
    return c;
  }
  uint32_t cp = c & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[*i + k]) & 0x3F);
  *i += n;
  return cp;
}

std::string ByteLevelForm(std::string_view bytes) {
  static const std::array<uint32_t, 256> table = ByteToCodePoint();
  std::string out;
  for (char c : bytes) AppendUtf8(table[static_cast<unsigned char>(c)], &out);
  return out;
}

// PCRE2 escapes a literal for use as a pattern (HF Split with a String pattern).
std::string QuoteRegex(const std::string& literal) {
  std::string out;
  for (char c : literal) {
    if (std::string_view("\\^$.|?*+()[]{}").find(c) != std::string_view::npos) out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

}  // namespace

struct BpeTokenizer::Regex {
  pcre2_code* code = nullptr;
  ~Regex() { pcre2_code_free(code); }
};

BpeTokenizer::~BpeTokenizer() = default;

Result<std::vector<std::string>> PreTokenizerForGgufPre(const std::string& pre) {
  if (pre == "gpt2" || pre == "default") return std::vector<std::string>{kGpt2PreTokenizerRegex};
  if (pre == "smollm") return std::vector<std::string>{R"(\p{N})", kGpt2PreTokenizerRegex};
  if (pre == "llama3" || pre == "llama-bpe") {
    return std::vector<std::string>{kLlama3PreTokenizerRegex};
  }
  return Status::NotSupported("tokenizer.ggml.pre \"" + pre +
                              "\": unknown pre-tokenizer (supported: gpt2, default, smollm, "
                              "llama3, llama-bpe)");
}

Result<std::unique_ptr<BpeTokenizer>> BpeTokenizer::Create(BpeVocab vocab,
                                                           const std::string& source) {
  std::unique_ptr<BpeTokenizer> t(new BpeTokenizer());
  const int32_t n = static_cast<int32_t>(vocab.tokens.size());
  t->token_to_id_.reserve(vocab.tokens.size());
  for (int32_t id = 0; id < n; ++id) {
    // Holes in an HF vocabulary (ids no entry names) are left empty and never produced.
    if (vocab.tokens[id].empty()) continue;
    if (!t->token_to_id_.emplace(vocab.tokens[id], id).second) {
      return Status::Corruption(source + ": token " + std::to_string(id) + " \"" +
                                vocab.tokens[id] + "\" duplicates token " +
                                std::to_string(t->token_to_id_[vocab.tokens[id]]));
    }
  }
  for (const AddedToken& a : vocab.added_tokens) {
    if (a.id < 0 || a.id >= n) {
      return Status::Corruption(source + ": added token \"" + a.content + "\" has id " +
                                std::to_string(a.id) + ", outside the vocabulary of " +
                                std::to_string(n));
    }
  }
  for (int32_t id : {vocab.bos_id, vocab.eos_id, vocab.unk_id}) {
    if (id < -1 || id >= n) {
      return Status::Corruption(source + ": bos/eos/unk id " + std::to_string(id) +
                                " outside the vocabulary of " + std::to_string(n));
    }
  }

  t->merges_.reserve(vocab.merges.size());
  for (size_t rank = 0; rank < vocab.merges.size(); ++rank) {
    const auto& [left, right] = vocab.merges[rank];
    auto l = t->token_to_id_.find(left);
    auto r = t->token_to_id_.find(right);
    auto m = t->token_to_id_.find(left + right);
    if (l == t->token_to_id_.end() || r == t->token_to_id_.end() || m == t->token_to_id_.end()) {
      return Status::Corruption(source + ": merge " + std::to_string(rank) + " \"" + left + " " +
                                right + "\" names a token not in the vocabulary");
    }
    uint64_t key = (static_cast<uint64_t>(l->second) << 32) | static_cast<uint32_t>(r->second);
    // A repeated pair keeps its first (lowest) rank, as HF does.
    t->merges_.emplace(key, MergeRule{static_cast<int32_t>(rank), m->second});
  }

  const std::array<uint32_t, 256> byte_cp = ByteToCodePoint();
  std::unordered_map<uint32_t, unsigned char> cp_byte;
  for (int b = 0; b < 256; ++b) {
    cp_byte[byte_cp[b]] = static_cast<unsigned char>(b);
    std::string sym;
    AppendUtf8(byte_cp[b], &sym);
    auto it = t->token_to_id_.find(sym);
    t->byte_to_id_[b] = it == t->token_to_id_.end() ? -1 : it->second;
  }
  t->id_to_bytes_.resize(vocab.tokens.size());
  for (int32_t id = 0; id < n; ++id) {
    const std::string& tok = vocab.tokens[id];
    std::string& bytes = t->id_to_bytes_[id];
    for (size_t i = 0; i < tok.size();) {
      size_t start = i;
      uint32_t cp = NextCodePoint(tok, &i);
      auto it = cp_byte.find(cp);
      if (it != cp_byte.end()) {
        bytes.push_back(static_cast<char>(it->second));
      } else {
        bytes.append(tok, start, i - start);  // not a byte-level symbol: keep as written
      }
    }
  }
  for (const AddedToken& a : vocab.added_tokens) t->id_to_bytes_[a.id] = a.content;

  for (const std::string& pattern : vocab.pre_tokenizer_regexes) {
    int err = 0;
    PCRE2_SIZE offset = 0;
    auto re = std::make_unique<Regex>();
    re->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                             PCRE2_UTF | PCRE2_UCP, &err, &offset, nullptr);
    if (re->code == nullptr) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof(msg));
      return Status::InvalidArgument(source + ": pre-tokenizer regex /" + pattern +
                                     "/ does not compile at offset " + std::to_string(offset) +
                                     ": " + reinterpret_cast<const char*>(msg));
    }
    // JIT is an optimisation only: pcre2_match falls back to the interpreter without it.
    pcre2_jit_compile(re->code, PCRE2_JIT_COMPLETE);
    t->regexes_.push_back(std::move(re));
  }
  t->added_ = AddedTokenMatcher(vocab.added_tokens);

  FingerprintHasher h;
  h.AddString("shotdb-bpe-v1");
  h.AddInt(n);
  for (const std::string& tok : vocab.tokens) h.AddString(tok);
  h.AddInt(static_cast<int64_t>(vocab.merges.size()));
  for (const auto& [l, r] : vocab.merges) {
    h.AddString(l);
    h.AddString(r);
  }
  h.AddInt(static_cast<int64_t>(vocab.added_tokens.size()));
  for (const AddedToken& a : vocab.added_tokens) {
    h.AddInt(a.id);
    h.AddString(a.content);
    h.AddInt(a.special);
  }
  h.AddInt(static_cast<int64_t>(vocab.pre_tokenizer_regexes.size()));
  for (const std::string& re : vocab.pre_tokenizer_regexes) h.AddString(re);
  h.AddInt(vocab.ignore_merges);
  h.AddInt(vocab.unk_id);
  h.AddInt(vocab.bos_id);
  h.AddInt(vocab.add_bos);
  t->fingerprint_ = h.HexDigest();
  t->vocab_ = std::move(vocab);
  return t;
}

std::vector<std::string_view> BpeTokenizer::PreTokenize(std::string_view text) const {
  std::vector<std::string_view> pieces{text};
  for (const auto& re : regexes_) {
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(re->code, nullptr);
    std::vector<std::string_view> next;
    next.reserve(pieces.size() * 2);
    for (std::string_view piece : pieces) {
      size_t pos = 0;   // search start
      size_t emit = 0;  // end of what has been emitted
      while (pos < piece.size()) {
        int rc = pcre2_match(re->code, reinterpret_cast<PCRE2_SPTR>(piece.data()), piece.size(),
                             pos, PCRE2_NO_UTF_CHECK, md, nullptr);
        if (rc < 0) break;  // no further match (the input was validated as UTF-8)
        const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
        size_t begin = ov[0], end = ov[1];
        if (begin > emit) next.push_back(piece.substr(emit, begin - emit));
        if (end > begin) {
          next.push_back(piece.substr(begin, end - begin));
          emit = pos = end;
        } else {
          emit = begin;
          pos = begin + Utf8SequenceLength(static_cast<unsigned char>(piece[begin]));
        }
      }
      if (emit < piece.size()) next.push_back(piece.substr(emit));
    }
    pcre2_match_data_free(md);
    pieces = std::move(next);
  }
  return pieces;
}

std::vector<int32_t> BpeTokenizer::MergePiece(std::string_view piece) const {
  if (vocab_.ignore_merges) {
    auto it = token_to_id_.find(ByteLevelForm(piece));
    if (it != token_to_id_.end()) return {it->second};
  }
  // A doubly linked list of symbols; merged-away symbols get id -1. Candidate merges wait in a
  // min-heap by (rank, position) and are re-validated when popped, so each merge costs O(log n).
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
  };
  std::vector<Symbol> syms;
  syms.reserve(piece.size());
  for (char c : piece) {
    int32_t id = byte_to_id_[static_cast<unsigned char>(c)];
    if (id < 0) id = vocab_.unk_id;
    if (id < 0) continue;
    int32_t i = static_cast<int32_t>(syms.size());
    syms.push_back({id, i - 1, i + 1});
  }
  if (syms.empty()) return {};
  syms.back().next = -1;

  struct Candidate {
    int32_t rank;
    int32_t left;
    int32_t left_id;
    int32_t right_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : left > o.left;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  auto push = [&](int32_t left) {
    int32_t right = syms[left].next;
    if (right < 0) return;
    uint64_t key =
        (static_cast<uint64_t>(syms[left].id) << 32) | static_cast<uint32_t>(syms[right].id);
    auto it = merges_.find(key);
    if (it != merges_.end()) heap.push({it->second.rank, left, syms[left].id, syms[right].id});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(syms.size()); ++i) push(i);
  while (!heap.empty()) {
    Candidate c = heap.top();
    heap.pop();
    Symbol& l = syms[c.left];
    if (l.id != c.left_id || l.next < 0 || syms[l.next].id != c.right_id) continue;  // stale
    Symbol& r = syms[l.next];
    l.id = merges_.at((static_cast<uint64_t>(c.left_id) << 32) | static_cast<uint32_t>(c.right_id))
               .result;
    r.id = -1;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = c.left;
    if (l.prev >= 0) push(l.prev);
    push(c.left);
  }
  std::vector<int32_t> out;
  for (int32_t i = 0; i >= 0; i = syms[i].next) out.push_back(syms[i].id);
  return out;
}

void BpeTokenizer::EncodePiece(std::string_view piece, std::vector<int32_t>* out) const {
  std::string key(piece);
  {
    std::lock_guard<std::mutex> lock(cache_mu_);
    auto it = cache_.find(key);
    if (it != cache_.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids = MergePiece(piece);
  out->insert(out->end(), ids.begin(), ids.end());
  std::lock_guard<std::mutex> lock(cache_mu_);
  if (cache_.size() >= kMaxCacheEntries) cache_.clear();
  cache_.emplace(std::move(key), std::move(ids));
}

Result<std::vector<int32_t>> BpeTokenizer::Encode(std::string_view text, bool add_bos,
                                                  bool parse_special) const {
  if (!IsValidUtf8(text)) {
    return Status::InvalidArgument("BpeTokenizer::Encode: text is not valid UTF-8");
  }
  std::vector<int32_t> ids;
  if (add_bos && vocab_.bos_id >= 0) ids.push_back(vocab_.bos_id);
  for (const TextFragment& f : added_.Split(text, parse_special)) {
    if (f.token_id >= 0) {
      ids.push_back(f.token_id);
      continue;
    }
    for (std::string_view piece : PreTokenize(f.text)) EncodePiece(piece, &ids);
  }
  return ids;
}

std::string BpeTokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) {
    if (id >= 0 && static_cast<size_t>(id) < id_to_bytes_.size()) out += id_to_bytes_[id];
  }
  return out;
}

std::string BpeTokenizer::TokenText(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= vocab_.tokens.size()) return "";
  return vocab_.tokens[id];
}

// ---- Hugging Face tokenizer.json
// -----------------------------------------------------------------

namespace {

using Json = nlohmann::json;

Result<Json> ReadJson(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IOError(path + ": cannot open for reading");
  std::stringstream ss;
  ss << in.rdbuf();
  Json j = Json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Status::Corruption(path + ": not valid JSON");
  return j;
}

// Appends the regex stages of HF pre-tokenizer `pt` (at JSON path `where`) to `out`.
Status ParsePreTokenizer(const Json& pt, const std::string& file, const std::string& where,
                         std::vector<std::string>* out, bool* byte_level) {
  if (!pt.is_object() || !pt.contains("type") || !pt["type"].is_string()) {
    return Status::Corruption(file + ": " + where + " must be an object with a string \"type\"");
  }
  const std::string type = pt["type"];
  if (type == "Sequence") {
    if (!pt.contains("pretokenizers") || !pt["pretokenizers"].is_array()) {
      return Status::Corruption(file + ": " + where + ".pretokenizers must be an array");
    }
    for (size_t i = 0; i < pt["pretokenizers"].size(); ++i) {
      SHOTDB_RETURN_IF_ERROR(ParsePreTokenizer(pt["pretokenizers"][i], file,
                                               where + ".pretokenizers[" + std::to_string(i) + "]",
                                               out, byte_level));
    }
    return Status::OK();
  }
  if (type == "ByteLevel") {
    if (pt.value("add_prefix_space", false)) {
      return Status::NotSupported(file + ": " + where + ".add_prefix_space = true");
    }
    if (pt.value("use_regex", true)) out->push_back(kGpt2PreTokenizerRegex);
    *byte_level = true;
    return Status::OK();
  }
  if (type == "Digits") {
    out->push_back(pt.value("individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)");
    return Status::OK();
  }
  if (type == "Split") {
    if (pt.value("behavior", std::string()) != "Isolated" || pt.value("invert", false)) {
      return Status::NotSupported(file + ": " + where +
                                  ": only Split with behavior \"Isolated\" and invert false");
    }
    const Json& p = pt.contains("pattern") ? pt["pattern"] : Json();
    if (p.is_object() && p.contains("Regex") && p["Regex"].is_string()) {
      out->push_back(p["Regex"].get<std::string>());
    } else if (p.is_object() && p.contains("String") && p["String"].is_string()) {
      out->push_back(QuoteRegex(p["String"].get<std::string>()));
    } else {
      return Status::Corruption(file + ": " + where +
                                ".pattern must be {\"Regex\": ...} or {\"String\": ...}");
    }
    return Status::OK();
  }
  return Status::NotSupported(file + ": " + where + ".type \"" + type +
                              "\" (supported: Sequence, ByteLevel, Digits, Split)");
}

// bos from a TemplateProcessing post-processor whose single template starts with a special token.
void BosFromPostProcessor(const Json& pp, int32_t* bos, bool* add_bos) {
  if (!pp.is_object()) return;
  if (pp.value("type", std::string()) == "Sequence" && pp.contains("processors") &&
      pp["processors"].is_array()) {
    for (const Json& p : pp["processors"]) BosFromPostProcessor(p, bos, add_bos);
    return;
  }
  if (pp.value("type", std::string()) != "TemplateProcessing") return;
  const Json& single = pp.contains("single") ? pp["single"] : Json();
  if (!single.is_array() || single.empty() || !single[0].contains("SpecialToken")) return;
  const Json name = single[0]["SpecialToken"].value("id", Json());
  if (!name.is_string() || !pp.contains("special_tokens")) return;
  const Json& st = pp["special_tokens"];
  if (!st.contains(name.get<std::string>())) return;
  const Json& ids = st[name.get<std::string>()].value("ids", Json());
  if (ids.is_array() && ids.size() == 1 && ids[0].is_number_integer()) {
    *bos = ids[0].get<int32_t>();
    *add_bos = true;
  }
}

}  // namespace

Result<std::unique_ptr<BpeTokenizer>> BpeTokenizer::FromHfJson(
    const std::string& path, const std::string& tokenizer_config_path) {
  // Optional fields are read with nlohmann::json's value(), which throws when a field has another
  // type than expected (e.g. "type": 5): that is a malformed file, reported, not an exception.
  try {
    return FromHfJsonUnguarded(path, tokenizer_config_path);
  } catch (const Json::exception& e) {
    return Status::Corruption(path + " (or " + tokenizer_config_path + "): " + e.what());
  }
}

Result<std::unique_ptr<BpeTokenizer>> BpeTokenizer::FromHfJsonUnguarded(
    const std::string& path, const std::string& tokenizer_config_path) {
  SHOTDB_ASSIGN_OR_RETURN(Json j, ReadJson(path));
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object()) {
    return Status::Corruption(path + ": missing object \"model\"");
  }
  const Json& model = j["model"];
  const std::string type = model.value("type", std::string("BPE"));
  if (type != "BPE") {
    return Status::NotSupported(path + ": model.type \"" + type + "\" (only BPE)");
  }
  if (j.contains("normalizer") && !j["normalizer"].is_null()) {
    return Status::NotSupported(path + ": normalizer (only byte-level BPE without a normalizer)");
  }
  if (!model.value("dropout", Json()).is_null() || model.value("byte_fallback", false) ||
      !model.value("continuing_subword_prefix", Json()).is_null() ||
      !model.value("end_of_word_suffix", Json()).is_null()) {
    return Status::NotSupported(path +
                                ": model.dropout / byte_fallback / continuing_subword_prefix / "
                                "end_of_word_suffix");
  }

  BpeVocab v;
  if (!model.contains("vocab") || !model["vocab"].is_object()) {
    return Status::Corruption(path + ": model.vocab must be an object of token -> id");
  }
  int64_t max_id = -1;
  for (const auto& [tok, id] : model["vocab"].items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
      return Status::Corruption(path + ": model.vocab[\"" + tok + "\"] must be an id >= 0");
    }
    max_id = std::max(max_id, id.get<int64_t>());
  }
  const Json added = j.value("added_tokens", Json::array());
  if (!added.is_array()) return Status::Corruption(path + ": added_tokens must be an array");
  for (size_t i = 0; i < added.size(); ++i) {
    const Json& a = added[i];
    if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() ||
        !a.contains("content") || !a["content"].is_string()) {
      return Status::Corruption(path + ": added_tokens[" + std::to_string(i) +
                                "] needs an integer \"id\" and a string \"content\"");
    }
    v.added_tokens.push_back(
        {a["id"].get<int32_t>(), a["content"].get<std::string>(), a.value("special", false)});
    max_id = std::max<int64_t>(max_id, a["id"].get<int32_t>());
  }
  // Ids are dense in practice; a far larger id is damage, not a sparse vocabulary.
  const size_t entries = model["vocab"].size() + added.size();
  if (max_id >= static_cast<int64_t>(entries)) {
    return Status::Corruption(path + ": token id " + std::to_string(max_id) + " but only " +
                              std::to_string(entries) + " vocab and added entries");
  }
  v.tokens.resize(static_cast<size_t>(max_id + 1));
  for (const auto& [tok, id] : model["vocab"].items()) v.tokens[id.get<int64_t>()] = tok;
  for (const AddedToken& a : v.added_tokens) {
    if (a.id >= 0) v.tokens[a.id] = a.content;
  }

  if (!model.contains("merges") || !model["merges"].is_array()) {
    return Status::Corruption(path + ": model.merges missing (must be an array of merges)");
  }
  const Json& merges = model["merges"];
  v.merges.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const Json& m = merges[i];
    if (m.is_string()) {
      const std::string s = m;
      size_t sp = s.find(' ');
      if (sp == std::string::npos || sp == 0 || sp + 1 == s.size() ||
          s.find(' ', sp + 1) != std::string::npos) {
        return Status::Corruption(path + ": model.merges[" + std::to_string(i) + "] \"" + s +
                                  "\" is not two tokens separated by one space");
      }
      v.merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      v.merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else {
      return Status::Corruption(path + ": model.merges[" + std::to_string(i) +
                                "] must be \"a b\" or [\"a\", \"b\"]");
    }
  }
  v.ignore_merges = model.value("ignore_merges", false);
  const Json unk = model.value("unk_token", Json());
  if (unk.is_string()) {
    auto it = model["vocab"].find(unk.get<std::string>());
    if (it == model["vocab"].end()) {
      return Status::Corruption(path + ": model.unk_token \"" + unk.get<std::string>() +
                                "\" is not in model.vocab");
    }
    v.unk_id = it->get<int32_t>();
  }

  bool byte_level = false;
  const Json pre = j.value("pre_tokenizer", Json());
  if (!pre.is_null()) {
    SHOTDB_RETURN_IF_ERROR(
        ParsePreTokenizer(pre, path, "pre_tokenizer", &v.pre_tokenizer_regexes, &byte_level));
  }
  if (!byte_level) {
    return Status::NotSupported(path +
                                ": pre_tokenizer has no ByteLevel step (only byte-level "
                                "BPE is supported)");
  }

  BosFromPostProcessor(j.value("post_processor", Json()), &v.bos_id, &v.add_bos);
  if (!tokenizer_config_path.empty() && std::ifstream(tokenizer_config_path).good()) {
    SHOTDB_ASSIGN_OR_RETURN(Json cfg, ReadJson(tokenizer_config_path));
    auto token_id = [&](const char* key, int32_t* id) -> Status {
      if (!cfg.contains(key) || cfg[key].is_null()) return Status::OK();
      const Json& t = cfg[key];
      std::string content = t.is_object() ? t.value("content", std::string())
                                          : (t.is_string() ? t.get<std::string>() : "");
      for (size_t i = 0; i < v.tokens.size(); ++i) {
        if (v.tokens[i] == content) {
          *id = static_cast<int32_t>(i);
          return Status::OK();
        }
      }
      return Status::Corruption(tokenizer_config_path + ": " + key + " \"" + content +
                                "\" is not in the vocabulary of " + path);
    };
    SHOTDB_RETURN_IF_ERROR(token_id("bos_token", &v.bos_id));
    SHOTDB_RETURN_IF_ERROR(token_id("eos_token", &v.eos_id));
    if (cfg.contains("add_bos_token") && cfg["add_bos_token"].is_boolean()) {
      v.add_bos = cfg["add_bos_token"].get<bool>();
    }
  }
  return Create(std::move(v), path);
}

}  // namespace shotdb
