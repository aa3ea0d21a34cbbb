// BM25 top-k latency over the NLU demonstration blocks (docs/bm25.md, "Benchmark").
//
// The index holds the first 400 blocks of 50 training rows of the NLU evaluation data (386 blocks:
// the file has 19,287 rows); the queries are its 250 test utterances, tokenized "lower,nonalnum".
// Two ways to get a query's top k blocks are timed, one iteration = all 250 queries:
//   BM_Bm25TopK      Bm25TopK driven by the query terms' posting lists (what the store does)
//   BM_Bm25ScoreAll  rank_bm25's algorithm: score every block (Bm25MemoryIndex::Scores), then
//                    partial-sort the full vector by the same order rule
// Both report us_per_query; BM_Bm25ScoreAll also reports scoreall_over_topk, its per-query time
// divided by BM_Bm25TopK's for the same k in the same run (TopK runs first).
// bench/bm25_vs_rank_bm25.py times rank_bm25 itself on the same queries.
//
// Usage: bm25_bench [benchmark flags] [DATA_DIR]   (DATA_DIR defaults to $SHOTDB_DATA_DIR, then
// ../shared/data next to the source tree). Exits 0 without running anything when the data is
// absent.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "engine/bm25.h"
#include "engine/text_tokenizer.h"
#include "tests/nlu_blocks.h"

namespace shotdb {
namespace {

struct Corpus {
  Bm25MemoryIndex index;
  std::vector<std::vector<std::string>> queries;
};

const Corpus* corpus = nullptr;
std::map<int64_t, double> topk_us_per_query;  // k -> BM_Bm25TopK's per-query time

// Runs `one_query` over every query once per iteration, timing iterations with a steady clock
// (manual time) so the per-query figure is available here for the ratio. Returns us per query.
template <typename Fn>
double RunPerQuery(benchmark::State& state, Fn one_query) {
  double total_s = 0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    for (const auto& query : corpus->queries) one_query(query);
    const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
    state.SetIterationTime(elapsed.count());
    total_s += elapsed.count();
  }
  const double queries = static_cast<double>(state.iterations() * corpus->queries.size());
  state.SetItemsProcessed(static_cast<int64_t>(queries));
  const double us = queries > 0 ? total_s * 1e6 / queries : 0;
  state.counters["us_per_query"] = us;
  return us;
}

void BM_Bm25TopK(benchmark::State& state) {
  const auto k = static_cast<size_t>(state.range(0));
  topk_us_per_query[state.range(0)] = RunPerQuery(
      state, [k](const auto& query) { benchmark::DoNotOptimize(corpus->index.TopK(query, k)); });
}

void BM_Bm25ScoreAll(benchmark::State& state) {
  const auto k = static_cast<size_t>(state.range(0));
  const double us = RunPerQuery(state, [k](const auto& query) {
    const std::vector<double> scores = corpus->index.Scores(query);
    std::vector<ScoredDoc> ranked(scores.size());
    for (uint32_t d = 0; d < scores.size(); ++d) ranked[d] = {d, scores[d]};
    const size_t n = std::min(k, ranked.size());
    std::partial_sort(ranked.begin(), ranked.begin() + n, ranked.end(),
                      [](const ScoredDoc& a, const ScoredDoc& b) {
                        return a.score != b.score ? a.score > b.score : a.doc < b.doc;
                      });
    ranked.resize(n);
    benchmark::DoNotOptimize(ranked);
  });
  const auto topk = topk_us_per_query.find(state.range(0));
  if (topk != topk_us_per_query.end() && topk->second > 0) {
    state.counters["scoreall_over_topk"] = us / topk->second;
  }
}

// k = 10 and k = 116 (30% of the 386 blocks, the paper's selection ratio).
BENCHMARK(BM_Bm25TopK)->Arg(10)->Arg(116)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Bm25ScoreAll)->Arg(10)->Arg(116)->UseManualTime()->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace shotdb

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  const std::string data_dir = argc > 1 ? argv[1] : shotdb::testing::NluDataDir();
  const auto data = shotdb::testing::LoadNluBlocks(data_dir);
  if (!data.ok()) {
    std::fprintf(stderr, "bm25_bench: skipped: %s\n", data.status().ToString().c_str());
    return data.status().IsNotFound() ? 0 : 1;
  }
  static shotdb::Corpus loaded;
  const shotdb::TextTokenizerOptions options;
  for (const std::string& block : data->blocks)
    loaded.index.Add(shotdb::TokenizeText(block, options));
  for (const std::string& query : data->queries) {
    loaded.queries.push_back(shotdb::TokenizeText(query, options));
  }
  shotdb::corpus = &loaded;
  std::printf("bm25_bench: %zu blocks (%zu rows), %zu queries from %s\n", data->blocks.size(),
              data->num_train_rows, loaded.queries.size(), data_dir.c_str());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
