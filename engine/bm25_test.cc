#include "engine/bm25.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "engine/text_tokenizer.h"
#include "tests/nlu_blocks.h"

namespace shotdb {
namespace {

using Tokens = std::vector<std::string>;

constexpr double kRelTol = 1e-9;

::testing::AssertionResult Near(double expected, double actual) {
  const double scale = std::max(std::fabs(expected), std::fabs(actual));
  if (std::fabs(expected - actual) <= kRelTol * scale) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "expected " << expected << " got " << actual << " (rel diff "
         << std::fabs(expected - actual) / scale << ")";
}

nlohmann::json ReadJson(const std::string& relative_path) {
  std::ifstream in(std::string(SHOTDB_SOURCE_DIR) + "/" + relative_path);
  EXPECT_TRUE(in.good()) << relative_path;
  return in.good() ? nlohmann::json::parse(in) : nlohmann::json();
}

// The documented result order applied to a full score vector: score descending, doc ascending.
std::vector<ScoredDoc> RankAll(const std::vector<double>& scores) {
  std::vector<ScoredDoc> ranked;
  for (uint32_t d = 0; d < scores.size(); ++d) ranked.push_back({d, scores[d]});
  std::stable_sort(ranked.begin(), ranked.end(),
                   [](const ScoredDoc& a, const ScoredDoc& b) { return a.score > b.score; });
  return ranked;
}

// Checks TopK(k) against the ranking of Scores() for several k, all of them exactly (both come from
// the same per-document sums, so even ties must agree bit for bit).
void ExpectTopKMatchesFullRanking(const Bm25MemoryIndex& index, const Tokens& query) {
  const std::vector<ScoredDoc> ranked = RankAll(index.Scores(query));
  for (size_t k : {size_t{0}, size_t{1}, size_t{3}, size_t{10}, ranked.size(), ranked.size() + 7}) {
    const size_t n = std::min(k, ranked.size());
    EXPECT_EQ(index.TopK(query, k), std::vector<ScoredDoc>(ranked.begin(), ranked.begin() + n))
        << "k=" << k;
  }
}

// From-scratch stats of a tokenized corpus: each term's df counted directly.
Bm25CorpusStats RebuildStats(const std::vector<Tokens>& docs) {
  std::map<std::string, uint32_t> df;
  Bm25CorpusStats stats;
  for (const Tokens& doc : docs) {
    ++stats.num_docs;
    stats.total_doc_length += doc.size();
    for (const std::string& term : std::set<std::string>(doc.begin(), doc.end())) ++df[term];
  }
  for (const auto& entry : df) ++stats.df_histogram[entry.second];
  return stats;
}

// rank_bm25's BM25Okapi written out plainly in float64 (per-term idf dictionary, average over the
// whole vocabulary, epsilon floor), independent of the df histogram.
std::vector<double> DirectScores(const std::vector<Tokens>& docs, const Tokens& query) {
  const Bm25Params p;
  std::map<std::string, uint32_t> df;
  std::vector<std::map<std::string, uint32_t>> tfs(docs.size());
  double total = 0;
  for (size_t d = 0; d < docs.size(); ++d) {
    total += docs[d].size();
    for (const std::string& t : docs[d]) ++tfs[d][t];
    for (const auto& entry : tfs[d]) ++df[entry.first];
  }
  const double n = docs.size(), avgdl = total / n;
  std::map<std::string, double> idf;
  double idf_sum = 0;
  for (const auto& [term, f] : df) {
    idf[term] = std::log(n - f + 0.5) - std::log(f + 0.5);
    idf_sum += idf[term];
  }
  const double floor = p.epsilon * idf_sum / static_cast<double>(idf.size());
  for (auto& entry : idf) {
    if (entry.second < 0) entry.second = floor;
  }
  std::vector<double> scores(docs.size(), 0.0);
  for (const std::string& q : query) {
    const double q_idf = idf.count(q) ? idf[q] : 0.0;
    for (size_t d = 0; d < docs.size(); ++d) {
      const double tf = tfs[d].count(q) ? tfs[d][q] : 0;
      scores[d] +=
          q_idf * (tf * (p.k1 + 1) /
                   (tf + p.k1 * (1 - p.b + p.b * static_cast<double>(docs[d].size()) / avgdl)));
    }
  }
  return scores;
}

// Fixture corpora scored by rank_bm25 itself (tests/scripts/make_bm25_golden.py).
TEST(Bm25Test, FixtureScoresMatchRankBm25) {
  const nlohmann::json golden = ReadJson("tests/fixtures/bm25/golden.json");
  ASSERT_TRUE(golden.contains("corpora"));
  const TextTokenizerOptions options;  // the golden scores use "lower,nonalnum"
  for (const auto& corpus : golden.at("corpora")) {
    SCOPED_TRACE(corpus.at("name").get<std::string>());
    const auto texts = corpus.at("texts").get<std::vector<std::string>>();
    const size_t num_docs = corpus.at("num_docs").get<size_t>();
    Bm25MemoryIndex index;
    for (size_t d = 0; d < num_docs; ++d) ASSERT_EQ(index.Add(TokenizeText(texts[d], options)), d);
    const Bm25Scorer scorer(index.stats());
    EXPECT_TRUE(Near(corpus.at("average_idf").get<double>(), scorer.average_idf()));
    EXPECT_TRUE(Near(corpus.at("avgdl").get<double>(), scorer.avgdl()));
    const auto& scores = corpus.at("scores");
    ASSERT_EQ(scores.size(), texts.size() - num_docs);
    for (size_t q = 0; q < scores.size(); ++q) {
      SCOPED_TRACE("query: " + texts[num_docs + q]);
      const Tokens query = TokenizeText(texts[num_docs + q], options);
      const auto expected = scores[q].get<std::vector<double>>();
      const std::vector<double> actual = index.Scores(query);
      ASSERT_EQ(actual.size(), expected.size());
      for (size_t d = 0; d < expected.size(); ++d) EXPECT_TRUE(Near(expected[d], actual[d])) << d;
      // The Top-k order is that of rank_bm25's scores under the documented tie rule.
      const std::vector<ScoredDoc> top = index.TopK(query, expected.size());
      const std::vector<ScoredDoc> golden_ranked = RankAll(expected);
      ASSERT_EQ(top.size(), golden_ranked.size());
      for (size_t i = 0; i < top.size(); ++i) {
        EXPECT_EQ(top[i].doc, golden_ranked[i].doc) << "rank " << i;
        EXPECT_TRUE(Near(golden_ranked[i].score, top[i].score)) << "rank " << i;
      }
      ExpectTopKMatchesFullRanking(index, query);
    }
  }
}

TEST(Bm25Test, NegativeFloorFillsWithUnlistedDocsBeforeNegativeOnes) {
  // N = 6, avgdl = 2: "a" (df 5) has a negative raw idf, "b" and "c" (df 3 = N/2) have idf exactly
  // 0, so the average idf is negative and the epsilon floor makes every "a" document score below 0.
  Bm25MemoryIndex index;
  index.Add({"a", "b"});
  index.Add({"a", "b"});
  index.Add({"a", "c"});
  index.Add({"a", "b", "c", "a"});
  index.Add({});
  index.Add({"a", "c"});
  const Bm25Scorer scorer(index.stats());
  ASSERT_LT(scorer.average_idf(), 0);
  const double floor = scorer.Idf(5);
  EXPECT_TRUE(Near(0.25 * scorer.average_idf(), floor));

  // "a": the unlisted empty document 4 (score 0) comes first, then the negatives; documents 0, 1,
  // 2, 5 tie (tf 1, length = avgdl: contribution = idf) and document 3 (tf 2, length 4) is lowest.
  const std::vector<ScoredDoc> top = index.TopK({"a"}, 6);
  ASSERT_EQ(top.size(), 6u);
  EXPECT_EQ(top[0], (ScoredDoc{4, 0.0}));
  const std::vector<uint32_t> order = {0, 1, 2, 5, 3};
  for (size_t i = 0; i < order.size(); ++i) EXPECT_EQ(top[i + 1].doc, order[i]) << i;
  for (size_t i = 1; i < 5; ++i) EXPECT_TRUE(Near(floor, top[i].score)) << i;
  EXPECT_TRUE(Near(floor * 5 / (2 + 1.5 * (0.25 + 0.75 * 4 / 2)), top[5].score));
  EXPECT_EQ(index.TopK({"a"}, 1), (std::vector<ScoredDoc>{{4, 0.0}}));

  // "c" has idf 0: its listed documents score exactly 0 and sort among the unlisted zeros by doc.
  EXPECT_EQ(index.TopK({"c"}, 3), (std::vector<ScoredDoc>{{0, 0.0}, {1, 0.0}, {2, 0.0}}));
  ExpectTopKMatchesFullRanking(index, {"a"});
  ExpectTopKMatchesFullRanking(index, {"a", "zzz", "c", "b"});
}

TEST(Bm25Test, RandomCorporaMatchDirectFormulaAndFullRanking) {
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 40; ++trial) {
    // Small vocabularies make terms in most documents (negative idf) and score ties common.
    const int vocab = 2 + trial % 12;
    std::uniform_int_distribution<int> term(0, vocab - 1), length(0, 9), qlength(0, 5);
    std::vector<Tokens> docs(1 + trial % 23);
    for (Tokens& doc : docs) {
      for (int i = length(rng); i > 0; --i) doc.push_back("t" + std::to_string(term(rng)));
    }
    if (std::all_of(docs.begin(), docs.end(), [](const Tokens& d) { return d.empty(); })) continue;
    Bm25MemoryIndex index;
    for (const Tokens& doc : docs) index.Add(doc);
    EXPECT_EQ(index.stats(), RebuildStats(docs));
    for (int q = 0; q < 5; ++q) {
      Tokens query;
      for (int i = qlength(rng); i > 0; --i) query.push_back("t" + std::to_string(term(rng) + 1));
      const std::vector<double> expected = DirectScores(docs, query);
      const std::vector<double> actual = index.Scores(query);
      for (size_t d = 0; d < docs.size(); ++d) EXPECT_TRUE(Near(expected[d], actual[d]));
      ExpectTopKMatchesFullRanking(index, query);
    }
  }
}

TEST(Bm25Test, IncrementalStatsEqualRebuildAfterEveryDocument) {
  const nlohmann::json golden = ReadJson("tests/fixtures/bm25/golden.json");
  ASSERT_TRUE(golden.contains("corpora"));
  std::vector<Tokens> docs;
  for (const auto& corpus : golden.at("corpora")) {
    const auto texts = corpus.at("texts").get<std::vector<std::string>>();
    for (size_t d = 0; d < corpus.at("num_docs").get<size_t>(); ++d) {
      docs.push_back(TokenizeText(texts[d], TextTokenizerOptions()));
    }
  }
  Bm25MemoryIndex index;
  std::vector<Tokens> added;
  for (const Tokens& doc : docs) {
    index.Add(doc);
    added.push_back(doc);
    const Bm25CorpusStats rebuilt = RebuildStats(added);
    ASSERT_EQ(index.stats(), rebuilt) << "after " << added.size() << " documents";
    std::set<std::string> vocabulary;
    for (const Tokens& d : added) vocabulary.insert(d.begin(), d.end());
    EXPECT_EQ(index.stats().vocabulary_size(), vocabulary.size());
  }
}

TEST(Bm25Test, AddDocumentRejectsInconsistentInputAndKeepsStats) {
  Bm25CorpusStats stats;
  ASSERT_TRUE(stats.AddDocument(3, {0, 0}).ok());  // two new terms
  ASSERT_TRUE(stats.AddDocument(2, {1, 0}).ok());  // one seen term, one new
  const Bm25CorpusStats before = stats;
  EXPECT_EQ(stats.df_histogram, (std::map<uint32_t, uint64_t>{{1, 2}, {2, 1}}));

  Status s = stats.AddDocument(1, {0, 0});
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("1 tokens cannot have 2 distinct terms"), std::string::npos)
      << s.ToString();
  s = stats.AddDocument(5, {3});
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("df before the append is 3"), std::string::npos) << s.ToString();
  s = stats.AddDocument(5, {2, 2});  // only one term has df 2
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("histogram counts only 1"), std::string::npos) << s.ToString();
  EXPECT_EQ(stats, before);

  ASSERT_TRUE(stats.AddDocument(0, {}).ok());  // an empty document
  EXPECT_EQ(stats.num_docs, 3u);
  EXPECT_EQ(stats.total_doc_length, 5u);
  EXPECT_EQ(stats.df_histogram, before.df_histogram);
}

TEST(Bm25Test, ScorerEdgeCases) {
  const Bm25Scorer empty{Bm25CorpusStats()};
  EXPECT_EQ(empty.avgdl(), 0);
  EXPECT_EQ(empty.average_idf(), 0);
  EXPECT_EQ(empty.Idf(0), 0);
  EXPECT_TRUE(Bm25TopK(
                  empty, {}, 0, [](uint32_t) { return 0u; }, 5)
                  .empty());

  Bm25CorpusStats stats;
  ASSERT_TRUE(stats.AddDocument(2, {0, 0}).ok());
  ASSERT_TRUE(stats.AddDocument(1, {1}).ok());
  ASSERT_TRUE(stats.AddDocument(4, {0}).ok());
  const Bm25Scorer scorer(stats);
  // Terms: df 2 (one) and df 1 (two); N = 3.
  const double idf1 = std::log(2.5) - std::log(1.5), idf2 = std::log(1.5) - std::log(2.5);
  EXPECT_TRUE(Near((2 * idf1 + idf2) / 3, scorer.average_idf()));
  EXPECT_TRUE(Near(7.0 / 3, scorer.avgdl()));
  EXPECT_TRUE(Near(idf1, scorer.Idf(1)));
  EXPECT_TRUE(Near(0.25 * scorer.average_idf(), scorer.Idf(2)));  // epsilon floor
  EXPECT_EQ(scorer.Idf(0), 0);
  EXPECT_EQ(scorer.TermScore(1.0, 0, 4), 0);
  EXPECT_TRUE(
      Near(2.0 * 2 * 2.5 / (2 + 1.5 * (0.25 + 0.75 * 4 / (7.0 / 3))), scorer.TermScore(2.0, 2, 4)));

  // Bm25TopK: unknown terms ({0, {}}) add nothing; k = 0 gives nothing; unlisted docs fill.
  const std::vector<QueryTerm> terms = {{}, {1, {{2, 3}}}, {}};
  const auto length = [](uint32_t doc) { return doc == 2 ? 4u : 1u; };
  EXPECT_TRUE(Bm25TopK(scorer, terms, 3, length, 0).empty());
  const std::vector<ScoredDoc> top = Bm25TopK(scorer, terms, 3, length, 10);
  ASSERT_EQ(top.size(), 3u);
  EXPECT_EQ(top[0].doc, 2u);
  EXPECT_EQ(top[0].score, scorer.TermScore(scorer.Idf(1), 3, 4));
  EXPECT_EQ(top[1], (ScoredDoc{0, 0.0}));
  EXPECT_EQ(top[2], (ScoredDoc{1, 0.0}));
}

// The NLU training texts in blocks of 50 rows against rank_bm25's scores for the 250 test
// utterances. The CSV is read at run time (not committed); only the scores are.
TEST(Bm25Test, NluBlocksMatchRankBm25) {
  const Result<testing::NluBlocks> data = testing::LoadNluBlocks(testing::NluDataDir());
  if (data.status().IsNotFound()) GTEST_SKIP() << data.status().ToString();
  ASSERT_TRUE(data.ok()) << data.status().ToString();
  const nlohmann::json golden = ReadJson("tests/fixtures/bm25/nlu_golden.json");
  ASSERT_TRUE(golden.contains("top"));
  ASSERT_EQ(data->num_train_rows, golden.at("num_train_rows").get<size_t>());
  ASSERT_EQ(data->queries.size(), golden.at("num_queries").get<size_t>());
  const auto options = TextTokenizerOptions::Parse(golden.at("tokenizer").get<std::string>());
  ASSERT_TRUE(options.ok());

  Bm25MemoryIndex index;
  const auto lengths = golden.at("block_lengths").get<std::vector<uint32_t>>();
  ASSERT_EQ(data->blocks.size(), lengths.size());
  for (size_t b = 0; b < data->blocks.size(); ++b) {
    index.Add(TokenizeText(data->blocks[b], *options));
    ASSERT_EQ(index.doc_length(static_cast<uint32_t>(b)), lengths[b]) << "block " << b;
  }
  const Bm25Scorer scorer(index.stats());
  EXPECT_TRUE(Near(golden.at("average_idf").get<double>(), scorer.average_idf()));
  EXPECT_TRUE(Near(golden.at("avgdl").get<double>(), scorer.avgdl()));

  const auto& tops = golden.at("top");
  for (size_t q = 0; q < data->queries.size(); ++q) {
    SCOPED_TRACE("query " + std::to_string(q) + ": " + data->queries[q]);
    const Tokens query = TokenizeText(data->queries[q], *options);
    const auto& expected = tops.at(q);
    const std::vector<ScoredDoc> top = index.TopK(query, expected.size());
    ASSERT_EQ(top.size(), expected.size());
    for (size_t i = 0; i < top.size(); ++i) {
      EXPECT_EQ(top[i].doc, expected[i].at("doc").get<uint32_t>()) << "rank " << i;
      EXPECT_TRUE(Near(expected[i].at("score").get<double>(), top[i].score)) << "rank " << i;
    }
    const std::vector<double> scores = index.Scores(query);
    const std::vector<ScoredDoc> ranked = RankAll(scores);
    EXPECT_EQ(index.TopK(query, ranked.size()), ranked);
  }
  for (const auto& full : golden.at("full")) {
    const size_t q = full.at("query").get<size_t>();
    const auto expected = full.at("scores").get<std::vector<double>>();
    const std::vector<double> actual = index.Scores(TokenizeText(data->queries[q], *options));
    ASSERT_EQ(actual.size(), expected.size());
    for (size_t d = 0; d < expected.size(); ++d) {
      EXPECT_TRUE(Near(expected[d], actual[d])) << "query " << q << " block " << d;
    }
  }
}

}  // namespace
}  // namespace shotdb
