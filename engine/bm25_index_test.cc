// The persisted BM25 index against the in-memory reference (Bm25MemoryIndex): identical top-k
// (same blocks, bit-identical scores) after every append, after reopening, and across deletes.
#include "engine/bm25_index.h"

#include <gtest/gtest.h>

#include "engine/bm25.h"
#include "engine/store.h"
#include "engine/store_test_util.h"
#include "engine/text_tokenizer.h"

namespace shotdb {
namespace {

using testing_util::MakeBlock;
using testing_util::MakeTask;
using testing_util::SmallModel;
using testing_util::SplitMix64;
using testing_util::TempDir;
using testing_util::TestBlock;

// A text of 1..40 words drawn from a Zipf-like vocabulary of 300 words (so some terms are in most
// blocks and get the epsilon-floored idf, and some are rare).
std::string RandomText(uint64_t seed) {
  std::string text;
  uint64_t r = SplitMix64(seed);
  const int words = 1 + static_cast<int>(r % 40);
  for (int w = 0; w < words; ++w) {
    r = SplitMix64(r);
    const uint64_t a = r % 300, b = (r >> 20) % 300;
    if (!text.empty()) text += (r >> 40) % 7 == 0 ? ", " : " ";
    text += "w" + std::to_string(a < b ? a : b);
    if ((r >> 50) % 11 == 0) text += " Intent:";
  }
  return text;
}

void ExpectSameTopK(Snapshot* snap, const std::string& task, const Bm25MemoryIndex& ref,
                    const TextTokenizerOptions& opts, uint64_t query_seed, size_t k) {
  const std::string query = RandomText(query_seed);
  Result<std::vector<ScoredDoc>> got = snap->Search(task, query, k);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  std::vector<ScoredDoc> want = ref.TopK(TokenizeText(query, opts), k);
  ASSERT_EQ(got->size(), want.size()) << query;
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ((*got)[i].doc, want[i].doc) << query << " rank " << i;
    EXPECT_EQ((*got)[i].score, want[i].score) << query << " rank " << i;  // bit-identical
  }
}

class Bm25IndexTest : public ::testing::TestWithParam<TextTokenizerOptions::Split> {};

TEST_P(Bm25IndexTest, SearchEqualsMemoryIndexAfterEveryAppendAndReopen) {
  TempDir dir;
  const ModelFingerprint model = SmallModel(DType::kBF16, 1);
  TaskInfo task = MakeTask("t", model);
  task.analyzer.tokenizer.split = GetParam();
  Bm25MemoryIndex ref;
  constexpr uint32_t kBlocks = 60;
  {
    Result<std::unique_ptr<Store>> store = Store::Open(dir.path());
    ASSERT_TRUE(store.ok());
    ASSERT_TRUE((*store)->CreateTask(task).ok());
    for (uint32_t i = 0; i < kBlocks; ++i) {
      TestBlock tb = MakeBlock(model, 1, i, i * 5, 5, 0);
      tb.block.info.text = RandomText(i);
      ASSERT_TRUE((*store)->AppendBlock("t", tb.block).ok());
      ref.Add(TokenizeText(tb.block.info.text, task.analyzer.tokenizer));
      auto snap = (*store)->BeginSnapshot();
      ASSERT_TRUE(snap.ok());
      for (uint64_t q = 0; q < 5; ++q) {
        ExpectSameTopK(snap->get(), "t", ref, task.analyzer.tokenizer, 1000 + i * 10 + q,
                       1 + q * 7);
      }
    }
  }
  Store::Options ro;
  ro.read_only = true;
  Result<std::unique_ptr<Store>> store = Store::Open(dir.path(), ro);
  ASSERT_TRUE(store.ok());
  auto snap = (*store)->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  for (uint64_t q = 0; q < 50; ++q) {
    ExpectSameTopK(snap->get(), "t", ref, task.analyzer.tokenizer, 5000 + q,
                   q % 2 ? 10 : kBlocks + 5);
  }
  // A query of no known term: every block scores 0, the lowest indices first.
  Result<std::vector<ScoredDoc>> none = (*snap)->Search("t", "zzz qqq", 3);
  ASSERT_TRUE(none.ok());
  ASSERT_EQ(none->size(), 3u);
  EXPECT_EQ((*none)[0].doc, 0u);
  EXPECT_EQ((*none)[2].score, 0.0);
  EXPECT_TRUE((*store)->Verify("t", nullptr).ok());
}

INSTANTIATE_TEST_SUITE_P(Splits, Bm25IndexTest,
                         ::testing::Values(TextTokenizerOptions::Split::kNonAlphanumeric,
                                           TextTokenizerOptions::Split::kWhitespace),
                         [](const auto& info) {
                           return info.param == TextTokenizerOptions::Split::kWhitespace
                                      ? std::string("whitespace")
                                      : std::string("nonalnum");
                         });

TEST(Bm25IndexTest, LongTermsAreIndexedAndMatched) {
  TempDir dir;
  const ModelFingerprint model = SmallModel(DType::kBF16, 1);
  Result<std::unique_ptr<Store>> store = Store::Open(dir.path());
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->CreateTask(MakeTask("t", model)).ok());
  // Two 600-byte terms that share their first 500 bytes: distinct keys (hash suffix).
  const std::string common(500, 'a');
  const std::string long1 = common + std::string(100, 'b'), long2 = common + std::string(100, 'c');
  const std::string texts[] = {long1 + " x", long2 + " y", "x y z", long1 + " " + long1};
  Bm25MemoryIndex ref;
  for (uint32_t i = 0; i < 4; ++i) {
    TestBlock tb = MakeBlock(model, 1, i, i * 5, 5, 0);
    tb.block.info.text = texts[i];
    ASSERT_TRUE((*store)->AppendBlock("t", tb.block).ok());
    ref.Add(TokenizeText(texts[i], TextTokenizerOptions{}));
  }
  auto snap = (*store)->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  for (const std::string& q : {long1, long2, long1 + " z", std::string("x")}) {
    Result<std::vector<ScoredDoc>> got = (*snap)->Search("t", q, 4);
    ASSERT_TRUE(got.ok());
    EXPECT_EQ(*got, ref.TopK(TokenizeText(q, TextTokenizerOptions{}), 4)) << q.substr(490);
  }
  EXPECT_EQ((*(*snap)->Search("t", long2, 1))[0].doc, 1u);
  EXPECT_EQ(Bm25LmdbIndex::TermKey(1, long1).size(), 4 + kLongTermPrefixBytes + 1 + 8);
  EXPECT_NE(Bm25LmdbIndex::TermKey(1, long1), Bm25LmdbIndex::TermKey(1, long2));
}

TEST(Bm25IndexTest, DeletedTaskLeavesNoPostings) {
  TempDir dir;
  const ModelFingerprint model = SmallModel(DType::kBF16, 1);
  Result<std::unique_ptr<Store>> store = Store::Open(dir.path());
  ASSERT_TRUE(store.ok());
  for (const char* name : {"a", "b"}) {
    ASSERT_TRUE((*store)->CreateTask(MakeTask(name, model)).ok());
  }
  Bm25MemoryIndex ref_b;
  for (uint32_t i = 0; i < 10; ++i) {
    TestBlock tb = MakeBlock(model, 1, i, i * 5, 5, 0);
    tb.block.info.text = RandomText(i);
    ASSERT_TRUE((*store)->AppendBlock("a", tb.block).ok());
    tb.block.info.text = RandomText(100 + i);
    ASSERT_TRUE((*store)->AppendBlock("b", tb.block).ok());
    ref_b.Add(TokenizeText(tb.block.info.text, TextTokenizerOptions{}));
  }
  ASSERT_TRUE((*store)->DeleteTask("a").ok());
  ASSERT_TRUE((*store)->CreateTask(MakeTask("a", model)).ok());
  TestBlock tb = MakeBlock(model, 1, 0, 0, 5, 0);
  tb.block.info.text = "w1 w2";
  ASSERT_TRUE((*store)->AppendBlock("a", tb.block).ok());
  Bm25MemoryIndex ref_a;
  ref_a.Add(TokenizeText("w1 w2", TextTokenizerOptions{}));

  auto snap = (*store)->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  for (uint64_t q = 0; q < 20; ++q) {
    ExpectSameTopK(snap->get(), "a", ref_a, TextTokenizerOptions{}, 300 + q, 5);
    ExpectSameTopK(snap->get(), "b", ref_b, TextTokenizerOptions{}, 300 + q, 5);
  }
  snap->reset();
  // Only the postings of b and of the new a remain: the entry counts say so.
  Result<StoreStats> stats = (*store)->Stats();
  ASSERT_TRUE(stats.ok());
  for (const DbStats& db : stats->dbs) {
    if (db.name == "doc_lengths") {
      EXPECT_EQ(db.entries, 11u);
    }
    if (db.name == "bm25_stats") {
      EXPECT_EQ(db.entries, 2u);
    }
  }
}

}  // namespace
}  // namespace shotdb
