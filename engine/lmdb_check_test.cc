// The LMDB structure check (engine/lmdb_check.h) against LMDB's own accounting, and targeted page
// damage that LMDB itself would follow into a crash or a hidden subtree; Verify's whole-store
// orphan check.
#include "engine/lmdb_check.h"

#include <gtest/gtest.h>
#include <lmdb.h>

#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
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
using testing_util::TestBlock;

// A block whose demonstrations all contain "alarm" (so that term's posting list outgrows a page and
// becomes a sub-database) and whose tensors of `tokens` tokens outgrow a page (overflow values).
TestBlock AlarmBlock(const ModelFingerprint& model, uint32_t index, uint64_t* position,
                     uint32_t tokens, uint32_t demos) {
  TestBlock tb = MakeBlock(model, 7, index, *position, tokens, demos);
  *position += tokens;
  tb.block.info.text.clear();
  for (uint32_t i = 0; i < demos; ++i) {
    Demonstration& d = tb.block.demos[i];
    d.text = "alarm number w" + std::to_string(index) + "x" + std::to_string(i);
    if (!tb.block.info.text.empty()) tb.block.info.text += "\n==\n";
    tb.block.info.text += "utterance: " + d.text + "\nintent: " + d.label;
  }
  return tb;
}

// A store with sorted-duplicate sub-databases, overflow values and a deleted task's free pages.
void BuildStore(const std::string& dir) {
  auto store = Store::Open(dir);
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  const ModelFingerprint model = SmallModel(DType::kBF16, 2);
  ASSERT_TRUE((*store)->CreateTask(MakeTask("keep", model)).ok());
  ASSERT_TRUE((*store)->CreateTask(MakeTask("gone", model)).ok());
  uint64_t keep_position = 0, gone_position = 0;
  for (uint32_t b = 0; b < 40; ++b) {
    // 40 blocks x 20 demonstrations: "alarm" has 800 postings of 12 bytes in demo_postings.
    TestBlock keep = AlarmBlock(model, b, &keep_position, b % 4 == 0 ? 300 : 6, 20);
    Status ks = (*store)->AppendBlock("keep", keep.block);
    ASSERT_TRUE(ks.ok()) << ks.ToString();
    TestBlock gone = AlarmBlock(model, b, &gone_position, 300, 2);
    ASSERT_TRUE((*store)->AppendBlock("gone", gone.block).ok());
  }
  ASSERT_TRUE((*store)->DeleteTask("gone").ok());
}

// Opens the environment with LMDB alone, read-only.
struct Env {
  MDB_env* env = nullptr;
  explicit Env(const std::string& dir) {
    EXPECT_EQ(mdb_env_create(&env), MDB_SUCCESS);
    EXPECT_EQ(mdb_env_set_maxdbs(env, 64), MDB_SUCCESS);
    EXPECT_EQ(mdb_env_set_mapsize(env, size_t(1) << 32), MDB_SUCCESS);
    EXPECT_EQ(mdb_env_open(env, dir.c_str(), MDB_RDONLY, 0644), MDB_SUCCESS);
  }
  ~Env() { mdb_env_close(env); }
};

// LMDB's own figures for the newest snapshot: pages, free pages (the counts the free-page DB
// lists), named databases and their overflow pages.
struct LmdbFigures {
  uint64_t pages = 0, free_pages = 0, named_dbs = 0, overflow_pages = 0, tree_pages = 0;
};
LmdbFigures Figures(MDB_env* env) {
  LmdbFigures f;
  MDB_envinfo info;
  mdb_env_info(env, &info);
  f.pages = info.me_last_pgno + 1;
  MDB_txn* txn = nullptr;
  EXPECT_EQ(mdb_txn_begin(env, nullptr, MDB_RDONLY, &txn), MDB_SUCCESS);
  MDB_cursor* c = nullptr;
  MDB_val k, v;
  // The free-page DB (dbi 0 inside LMDB is FREE_DBI; its records are [count, pgno...]).
  MDB_stat ms;
  EXPECT_EQ(mdb_stat(txn, 0, &ms), MDB_SUCCESS);
  f.overflow_pages += ms.ms_overflow_pages;
  f.tree_pages += ms.ms_branch_pages + ms.ms_leaf_pages;
  EXPECT_EQ(mdb_cursor_open(txn, 0, &c), MDB_SUCCESS);
  for (int rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == MDB_SUCCESS;
       rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
    size_t count;
    std::memcpy(&count, v.mv_data, sizeof count);
    f.free_pages += count;
  }
  mdb_cursor_close(c);
  // The main DB (MAIN_DBI = 1) names the named databases.
  MDB_dbi main_dbi;
  EXPECT_EQ(mdb_dbi_open(txn, nullptr, 0, &main_dbi), MDB_SUCCESS);
  EXPECT_EQ(mdb_stat(txn, main_dbi, &ms), MDB_SUCCESS);
  f.overflow_pages += ms.ms_overflow_pages;
  f.tree_pages += ms.ms_branch_pages + ms.ms_leaf_pages;
  std::vector<std::string> names;
  EXPECT_EQ(mdb_cursor_open(txn, main_dbi, &c), MDB_SUCCESS);
  for (int rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == MDB_SUCCESS;
       rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
    names.emplace_back(static_cast<const char*>(k.mv_data), k.mv_size);
  }
  mdb_cursor_close(c);
  for (const std::string& name : names) {
    MDB_dbi dbi;
    EXPECT_EQ(mdb_dbi_open(txn, name.c_str(), 0, &dbi), MDB_SUCCESS) << name;
    EXPECT_EQ(mdb_stat(txn, dbi, &ms), MDB_SUCCESS);
    f.overflow_pages += ms.ms_overflow_pages;
    f.tree_pages += ms.ms_branch_pages + ms.ms_leaf_pages;
    ++f.named_dbs;
  }
  mdb_txn_abort(txn);
  return f;
}

TEST(LmdbCheckTest, AgreesWithLmdbsAccountingOnAStoreWithSubDatabasesOverflowAndFreePages) {
  TempDir dir;
  BuildStore(dir.path());
  for (const std::string& d : {dir.path(), dir.Sub("compact")}) {
    if (d != dir.path()) {
      auto store = Store::Open(dir.path());
      ASSERT_TRUE(store.ok());
      ASSERT_TRUE((*store)->Compact(d).ok());
    }
    Env env(d);
    const LmdbFigures want = Figures(env.env);
    Result<lmdb::StructureStats> got = lmdb::CheckLmdbStructure(env.env);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    SCOPED_TRACE(d);
    // The readers' check finds the same pages (every overflow run here is as long as its value
    // needs, as LMDB allocates it).
    Result<lmdb::StructureStats> trees =
        lmdb::CheckLmdbStructure(env.env, lmdb::StructureCheck::kTrees);
    ASSERT_TRUE(trees.ok()) << trees.status().ToString();
    EXPECT_EQ(trees->pages, got->pages);
    EXPECT_EQ(trees->branch_pages, got->branch_pages);
    EXPECT_EQ(trees->leaf_pages, got->leaf_pages);
    EXPECT_EQ(trees->overflow_pages, got->overflow_pages);
    EXPECT_EQ(trees->free_pages, got->free_pages);
    EXPECT_EQ(got->pages, want.pages);
    EXPECT_EQ(got->free_pages, want.free_pages);
    EXPECT_EQ(got->named_dbs, want.named_dbs);
    EXPECT_EQ(got->overflow_pages, want.overflow_pages);
    // Sub-database pages are not in mdb_stat's counts of their DB: the check finds more.
    EXPECT_GT(got->branch_pages + got->leaf_pages, want.tree_pages);
    // Every page is a meta page, in a tree, or free (or the free-page DB's own pages).
    EXPECT_EQ(2 + got->branch_pages + got->leaf_pages + got->overflow_pages + got->free_pages,
              got->pages);
    EXPECT_GT(got->overflow_pages, 0u);
    if (d == dir.path()) {
      EXPECT_GT(got->free_pages, 0u);  // the deleted task's pages
    } else {
      EXPECT_EQ(got->free_pages, 0u);
    }
  }
}

// The pages of a compacted copy (no free pages: every page but the two metas is live), read
// from the file, so that the test can damage a live page of a chosen kind.
struct PageFile {
  std::string path;
  std::vector<uint8_t> bytes;
  size_t psize = 4096;
  explicit PageFile(std::string p) : path(std::move(p)) {
    std::ifstream f(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    // Meta page 0: header (16), magic, version, address, map size (24), then the free DB's
    // record, whose first field LMDB uses for the page size.
    uint32_t ps = 0;
    if (bytes.size() >= 44) std::memcpy(&ps, bytes.data() + 16 + 24, 4);
    EXPECT_GE(ps, 512u);
    if (ps >= 512) psize = ps;
  }
  uint8_t* Page(size_t n) { return bytes.data() + n * psize; }
  uint16_t Flags(size_t n) {
    uint16_t f;
    std::memcpy(&f, Page(n) + 10, 2);
    return f;
  }
  // The first live page (after the metas, skipping overflow runs) for which `want` holds.
  long Find(const std::function<bool(size_t)>& want) {
    for (size_t n = 2; n < bytes.size() / psize;) {
      if (Flags(n) & 0x04) {  // overflow: the run's length is in place of lower/upper
        uint32_t run;
        std::memcpy(&run, Page(n) + 12, 4);
        if (want(n)) return static_cast<long>(n);
        n += run;
        continue;
      }
      if (want(n)) return static_cast<long>(n);
      ++n;
    }
    return -1;
  }
  uint16_t Nodes(size_t n) {
    uint16_t lower;
    std::memcpy(&lower, Page(n) + 12, 2);
    return static_cast<uint16_t>((lower - 16) / 2);
  }
  uint8_t* Node(size_t n, int i) {
    uint16_t off;
    std::memcpy(&off, Page(n) + 16 + 2 * i, 2);
    return Page(n) + off;
  }
  void Write() {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  }
};

// Each damage: the store must refuse to open (Corruption naming data.mdb), and with the check
// off, Verify must report it; neither may crash.
// `what` is the part of the message that names the damage. Damage that only LMDB's writers would
// follow (`writers_only`) lets a read-only Open pass (its check skips what readers never read) and
// is refused by a writable Open.
void ExpectReported(const std::string& dir, const std::string& what, bool writers_only = false) {
  SCOPED_TRACE(what);
  Store::Options ro;
  ro.read_only = !writers_only;
  auto opened = Store::Open(dir, ro);
  ASSERT_FALSE(opened.ok());
  EXPECT_TRUE(opened.status().IsCorruption()) << opened.status().ToString();
  EXPECT_NE(opened.status().message().find("data.mdb"), std::string::npos)
      << opened.status().ToString();
  EXPECT_NE(opened.status().message().find(what), std::string::npos) << opened.status().ToString();
  if (writers_only) {
    ro.read_only = true;
    auto reader = Store::Open(dir, ro);
    ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  }
  ro.read_only = true;
  ro.check_structure = false;
  auto unchecked = Store::Open(dir, ro);
  if (!unchecked.ok()) return;  // LMDB itself noticed (e.g. a damaged main DB root)
  VerifyReport report;
  Status s = (*unchecked)->Verify("", &report);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_FALSE(report.problems.empty());
}

class LmdbCheckDamageTest : public ::testing::Test {
 protected:
  void SetUp() override {
    BuildStore(dir_.path());
    auto store = Store::Open(dir_.path());
    ASSERT_TRUE(store.ok());
    ASSERT_TRUE((*store)->Compact(dir_.Sub("c")).ok());
    Store::Options ro;
    ro.read_only = true;
    ASSERT_TRUE(Store::Open(dir_.Sub("c"), ro).ok());  // undamaged, it opens
  }
  PageFile File() { return PageFile(dir_.Sub("c") + "/data.mdb"); }
  TempDir dir_;
};

TEST_F(LmdbCheckDamageTest, BranchChildPointingToItsSibling) {
  PageFile f = File();
  long page = f.Find([&](size_t n) { return f.Flags(n) == 0x01 && f.Nodes(n) >= 2; });
  ASSERT_GE(page, 0) << "no branch page";
  std::memcpy(f.Node(page, 1), f.Node(page, 0), 6);  // child pgno: lo, hi, flags
  f.Write();
  ExpectReported(dir_.Sub("c"), "page reached twice");
}

TEST_F(LmdbCheckDamageTest, BranchChildOutsideTheFile) {
  PageFile f = File();
  long page = f.Find([&](size_t n) { return f.Flags(n) == 0x01 && f.Nodes(n) >= 2; });
  ASSERT_GE(page, 0);
  std::memset(f.Node(page, 1), 0x7F, 6);
  f.Write();
  ExpectReported(dir_.Sub("c"), "outside the snapshot's");
}

TEST_F(LmdbCheckDamageTest, LeafFreeSpaceBoundsCrossed) {
  PageFile f = File();
  long page = f.Find([&](size_t n) { return f.Flags(n) == 0x02 && f.Nodes(n) >= 2; });
  ASSERT_GE(page, 0);
  uint16_t upper;
  std::memcpy(&upper, f.Page(page) + 14, 2);
  const uint16_t lower = static_cast<uint16_t>(upper + 2);
  std::memcpy(f.Page(page) + 12, &lower, 2);
  f.Write();
  ExpectReported(dir_.Sub("c"), "free space bounds");
}

TEST_F(LmdbCheckDamageTest, LeafNodeOffsetOutsideThePage) {
  PageFile f = File();
  long page = f.Find([&](size_t n) { return f.Flags(n) == 0x02 && f.Nodes(n) >= 2; });
  ASSERT_GE(page, 0);
  const uint16_t off = 0xFFF0;
  std::memcpy(f.Page(page) + 16 + 2, &off, 2);
  f.Write();
  ExpectReported(dir_.Sub("c"), "node 1 offset 65520");
}

TEST_F(LmdbCheckDamageTest, OverflowRunOfZeroPages) {
  PageFile f = File();
  long page = f.Find([&](size_t n) { return f.Flags(n) == 0x04; });
  ASSERT_GE(page, 0) << "no overflow page";
  const uint32_t zero = 0;
  std::memcpy(f.Page(page) + 12, &zero, 4);
  f.Write();
  ExpectReported(dir_.Sub("c"), "overflow run of node", /*writers_only=*/true);
}

TEST_F(LmdbCheckDamageTest, PageNumberInHeader) {
  PageFile f = File();
  long page = f.Find([&](size_t n) { return f.Flags(n) == 0x02; });
  ASSERT_GE(page, 0);
  f.Page(page)[0] ^= 0x01;
  f.Write();
  ExpectReported(dir_.Sub("c"), "page header says page");
}

TEST_F(LmdbCheckDamageTest, TruncatedFile) {
  PageFile f = File();
  f.bytes.resize(f.bytes.size() - f.psize);
  f.Write();
  Store::Options ro;
  ro.read_only = true;
  auto opened = Store::Open(dir_.Sub("c"), ro);
  ASSERT_FALSE(opened.ok());
  EXPECT_TRUE(opened.status().IsCorruption()) << opened.status().ToString();
}

// A store with one whole task "a", plus one record under task id 77 (no task has it) put into
// database `db` with LMDB alone. Returns the status of Verify("") after checking Verify("a").
Status VerifyWithStray(const std::string& dir, const char* db, size_t key_size) {
  {
    auto store = Store::Open(dir);
    EXPECT_TRUE(store.ok());
    const ModelFingerprint model = SmallModel(DType::kBF16, 2);
    EXPECT_TRUE((*store)->CreateTask(MakeTask("a", model)).ok());
    TestBlock b = MakeBlock(model, 1, 0, 0);
    EXPECT_TRUE((*store)->AppendBlock("a", b.block).ok());
    EXPECT_TRUE((*store)->Verify("", nullptr).ok());
  }
  MDB_env* env;
  EXPECT_EQ(mdb_env_create(&env), MDB_SUCCESS);
  mdb_env_set_maxdbs(env, 64);
  mdb_env_set_mapsize(env, size_t(1) << 32);
  EXPECT_EQ(mdb_env_open(env, dir.c_str(), 0, 0644), MDB_SUCCESS);
  MDB_txn* txn;
  EXPECT_EQ(mdb_txn_begin(env, nullptr, 0, &txn), MDB_SUCCESS);
  MDB_dbi dbi;
  EXPECT_EQ(mdb_dbi_open(txn, db, 0, &dbi), MDB_SUCCESS);
  char key[8] = {0, 0, 0, 77, 0, 0, 0, 0};
  char value[] = "stray";
  MDB_val k{key_size, key}, v{5, value};
  EXPECT_EQ(mdb_put(txn, dbi, &k, &v, 0), MDB_SUCCESS);
  EXPECT_EQ(mdb_txn_commit(txn), MDB_SUCCESS);
  mdb_env_close(env);

  auto store = Store::Open(dir);
  EXPECT_TRUE(store.ok()) << store.status().ToString();
  if (!store.ok()) return store.status();
  EXPECT_TRUE((*store)->Verify("a", nullptr).ok());  // task a itself is whole
  VerifyReport report;
  Status s = (*store)->Verify("", &report);
  EXPECT_FALSE(report.problems.empty());
  return s;
}

TEST(VerifyOrphansTest, ARecordCountTheTasksDoNotAccountForIsReported) {
  TempDir dir;
  Status s = VerifyWithStray(dir.path(), "blocks", 8);
  ASSERT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("database blocks holds 2 records; the tasks account for 1"),
            std::string::npos)
      << s.ToString();
}

TEST(VerifyOrphansTest, AKeyOfNoListedTaskIsReported) {
  TempDir dir;
  // bm25_stats has one record per task with documents, not a count Verify can predict.
  Status s = VerifyWithStray(dir.path(), "bm25_stats", 4);
  ASSERT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("database bm25_stats holds a record of task id 77"), std::string::npos)
      << s.ToString();
}

}  // namespace
}  // namespace shotdb
