// Analyzer: how a task turns text (block texts, demonstrations, queries) into the terms its BM25
// indexes count. A task persists its AnalyzerOptions; its queries must be analyzed exactly as its
// documents were, so every analyzer is deterministic and locale-free.
//
// Two kinds:
//   - kSimple (the default of stores before format 2, and of rank_bm25 parity): TokenizeText with
//     the task's TextTokenizerOptions (case, split; engine/text_tokenizer.h), nothing else.
//   - kRetriv: the analyzer of the DBSA reference code, i.e. retriv 0.2.3's SparseRetriever with
//   its
//     defaults (tokenizer "whitespace", stemmer "english", stop words, lowercasing, ampersand,
//     special-character and acronym normalisation, punctuation removal). In order:
//       1. lowercase (ASCII letters only: retriv's str.lower() also folds non-ASCII letters; see
//          below);
//       2. "&" -> " and ";
//       3. U+2018, U+2019, U+00B4 -> "'", U+201C, U+201D -> '"', U+2013 -> "-";
//       4. acronym dots: a "." is deleted unless the next character is an ASCII digit, or the next
//          two characters are a non-whitespace character followed by one that is neither "." nor
//          " " (Python: re.sub(r"\.(?!(\S[^. ])|\d)", "", x));
//       5. every ASCII punctuation character (Python's string.punctuation) -> " ";
//       6. split on whitespace as Python's str.split() does (ASCII whitespace, the ASCII
//          separators 0x1C-0x1F, U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F,
//          U+205F, U+3000);
//       7. drop every token that equals a STEMMED stop word (retriv stems its stop list once and
//          compares the unstemmed tokens against it: "does" stays, because the list holds "doe");
//       8. stem each token with the Snowball English stemmer (libstemmer).
//     Parity with retriv itself is tested on a corpus that includes these edge cases
//     (engine/analyzer_test.cc, goldens from tests/scripts/make_retriv_golden.py). Known
//     differences: non-ASCII upper-case letters are not lowered; Unicode digits other than 0-9
//     do not count as digits in step 4; invalid UTF-8 bytes are kept as word bytes (Python would
//     not have decoded the text at all). retriv's English stemmer is NLTK's SnowballStemmer
//     ("english"); on the 32,646 words of Snowball's English test vocabulary and the NLU data it
//     stems every word exactly as libstemmer 2.2 does (docs/bm25.md).
//
// Thread-safety: AnalyzerOptions is a plain value. An Analyzer holds a stemmer, which is not
// thread-safe: use one Analyzer from one thread at a time (create one per thread; it is cheap).
#ifndef SHOTDB_ENGINE_ANALYZER_H_
#define SHOTDB_ENGINE_ANALYZER_H_

#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "engine/text_tokenizer.h"
#include "util/status.h"

struct sb_stemmer;

namespace shotdb {

struct AnalyzerOptions {
  enum class Kind : uint8_t { kSimple = 0, kRetriv = 1 };
  Kind kind = Kind::kSimple;
  // kSimple: how text is split and cased. Ignored by kRetriv (which lowercases and splits on
  // whitespace after its normalisation).
  TextTokenizerOptions tokenizer;
  // kRetriv: the stop list as given (one word per entry, compared after ASCII lowercasing and
  // stemming; see step 7). Empty for no stop words. Must be empty for kSimple.
  std::vector<std::string> stopwords;

  // The retriv analyzer with `stopwords` (e.g. DefaultStopwords()).
  static AnalyzerOptions Retriv(std::vector<std::string> stopwords);

  // "simple lower,nonalnum" or "retriv stopwords=174": for `shotdb info` and messages.
  std::string Describe() const;

  bool operator==(const AnalyzerOptions& o) const {
    return kind == o.kind && tokenizer == o.tokenizer && stopwords == o.stopwords;
  }
  bool operator!=(const AnalyzerOptions& o) const { return !(*this == o); }
};

// The English stop list built into this binary, taken at build time from Debian's
// liblingua-stopwords-perl (Lingua::StopWords::EN, the Snowball project's English list; see
// engine/CMakeLists.txt). Empty when that package was not installed at build time.
const std::vector<std::string>& DefaultStopwords();
// Where DefaultStopwords() came from, e.g. "Lingua::StopWords 0.12 (EN)", or "" when empty.
std::string_view DefaultStopwordsSource();

// Reads a stop list: one word per line (UTF-8), surrounding whitespace ignored, empty lines and
// lines starting with '#' skipped. Errors name the file and line: IOError when it cannot be read,
// InvalidArgument for invalid UTF-8 or a word containing whitespace.
Result<std::vector<std::string>> ReadStopwordFile(const std::string& path);

class Analyzer {
 public:
  // InvalidArgument for options that cannot be used (kSimple with stop words, an empty stop word,
  // an unknown kind); NotSupported if libstemmer has no English stemmer.
  static Result<Analyzer> Create(const AnalyzerOptions& options);

  Analyzer(Analyzer&&) noexcept;
  Analyzer& operator=(Analyzer&&) noexcept;
  ~Analyzer();

  // The terms of `text`, in order of appearance, duplicates kept (BM25 counts them). Never fails:
  // any byte string is accepted.
  std::vector<std::string> Terms(std::string_view text);

  const AnalyzerOptions& options() const { return options_; }

 private:
  explicit Analyzer(AnalyzerOptions options) : options_(std::move(options)) {}
  std::string Stem(const std::string& word);

  AnalyzerOptions options_;
  sb_stemmer* stemmer_ = nullptr;  // owned; kRetriv only
  std::set<std::string> stop_;     // stemmed stop words
};

// retriv's normalisation (steps 1-5 above) and split (step 6), without stop words and stemming;
// exposed for tests.
std::vector<std::string> RetrivSplit(std::string_view text);

}  // namespace shotdb

#endif  // SHOTDB_ENGINE_ANALYZER_H_
