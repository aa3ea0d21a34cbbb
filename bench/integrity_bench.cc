// What the store's integrity checks cost (store format 3): the LMDB structure check at Open, sealed
// records on every read and check words on every posting, next to baselines from the same run.
//
//   integrity_bench [--dir DIR] [--blocks N] [--demos_per_block D] [--layers L] [--tokens T]
//                   [--queries Q] [--repeats R] [--keep]
// Defaults: a pool shaped like the 19,287 NLU demonstrations in blocks of 5 (3,858 blocks) for
// SmolLM2-135M (30 layers, 3 KV heads, head dim 64, bf16), 8 tokens a block so that the store stays
// small: the checks' cost follows the number of records and tree pages, not the payload bytes
// (which the structure check does not read and the payload checksums already covered before
// format 3). Demonstration texts are drawn from a Zipf-like vocabulary of 5,000 words.
//
// Prints, each a median of R runs:
//   Open without the structure check (baseline) and with it; the pages checked and pages/s;
//   GetBlock / GetDemonstration / GetTask (each unseals one record) per call;
//   Search and SearchDemos per query, next to Bm25MemoryIndex::TopK over the same analyzed texts in
//   memory (no storage, no checks: the floor of the same scoring);
//   Verify of the whole store, and the structure check's share of it.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "engine/analyzer.h"
#include "engine/bm25.h"
#include "engine/store.h"

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

uint64_t Next(uint64_t* s) {
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// A word of a 5,000-word vocabulary, Zipf-like (rank r drawn with probability ~ 1/r).
std::string Word(uint64_t* s) {
  const double u = static_cast<double>(Next(s) % 1000000) / 1e6;
  const uint64_t rank = static_cast<uint64_t>(std::pow(5000.0, u));  // log-uniform ~ 1/r
  std::string w;
  for (uint64_t x = rank * 2654435761u + 7; w.size() < 3 + rank % 6; x /= 26) {
    w.push_back(static_cast<char>('a' + x % 26));
    if (x < 26) x += rank * 40503u + 11;
  }
  return w;
}

std::string Sentence(uint64_t* s) {
  std::string t;
  const int words = 5 + static_cast<int>(Next(s) % 8);
  for (int i = 0; i < words; ++i) t += (i ? " " : "") + Word(s);
  return t;
}

struct Args {
  std::string dir = "/tmp/shotdb_integrity_bench";
  uint32_t blocks = 3858, demos_per_block = 5, layers = 30, tokens = 8, queries = 250;
  int repeats = 5;
  bool keep = false;  // leave the store in --dir (e.g. to time `shotdb ls` on it)
};

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", k.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (k == "--dir")
      a.dir = next();
    else if (k == "--blocks")
      a.blocks = static_cast<uint32_t>(std::atoi(next()));
    else if (k == "--demos_per_block")
      a.demos_per_block = static_cast<uint32_t>(std::atoi(next()));
    else if (k == "--layers")
      a.layers = static_cast<uint32_t>(std::atoi(next()));
    else if (k == "--tokens")
      a.tokens = static_cast<uint32_t>(std::atoi(next()));
    else if (k == "--queries")
      a.queries = static_cast<uint32_t>(std::atoi(next()));
    else if (k == "--repeats")
      a.repeats = std::atoi(next());
    else if (k == "--keep")
      a.keep = true;
    else {
      std::fprintf(stderr, "unknown argument %s\n", k.c_str());
      return 2;
    }
  }
  auto fail = [](const shotdb::Status& s) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  };
  std::filesystem::remove_all(a.dir);

  // Build the pool (no fsync: the build is not what is measured).
  const shotdb::ModelFingerprint model{"llama", shotdb::DType::kBF16, "bench", a.layers, 3, 64};
  std::vector<uint16_t> tensor(size_t{3} * a.tokens * 64, 0x3f80);
  std::vector<std::string> demo_texts, block_texts;
  shotdb::TaskInfo task;
  task.name = "pool";
  task.model = model;
  task.labels = {"a", "b", "c"};
  task.prompt_template = "utterance: {text}\nintent: {label}";
  task.separator = "\n\n";
  {
    shotdb::Store::Options o;
    o.sync = false;
    auto store = shotdb::Store::Open(a.dir, o);
    if (!store.ok()) return fail(store.status());
    if (auto s = (*store)->CreateTask(task); !s.ok()) return fail(s);
    uint64_t seed = 88172645463325252ull;
    auto t0 = Clock::now();
    for (uint32_t b = 0; b < a.blocks; ++b) {
      shotdb::NewBlock nb;
      nb.model = model;
      nb.info.index = b;
      nb.info.position_offset = uint64_t{b} * a.tokens;
      nb.info.token_count = a.tokens;
      for (uint32_t d = 0; d < a.demos_per_block; ++d) {
        shotdb::Demonstration demo{uint64_t{b} * a.demos_per_block + d, Sentence(&seed),
                                   task.labels[Next(&seed) % 3]};
        demo_texts.push_back("utterance: " + demo.text + "\nintent: " + demo.label);
        nb.info.demo_ids.push_back(demo.id);
        nb.info.text += (d ? "\n\n" : "") + demo_texts.back();
        nb.demos.push_back(std::move(demo));
      }
      block_texts.push_back(nb.info.text);
      for (uint32_t l = 0; l < a.layers; ++l) {
        nb.keys.push_back(tensor.data());
        nb.values.push_back(tensor.data());
      }
      if (auto s = (*store)->AppendBlock("pool", nb); !s.ok()) return fail(s);
    }
    std::printf(
        "pool: %u blocks x %u demonstrations, %u layers (%u payload records), built in "
        "%.1f s\n",
        a.blocks, a.demos_per_block, a.layers, a.blocks * a.layers * 2, Seconds(t0, Clock::now()));
  }

  // 1. Open, without and with the structure check.
  std::vector<double> open_plain, open_checked;
  uint64_t pages = 0;
  for (int r = 0; r < a.repeats; ++r) {
    for (bool check : {false, true}) {
      shotdb::Store::Options o;
      o.read_only = true;
      o.check_structure = check;
      auto t0 = Clock::now();
      auto store = shotdb::Store::Open(a.dir, o);
      const double s = Seconds(t0, Clock::now());
      if (!store.ok()) return fail(store.status());
      (check ? open_checked : open_plain).push_back(s);
      if (check && pages == 0) {
        auto st = (*store)->Stats();
        if (st.ok()) pages = st->last_page + 1;
      }
    }
  }
  const double plain = Median(open_plain), checked = Median(open_checked);
  std::printf(
      "\nOpen: %.2f ms without the structure check, %.2f ms with it (%.1fx; %.2f ms for "
      "%lu pages, %.0f pages/ms)\n",
      plain * 1e3, checked * 1e3, checked / plain, (checked - plain) * 1e3,
      static_cast<unsigned long>(pages), static_cast<double>(pages) / ((checked - plain) * 1e3));

  shotdb::Store::Options ro;
  ro.read_only = true;
  auto store = shotdb::Store::Open(a.dir, ro);
  if (!store.ok()) return fail(store.status());
  auto snap = (*store)->BeginSnapshot();
  if (!snap.ok()) return fail(snap.status());

  // 2. Point reads (each unseals one record; GetTask one task record).
  {
    uint64_t seed = 12345;
    const int n = 100000;
    std::vector<double> block_us, demo_us, task_us;
    for (int r = 0; r < a.repeats; ++r) {
      auto t0 = Clock::now();
      for (int i = 0; i < n; ++i) {
        if (!(*snap)->GetBlock("pool", static_cast<uint32_t>(Next(&seed) % a.blocks)).ok())
          return 1;
      }
      block_us.push_back(Seconds(t0, Clock::now()) / n * 1e6);
      t0 = Clock::now();
      for (int i = 0; i < n; ++i) {
        if (!(*snap)->GetDemonstration("pool", Next(&seed) % demo_texts.size()).ok()) return 1;
      }
      demo_us.push_back(Seconds(t0, Clock::now()) / n * 1e6);
      t0 = Clock::now();
      for (int i = 0; i < n; ++i) {
        if (!(*snap)->GetTask("pool").ok()) return 1;
      }
      task_us.push_back(Seconds(t0, Clock::now()) / n * 1e6);
    }
    std::printf(
        "point reads (sealed): GetBlock %.2f us, GetDemonstration %.2f us, GetTask %.2f us\n",
        Median(block_us), Median(demo_us), Median(task_us));
  }

  // 3. Search over the store vs the same scoring in memory.
  {
    auto analyzer = shotdb::Analyzer::Create(task.analyzer);
    if (!analyzer.ok()) return fail(analyzer.status());
    shotdb::Bm25MemoryIndex blocks_mem(task.bm25), demos_mem(task.bm25);
    for (const auto& t : block_texts) blocks_mem.Add(analyzer->Terms(t));
    for (const auto& t : demo_texts) demos_mem.Add(analyzer->Terms(t));
    uint64_t seed = 777;
    std::vector<std::string> queries;
    for (uint32_t q = 0; q < a.queries; ++q) queries.push_back(Sentence(&seed));
    std::vector<double> store_blocks, mem_blocks, store_demos, mem_demos;
    for (int r = 0; r < a.repeats; ++r) {
      auto t0 = Clock::now();
      for (const auto& q : queries) {
        if (!(*snap)->Search("pool", q, 10).ok()) return 1;
      }
      store_blocks.push_back(Seconds(t0, Clock::now()) / queries.size() * 1e6);
      t0 = Clock::now();
      for (const auto& q : queries) {
        if (blocks_mem.TopK(analyzer->Terms(q), 10).empty()) return 1;
      }
      mem_blocks.push_back(Seconds(t0, Clock::now()) / queries.size() * 1e6);
      t0 = Clock::now();
      for (const auto& q : queries) {
        if (!(*snap)->SearchDemos("pool", q, 10).ok()) return 1;
      }
      store_demos.push_back(Seconds(t0, Clock::now()) / queries.size() * 1e6);
      t0 = Clock::now();
      for (const auto& q : queries) {
        if (demos_mem.TopK(analyzer->Terms(q), 10).empty()) return 1;
      }
      mem_demos.push_back(Seconds(t0, Clock::now()) / queries.size() * 1e6);
    }
    std::printf("Search (blocks, k=10): %.1f us a query vs %.1f us in memory (%.2fx)\n",
                Median(store_blocks), Median(mem_blocks),
                Median(store_blocks) / Median(mem_blocks));
    std::printf("SearchDemos (k=10):    %.1f us a query vs %.1f us in memory (%.2fx)\n",
                Median(store_demos), Median(mem_demos), Median(store_demos) / Median(mem_demos));
  }
  snap->reset();

  // 4. Verify of the whole store.
  {
    shotdb::VerifyReport report;
    auto t0 = Clock::now();
    if (auto s = (*store)->Verify("", &report); !s.ok()) return fail(s);
    const double verify = Seconds(t0, Clock::now());
    std::printf("Verify: %.2f s for %lu records (structure check of %lu pages included, ~%.2f s)\n",
                verify, static_cast<unsigned long>(report.records_checked),
                static_cast<unsigned long>(report.pages_checked), checked - plain);
  }
  if (!a.keep) std::filesystem::remove_all(a.dir);
  return 0;
}
