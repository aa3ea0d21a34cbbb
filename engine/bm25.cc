#include "engine/bm25.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <string>
#include <utility>

namespace shotdb {
namespace {

// rank_bm25's raw idf, before the epsilon floor. Both logs are taken separately (not log of the
// quotient) because that is what rank_bm25 computes and the results differ in the last bits.
double RawIdf(uint64_t num_docs, uint64_t df) {
  return std::log(static_cast<double>(num_docs - df) + 0.5) -
         std::log(static_cast<double>(df) + 0.5);
}

// Result order: score descending, then doc ascending.
bool Better(const ScoredDoc& a, const ScoredDoc& b) {
  if (a.score != b.score) return a.score > b.score;
  return a.doc < b.doc;
}

}  // namespace

Status Bm25CorpusStats::AddDocument(uint32_t doc_length,
                                    const std::vector<uint32_t>& term_dfs_before) {
  if (term_dfs_before.size() > doc_length) {
    return Status::InvalidArgument("BM25 stats: a document of " + std::to_string(doc_length) +
                                   " tokens cannot have " + std::to_string(term_dfs_before.size()) +
                                   " distinct terms");
  }
  // Validate everything before changing anything, so a rejected call leaves the stats intact.
  std::map<uint32_t, uint64_t> removed;  // df -> terms leaving that df bucket
  for (uint32_t df : term_dfs_before) {
    if (df > num_docs) {
      return Status::InvalidArgument("BM25 stats: a term's df before the append is " +
                                     std::to_string(df) + " but the corpus has only " +
                                     std::to_string(num_docs) + " documents");
    }
    if (df > 0) ++removed[df];
  }
  for (const auto& [df, count] : removed) {
    const auto it = df_histogram.find(df);
    const uint64_t have = it == df_histogram.end() ? 0 : it->second;
    if (count > have) {
      return Status::InvalidArgument("BM25 stats: the document has " + std::to_string(count) +
                                     " terms with df " + std::to_string(df) +
                                     " but the df histogram counts only " + std::to_string(have) +
                                     " (index and stats disagree)");
    }
  }
  for (const auto& [df, count] : removed) {
    auto it = df_histogram.find(df);
    it->second -= count;
    if (it->second == 0) df_histogram.erase(it);
  }
  for (uint32_t df : term_dfs_before) ++df_histogram[df + 1];
  ++num_docs;
  total_doc_length += doc_length;
  return Status::OK();
}

uint64_t Bm25CorpusStats::vocabulary_size() const {
  uint64_t terms = 0;
  for (const auto& entry : df_histogram) terms += entry.second;
  return terms;
}

Bm25Scorer::Bm25Scorer(const Bm25CorpusStats& stats, const Bm25Params& params)
    : params_(params), num_docs_(stats.num_docs) {
  if (num_docs_ > 0) {
    avgdl_ = static_cast<double>(stats.total_doc_length) / static_cast<double>(num_docs_);
  }
  double idf_sum = 0;
  uint64_t vocabulary = 0;
  for (const auto& [df, count] : stats.df_histogram) {
    idf_sum += static_cast<double>(count) * RawIdf(num_docs_, df);
    vocabulary += count;
  }
  if (vocabulary > 0) average_idf_ = idf_sum / static_cast<double>(vocabulary);
  idf_floor_ = params_.epsilon * average_idf_;
}

double Bm25Scorer::Idf(uint32_t df) const {
  if (df == 0) return 0;
  assert(df <= num_docs_);
  if (params_.idf == Bm25Idf::kLucene) {
    const double n = static_cast<double>(num_docs_), d = static_cast<double>(df);
    return std::log(1.0 + ((n - d) + 0.5) / (d + 0.5));
  }
  const double idf = RawIdf(num_docs_, df);
  return idf < 0 ? idf_floor_ : idf;
}

double Bm25Scorer::TermScore(double idf, uint32_t tf, uint32_t doc_length) const {
  if (tf == 0) return 0;
  // Same association as rank_bm25's numpy expression
  //   idf * (tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl)))
  // so that the result is bit-identical; a document with tf > 0 has dl > 0, hence avgdl > 0.
  const double k1 = params_.k1;
  const double b = params_.b;
  const double tfd = static_cast<double>(tf);
  const double norm = (1 - b) + (b * static_cast<double>(doc_length)) / avgdl_;
  return idf * ((tfd * (k1 + 1)) / (tfd + k1 * norm));
}

std::vector<ScoredDoc> Bm25TopK(const Bm25Scorer& scorer, const std::vector<QueryTerm>& terms,
                                uint32_t num_docs,
                                const std::function<uint32_t(uint32_t doc)>& doc_length, size_t k) {
  k = std::min<size_t>(k, num_docs);
  std::vector<ScoredDoc> result;
  if (k == 0) return result;

  std::vector<double> idfs;
  idfs.reserve(terms.size());
  for (const QueryTerm& term : terms) idfs.push_back(scorer.Idf(term.df));

  // Term-at-a-time into a dense accumulator: each document's contributions are added in
  // query-token order, exactly as rank_bm25 adds them, and only listed documents are touched
  // (the O(num_docs) scratch is a few bytes per document and cheaper than a merge heap).
  std::vector<double> score(num_docs, 0.0);
  std::vector<uint32_t> length(num_docs);
  std::vector<bool> listed(num_docs, false);
  std::vector<uint32_t> scored_docs;  // listed documents, in order of first appearance
  for (size_t t = 0; t < terms.size(); ++t) {
    const std::vector<Posting>& postings = terms[t].postings;
    for (size_t i = 0; i < postings.size(); ++i) {
      const uint32_t doc = postings[i].doc;
      assert(doc < num_docs);
      assert(i == 0 || postings[i - 1].doc < doc);
      if (doc >= num_docs) continue;  // a broken precondition must not write out of bounds
      if (!listed[doc]) {
        listed[doc] = true;
        length[doc] = doc_length(doc);
        scored_docs.push_back(doc);
      }
      score[doc] += scorer.TermScore(idfs[t], postings[i].tf, length[doc]);
    }
  }

  // Positive scores first, then every score-0 document (listed or not) by doc, then negatives.
  for (uint32_t doc : scored_docs) {
    if (score[doc] > 0) result.push_back({doc, score[doc]});
  }
  if (result.size() > k) {
    std::partial_sort(result.begin(), result.begin() + k, result.end(), Better);
    result.resize(k);
    return result;
  }
  std::sort(result.begin(), result.end(), Better);
  for (uint32_t doc = 0; doc < num_docs && result.size() < k; ++doc) {
    if (score[doc] == 0) result.push_back({doc, 0.0});
  }
  if (result.size() < k) {
    std::vector<ScoredDoc> negative;
    for (uint32_t doc : scored_docs) {
      if (score[doc] < 0) negative.push_back({doc, score[doc]});
    }
    std::sort(negative.begin(), negative.end(), Better);
    negative.resize(std::min(negative.size(), k - result.size()));
    result.insert(result.end(), negative.begin(), negative.end());
  }
  return result;
}

Bm25MemoryIndex::Bm25MemoryIndex(Bm25Params params) : params_(params), scorer_(stats_, params_) {}

uint32_t Bm25MemoryIndex::Add(const std::vector<std::string>& doc_tokens) {
  const auto doc = static_cast<uint32_t>(doc_lengths_.size());
  std::unordered_map<std::string, uint32_t> tf;
  for (const std::string& token : doc_tokens) ++tf[token];
  std::vector<uint32_t> dfs_before;
  dfs_before.reserve(tf.size());
  for (const auto& [term, count] : tf) {
    std::vector<Posting>& postings = postings_[term];
    dfs_before.push_back(static_cast<uint32_t>(postings.size()));
    postings.push_back({doc, count});
  }
  const Status status = stats_.AddDocument(static_cast<uint32_t>(doc_tokens.size()), dfs_before);
  assert(status.ok());  // the dfs come from this index's own postings
  (void)status;
  scorer_ = Bm25Scorer(stats_, params_);
  doc_lengths_.push_back(static_cast<uint32_t>(doc_tokens.size()));
  doc_term_freqs_.push_back(std::move(tf));
  return doc;
}

std::vector<double> Bm25MemoryIndex::Scores(const std::vector<std::string>& query_tokens) const {
  std::vector<double> scores(num_docs(), 0.0);
  for (const std::string& token : query_tokens) {
    const auto it = postings_.find(token);
    const double idf =
        scorer_.Idf(it == postings_.end() ? 0 : static_cast<uint32_t>(it->second.size()));
    for (uint32_t doc = 0; doc < num_docs(); ++doc) {
      const auto& tf = doc_term_freqs_[doc];
      const auto found = tf.find(token);
      scores[doc] +=
          scorer_.TermScore(idf, found == tf.end() ? 0 : found->second, doc_lengths_[doc]);
    }
  }
  return scores;
}

std::vector<ScoredDoc> Bm25MemoryIndex::TopK(const std::vector<std::string>& query_tokens,
                                             size_t k) const {
  std::vector<QueryTerm> terms;
  terms.reserve(query_tokens.size());
  for (const std::string& token : query_tokens) {
    const auto it = postings_.find(token);
    if (it == postings_.end()) {
      terms.push_back({});
    } else {
      terms.push_back({static_cast<uint32_t>(it->second.size()), it->second});
    }
  }
  return Bm25TopK(
      scorer_, terms, num_docs(), [this](uint32_t doc) { return doc_lengths_[doc]; }, k);
}

}  // namespace shotdb
