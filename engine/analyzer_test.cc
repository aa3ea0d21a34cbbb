// The analyzers against goldens from retriv 0.2.3 itself (tests/scripts/make_retriv_golden.py):
// the terms of a synthetic corpus full of the pipeline's edge cases, BM25 scores with retriv's
// parameters, and on the NLU data (when present) the top blocks and the top single demonstrations
// for the 250 test utterances, through the persisted indexes of a Store.
#include "engine/analyzer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/bm25.h"
#include "engine/prompt_format.h"
#include "engine/store.h"
#include "engine/store_test_util.h"
#include "tests/nlu_blocks.h"

namespace shotdb {
namespace {

// retriv sums in float32; shotdb in float64.
constexpr double kFloat32Tol = 2e-6;

nlohmann::json ReadJson(const std::string& relative_path) {
  std::ifstream in(std::string(SHOTDB_SOURCE_DIR) + "/" + relative_path);
  EXPECT_TRUE(in.good()) << relative_path;
  return in.good() ? nlohmann::json::parse(in) : nlohmann::json();
}

bool Close(double expected, double actual) {
  return std::fabs(expected - actual) <= kFloat32Tol * std::max(1.0, std::fabs(expected));
}

Analyzer MakeAnalyzer(std::vector<std::string> stopwords) {
  auto a = Analyzer::Create(AnalyzerOptions::Retriv(std::move(stopwords)));
  EXPECT_TRUE(a.ok()) << a.status().ToString();
  return std::move(*a);
}

TEST(AnalyzerTest, RetrivTermsMatchRetriv) {
  const nlohmann::json golden = ReadJson("tests/fixtures/bm25/retriv_golden.json");
  Analyzer analyzer = MakeAnalyzer(golden.at("stopwords").get<std::vector<std::string>>());
  const auto texts = golden.at("texts").get<std::vector<std::string>>();
  const auto terms = golden.at("terms").get<std::vector<std::vector<std::string>>>();
  const auto ascii_case = golden.at("ascii_case").get<std::vector<bool>>();
  size_t compared = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    if (!ascii_case[i]) continue;  // non-ASCII capitals: a documented difference
    EXPECT_EQ(analyzer.Terms(texts[i]), terms[i]) << "text " << i << ": " << texts[i];
    ++compared;
  }
  EXPECT_GE(compared, texts.size() - 1);
}

TEST(AnalyzerTest, RetrivBm25ScoresMatchRetriv) {
  const nlohmann::json golden = ReadJson("tests/fixtures/bm25/retriv_golden.json");
  Analyzer analyzer = MakeAnalyzer(golden.at("stopwords").get<std::vector<std::string>>());
  const auto texts = golden.at("texts").get<std::vector<std::string>>();
  const size_t num_docs = golden.at("num_docs").get<size_t>();
  Bm25MemoryIndex index(Bm25Params::Retriv());
  for (size_t d = 0; d < num_docs; ++d) index.Add(analyzer.Terms(texts[d]));
  const auto ascii_case = golden.at("ascii_case").get<std::vector<bool>>();
  const auto& all_scores = golden.at("scores");
  for (size_t q = 0; q + num_docs < texts.size(); ++q) {
    const std::string& query = texts[num_docs + q];
    SCOPED_TRACE("query " + query);
    const std::vector<double> scores = index.Scores(analyzer.Terms(query));
    const auto& expected = all_scores.at(q);
    for (size_t d = 0; d < num_docs; ++d) {
      if (!ascii_case[d]) continue;  // non-ASCII capitals count differently (documented)
      const auto it = expected.find(std::to_string(d));
      // retriv lists exactly the documents that share a term with the query.
      if (it == expected.end()) {
        EXPECT_EQ(scores[d], 0.0) << "doc " << d;
      } else {
        EXPECT_TRUE(Close(it->get<double>(), scores[d]))
            << "doc " << d << ": retriv " << it->get<double>() << ", shotdb " << scores[d];
      }
    }
  }
}

TEST(AnalyzerTest, SimpleAnalyzerIsTheTokenizer) {
  AnalyzerOptions o;
  o.tokenizer.split = TextTokenizerOptions::Split::kWhitespace;
  auto a = Analyzer::Create(o);
  ASSERT_TRUE(a.ok());
  const std::string text = "Wake ME up, at 7 A.M.\ttomorrow!";
  EXPECT_EQ(a->Terms(text), TokenizeText(text, o.tokenizer));
  o.stopwords = {"the"};
  EXPECT_TRUE(Analyzer::Create(o).status().IsInvalidArgument());
  EXPECT_TRUE(Analyzer::Create(AnalyzerOptions::Retriv({"ok", ""})).status().IsInvalidArgument());
}

TEST(AnalyzerTest, DefaultStopwordsComeFromThePackagedList) {
  if (DefaultStopwords().empty()) {
    GTEST_SKIP() << "built without liblingua-stopwords-perl: no default stop list";
  }
  const auto& words = DefaultStopwords();
  EXPECT_NE(std::find(words.begin(), words.end(), "the"), words.end());
  EXPECT_NE(std::find(words.begin(), words.end(), "because"), words.end());
  EXPECT_EQ(std::find(words.begin(), words.end(), "alarm"), words.end());
  EXPECT_NE(DefaultStopwordsSource().find("Lingua::StopWords"), std::string_view::npos);
  Analyzer analyzer = MakeAnalyzer(words);
  // "because" stays: retriv compares unstemmed tokens with the stemmed list ("becaus").
  EXPECT_EQ(analyzer.Terms("What is the weather like because of the rain?"),
            (std::vector<std::string>{"weather", "like", "becaus", "rain"}));
}

TEST(AnalyzerTest, StopwordFileErrorsNameTheLine) {
  testing_util::TempDir dir;
  const std::string path = dir.Sub("stop.txt");
  std::ofstream(path) << "# comment\nthe\n\n  and  \n";
  auto words = ReadStopwordFile(path);
  ASSERT_TRUE(words.ok()) << words.status().ToString();
  EXPECT_EQ(*words, (std::vector<std::string>{"the", "and"}));
  std::ofstream(path) << "the\ntwo words\n";
  Status s = ReadStopwordFile(path).status();
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("line 2"), std::string::npos) << s.ToString();
  std::ofstream(path) << "ok\n\xff\xfe\n";
  s = ReadStopwordFile(path).status();
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("line 2"), std::string::npos) << s.ToString();
  EXPECT_TRUE(ReadStopwordFile(dir.Sub("missing.txt")).status().IsIOError());
}

// Our top k where retriv's float32 scores allow a different order only among near-ties.
void ExpectSameTop(const std::vector<ScoredDoc>& top, const nlohmann::json& expected) {
  ASSERT_EQ(top.size(), expected.size());
  if (expected.empty()) return;
  std::map<uint32_t, double> golden;
  for (const auto& e : expected) golden[e.at("doc").get<uint32_t>()] = e.at("score").get<double>();
  const double last = expected.back().at("score").get<double>();
  for (size_t i = 0; i < top.size(); ++i) {
    EXPECT_TRUE(Close(expected[i].at("score").get<double>(), top[i].score))
        << "rank " << i << ": retriv " << expected[i].at("score").get<double>() << ", shotdb "
        << top[i].score;
    const auto it = golden.find(top[i].doc);
    if (it != golden.end()) {
      EXPECT_TRUE(Close(it->second, top[i].score)) << "doc " << top[i].doc;
    } else {
      EXPECT_TRUE(Close(last, top[i].score)) << "doc " << top[i].doc << " is not in retriv's top";
    }
  }
}

// Blocks of 50 formatted training rows and every row as its own demonstration, through a Store's
// persisted indexes (Search and SearchDemos), against retriv's top 10 for the 250 test utterances.
TEST(AnalyzerTest, NluSearchMatchesRetriv) {
  const std::string data_dir = testing::NluDataDir();
  auto rows = testing::LoadNluTrainRows(data_dir);
  if (rows.status().IsNotFound()) GTEST_SKIP() << rows.status().ToString();
  ASSERT_TRUE(rows.ok()) << rows.status().ToString();
  if (DefaultStopwords().empty()) GTEST_SKIP() << "no default stop list in this build";
  auto queries = testing::ReadTextColumn(data_dir + "/nlu_evaluation_data_test.csv");
  ASSERT_TRUE(queries.ok());
  const nlohmann::json golden = ReadJson("tests/fixtures/bm25/nlu_retriv_golden.json");
  ASSERT_EQ(rows->size(), golden.at("num_train_rows").get<size_t>());
  ASSERT_EQ(DefaultStopwords().size(), golden.at("num_stopwords").get<size_t>());
  const size_t per_block = golden.at("block_rows").get<size_t>();

  testing_util::TempDir dir;
  Store::Options options;
  options.sync = false;
  auto store = Store::Open(dir.Sub("s"), options);
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  const ModelFingerprint model = testing_util::SmallModel(DType::kBF16, 1);
  TaskInfo task = testing_util::MakeTask("nlu", model);
  task.prompt_template = golden.at("template").get<std::string>();
  task.separator = golden.at("separator").get<std::string>();
  task.analyzer = AnalyzerOptions::Retriv(DefaultStopwords());
  task.bm25 = Bm25Params::Retriv();
  ASSERT_TRUE((*store)->CreateTask(task).ok());
  auto format = PromptFormat::Create(task.prompt_template, task.separator);
  ASSERT_TRUE(format.ok());
  uint64_t offset = 0;
  for (size_t start = 0, b = 0; start < rows->size(); start += per_block, ++b) {
    testing_util::TestBlock tb =
        testing_util::MakeBlock(model, 1, static_cast<uint32_t>(b), offset, 4, 0);
    std::vector<std::pair<std::string, std::string>> pairs;
    for (size_t i = start; i < std::min(rows->size(), start + per_block); ++i) {
      Demonstration d{i + 1, (*rows)[i].text, (*rows)[i].label};
      tb.block.info.demo_ids.push_back(d.id);
      tb.block.demos.push_back(d);
      pairs.emplace_back(d.text, d.label);
    }
    tb.block.info.text = format->FormatBlock(pairs, b == 0);
    offset += 4;
    ASSERT_TRUE((*store)->AppendBlock("nlu", tb.block).ok()) << "block " << b;
  }
  ASSERT_TRUE((*store)->Verify("nlu", nullptr).ok());

  auto snap = (*store)->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  const auto& block_tops = golden.at("blocks").at("top");
  const auto& demo_tops = golden.at("demos").at("top");
  ASSERT_EQ(queries->size(), block_tops.size());
  for (size_t q = 0; q < queries->size(); ++q) {
    SCOPED_TRACE("query " + std::to_string(q) + ": " + (*queries)[q]);
    auto blocks = (*snap)->Search("nlu", (*queries)[q], block_tops.at(q).size());
    ASSERT_TRUE(blocks.ok()) << blocks.status().ToString();
    ExpectSameTop(*blocks, block_tops.at(q));
    auto demos = (*snap)->SearchDemos("nlu", (*queries)[q], demo_tops.at(q).size());
    ASSERT_TRUE(demos.ok()) << demos.status().ToString();
    ExpectSameTop(*demos, demo_tops.at(q));
  }
  // Demonstration numbers follow the pool order.
  auto d = (*snap)->DemoAt("nlu", 1234);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->text, (*rows)[1234].text);
  EXPECT_TRUE((*snap)->DemoAt("nlu", static_cast<uint32_t>(rows->size())).status().IsNotFound());
}

}  // namespace
}  // namespace shotdb
