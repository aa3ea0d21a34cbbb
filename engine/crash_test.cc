// Crash safety: a real child process appends blocks in a loop and is SIGKILLed at random moments;
// after each kill the store must open, pass Verify, and hold every block the child reported as
// committed (reported through a pipe after AppendBlock returned), intact, and nothing partial.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <random>

#include "engine/store.h"
#include "engine/store_test_util.h"

namespace shotdb {
namespace {

using testing_util::MakeBlock;
using testing_util::MakeTask;
using testing_util::TempDir;
using testing_util::TensorBytes;

constexpr uint32_t kTokens = 1500;  // 8 layers x K,V x 2 heads x 1500 x 16 dims x 2 B = 1.5 MiB
constexpr uint64_t kSeed = 99;
// The child writes `index | kStartingBit` to the pipe before AppendBlock and `index` after it.
constexpr uint32_t kStartingBit = 0x80000000u;

ModelFingerprint CrashModel() {
  ModelFingerprint m = testing_util::SmallModel(DType::kBF16, 8);
  m.head_dim = 16;
  return m;
}

// The child: appends blocks forever, writing each committed index to `fd`. Never returns.
[[noreturn]] void AppendUntilKilled(const std::string& dir, bool sync, int fd) {
  Store::Options options;
  options.sync = sync;
  Result<std::unique_ptr<Store>> store = Store::Open(dir, options);
  if (!store.ok()) _exit(10);
  uint64_t next = 0;
  {
    auto snap = (*store)->BeginSnapshot();
    if (!snap.ok()) _exit(11);
    Result<TaskInfo> task = (*snap)->GetTask("t");
    if (!task.ok()) _exit(12);
    next = task->num_blocks;
  }
  const ModelFingerprint model = CrashModel();
  for (uint32_t i = static_cast<uint32_t>(next);; ++i) {
    testing_util::TestBlock tb = MakeBlock(model, kSeed, i, uint64_t{i} * kTokens, kTokens);
    const uint32_t starting = i | kStartingBit;
    if (write(fd, &starting, sizeof starting) != sizeof starting) _exit(14);
    if (!(*store)->AppendBlock("t", tb.block).ok()) _exit(13);
    if (write(fd, &i, sizeof i) != sizeof i) _exit(14);
  }
}

TEST(CrashTest, KilledWriterLeavesOnlyCommittedWholeBlocks) {
  TempDir dir;
  const ModelFingerprint model = CrashModel();
  {
    Result<std::unique_ptr<Store>> store = Store::Open(dir.path());
    ASSERT_TRUE(store.ok());
    // lz4 so that the payload path through the codec is exercised too.
    ASSERT_TRUE((*store)->CreateTask(MakeTask("t", model, Codec::kLz4)).ok());
  }
  const uint64_t seed =
      static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  SCOPED_TRACE("random seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);

  int64_t reported_max = -1;  // highest block index any child reported
  int unreported_commits = 0;
  int killed_in_append = 0;
  int64_t append_us = 5000;  // last measured append time (start message to commit message)
  std::chrono::steady_clock::time_point
      append_started;  // rounds whose kill landed between "starting" and "committed"
  constexpr int kRounds = 12;
  for (int round = 0; round < kRounds; ++round) {
    int fds[2];
    ASSERT_EQ(pipe(fds), 0);
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      close(fds[0]);
      AppendUntilKilled(dir.path(), round % 2 == 0, fds[1]);
    }
    close(fds[1]);
    // Wait for 0..3 reported commits and the start of the next append, then kill after a random
    // fraction (0..1.2) of the last measured append time: most kills land inside the append, some
    // just after its commit. Timing adapts to the build (ASan is much slower).
    bool in_append = false;  // the last message said an append had started
    auto take = [&](uint32_t msg) {
      const auto now = std::chrono::steady_clock::now();
      if (msg & kStartingBit) {
        EXPECT_EQ(static_cast<int64_t>(msg & ~kStartingBit), reported_max + 1);
        in_append = true;
        append_started = now;
      } else {
        EXPECT_EQ(static_cast<int64_t>(msg), reported_max + 1);
        reported_max = msg;
        in_append = false;
        append_us =
            std::chrono::duration_cast<std::chrono::microseconds>(now - append_started).count();
      }
    };
    const int wait_for = static_cast<int>(rng() % 4);
    for (int got = 0; got < wait_for || !in_append;) {
      uint32_t msg;
      ASSERT_EQ(read(fds[0], &msg, sizeof msg), static_cast<ssize_t>(sizeof msg));
      take(msg);
      if (!(msg & kStartingBit)) ++got;
    }
    usleep(static_cast<useconds_t>(rng() % (append_us * 12 / 10 + 1)));
    ASSERT_EQ(kill(pid, SIGKILL), 0);
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFSIGNALED(status)) << "child exited with " << WEXITSTATUS(status);
    uint32_t msg;
    while (read(fds[0], &msg, sizeof msg) == static_cast<ssize_t>(sizeof msg)) take(msg);
    close(fds[0]);
    if (in_append) ++killed_in_append;

    // Reopen: it opens, verifies, and holds exactly the reported blocks, perhaps plus the one
    // whose commit returned just before the kill but was not reported yet.
    Result<std::unique_ptr<Store>> store = Store::Open(dir.path());
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    VerifyReport report;
    Status v = (*store)->Verify("t", &report);
    ASSERT_TRUE(v.ok()) << "round " << round << ": " << v.ToString();
    auto snap = (*store)->BeginSnapshot();
    ASSERT_TRUE(snap.ok());
    Result<TaskInfo> task = (*snap)->GetTask("t");
    ASSERT_TRUE(task.ok());
    const int64_t blocks = static_cast<int64_t>(task->num_blocks);
    ASSERT_GE(blocks, reported_max + 1) << "round " << round << ": a reported block is missing";
    ASSERT_LE(blocks, reported_max + 2) << "round " << round;
    if (blocks == reported_max + 2) {
      ++unreported_commits;
      reported_max = blocks - 1;  // the next child continues after it
    }
    EXPECT_EQ(task->num_demos, static_cast<uint64_t>(blocks) * 2);
    EXPECT_EQ(task->num_tokens, static_cast<uint64_t>(blocks) * kTokens);
    EXPECT_TRUE((*snap)->GetBlock("t", static_cast<uint32_t>(blocks)).status().IsNotFound());
    EXPECT_TRUE((*snap)
                    ->GetPayload("t", static_cast<uint32_t>(blocks), 0, TensorKind::kKey)
                    .status()
                    .IsNotFound());
    for (int64_t b = 0; b < blocks; ++b) {
      const uint32_t bi = static_cast<uint32_t>(b);
      for (uint32_t layer = 0; layer < model.num_layers; layer += 7) {
        Result<PayloadRef> p = (*snap)->GetPayload("t", bi, layer, TensorKind::kValue);
        ASSERT_TRUE(p.ok()) << p.status().ToString();
        std::vector<uint8_t> want =
            TensorBytes(model, kTokens, kSeed, bi, layer, TensorKind::kValue);
        ASSERT_EQ(p->size, want.size());
        EXPECT_EQ(std::memcmp(p->data, want.data(), want.size()), 0) << "block " << b;
      }
    }
  }
  RecordProperty("blocks_committed", static_cast<int>(reported_max + 1));
  RecordProperty("commits_unreported_at_kill", unreported_commits);
  RecordProperty("killed_in_append", killed_in_append);
  EXPECT_GT(reported_max, 0);
  // The point of the test: most kills interrupt an append (the child spends most of its time
  // there). Failing this would mean the timing no longer exercises crashes mid-transaction.
  EXPECT_GE(killed_in_append, 3);
}

}  // namespace
}  // namespace shotdb

namespace shotdb {
namespace {

constexpr uint32_t kLoadTokens = 64;
constexpr uint64_t kLoadSeed = 17;

// One reader process: `role` 0 searches, 1 reads a random block whole ("show"), 2 verifies the
// store, 3 searches and loads the hits' K/V (DBSA's read path). Runs until `deadline`; every block
// it sees must be whole and exactly what the writer wrote. Exits 0, or 20+ with a message.
[[noreturn]] void ReadUntil(const std::string& dir, int role,
                            std::chrono::steady_clock::time_point deadline) {
  const ModelFingerprint model = CrashModel();
  Store::Options options;
  options.read_only = true;
  auto store = Store::Open(dir, options);
  if (!store.ok()) _exit(20);
  std::mt19937 rng(static_cast<unsigned>(role) * 7919u + static_cast<unsigned>(getpid()));
  auto check_block = [&](Snapshot* snap, uint32_t b, uint32_t layer_step) {
    Result<BlockInfo> info = snap->GetBlock("t", b);
    if (!info.ok() || info->token_count != kLoadTokens) {
      std::fprintf(stderr, "reader %d: block %u: %s\n", role, b, info.status().ToString().c_str());
      _exit(21);
    }
    for (uint64_t id : info->demo_ids) {
      if (!snap->GetDemonstration("t", id).ok()) _exit(22);
    }
    for (uint32_t layer = 0; layer < model.num_layers; layer += layer_step) {
      for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
        Result<PayloadRef> p = snap->GetPayload("t", b, layer, kind);
        const std::vector<uint8_t> want =
            TensorBytes(model, kLoadTokens, kLoadSeed, b, layer, kind);
        if (!p.ok() || p->size != want.size() || std::memcmp(p->data, want.data(), p->size) != 0) {
          std::fprintf(stderr, "reader %d: block %u layer %u: %s\n", role, b, layer,
                       p.status().ToString().c_str());
          _exit(23);
        }
      }
    }
  };
  const char* queries[] = {"alarm jazz", "weather today rain", "play music loud", "wake me"};
  uint64_t reads = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    if (role == 2) {
      Status v = (*store)->Verify("t", nullptr);
      if (!v.ok()) {
        std::fprintf(stderr, "reader 2: verify: %s\n", v.ToString().c_str());
        _exit(24);
      }
      ++reads;
      continue;
    }
    auto snap = (*store)->BeginSnapshot();
    if (!snap.ok()) _exit(25);
    Result<TaskInfo> task = (*snap)->GetTask("t");
    if (!task.ok()) _exit(26);
    const auto blocks = static_cast<uint32_t>(task->num_blocks);
    if (blocks == 0) continue;
    if (role == 1) {
      check_block(snap->get(), static_cast<uint32_t>(rng() % blocks), 1);
    } else {
      auto hits = (*snap)->Search("t", queries[rng() % 4], 3);
      if (!hits.ok() || hits->size() != std::min<size_t>(3, blocks)) _exit(27);
      for (const ScoredDoc& h : *hits) {
        if (h.doc >= blocks) _exit(28);
        if (role == 3) check_block(snap->get(), h.doc, 3);
      }
    }
    ++reads;
  }
  _exit(reads > 0 ? 0 : 29);
}

// The writer: appends blocks until `deadline` (or until killed). Never returns.
[[noreturn]] void WriteUntil(const std::string& dir,
                             std::chrono::steady_clock::time_point deadline) {
  Store::Options options;
  options.sync = false;
  auto store = Store::Open(dir, options);
  if (!store.ok()) _exit(10);
  const ModelFingerprint model = CrashModel();
  uint64_t next = 0;
  {
    auto snap = (*store)->BeginSnapshot();
    if (!snap.ok()) _exit(11);
    next = (*snap)->GetTask("t")->num_blocks;
  }
  for (uint32_t i = static_cast<uint32_t>(next); std::chrono::steady_clock::now() < deadline; ++i) {
    testing_util::TestBlock tb =
        MakeBlock(model, kLoadSeed, i, uint64_t{i} * kLoadTokens, kLoadTokens);
    if (!(*store)->AppendBlock("t", tb.block).ok()) _exit(13);
  }
  _exit(0);
}

std::string MakeLoadStore(const TempDir& dir) {
  auto store = Store::Open(dir.path());
  EXPECT_TRUE(store.ok());
  EXPECT_TRUE((*store)->CreateTask(MakeTask("t", CrashModel(), Codec::kLz4)).ok());
  return dir.path();
}

// One writer process and four reader processes (search, show, verify, search + load) for two
// seconds: no reader sees a partial block or an error, and the store verifies afterwards.
TEST(ConcurrencyTest, OneWriterAndFourReaderProcesses) {
  TempDir dir;
  const std::string path = MakeLoadStore(dir);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  std::vector<pid_t> pids;
  pid_t writer = fork();
  ASSERT_GE(writer, 0);
  if (writer == 0) WriteUntil(path, deadline);
  for (int role = 0; role < 4; ++role) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) ReadUntil(path, role, deadline + std::chrono::milliseconds(300));
    pids.push_back(pid);
  }
  int status = 0;
  ASSERT_EQ(waitpid(writer, &status, 0), writer);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "writer: " << status;
  for (size_t r = 0; r < pids.size(); ++r) {
    ASSERT_EQ(waitpid(pids[r], &status, 0), pids[r]);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "reader " << r << " exited with " << WEXITSTATUS(status);
  }
  auto store = Store::Open(path);
  ASSERT_TRUE(store.ok());
  EXPECT_TRUE((*store)->Verify("", nullptr).ok());
  auto snap = (*store)->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  EXPECT_GT((*snap)->GetTask("t")->num_blocks, 2u);
  RecordProperty("blocks_written", static_cast<int>((*snap)->GetTask("t")->num_blocks));
}

// Readers keep reading after the writer is SIGKILLed in the middle of its appends: they see only
// whole blocks and no errors, and a new writer then appends (LMDB recovers the dead writer's
// lock).
TEST(ConcurrencyTest, ReadersOutliveAWriterKilledMidTransaction) {
  TempDir dir;
  const std::string path = MakeLoadStore(dir);
  const auto start = std::chrono::steady_clock::now();
  pid_t writer = fork();
  ASSERT_GE(writer, 0);
  if (writer == 0) WriteUntil(path, start + std::chrono::hours(1));
  std::vector<pid_t> pids;
  for (int role = 0; role < 4; ++role) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) ReadUntil(path, role, start + std::chrono::milliseconds(2500));
    pids.push_back(pid);
  }
  usleep(1000 * 1000);
  ASSERT_EQ(kill(writer, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(waitpid(writer, &status, 0), writer);
  EXPECT_TRUE(WIFSIGNALED(status));
  for (size_t r = 0; r < pids.size(); ++r) {
    ASSERT_EQ(waitpid(pids[r], &status, 0), pids[r]);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "reader " << r << " exited with " << WEXITSTATUS(status);
  }
  auto store = Store::Open(path);
  ASSERT_TRUE(store.ok());
  EXPECT_TRUE((*store)->Verify("", nullptr).ok());
  uint64_t blocks = 0;
  {
    auto snap = (*store)->BeginSnapshot();
    ASSERT_TRUE(snap.ok());
    blocks = (*snap)->GetTask("t")->num_blocks;
  }
  ASSERT_GT(blocks, 0u);
  testing_util::TestBlock tb = MakeBlock(CrashModel(), kLoadSeed, static_cast<uint32_t>(blocks),
                                         blocks * kLoadTokens, kLoadTokens);
  EXPECT_TRUE((*store)->AppendBlock("t", tb.block).ok());
  EXPECT_TRUE((*store)->Verify("", nullptr).ok());
}

}  // namespace
}  // namespace shotdb
