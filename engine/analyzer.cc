#include "engine/analyzer.h"

#include <libstemmer.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "util/utf8.h"

namespace shotdb {
namespace {

// Generated at configure time (engine/CMakeLists.txt): kDefaultStopwords[] and
// kDefaultStopwordsSource.
#include "default_stopwords.inc"

// One decoded character of a UTF-8 string. A byte that does not start a valid sequence decodes to
// kInvalid + the byte, with length 1: outside Unicode, so it is never whitespace, punctuation or a
// digit, and no input is rejected.
constexpr uint32_t kInvalid = 0x110000;
struct Char {
  uint32_t cp = 0;
  size_t len = 1;
  bool invalid() const { return cp >= kInvalid; }
};

Char DecodeAt(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[i + k]); };
  const unsigned char c = b(0);
  if (c < 0x80) return {c, 1};
  size_t n = 0;
  uint32_t cp = 0, min = 0;
  if ((c & 0xE0) == 0xC0) {
    n = 2, cp = c & 0x1F, min = 0x80;
  } else if ((c & 0xF0) == 0xE0) {
    n = 3, cp = c & 0x0F, min = 0x800;
  } else if ((c & 0xF8) == 0xF0) {
    n = 4, cp = c & 0x07, min = 0x10000;
  } else {
    return {kInvalid + c, 1};
  }
  if (i + n > s.size()) return {kInvalid + c, 1};
  for (size_t k = 1; k < n; ++k) {
    if ((b(k) & 0xC0) != 0x80) return {kInvalid + c, 1};
    cp = (cp << 6) | (b(k) & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return {kInvalid + c, 1};
  return {cp, n};
}

// Python's str.isspace().
bool IsUnicodeSpace(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// Python's string.punctuation.
bool IsAsciiPunctuation(uint32_t cp) {
  return cp < 0x80 && cp != 0 && std::strchr("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", int(cp));
}

// Steps 1-3: ASCII lowercasing, the ampersand and the typographic quotes and dash.
std::string LowerAndMapSpecials(std::string_view text) {
  std::string out;
  out.reserve(text.size() + 8);
  for (size_t i = 0; i < text.size();) {
    const Char c = DecodeAt(text, i);
    if (c.invalid()) {  // an undecodable byte: kept as it is
      out.push_back(text[i]);
    } else if (c.cp >= 'A' && c.cp <= 'Z') {
      out.push_back(static_cast<char>(c.cp - 'A' + 'a'));
    } else if (c.cp == '&') {
      out += " and ";
    } else if (c.cp == 0x2018 || c.cp == 0x2019 || c.cp == 0xB4) {
      out.push_back('\'');
    } else if (c.cp == 0x201C || c.cp == 0x201D) {
      out.push_back('"');
    } else if (c.cp == 0x2013) {
      out.push_back('-');
    } else {
      out.append(text.substr(i, c.len));
    }
    i += c.len;
  }
  return out;
}

// Steps 4-5: acronym dots (lookaheads read the text before any deletion, as re.sub does), then
// punctuation to spaces.
std::string DropDotsAndPunctuation(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    const Char c = DecodeAt(text, i);
    if (c.cp == '.') {
      bool keep = false;
      const size_t j = i + 1;
      if (j < text.size()) {
        const Char c1 = DecodeAt(text, j);
        if (c1.cp >= '0' && c1.cp <= '9') {
          keep = true;
        } else if (!IsUnicodeSpace(c1.cp) && j + c1.len < text.size()) {
          const Char c2 = DecodeAt(text, j + c1.len);
          keep = c2.cp != '.' && c2.cp != ' ';
        }
      }
      // A kept dot is punctuation and becomes a space in step 5 anyway.
      if (keep) out.push_back(' ');
    } else if (IsAsciiPunctuation(c.cp)) {
      out.push_back(' ');
    } else {
      out.append(text.substr(i, c.len));
    }
    i += c.len;
  }
  return out;
}

size_t CountChars(std::string_view s) {
  size_t n = 0;
  for (size_t i = 0; i < s.size(); i += DecodeAt(s, i).len) ++n;
  return n;
}

std::string AsciiLower(std::string s) {
  for (char& c : s) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return s;
}

}  // namespace

AnalyzerOptions AnalyzerOptions::Retriv(std::vector<std::string> stopwords) {
  AnalyzerOptions o;
  o.kind = Kind::kRetriv;
  o.tokenizer.lowercase = true;
  o.tokenizer.split = TextTokenizerOptions::Split::kWhitespace;
  o.stopwords = std::move(stopwords);
  return o;
}

std::string AnalyzerOptions::Describe() const {
  if (kind == Kind::kRetriv) {
    return "retriv (english stemmer, " + std::to_string(stopwords.size()) + " stop words)";
  }
  return "simple " + tokenizer.Serialize();
}

const std::vector<std::string>& DefaultStopwords() {
  static const std::vector<std::string>* words = [] {
    auto* v = new std::vector<std::string>();
    for (const char* w : kDefaultStopwords) {
      if (*w) v->emplace_back(w);
    }
    return v;
  }();
  return *words;
}

std::string_view DefaultStopwordsSource() { return kDefaultStopwordsSource; }

Result<std::vector<std::string>> ReadStopwordFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Status::IOError(path + ": cannot open stop word file: " + std::strerror(errno));
  std::vector<std::string> words;
  std::string line;
  for (size_t number = 1; std::getline(in, line); ++number) {
    const std::string where = path + " line " + std::to_string(number);
    if (!IsValidUtf8(line)) return Status::InvalidArgument(where + ": not valid UTF-8");
    const auto space = [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; };
    size_t b = 0, e = line.size();
    while (b < e && space(line[b])) ++b;
    while (e > b && space(line[e - 1])) --e;
    const std::string word = line.substr(b, e - b);
    if (word.empty() || word[0] == '#') continue;
    for (size_t i = 0; i < word.size();) {
      const Char c = DecodeAt(word, i);
      if (IsUnicodeSpace(c.cp)) {
        return Status::InvalidArgument(where + ": \"" + word +
                                       "\" holds whitespace; one word per line");
      }
      i += c.len;
    }
    words.push_back(word);
  }
  if (in.bad()) return Status::IOError(path + ": read failed");
  return words;
}

std::vector<std::string> RetrivSplit(std::string_view text) {
  const std::string normal = DropDotsAndPunctuation(LowerAndMapSpecials(text));
  std::vector<std::string> tokens;
  size_t start = std::string::npos;
  for (size_t i = 0; i < normal.size();) {
    const Char c = DecodeAt(normal, i);
    if (IsUnicodeSpace(c.cp)) {
      if (start != std::string::npos) tokens.push_back(normal.substr(start, i - start));
      start = std::string::npos;
    } else if (start == std::string::npos) {
      start = i;
    }
    i += c.len;
  }
  if (start != std::string::npos) tokens.push_back(normal.substr(start));
  return tokens;
}

Result<Analyzer> Analyzer::Create(const AnalyzerOptions& options) {
  Analyzer a(options);
  switch (options.kind) {
    case AnalyzerOptions::Kind::kSimple:
      if (!options.stopwords.empty()) {
        return Status::InvalidArgument("the simple analyzer takes no stop words");
      }
      return a;
    case AnalyzerOptions::Kind::kRetriv:
      break;
    default:
      return Status::InvalidArgument(
          "analyzer kind " + std::to_string(static_cast<int>(options.kind)) + " is not known");
  }
  a.stemmer_ = sb_stemmer_new("english", "UTF_8");
  if (a.stemmer_ == nullptr) {
    return Status::NotSupported("libstemmer has no English (UTF-8) stemmer");
  }
  for (const std::string& word : options.stopwords) {
    if (word.empty()) return Status::InvalidArgument("the stop list holds an empty word");
    a.stop_.insert(a.Stem(AsciiLower(word)));
  }
  return a;
}

Analyzer::Analyzer(Analyzer&& o) noexcept
    : options_(std::move(o.options_)), stemmer_(o.stemmer_), stop_(std::move(o.stop_)) {
  o.stemmer_ = nullptr;
}

Analyzer& Analyzer::operator=(Analyzer&& o) noexcept {
  if (this != &o) {
    if (stemmer_ != nullptr) sb_stemmer_delete(stemmer_);
    options_ = std::move(o.options_);
    stemmer_ = o.stemmer_;
    stop_ = std::move(o.stop_);
    o.stemmer_ = nullptr;
  }
  return *this;
}

Analyzer::~Analyzer() {
  if (stemmer_ != nullptr) sb_stemmer_delete(stemmer_);
}

std::string Analyzer::Stem(const std::string& word) {
  // NLTK's SnowballStemmer returns words of at most two characters unchanged; libstemmer agrees on
  // every such word we know of, and keeping the rule makes the two equal by construction there.
  if (CountChars(word) <= 2) return word;
  const sb_symbol* out = sb_stemmer_stem(stemmer_, reinterpret_cast<const sb_symbol*>(word.data()),
                                         static_cast<int>(word.size()));
  if (out == nullptr) return word;  // libstemmer is out of memory; the word itself still matches
  return std::string(reinterpret_cast<const char*>(out),
                     static_cast<size_t>(sb_stemmer_length(stemmer_)));
}

std::vector<std::string> Analyzer::Terms(std::string_view text) {
  if (options_.kind == AnalyzerOptions::Kind::kSimple)
    return TokenizeText(text, options_.tokenizer);
  std::vector<std::string> terms;
  for (std::string& token : RetrivSplit(text)) {
    if (stop_.count(token)) continue;
    terms.push_back(Stem(token));
  }
  return terms;
}

}  // namespace shotdb
