// Damage detection, byte by byte: a small store (two tasks, compressed and raw payloads, both BM25
// indexes, a deleted task's freed pages) has one byte of its data.mdb flipped at a time, and a
// child process then opens it, verifies it and performs every read the store offers. Each flip must
// either be reported (Open or Verify fails, and every read returns the original value or an
// error) or change nothing any read returns (Verify passes and every read equals the original).
// A read that returns a different value without an error (a silent change), a read error that
// Verify missed, or a crash fails the test.
//
// LMDB's two meta pages (pages 0 and 1) are left out: LMDB keeps no checksum there, and a damaged
// newer meta makes it open the previous commit, a consistent older store that nothing inside the
// file can tell from the newer one (docs/storage.md).
//
// By default a seeded sample of positions is flipped; SHOTDB_FLIP_ALL=1 flips every byte.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "engine/store.h"
#include "engine/store_test_util.h"

namespace shotdb {
namespace {

using testing_util::MakeBlock;
using testing_util::MakeTask;
using testing_util::SmallModel;
using testing_util::TempDir;

const char* const kQueries[] = {"alarm jazz", "weather today rain", "play music loud", "wake me",
                                "tomorrow city song"};

// Every read of the store, by name ("task a block 2", ...), each as a string ("E" and the status
// code for an error). Keyed so that a read that fails does not shift the ones after it.
using Reads = std::map<std::string, std::string>;

Reads ReadEverything(Store* store) {
  Reads out;
  auto put = [&](const std::string& name, const auto& result, const auto& encode) {
    out[name] = result.ok() ? encode(*result) : "E" + std::to_string(int(result.status().code()));
  };
  auto snap = store->BeginSnapshot();
  if (!snap.ok()) {
    out["snapshot"] = "E" + std::to_string(int(snap.status().code()));
    return out;
  }
  Snapshot& sn = **snap;
  Result<std::vector<TaskInfo>> tasks = sn.ListTasks();
  put("list", tasks, [](const std::vector<TaskInfo>& ts) {
    std::string s;
    for (const TaskInfo& t : ts) s += EncodeTaskInfo(t);
    return s;
  });
  for (const std::string name : {"a", "b"}) {
    Result<TaskInfo> t = sn.GetTask(name);
    put("task " + name, t, [](const TaskInfo& x) { return EncodeTaskInfo(x); });
    if (!t.ok()) continue;
    for (uint32_t b = 0; b < 4; ++b) {  // one past the last block too
      const std::string block = "task " + name + " block " + std::to_string(b);
      Result<BlockInfo> info = sn.GetBlock(name, b);
      put(block, info, [](const BlockInfo& x) { return EncodeBlockInfo(x); });
      if (info.ok()) {
        for (uint64_t id : info->demo_ids) {
          put("task " + name + " demo " + std::to_string(id), sn.GetDemonstration(name, id),
              [](const Demonstration& x) { return EncodeDemonstration(x); });
        }
      }
      for (uint32_t layer = 0; layer < t->model.num_layers; ++layer) {
        for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
          put(block + " layer " + std::to_string(layer) + " " + std::string(TensorKindName(kind)),
              sn.GetPayload(name, b, layer, kind), [](const PayloadRef& p) {
                return std::string(static_cast<const char*>(p.data), p.size);
              });
        }
      }
    }
    for (uint32_t n = 0; n <= t->num_demos; ++n) {
      put("task " + name + " demo at " + std::to_string(n), sn.DemoAt(name, n),
          [](const Demonstration& x) { return EncodeDemonstration(x); });
    }
    for (const char* q : kQueries) {
      for (bool demos : {false, true}) {
        put("task " + name + (demos ? " demo search " : " search ") + q,
            demos ? sn.SearchDemos(name, q, 100) : sn.Search(name, q, 100),
            [](const std::vector<ScoredDoc>& hits) {
              std::string h;
              for (const ScoredDoc& d : hits)
                h += std::to_string(d.doc) + ":" + std::to_string(d.score) + ",";
              return h;
            });
      }
    }
  }
  return out;
}

bool IsError(const std::string& s) { return s.size() >= 2 && s.size() < 4 && s[0] == 'E'; }

// Outcome of one flip, as the child's exit code.
enum Outcome { kUnchanged = 0, kReported = 1, kSilent = 3, kMissedByVerify = 4, kNoStore = 5 };

[[noreturn]] void Inspect(const std::string& dir, const Reads& golden) {
  Store::Options options;
  options.read_only = true;
  auto store = Store::Open(dir, options);
  if (!store.ok()) _exit(kReported);
  const bool verified = (*store)->Verify("", nullptr).ok();
  const Reads got = ReadEverything(store->get());
  bool read_error = false;
  for (const auto& [name, value] : got) {
    auto it = golden.find(name);
    if (it != golden.end() && it->second == value) continue;
    if (IsError(value)) {
      read_error = true;
      continue;
    }
    if (std::getenv("SHOTDB_FLIP_DEBUG") != nullptr) {
      std::fprintf(stderr, "%s differs (verify %d): %zu bytes, was %zu bytes\n", name.c_str(),
                   verified, value.size(), it == golden.end() ? 0 : it->second.size());
    }
    _exit(kSilent);
  }
  // A read the damaged store no longer makes (its block index failed) counts as an error.
  for (const auto& entry : golden) read_error |= got.count(entry.first) == 0;
  if (!verified) _exit(kReported);
  _exit(read_error ? kMissedByVerify : kUnchanged);
}

TEST(FlipTest, EveryFlippedByteIsReportedOrChangesNothing) {
  TempDir dir;
  const std::string store_dir = dir.Sub("store");
  {
    Store::Options options;
    options.sync = false;
    auto store = Store::Open(store_dir, options);
    ASSERT_TRUE(store.ok());
    const ModelFingerprint bf16 = SmallModel(DType::kBF16, 2), f32 = SmallModel(DType::kF32, 2);
    ASSERT_TRUE((*store)->CreateTask(MakeTask("c", bf16)).ok());
    ASSERT_TRUE((*store)->AppendBlock("c", MakeBlock(bf16, 9, 0, 0, 6).block).ok());
    ASSERT_TRUE((*store)->CreateTask(MakeTask("a", bf16, Codec::kLz4)).ok());
    ASSERT_TRUE((*store)->CreateTask(MakeTask("b", f32)).ok());
    for (uint32_t b = 0; b < 3; ++b) {
      ASSERT_TRUE((*store)->AppendBlock("a", MakeBlock(bf16, 1, b, b * 7, 7).block).ok());
      ASSERT_TRUE((*store)->AppendBlock("b", MakeBlock(f32, 2, b, b * 5, 5).block).ok());
    }
    ASSERT_TRUE((*store)->DeleteTask("c").ok());
  }
  Reads golden;
  {
    auto store = Store::Open(store_dir);
    ASSERT_TRUE(store.ok());
    ASSERT_TRUE((*store)->Verify("", nullptr).ok());
    golden = ReadEverything(store->get());
  }
  ASSERT_GT(golden.size(), 60u);
  const std::string data_file = store_dir + "/data.mdb";
  std::ifstream in(data_file, std::ios::binary);
  const std::vector<char> original((std::istreambuf_iterator<char>(in)),
                                   std::istreambuf_iterator<char>());
  const size_t page = 4096, first = 2 * page;  // after the two meta pages
  ASSERT_GT(original.size(), first);

  std::vector<size_t> positions;
  const bool all = std::getenv("SHOTDB_FLIP_ALL") != nullptr;
  if (const char* at = std::getenv("SHOTDB_FLIP_AT")) {  // one position, for debugging
    positions.push_back(std::strtoull(at, nullptr, 10));
  } else if (all) {
    for (size_t p = first; p < original.size(); ++p) positions.push_back(p);
  } else {
    std::mt19937_64 rng(20261130);
    for (int i = 0; i < 1500; ++i) positions.push_back(first + rng() % (original.size() - first));
  }
  const std::string work = dir.Sub("work");
  ASSERT_TRUE(std::filesystem::create_directory(work));
  int counts[8] = {0};
  std::vector<std::string> failures;
  for (size_t pos : positions) {
    std::vector<char> damaged = original;
    damaged[pos] ^= static_cast<char>(1 << (pos % 8));
    std::filesystem::remove(work + "/lock.mdb");
    std::ofstream(work + "/data.mdb", std::ios::binary | std::ios::trunc)
        .write(damaged.data(), static_cast<std::streamsize>(damaged.size()));
    if (std::getenv("SHOTDB_FLIP_AT") != nullptr) {  // keep the damaged store to inspect
      std::filesystem::create_directories("/tmp/shotdb-flip");
      std::filesystem::copy_file(work + "/data.mdb", "/tmp/shotdb-flip/data.mdb",
                                 std::filesystem::copy_options::overwrite_existing);
    }
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) Inspect(work, golden);
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    if (WIFSIGNALED(status)) {
      failures.push_back("byte " + std::to_string(pos) + " (page " + std::to_string(pos / page) +
                         "): crash, signal " + std::to_string(WTERMSIG(status)));
      continue;
    }
    const int code = WEXITSTATUS(status);
    ++counts[code < 8 ? code : 7];
    if (code == kSilent || code == kMissedByVerify) {
      failures.push_back(
          "byte " + std::to_string(pos) + " (page " + std::to_string(pos / page) +
          "): " + (code == kSilent ? "silent change" : "a read failed, Verify passed"));
    }
  }
  RecordProperty("flips", static_cast<int>(positions.size()));
  RecordProperty("reported", counts[kReported]);
  RecordProperty("unchanged", counts[kUnchanged]);
  std::printf(
      "flip test: %zu bytes of %zu flipped: %d reported, %d changed nothing, %zu failures\n",
      positions.size(), original.size(), counts[kReported], counts[kUnchanged], failures.size());
  for (size_t i = 0; i < failures.size() && i < 30; ++i) ADD_FAILURE() << failures[i];
  EXPECT_TRUE(failures.empty()) << failures.size() << " failures";
}

}  // namespace
}  // namespace shotdb
