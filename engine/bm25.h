// BM25 scoring with the exact semantics of rank_bm25's BM25Okapi (the DBSA reference retriever).
//
// For a corpus of N documents with average length avgdl, a term with document frequency df has
//   idf(df) = log(N - df + 0.5) - log(df + 0.5)
// and, because idf is negative for terms in more than half of the documents, rank_bm25 replaces
// every negative idf by epsilon * average_idf, where average_idf is the mean of the raw idf over
// the WHOLE vocabulary (every distinct term of the corpus, not just the query's). A document's
// score for a query is
//   sum over query tokens q (duplicates count again) of
//     idf(q) * tf(q) * (k1 + 1) / (tf(q) + k1 * (1 - b + b * dl / avgdl))
// where tf(q) is q's count in the document and dl the document's length in tokens; a query token
// that occurs in no document adds 0. docs/bm25.md gives the derivation and the parity notes.
//
// average_idf depends on every term's df, so appending a document would naively cost O(vocabulary).
// Bm25CorpusStats instead keeps a histogram df -> number of terms with that df: idf depends on df
// only, so sum(idf) = sum over d of count[d] * idf(d), which costs O(distinct df values), and an
// appended document changes the histogram only at its own terms' dfs.
//
// Thread-safety: Bm25CorpusStats and Bm25MemoryIndex are plain values (concurrent const use is
// safe, mutation needs external synchronization); Bm25Scorer is immutable after construction.
#ifndef SHOTDB_ENGINE_BM25_H_
#define SHOTDB_ENGINE_BM25_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

#include "util/status.h"

namespace shotdb {

// How a term's idf is computed.
enum class Bm25Idf : uint8_t {
  // rank_bm25's BM25Okapi: log(N - df + 0.5) - log(df + 0.5), negative values replaced by
  // epsilon * average_idf (see the file comment).
  kOkapi = 0,
  // Lucene's and retriv's: log(1 + (N - df + 0.5) / (df + 0.5)), never negative; epsilon unused.
  kLucene = 1,
};

// rank_bm25's BM25Okapi defaults, which are also the DBSA paper's.
struct Bm25Params {
  double k1 = 1.5;
  double b = 0.75;
  double epsilon = 0.25;
  Bm25Idf idf = Bm25Idf::kOkapi;

  // retriv's SparseRetriever defaults (k1 = 1.2, b = 0.75, Lucene idf): the DBSA reference code's
  // retriever.
  static Bm25Params Retriv() { return {1.2, 0.75, 0.25, Bm25Idf::kLucene}; }
  bool operator==(const Bm25Params& o) const {
    return k1 == o.k1 && b == o.b && epsilon == o.epsilon && idf == o.idf;
  }
};

// Everything corpus-wide that BM25 needs, small enough to persist as one record and update in the
// same transaction as each appended document.
struct Bm25CorpusStats {
  uint64_t num_docs = 0;
  uint64_t total_doc_length = 0;  // sum of all documents' lengths in tokens
  // df -> number of distinct terms with that df. Only df >= 1 appears; a count is never 0 (entries
  // that drop to 0 are erased), so two stats of the same corpus compare equal.
  std::map<uint32_t, uint64_t> df_histogram;

  // Records one appended document of `doc_length` tokens whose DISTINCT terms had, before this
  // document was added, the document frequencies `term_dfs_before` (0 for a term new to the corpus;
  // one entry per distinct term, in any order). Afterwards each such term has df + 1.
  // Returns InvalidArgument, leaving the stats unchanged, when the input cannot describe a document
  // of this corpus: more distinct terms than doc_length, a df above num_docs, or more terms with
  // some df d >= 1 than df_histogram counts (which means the caller's index and these stats
  // disagree).
  Status AddDocument(uint32_t doc_length, const std::vector<uint32_t>& term_dfs_before);

  // Number of distinct terms in the corpus (the sum of the histogram's counts).
  uint64_t vocabulary_size() const;

  bool operator==(const Bm25CorpusStats& other) const {
    return num_docs == other.num_docs && total_doc_length == other.total_doc_length &&
           df_histogram == other.df_histogram;
  }
  bool operator!=(const Bm25CorpusStats& other) const { return !(*this == other); }
};

// The per-corpus constants of a BM25 query (avgdl, average_idf, the epsilon floor), computed once
// from a snapshot of Bm25CorpusStats. Does not keep a reference to the stats.
class Bm25Scorer {
 public:
  // avgdl = total_doc_length / num_docs and average_idf = sum(idf) / vocabulary_size, each 0 when
  // its denominator is 0 (rank_bm25 raises ZeroDivisionError there instead).
  explicit Bm25Scorer(const Bm25CorpusStats& stats, const Bm25Params& params = {});

  // The idf of a term with document frequency `df`. kOkapi: with rank_bm25's epsilon floor, raw idf
  // if it is >= 0, else epsilon * average_idf(). kLucene: log(1 + (N - df + 0.5) / (df + 0.5)).
  // Returns 0 for df == 0 (a term in no document; rank_bm25 adds 0 for it, retriv drops it).
  // Precondition: df <= num_docs (a larger df yields NaN).
  double Idf(uint32_t df) const;

  // One query token's contribution to a document of `doc_length` tokens in which it occurs `tf`
  // times: idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * doc_length / avgdl)), evaluated in the
  // same operation order as rank_bm25, so for the same idf the result is bit-identical to its numpy
  // expression. (Floored idfs may still differ from rank_bm25's in the last bits, ~1e-15 relative:
  // average_idf is summed per df value here, per term in dictionary order there.)
  // Returns 0 when tf == 0.
  double TermScore(double idf, uint32_t tf, uint32_t doc_length) const;

  double average_idf() const { return average_idf_; }
  double avgdl() const { return avgdl_; }
  uint64_t num_docs() const { return num_docs_; }
  const Bm25Params& params() const { return params_; }

 private:
  Bm25Params params_;
  uint64_t num_docs_ = 0;
  double avgdl_ = 0;
  double average_idf_ = 0;
  double idf_floor_ = 0;  // epsilon * average_idf
};

struct Posting {
  uint32_t doc;
  uint32_t tf;  // >= 1
};

// One query token occurrence: its document frequency and its posting list, sorted by doc ascending,
// one posting per document containing the term (so postings.size() == df for a consistent index).
// An unknown token is {0, {}}; a token that occurs twice in the query appears twice.
struct QueryTerm {
  uint32_t df = 0;
  std::vector<Posting> postings;
};

struct ScoredDoc {
  uint32_t doc;
  double score;
  bool operator==(const ScoredDoc& other) const { return doc == other.doc && score == other.score; }
};

// The k best documents of 0..num_docs-1 for the query `terms`, i.e. exactly the first
// min(k, num_docs) entries of the full score vector (what rank_bm25's get_scores returns) ordered
// by score descending, ties broken by doc ascending. (This tie rule is deterministic; rank_bm25's
// get_top_n, np.argsort(scores)[::-1], orders ties by its unstable sort, typically highest id
// first.)
//
// The work is driven by the posting lists: only documents in some list are scored, each calling
// doc_length(doc) once (the callback must return that document's length in tokens). Time is
// O(total postings + listed documents * log k) plus O(num_docs) for a zeroed per-query
// accumulator (about 12 bytes per document), which is cheaper than merging the lists for the block
// counts DBSA uses. Documents in no list score exactly 0; they appear in the result, lowest doc ids
// first, only when fewer than k listed documents score > 0 (or when listed ones score below 0,
// which happens when the epsilon floor is negative). Per document the contributions are summed in
// query-token order, like rank_bm25, so scores are bit-identical to TermScore sums in that order.
// Preconditions: every posting's doc < num_docs and each list is sorted by doc ascending without
// duplicates (checked with assert; a release build ignores postings with doc >= num_docs, and an
// unsorted list still yields correct sums, so callers validate what they read from disk).
std::vector<ScoredDoc> Bm25TopK(const Bm25Scorer& scorer, const std::vector<QueryTerm>& terms,
                                uint32_t num_docs,
                                const std::function<uint32_t(uint32_t doc)>& doc_length, size_t k);

// A complete in-memory BM25 index over pre-tokenized documents: the reference implementation that
// tests compare the persisted index against, and the baseline in the benchmarks.
class Bm25MemoryIndex {
 public:
  explicit Bm25MemoryIndex(Bm25Params params = {});

  // Appends a document (its tokens, duplicates counted) and returns its id: 0, 1, 2, ... in order
  // of addition. An empty document is allowed (length 0). Updates the corpus stats incrementally
  // and rebuilds the scorer (O(distinct df values)).
  uint32_t Add(const std::vector<std::string>& doc_tokens);

  // The score of every document, indexed by doc id: rank_bm25's get_scores(query_tokens), computed
  // by visiting every document (the exhaustive baseline). Empty when there are no documents.
  std::vector<double> Scores(const std::vector<std::string>& query_tokens) const;

  // Bm25TopK over this index's posting lists: same scores as Scores(), same order rule.
  std::vector<ScoredDoc> TopK(const std::vector<std::string>& query_tokens, size_t k) const;

  const Bm25CorpusStats& stats() const { return stats_; }
  uint32_t num_docs() const { return static_cast<uint32_t>(doc_lengths_.size()); }
  uint32_t doc_length(uint32_t doc) const { return doc_lengths_[doc]; }

 private:
  Bm25Params params_;
  Bm25CorpusStats stats_;
  Bm25Scorer scorer_;  // of stats_, rebuilt by Add() so that queries do not pay for it
  std::vector<uint32_t> doc_lengths_;
  std::unordered_map<std::string, std::vector<Posting>> postings_;  // term -> postings by doc
  // Per document, term -> tf: what Scores() visits, like rank_bm25's doc_freqs.
  std::vector<std::unordered_map<std::string, uint32_t>> doc_term_freqs_;
};

}  // namespace shotdb

#endif  // SHOTDB_ENGINE_BM25_H_
