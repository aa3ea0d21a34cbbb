#include "engine/store.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <thread>

#include "engine/export.h"
#include "engine/lmdb_util.h"
#include "engine/store_test_util.h"

namespace shotdb {
namespace {

using testing_util::FlipInFile;
using testing_util::MakeBlock;
using testing_util::MakeTask;
using testing_util::SmallModel;
using testing_util::TempDir;
using testing_util::TensorBytes;
using testing_util::TestBlock;

std::unique_ptr<Store> OpenOrDie(const std::string& dir, const Store::Options& options = {}) {
  Result<std::unique_ptr<Store>> store = Store::Open(dir, options);
  EXPECT_TRUE(store.ok()) << store.status().ToString();
  return store.ok() ? std::move(store).value() : nullptr;
}

// Appends blocks [from, to) of `seed` with 5 + (i % 3) tokens each; returns the next offset.
uint64_t AppendBlocks(Store* store, const std::string& task, const ModelFingerprint& model,
                      uint64_t seed, uint32_t from, uint32_t to, uint64_t offset) {
  for (uint32_t i = from; i < to; ++i) {
    const uint32_t tokens = 5 + i % 3;
    TestBlock tb = MakeBlock(model, seed, i, offset, tokens);
    Status s = store->AppendBlock(task, tb.block);
    EXPECT_TRUE(s.ok()) << s.ToString();
    offset += tokens;
  }
  return offset;
}

// Checks every block, demonstration and payload of `task` against what MakeBlock produced.
void ExpectTaskContents(Store* store, const std::string& task, const ModelFingerprint& model,
                        uint64_t seed, uint32_t num_blocks) {
  auto snap = store->BeginSnapshot();
  ASSERT_TRUE(snap.ok()) << snap.status().ToString();
  Result<TaskInfo> info = (*snap)->GetTask(task);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->num_blocks, num_blocks);
  EXPECT_EQ(info->num_demos, 2u * num_blocks);
  EXPECT_EQ(info->version, num_blocks);
  uint64_t offset = 0, raw = 0;
  for (uint32_t i = 0; i < num_blocks; ++i) {
    const uint32_t tokens = 5 + i % 3;
    TestBlock expected = MakeBlock(model, seed, i, offset, tokens);
    offset += tokens;
    Result<BlockInfo> block = (*snap)->GetBlock(task, i);
    ASSERT_TRUE(block.ok()) << block.status().ToString();
    EXPECT_EQ(*block, expected.block.info);
    for (const Demonstration& d : expected.block.demos) {
      Result<Demonstration> got = (*snap)->GetDemonstration(task, d.id);
      ASSERT_TRUE(got.ok()) << got.status().ToString();
      EXPECT_EQ(*got, d);
    }
    for (uint32_t layer = 0; layer < model.num_layers; ++layer) {
      for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
        const std::vector<uint8_t>& want =
            expected.tensors[2 * layer + (kind == TensorKind::kValue)];
        Result<PayloadRef> ref = (*snap)->GetPayload(task, i, layer, kind);
        ASSERT_TRUE(ref.ok()) << ref.status().ToString();
        ASSERT_EQ(ref->size, want.size());
        // Consumers read the payload as an array of its element type (small records sit at
        // 2-byte-aligned offsets inside LMDB pages, so this needs the store's copy fallback).
        EXPECT_EQ(reinterpret_cast<uintptr_t>(ref->data) % DTypeSize(model.dtype), 0u)
            << "block " << i << " layer " << layer;
        EXPECT_EQ(std::memcmp(ref->data, want.data(), want.size()), 0)
            << "block " << i << " layer " << layer;
        EXPECT_EQ(ref->header.meta.tokens, tokens);
        std::vector<uint8_t> dst(want.size());
        ASSERT_TRUE((*snap)->DecodePayloadInto(task, i, layer, kind, dst.data(), dst.size()).ok());
        EXPECT_EQ(dst, want);
        raw += want.size();
      }
    }
  }
  EXPECT_EQ(info->num_tokens, offset);
  EXPECT_EQ(info->payload_raw_bytes, raw);
}

TEST(StoreTest, RoundTripEveryCodecAndDType) {
  TempDir dir;
  const Codec codecs[] = {Codec::kRaw, Codec::kLz4, Codec::kShuffleLz4};
  const DType dtypes[] = {DType::kF32, DType::kF16, DType::kBF16, DType::kF64};
  {
    auto store = OpenOrDie(dir.path());
    ASSERT_NE(store, nullptr);
    for (Codec codec : codecs) {
      for (DType dtype : dtypes) {
        const std::string name =
            std::string(CodecName(codec)) + "/" + std::string(DTypeName(dtype));
        TaskInfo task = MakeTask(name, SmallModel(dtype), codec);
        ASSERT_TRUE(store->CreateTask(task).ok());
        AppendBlocks(store.get(), name, task.model, 7, 0, 4, 0);
        ExpectTaskContents(store.get(), name, task.model, 7, 4);
      }
    }
    VerifyReport report;
    Status v = store->Verify("", &report);
    EXPECT_TRUE(v.ok()) << v.ToString();
    EXPECT_EQ(report.tasks_checked, 12u);
    EXPECT_EQ(report.records_checked, 12u * 4 * 3 * 2);
  }
  // Everything persisted: reopen (read-only) and check again, including the task record fields.
  Store::Options ro;
  ro.read_only = true;
  auto store = OpenOrDie(dir.path(), ro);
  ASSERT_NE(store, nullptr);
  auto snap = store->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  Result<std::vector<TaskInfo>> tasks = (*snap)->ListTasks();
  ASSERT_TRUE(tasks.ok());
  ASSERT_EQ(tasks->size(), 12u);
  for (const TaskInfo& t : *tasks) {
    TaskInfo want = MakeTask(t.name, t.model, t.codec);
    EXPECT_EQ(t.prompt_template, want.prompt_template);
    EXPECT_EQ(t.separator, want.separator);
    EXPECT_EQ(t.labels, want.labels);
    EXPECT_EQ(t.metadata_json, want.metadata_json);
    EXPECT_EQ(t.analyzer, want.analyzer);
    EXPECT_EQ(t.bm25, want.bm25);
    EXPECT_EQ(t.blocks, want.blocks);
    EXPECT_GT(t.created_unix, 0);
    ExpectTaskContents(store.get(), t.name, t.model, 7, 4);
  }
  Result<StoreStats> stats = store->Stats();
  ASSERT_TRUE(stats.ok());
  for (const TaskStats& ts : stats->tasks) {
    if (ts.codec == Codec::kRaw) {
      EXPECT_LT(ts.compression_ratio, 1.0);  // headers only add bytes
    }
    EXPECT_GT(ts.payload_stored_bytes, 0u);
  }
  EXPECT_GE(stats->file_size, stats->used_bytes);
  // A read-only store refuses writes.
  EXPECT_TRUE(store->AppendBlock("raw/f32", MakeBlock(SmallModel(DType::kF32), 7, 4, 100).block)
                  .IsIOError());
  EXPECT_TRUE(store->CreateTask(MakeTask("new", SmallModel())).IsIOError());
}

TEST(StoreTest, CreateTaskErrors) {
  TempDir dir;
  auto store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->CreateTask(MakeTask("a", SmallModel())).ok());
  EXPECT_TRUE(store->CreateTask(MakeTask("a", SmallModel())).IsAlreadyExists());
  EXPECT_TRUE(store->CreateTask(MakeTask("", SmallModel())).IsInvalidArgument());
  EXPECT_TRUE(store->CreateTask(MakeTask(std::string(256, 'x'), SmallModel())).IsInvalidArgument());
  ModelFingerprint zero = SmallModel();
  zero.kv_heads = 0;
  EXPECT_TRUE(store->CreateTask(MakeTask("b", zero)).IsInvalidArgument());
  TaskInfo bad_codec = MakeTask("c", SmallModel());
  bad_codec.codec = static_cast<Codec>(9);
  EXPECT_TRUE(store->CreateTask(bad_codec).IsInvalidArgument());
  EXPECT_TRUE(store->AppendBlock("nope", MakeBlock(SmallModel(), 1, 0, 0).block).IsNotFound());
  EXPECT_TRUE(store->DeleteTask("nope").IsNotFound());
  auto snap = store->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  EXPECT_TRUE((*snap)->GetTask("nope").status().IsNotFound());
  EXPECT_TRUE((*snap)->GetBlock("a", 0).status().IsNotFound());
  EXPECT_TRUE((*snap)->GetPayload("a", 0, 0, TensorKind::kKey).status().IsNotFound());
  EXPECT_TRUE((*snap)->GetDemonstration("a", 0).status().IsNotFound());
}

TEST(StoreTest, RefusesMismatchedBlocks) {
  TempDir dir;
  auto store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  const ModelFingerprint model = SmallModel(DType::kBF16, 3);
  ASSERT_TRUE(store->CreateTask(MakeTask("t", model)).ok());
  AppendBlocks(store.get(), "t", model, 3, 0, 2, 0);
  const uint64_t next_offset = 5 + 6;

  struct Case {
    const char* name;
    std::function<void(NewBlock*)> mutate;
    Status::Code code;
    const char* message_part;
  };
  const Case cases[] = {
      {"dtype", [](NewBlock* b) { b->model.dtype = DType::kF16; },
       Status::Code::kFailedPrecondition, "llama f16"},
      {"kv_heads", [](NewBlock* b) { b->model.kv_heads = 4; }, Status::Code::kFailedPrecondition,
       "kv_heads=2"},
      {"head_dim", [](NewBlock* b) { b->model.head_dim = 16; }, Status::Code::kFailedPrecondition,
       "head_dim=8"},
      {"tokenizer", [](NewBlock* b) { b->model.tokenizer_hash = "other"; },
       Status::Code::kFailedPrecondition, "tokenizer=tok-0123"},
      {"architecture", [](NewBlock* b) { b->model.architecture = "qwen2"; },
       Status::Code::kFailedPrecondition, "qwen2"},
      {"layers", [](NewBlock* b) { b->keys.pop_back(); }, Status::Code::kFailedPrecondition,
       "expected 3 K and V tensors, got 2 K and 3 V"},
      {"index gap", [](NewBlock* b) { b->info.index = 3; }, Status::Code::kInvalidArgument,
       "expected the next index 2"},
      {"index repeat", [](NewBlock* b) { b->info.index = 1; }, Status::Code::kInvalidArgument,
       "expected the next index 2"},
      {"null tensor", [](NewBlock* b) { b->values[1] = nullptr; }, Status::Code::kInvalidArgument,
       "null"},
      {"no tokens", [](NewBlock* b) { b->info.token_count = 0; }, Status::Code::kInvalidArgument,
       "token_count"},
      {"demo ids", [](NewBlock* b) { b->info.demo_ids[0] = 77; }, Status::Code::kInvalidArgument,
       "demo_ids lists 77"},
      {"demo id reused",
       [](NewBlock* b) {
         b->demos[1].id = 1000;  // block 1's first demonstration
         b->info.demo_ids[1] = 1000;
       },
       Status::Code::kInvalidArgument, "already stored"},
      {"overlapping positions", [](NewBlock* b) { b->info.position_offset = 10; },
       Status::Code::kInvalidArgument, "ends at 11"},
  };
  for (const Case& c : cases) {
    TestBlock tb = MakeBlock(model, 3, 2, next_offset, 7);
    c.mutate(&tb.block);
    Status s = store->AppendBlock("t", tb.block);
    EXPECT_EQ(s.code(), c.code) << c.name << ": " << s.ToString();
    EXPECT_NE(s.message().find(c.message_part), std::string::npos)
        << c.name << ": " << s.ToString();
  }
  // Nothing of the refused blocks was stored; a correct block still appends.
  auto snap = store->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  EXPECT_EQ((*snap)->GetTask("t")->num_blocks, 2u);
  EXPECT_TRUE((*snap)->GetDemonstration("t", 2000).status().IsNotFound());
  snap->reset();
  EXPECT_TRUE(store->AppendBlock("t", MakeBlock(model, 3, 2, next_offset, 7).block).ok());
  EXPECT_TRUE(store->Verify("t", nullptr).ok());
}

// GetBlockRecords walks a block's records with a cursor; it must return exactly what GetRecord
// returns, record by record, for layers in any order, and name what is missing.
TEST(StoreTest, BlockRecordsEqualSingleRecordLookups) {
  TempDir dir;
  const ModelFingerprint model = SmallModel(DType::kBF16, 4);
  auto store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->CreateTask(MakeTask("t", model, Codec::kRaw)).ok());
  ASSERT_TRUE(store->CreateTask(MakeTask("u", model, Codec::kLz4)).ok());
  uint64_t offset = 0;
  for (uint32_t i = 0; i < 3; ++i) {
    const uint32_t tokens = i == 1 ? 900 : 5 + i;  // block 1's records span overflow pages
    ASSERT_TRUE(store->AppendBlock("t", MakeBlock(model, 5, i, offset, tokens).block).ok());
    ASSERT_TRUE(store->AppendBlock("u", MakeBlock(model, 6, i, offset, tokens).block).ok());
    offset += tokens;
  }
  auto snap = store->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  for (const char* task : {"t", "u"}) {
    for (uint32_t block = 0; block < 3; ++block) {
      for (const std::vector<uint32_t>& layers :
           std::vector<std::vector<uint32_t>>{{0, 1, 2, 3}, {3, 1}, {2}, {1, 1, 0}, {}}) {
        Result<std::vector<BlockRecordView>> got = (*snap)->GetBlockRecords(task, block, layers);
        ASSERT_TRUE(got.ok()) << got.status().ToString();
        ASSERT_EQ(got->size(), 2 * layers.size());
        for (size_t i = 0; i < layers.size(); ++i) {
          for (int kv = 0; kv < 2; ++kv) {
            const TensorKind kind = kv == 0 ? TensorKind::kKey : TensorKind::kValue;
            Result<BlockRecordView> want = (*snap)->GetRecord(task, block, layers[i], kind);
            ASSERT_TRUE(want.ok());
            const BlockRecordView& g = (*got)[2 * i + kv];
            EXPECT_EQ(g.payload, want->payload) << task << " " << block << " " << layers[i];
            EXPECT_EQ(g.payload_size, want->payload_size);
            EXPECT_EQ(g.header.meta.layer, layers[i]);
            EXPECT_EQ(g.header.meta.kind, kind);
          }
        }
      }
    }
  }
  // GetBlockPayloads gives what GetPayload gives, record by record: headers and bytes (decoded
  // for LZ4), with and without checksum verification.
  for (const char* task : {"t", "u"}) {
    for (uint32_t block = 0; block < 3; ++block) {
      for (bool verify : {true, false}) {
        const std::vector<uint32_t> layers = {3, 0, 1, 1};
        Result<std::vector<PayloadRef>> got =
            (*snap)->GetBlockPayloads(task, block, layers, verify);
        ASSERT_TRUE(got.ok()) << got.status().ToString();
        ASSERT_EQ(got->size(), 2 * layers.size());
        for (size_t i = 0; i < got->size(); ++i) {
          const TensorKind kind = i % 2 == 0 ? TensorKind::kKey : TensorKind::kValue;
          Result<PayloadRef> want = (*snap)->GetPayload(task, block, layers[i / 2], kind, verify);
          ASSERT_TRUE(want.ok());
          const PayloadRef& g = (*got)[i];
          EXPECT_EQ(g.header.meta.layer, layers[i / 2]);
          EXPECT_EQ(g.header.meta.kind, kind);
          EXPECT_EQ(g.header.raw_size, want->header.raw_size);
          ASSERT_EQ(g.size, want->size);
          EXPECT_EQ(std::memcmp(g.data, want->data, g.size), 0) << task << " " << block;
        }
      }
    }
  }
  EXPECT_TRUE((*snap)->GetBlockPayloads("t", 1, {2, 4}).status().IsNotFound());
  EXPECT_TRUE((*snap)->GetBlockPayloads("t", 3, {0}).status().IsNotFound());
  EXPECT_TRUE((*snap)->GetBlockPayloads("nope", 0, {0}).status().IsNotFound());

  Result<std::vector<BlockRecordView>> missing = (*snap)->GetBlockRecords("t", 1, {2, 4});
  EXPECT_TRUE(missing.status().IsNotFound()) << missing.status().ToString();
  EXPECT_NE(missing.status().message().find("task t block 1 layer 4 K"), std::string::npos)
      << missing.status().ToString();
  EXPECT_TRUE((*snap)->GetBlockRecords("t", 3, {0}).status().IsNotFound());
  EXPECT_TRUE((*snap)->GetBlockRecords("nope", 0, {0}).status().IsNotFound());
}

class StoreCorruptionTest : public ::testing::TestWithParam<Codec> {};

TEST_P(StoreCorruptionTest, DamagedPayloadAndHeaderAreReported) {
  TempDir dir;
  const ModelFingerprint model = SmallModel(DType::kBF16, 2);
  std::vector<uint8_t> payload_bytes, header_bytes;
  {
    auto store = OpenOrDie(dir.path());
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->CreateTask(MakeTask("t", model, GetParam())).ok());
    // Larger blocks so that compressed payloads are long enough to be unique in the file.
    uint64_t offset = 0;
    for (uint32_t i = 0; i < 3; ++i) {
      ASSERT_TRUE(store->AppendBlock("t", MakeBlock(model, 11, i, offset, 64).block).ok());
      offset += 64;
    }
    auto snap = store->BeginSnapshot();
    ASSERT_TRUE(snap.ok());
    Result<BlockRecordView> v1 = (*snap)->GetRecord("t", 1, 0, TensorKind::kValue);
    ASSERT_TRUE(v1.ok());
    payload_bytes.assign(v1->payload, v1->payload + v1->payload_size);
    Result<BlockRecordView> v2 = (*snap)->GetRecord("t", 2, 1, TensorKind::kKey);
    ASSERT_TRUE(v2.ok());
    header_bytes.assign(v2->payload - kBlockRecordHeaderSize, v2->payload + 32);
  }
  const std::string data = dir.path() + "/data.mdb";
  ASSERT_TRUE(FlipInFile(data, payload_bytes, payload_bytes.size() / 2));
  ASSERT_TRUE(FlipInFile(data, header_bytes, 20));  // the `tokens` field of the header

  auto store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  auto snap = store->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  Result<PayloadRef> bad = (*snap)->GetPayload("t", 1, 0, TensorKind::kValue);
  EXPECT_TRUE(bad.status().IsCorruption()) << bad.status().ToString();
  EXPECT_NE(bad.status().message().find("task t block 1 layer 0 V"), std::string::npos);
  std::vector<uint8_t> dst(2 * 64 * 8 * 2);
  EXPECT_TRUE((*snap)
                  ->DecodePayloadInto("t", 1, 0, TensorKind::kValue, dst.data(), dst.size())
                  .IsCorruption());
  EXPECT_TRUE((*snap)->GetRecord("t", 2, 1, TensorKind::kKey).status().IsCorruption());
  EXPECT_TRUE((*snap)->GetPayload("t", 2, 1, TensorKind::kKey).status().IsCorruption());
  // The same damage through GetBlockPayloads: Corruption naming the record, never its bytes.
  Result<std::vector<PayloadRef>> payloads = (*snap)->GetBlockPayloads("t", 1, {0});
  EXPECT_TRUE(payloads.status().IsCorruption()) << payloads.status().ToString();
  EXPECT_NE(payloads.status().message().find("task t block 1 layer 0 V"), std::string::npos)
      << payloads.status().ToString();
  payloads = (*snap)->GetBlockPayloads("t", 2, {1});
  EXPECT_TRUE(payloads.status().IsCorruption()) << payloads.status().ToString();
  EXPECT_NE(payloads.status().message().find("task t block 2 layer 1 K"), std::string::npos)
      << payloads.status().ToString();
  EXPECT_TRUE((*snap)->GetBlockPayloads("t", 1, {1}).ok());  // block 1's damage is in layer 0
  Result<std::vector<BlockRecordView>> walk = (*snap)->GetBlockRecords("t", 2, {0, 1});
  EXPECT_TRUE(walk.status().IsCorruption()) << walk.status().ToString();
  EXPECT_NE(walk.status().message().find("task t block 2 layer 1 K"), std::string::npos)
      << walk.status().ToString();
  EXPECT_TRUE((*snap)->GetBlockRecords("t", 2, {0}).ok());  // the damage is in layer 1
  // Undamaged neighbours still read.
  Result<PayloadRef> good = (*snap)->GetPayload("t", 1, 0, TensorKind::kKey);
  ASSERT_TRUE(good.ok()) << good.status().ToString();
  std::vector<uint8_t> want = TensorBytes(model, 64, 11, 1, 0, TensorKind::kKey);
  EXPECT_EQ(std::memcmp(good->data, want.data(), want.size()), 0);
  snap->reset();

  VerifyReport report;
  std::vector<uint64_t> progress;
  Status v = store->Verify("t", &report, [&](uint64_t done, uint64_t total) {
    EXPECT_EQ(total, 3u * 2 * 2);
    progress.push_back(done);
  });
  EXPECT_TRUE(v.IsCorruption());
  ASSERT_EQ(report.problems.size(), 2u) << ::testing::PrintToString(report.problems);
  EXPECT_NE(report.problems[0].find("block 1 layer 0 V"), std::string::npos) << report.problems[0];
  EXPECT_NE(report.problems[1].find("block 2 layer 1 K"), std::string::npos) << report.problems[1];
  EXPECT_EQ(progress, (std::vector<uint64_t>{4, 8, 12}));
  EXPECT_EQ(report.records_checked, 12u);
}

INSTANTIATE_TEST_SUITE_P(Codecs, StoreCorruptionTest,
                         ::testing::Values(Codec::kRaw, Codec::kLz4, Codec::kShuffleLz4),
                         [](const auto& info) {
                           std::string n(CodecName(info.param));
                           for (char& c : n) c = c == '-' ? '_' : c;
                           return n;
                         });

TEST(StoreTest, SnapshotIsStableWhileWriterAppends) {
  TempDir dir;
  auto store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  const ModelFingerprint model = SmallModel();
  ASSERT_TRUE(store->CreateTask(MakeTask("t", model)).ok());
  uint64_t offset = AppendBlocks(store.get(), "t", model, 5, 0, 3, 0);
  auto old_snap = store->BeginSnapshot();
  ASSERT_TRUE(old_snap.ok());
  Result<std::vector<ScoredDoc>> before = (*old_snap)->Search("t", "alarm music jazz", 10);
  ASSERT_TRUE(before.ok());
  AppendBlocks(store.get(), "t", model, 5, 3, 8, offset);

  EXPECT_EQ((*old_snap)->GetTask("t")->num_blocks, 3u);
  EXPECT_TRUE((*old_snap)->GetBlock("t", 3).status().IsNotFound());
  EXPECT_TRUE((*old_snap)->GetPayload("t", 5, 0, TensorKind::kKey).status().IsNotFound());
  Result<std::vector<ScoredDoc>> after_old = (*old_snap)->Search("t", "alarm music jazz", 10);
  ASSERT_TRUE(after_old.ok());
  EXPECT_EQ(*after_old, *before);

  auto new_snap = store->BeginSnapshot();
  ASSERT_TRUE(new_snap.ok());
  EXPECT_EQ((*new_snap)->GetTask("t")->num_blocks, 8u);
  EXPECT_EQ((*new_snap)->Search("t", "alarm music jazz", 10)->size(), 8u);
  old_snap->reset();
  new_snap->reset();
  ExpectTaskContents(store.get(), "t", model, 5, 8);
}

// The mapped range is the data file mapped at `base`: every record view lies inside, and its bytes
// are the file's bytes at the same offset (read back with ordinary file I/O).
TEST(StoreTest, MappedRangeIsTheDataFile) {
  TempDir dir;
  auto store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  ModelFingerprint model = SmallModel();
  model.num_layers = 2;
  TaskInfo task = MakeTask("t", model);
  task.codec = Codec::kRaw;
  ASSERT_TRUE(store->CreateTask(task).ok());
  AppendBlocks(store.get(), "t", model, 9, 0, 4, 0);
  // A large block: its records live on overflow pages.
  TestBlock big = MakeBlock(model, 9, 4, 100, 3000);
  ASSERT_TRUE(store->AppendBlock("t", big.block).ok());

  auto snap = store->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  Result<Snapshot::MappedRange> mapped = (*snap)->Mapped();
  ASSERT_TRUE(mapped.ok()) << mapped.status().ToString();
  const Snapshot::MappedRange range = *mapped;
  ASSERT_NE(range.base, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(range.base) % 4096, 0u);
  EXPECT_EQ(range.bytes % 4096, 0u);
  Result<StoreStats> stats = store->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(range.bytes, stats->used_bytes);
  EXPECT_LE(range.bytes, stats->file_size);

  std::ifstream file(dir.path() + "/data.mdb", std::ios::binary);
  ASSERT_TRUE(file.good());
  for (uint32_t block = 0; block < 5; ++block) {
    for (uint32_t layer = 0; layer < model.num_layers; ++layer) {
      Result<BlockRecordView> view = (*snap)->GetRecord("t", block, layer, TensorKind::kValue);
      ASSERT_TRUE(view.ok()) << view.status().ToString();
      const uint8_t* p = static_cast<const uint8_t*>(view->payload);
      ASSERT_GE(p, range.base);
      ASSERT_LE(p + view->payload_size, range.base + range.bytes);
      std::vector<char> from_file(view->payload_size);
      file.seekg(static_cast<std::streamoff>(p - range.base));
      file.read(from_file.data(), static_cast<std::streamsize>(from_file.size()));
      ASSERT_TRUE(file.good());
      EXPECT_EQ(std::memcmp(from_file.data(), p, from_file.size()), 0)
          << "block " << block << " layer " << layer;
    }
  }
}

TEST(StoreTest, ManyReaderThreadsOneWriter) {
  TempDir dir;
  auto store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  const ModelFingerprint model = SmallModel(DType::kF16, 2);
  ASSERT_TRUE(store->CreateTask(MakeTask("t", model, Codec::kShuffleLz4)).ok());
  constexpr uint32_t kBlocks = 40;
  std::atomic<bool> done{false};
  std::atomic<int> errors{0};
  std::atomic<uint64_t> reads{0};
  std::vector<std::thread> readers;
  for (int r = 0; r < 4; ++r) {
    readers.emplace_back([&, r] {
      uint64_t last_seen = 0;
      uint64_t x = static_cast<uint64_t>(r);
      while (!done.load()) {
        auto snap = store->BeginSnapshot();
        if (!snap.ok()) {
          ++errors;
          return;
        }
        Result<TaskInfo> t = (*snap)->GetTask("t");
        if (!t.ok() || t->num_blocks < last_seen) ++errors;  // views only move forward
        if (!t.ok() || t->num_blocks == 0) continue;
        last_seen = t->num_blocks;
        x = testing_util::SplitMix64(x);
        const uint32_t b = static_cast<uint32_t>(x % t->num_blocks);
        Result<BlockInfo> info = (*snap)->GetBlock("t", b);
        Result<PayloadRef> p = (*snap)->GetPayload("t", b, 1, TensorKind::kValue);
        if (!info.ok() || !p.ok()) {
          ++errors;
          continue;
        }
        std::vector<uint8_t> want =
            TensorBytes(model, info->token_count, 9, b, 1, TensorKind::kValue);
        if (p->size != want.size() || std::memcmp(p->data, want.data(), want.size()) != 0) {
          ++errors;
        }
        ++reads;
      }
    });
  }
  AppendBlocks(store.get(), "t", model, 9, 0, kBlocks, 0);
  done = true;
  for (std::thread& t : readers) t.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_GT(reads.load(), 0u);
  EXPECT_TRUE(store->Verify("t", nullptr).ok());
}

TEST(StoreTest, ReadersInOtherProcessesSeeOnlyWholeBlocks) {
  TempDir dir;
  const ModelFingerprint model = SmallModel(DType::kBF16, 4);
  constexpr uint32_t kBlocks = 30;
  {
    auto store = OpenOrDie(dir.path());
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->CreateTask(MakeTask("t", model, Codec::kLz4)).ok());
  }
  std::vector<pid_t> children;
  for (int c = 0; c < 3; ++c) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      // Child: its own read-only Store; checks every visible block until all are there.
      Store::Options ro;
      ro.read_only = true;
      Result<std::unique_ptr<Store>> store = Store::Open(dir.path(), ro);
      if (!store.ok()) _exit(10);
      for (int iter = 0; iter < 200000; ++iter) {
        auto snap = (*store)->BeginSnapshot();
        if (!snap.ok()) _exit(11);
        Result<TaskInfo> t = (*snap)->GetTask("t");
        if (!t.ok()) _exit(12);
        for (uint32_t b = 0; b < t->num_blocks; ++b) {
          Result<BlockInfo> info = (*snap)->GetBlock("t", b);
          if (!info.ok()) _exit(13);
          for (uint32_t layer = 0; layer < model.num_layers; ++layer) {
            Result<PayloadRef> p = (*snap)->GetPayload("t", b, layer, TensorKind::kKey);
            if (!p.ok()) _exit(14);
            std::vector<uint8_t> want =
                TensorBytes(model, info->token_count, 21, b, layer, TensorKind::kKey);
            if (std::memcmp(p->data, want.data(), want.size()) != 0) _exit(15);
          }
        }
        if (t->num_blocks == kBlocks) _exit((*store)->Verify("t", nullptr).ok() ? 0 : 16);
      }
      _exit(17);
    }
    children.push_back(pid);
  }
  {
    auto store = OpenOrDie(dir.path());
    ASSERT_NE(store, nullptr);
    AppendBlocks(store.get(), "t", model, 21, 0, kBlocks, 0);
  }
  for (pid_t pid : children) {
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_EQ(WEXITSTATUS(status), 0);
  }
}

TEST(StoreTest, GrowsTheMapWhenFull) {
  TempDir dir;
  const ModelFingerprint model = SmallModel(DType::kF32, 4);
  Store::Options tiny;
  tiny.map_size = 64 * 1024;
  constexpr uint32_t kTokens = 600;  // 4 layers x 2 x 2 heads x 600 x 8 x 4 B = 300 KiB a block
  {
    auto store = OpenOrDie(dir.path(), tiny);
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->CreateTask(MakeTask("t", model)).ok());
    uint64_t offset = 0;
    for (uint32_t i = 0; i < 6; ++i) {
      Status s = store->AppendBlock("t", MakeBlock(model, 2, i, offset, kTokens).block);
      ASSERT_TRUE(s.ok()) << s.ToString();
      offset += kTokens;
    }
    Result<StoreStats> stats = store->Stats();
    ASSERT_TRUE(stats.ok());
    EXPECT_GT(stats->map_size, tiny.map_size);
    EXPECT_GE(stats->used_bytes, 6u * 4 * 2 * 2 * kTokens * 8 * 4);

    // While a snapshot is open the map cannot grow: a clear IOError, and nothing stored.
    auto snap = store->BeginSnapshot();
    ASSERT_TRUE(snap.ok());
    Status s;
    uint32_t i = 6;
    for (; i < 40 && s.ok(); ++i) {
      s = store->AppendBlock("t", MakeBlock(model, 2, i, offset, kTokens).block);
      if (s.ok()) offset += kTokens;
    }
    ASSERT_TRUE(s.IsIOError()) << s.ToString();
    EXPECT_NE(s.message().find("snapshots are open"), std::string::npos) << s.ToString();
    const uint32_t failed = i - 1;
    snap->reset();
    s = store->AppendBlock("t", MakeBlock(model, 2, failed, offset, kTokens).block);
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_TRUE(store->Verify("t", nullptr).ok());
  }
  // Reopening with the tiny map size still maps the whole file.
  auto store = OpenOrDie(dir.path(), tiny);
  ASSERT_NE(store, nullptr);
  Status v = store->Verify("t", nullptr);
  EXPECT_TRUE(v.ok()) << v.ToString();
}

TEST(StoreTest, AdoptsMapGrownByAnotherProcess) {
  TempDir dir;
  const ModelFingerprint model = SmallModel(DType::kF32, 4);
  Store::Options tiny;
  tiny.map_size = 256 * 1024;
  auto store = OpenOrDie(dir.path(), tiny);
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->CreateTask(MakeTask("t", model)).ok());
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // The child grows the map far beyond the parent's 256 KiB.
    Result<std::unique_ptr<Store>> child = Store::Open(dir.path(), tiny);
    if (!child.ok()) _exit(10);
    uint64_t offset = 0;
    for (uint32_t i = 0; i < 8; ++i) {
      if (!(*child)->AppendBlock("t", MakeBlock(model, 4, i, offset, 600).block).ok()) _exit(11);
      offset += 600;
    }
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  ASSERT_EQ(WEXITSTATUS(status), 0);
  // The parent's readers and writer adopt the larger map.
  {
    auto snap = store->BeginSnapshot();
    ASSERT_TRUE(snap.ok()) << snap.status().ToString();
    ASSERT_EQ((*snap)->GetTask("t")->num_blocks, 8u);
    for (uint32_t i = 0; i < 8; ++i) {
      Result<PayloadRef> p = (*snap)->GetPayload("t", i, 3, TensorKind::kValue);
      ASSERT_TRUE(p.ok()) << p.status().ToString();
      std::vector<uint8_t> want = TensorBytes(model, 600, 4, i, 3, TensorKind::kValue);
      EXPECT_EQ(std::memcmp(p->data, want.data(), want.size()), 0);
    }
  }
  Status s = store->AppendBlock("t", MakeBlock(model, 4, 8, 8 * 600, 600).block);
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(store->Verify("t", nullptr).ok());
}

TEST(StoreTest, DeleteTaskRemovesEverythingAndCompactReclaims) {
  TempDir dir;
  const ModelFingerprint model = SmallModel(DType::kBF16, 4);
  auto store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->CreateTask(MakeTask("keep", model, Codec::kLz4)).ok());
  ASSERT_TRUE(store->CreateTask(MakeTask("drop", model)).ok());
  AppendBlocks(store.get(), "keep", model, 1, 0, 5, 0);
  uint64_t offset = 0;
  for (uint32_t i = 0; i < 6; ++i) {  // big raw blocks: overflow pages
    ASSERT_TRUE(store->AppendBlock("drop", MakeBlock(model, 2, i, offset, 800).block).ok());
    offset += 800;
  }
  Result<StoreStats> before = store->Stats();
  ASSERT_TRUE(before.ok());

  ASSERT_TRUE(store->DeleteTask("drop").ok());
  auto snap = store->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  EXPECT_TRUE((*snap)->GetTask("drop").status().IsNotFound());
  EXPECT_EQ((*snap)->ListTasks()->size(), 1u);
  snap->reset();
  ExpectTaskContents(store.get(), "keep", model, 1, 5);
  EXPECT_TRUE(store->Verify("", nullptr).ok());
  Result<StoreStats> after = store->Stats();
  ASSERT_TRUE(after.ok());
  // Every per-record database now holds exactly what "keep" needs.
  for (const DbStats& db : after->dbs) {
    uint64_t want = 0;
    if (db.name == "tasks" || db.name == "task_names" || db.name == "bm25_stats" ||
        db.name == "demo_bm25_stats") {
      want = 1;
    }
    if (db.name == "blocks" || db.name == "doc_lengths") want = 5;
    if (db.name == "demos" || db.name == "demo_docs" || db.name == "demo_doc_lengths") want = 10;
    if (db.name == "payloads") want = 5 * 4 * 2;
    if (db.name == "meta") want = 2;
    if (db.name != "postings" && db.name != "demo_postings") {
      EXPECT_EQ(db.entries, want) << db.name;
    }
  }
  // The same name again is a new, empty task.
  ASSERT_TRUE(store->CreateTask(MakeTask("drop", model)).ok());
  snap = store->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  EXPECT_EQ((*snap)->GetTask("drop")->num_blocks, 0u);
  EXPECT_TRUE((*snap)->GetBlock("drop", 0).status().IsNotFound());
  EXPECT_TRUE((*snap)->Search("drop", "alarm", 3)->empty());
  snap->reset();

  // The file does not shrink; a compacted copy is smaller and equal in content.
  const std::string compact_dir = dir.Sub("compact");
  ASSERT_TRUE(store->Compact(compact_dir).ok());
  EXPECT_TRUE(store->Compact(compact_dir).IsAlreadyExists());
  auto compacted = OpenOrDie(compact_dir);
  ASSERT_NE(compacted, nullptr);
  Result<StoreStats> cstats = compacted->Stats();
  ASSERT_TRUE(cstats.ok());
  EXPECT_LT(cstats->file_size, before->file_size / 2);
  EXPECT_GE(after->file_size, before->file_size);
  ExpectTaskContents(compacted.get(), "keep", model, 1, 5);
  EXPECT_TRUE(compacted->Verify("", nullptr).ok());
}

TEST(StoreTest, ExportImportRoundTripAndRefusesDamage) {
  TempDir dir;
  const ModelFingerprint model = SmallModel(DType::kF16, 3);
  const std::string file = dir.Sub("t.shotdb");
  {
    auto store = OpenOrDie(dir.Sub("a"));
    ASSERT_NE(store, nullptr);
    TaskInfo task = MakeTask("t", model, Codec::kShuffleLz4);
    task.analyzer.tokenizer.split = TextTokenizerOptions::Split::kWhitespace;
    ASSERT_TRUE(store->CreateTask(task).ok());
    AppendBlocks(store.get(), "t", model, 8, 0, 7, 0);
    ASSERT_TRUE(ExportTask(*store, "t", file).ok());
    EXPECT_TRUE(ExportTask(*store, "missing", dir.Sub("m")).IsNotFound());
  }
  auto store = OpenOrDie(dir.Sub("b"));
  ASSERT_NE(store, nullptr);
  std::string name;
  Status s = ImportTask(store.get(), file, &name);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(name, "t");
  ExpectTaskContents(store.get(), "t", model, 8, 7);
  EXPECT_TRUE(store->Verify("t", nullptr).ok());
  auto a = OpenOrDie(dir.Sub("a"));
  ASSERT_NE(a, nullptr);
  auto sa = a->BeginSnapshot();
  auto sb = store->BeginSnapshot();
  ASSERT_TRUE(sa.ok() && sb.ok());
  TaskInfo ta = *(*sa)->GetTask("t"), tb = *(*sb)->GetTask("t");
  EXPECT_EQ(EncodeTaskInfo(ta).size(), EncodeTaskInfo(tb).size());
  ta.created_unix = tb.created_unix;
  EXPECT_EQ(EncodeTaskInfo(ta), EncodeTaskInfo(tb));
  EXPECT_EQ(*(*sa)->Search("t", "alarm jazz", 7), *(*sb)->Search("t", "alarm jazz", 7));
  sb->reset();
  EXPECT_TRUE(ImportTask(store.get(), file, nullptr).IsAlreadyExists());

  // A flipped byte anywhere, or a truncated file, is refused and leaves no task behind.
  std::ifstream in(file, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (size_t pos :
       {size_t{3}, size_t{40}, bytes.size() / 2, bytes.size() - 20, bytes.size() - 1}) {
    std::vector<char> damaged = bytes;
    damaged[pos] ^= 0x01;
    const std::string bad = dir.Sub("bad.shotdb");
    std::ofstream(bad, std::ios::binary)
        .write(damaged.data(), static_cast<std::streamsize>(damaged.size()));
    auto fresh = OpenOrDie(dir.Sub("c"));
    ASSERT_NE(fresh, nullptr);
    Status st = ImportTask(fresh.get(), bad, nullptr);
    EXPECT_TRUE(st.IsCorruption()) << pos << ": " << st.ToString();
    auto snap = fresh->BeginSnapshot();
    ASSERT_TRUE(snap.ok());
    EXPECT_TRUE((*snap)->ListTasks()->empty());
  }
  const std::string cut = dir.Sub("cut.shotdb");
  std::ofstream(cut, std::ios::binary)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 3));
  auto fresh = OpenOrDie(dir.Sub("c"));
  ASSERT_NE(fresh, nullptr);
  EXPECT_TRUE(ImportTask(fresh.get(), cut, nullptr).IsCorruption());
}

TEST(StoreTest, OpenErrors) {
  TempDir dir;
  Store::Options ro;
  ro.read_only = true;
  EXPECT_TRUE(Store::Open(dir.Sub("none"), ro).status().IsNotFound());
  Store::Options no_create;
  no_create.create_if_missing = false;
  EXPECT_TRUE(Store::Open(dir.Sub("none"), no_create).status().IsNotFound());
  EXPECT_TRUE(Store::Open(dir.path(), ro).status().IsNotFound());  // no data.mdb
  // A file that is not LMDB.
  const std::string junk = dir.Sub("junk");
  ASSERT_TRUE(std::filesystem::create_directory(junk));
  std::ofstream(junk + "/data.mdb", std::ios::binary) << std::string(64 * 1024, 'x');
  Result<std::unique_ptr<Store>> s = Store::Open(junk);
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(s.status().IsCorruption()) << s.status().ToString();
  // A regular file is not a store directory.
  EXPECT_TRUE(Store::Open(junk + "/data.mdb").status().IsInvalidArgument());
}

}  // namespace
}  // namespace shotdb

namespace shotdb {
namespace {

TEST(StoreTest, TaskRecordKeepsPositionsAnalyzerAndIdf) {
  TempDir dir;
  auto store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  TaskInfo task = MakeTask("r", SmallModel());
  task.blocks.positions = PositionScheme::kSequential;
  task.blocks.sink_blocks = 2;
  task.analyzer = AnalyzerOptions::Retriv({"the", "i'm", "caf\xc3\xa9"});
  task.bm25 = Bm25Params::Retriv();
  ASSERT_TRUE(store->CreateTask(task).ok());
  AppendBlocks(store.get(), "r", task.model, 3, 0, 2, 0);
  auto snap = store->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  Result<TaskInfo> got = (*snap)->GetTask("r");
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->blocks, task.blocks);
  EXPECT_EQ(got->analyzer, task.analyzer);
  EXPECT_EQ(got->bm25, task.bm25);
  // The per-demonstration index numbers the demonstrations in pool order.
  for (uint32_t d = 0; d < got->num_demos; ++d) {
    Result<Demonstration> demo = (*snap)->DemoAt("r", d);
    ASSERT_TRUE(demo.ok()) << demo.status().ToString();
    EXPECT_EQ(demo->id, (d / 2) * 1000 + d % 2);  // MakeBlock: 2 demos a block, ids block*1000+i
  }
  Result<std::vector<ScoredDoc>> hits = (*snap)->SearchDemos("r", "alarm", 100);
  ASSERT_TRUE(hits.ok()) << hits.status().ToString();
  EXPECT_EQ(hits->size(), got->num_demos);

  // A record of store format 1 (no position scheme, analyzer kind, stop words or idf) decodes with
  // what format 1 meant: sequential positions, the simple analyzer, Okapi idf.
  TaskInfo old = task;
  old.analyzer = AnalyzerOptions{};
  const std::string v2 = EncodeTaskInfo(old);
  const std::string v1 = v2.substr(0, v2.size() - (1 + 1 + 4 + 1));
  Result<TaskInfo> decoded = DecodeTaskInfo(v1, "v1 record");
  ASSERT_TRUE(decoded.ok()) << decoded.status().ToString();
  EXPECT_EQ(decoded->blocks.positions, PositionScheme::kSequential);
  EXPECT_EQ(decoded->analyzer, AnalyzerOptions{});
  EXPECT_EQ(decoded->bm25.idf, Bm25Idf::kOkapi);
  // A tail with an unknown scheme is corruption, not a silent default.
  std::string bad = v2;
  bad[v1.size()] = 7;
  EXPECT_TRUE(DecodeTaskInfo(bad, "bad record").status().IsCorruption());
  EXPECT_TRUE(DecodeTaskInfo(v2 + "x", "long record").status().IsCorruption());
}

TEST(StoreTest, CreateTaskRefusesUnusableOptionsAndWritesNothing) {
  TempDir dir;
  auto store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  TaskInfo no_label = MakeTask("a", SmallModel());
  no_label.prompt_template = "utterance: {text}";
  TaskInfo bad_analyzer = MakeTask("b", SmallModel());
  bad_analyzer.analyzer.stopwords = {"the"};  // the simple analyzer takes none
  TaskInfo no_sink = MakeTask("c", SmallModel());
  no_sink.blocks.sink_blocks = 0;
  for (const TaskInfo& t : {no_label, bad_analyzer, no_sink}) {
    Status s = store->CreateTask(t);
    EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
    EXPECT_NE(s.message().find("task " + t.name), std::string::npos) << s.ToString();
  }
  auto snap = store->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  EXPECT_TRUE((*snap)->ListTasks()->empty());
}

// Every (key, value) of a database, duplicates included.
std::vector<std::pair<std::string, std::string>> AllRecords(MDB_txn* txn, MDB_dbi dbi) {
  std::vector<std::pair<std::string, std::string>> records;
  MDB_cursor* c = nullptr;
  EXPECT_EQ(mdb_cursor_open(txn, dbi, &c), MDB_SUCCESS);
  MDB_val k, v;
  for (int rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == MDB_SUCCESS;
       rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
    records.emplace_back(std::string(static_cast<char*>(k.mv_data), k.mv_size),
                         std::string(static_cast<char*>(v.mv_data), v.mv_size));
  }
  mdb_cursor_close(c);
  return records;
}

// Turns a store written by this build into what an older store looks like: its version in meta
// (a plain u32), values without record checksums, postings of 8 bytes (no check word); for
// version 1 also no per-demonstration databases and task records without the version-2 tail.
void MakeOlderFormat(const std::string& dir, uint32_t version) {
  MDB_env* env = nullptr;
  ASSERT_EQ(mdb_env_create(&env), MDB_SUCCESS);
  ASSERT_EQ(mdb_env_set_maxdbs(env, 16), MDB_SUCCESS);
  ASSERT_EQ(mdb_env_open(env, dir.c_str(), 0, 0644), MDB_SUCCESS);
  MDB_txn* txn = nullptr;
  ASSERT_EQ(mdb_txn_begin(env, nullptr, 0, &txn), MDB_SUCCESS);
  std::vector<const char*> sealed = {"meta",  "task_names",  "tasks",     "blocks",
                                     "demos", "doc_lengths", "bm25_stats"};
  std::vector<const char*> postings = {"postings"};
  for (const char* name : {"demo_postings", "demo_doc_lengths", "demo_bm25_stats", "demo_docs"}) {
    MDB_dbi dbi;
    ASSERT_EQ(mdb_dbi_open(txn, name, 0, &dbi), MDB_SUCCESS) << name;
    if (version == 1) {
      ASSERT_EQ(mdb_drop(txn, dbi, 1), MDB_SUCCESS) << name;
    } else if (std::string(name) == "demo_postings") {
      postings.push_back(name);
    } else {
      sealed.push_back(name);
    }
  }
  // Unseal every checked value (and for version 1 cut the task records' tail).
  for (const char* name : sealed) {
    MDB_dbi dbi;
    ASSERT_EQ(mdb_dbi_open(txn, name, 0, &dbi), MDB_SUCCESS) << name;
    for (auto& [key, stored] : AllRecords(txn, dbi)) {
      Result<std::string_view> unsealed = lmdb::Unseal(key, stored, name);
      ASSERT_TRUE(unsealed.ok()) << unsealed.status().ToString();
      std::string value(*unsealed);
      if (std::string(name) == "tasks" && version == 1) {
        Result<TaskInfo> t = DecodeTaskInfo(value, "record");
        ASSERT_TRUE(t.ok());
        ASSERT_TRUE(t->analyzer.stopwords.empty());
        value.resize(value.size() - (1 + 1 + 4 + 1));
      }
      MDB_val rk{key.size(), key.data()}, rv{value.size(), value.data()};
      ASSERT_EQ(mdb_put(txn, dbi, &rk, &rv, 0), MDB_SUCCESS);
    }
  }
  MDB_dbi meta;
  ASSERT_EQ(mdb_dbi_open(txn, "meta", 0, &meta), MDB_SUCCESS);
  const char version_key[] = "format_version";
  const uint8_t le[4] = {static_cast<uint8_t>(version), 0, 0, 0};
  MDB_val k{sizeof version_key - 1, const_cast<char*>(version_key)}, v{4, const_cast<uint8_t*>(le)};
  ASSERT_EQ(mdb_put(txn, meta, &k, &v, 0), MDB_SUCCESS);
  // Postings of 8 bytes: the dups of a DUPFIXED key share one size, so empty the DB first.
  for (const char* name : postings) {
    MDB_dbi dbi;
    ASSERT_EQ(mdb_dbi_open(txn, name, MDB_DUPSORT | MDB_DUPFIXED, &dbi), MDB_SUCCESS);
    auto dups = AllRecords(txn, dbi);
    ASSERT_EQ(mdb_drop(txn, dbi, 0), MDB_SUCCESS);
    for (auto& [key, dup] : dups) {
      ASSERT_EQ(dup.size(), 12u);
      dup.resize(8);
      MDB_val rk{key.size(), key.data()}, rv{dup.size(), dup.data()};
      ASSERT_EQ(mdb_put(txn, dbi, &rk, &rv, 0), MDB_SUCCESS);
    }
  }
  ASSERT_EQ(mdb_txn_commit(txn), MDB_SUCCESS);
  mdb_env_close(env);
}

// A term key damaged so that it still sorts in its place ("jazz" -> "jazj", between "citi" and
// "loud"): the structure check cannot see it and the term simply looks absent, but a search for
// the term checks the neighbouring keys' postings, whose check words were made from "jazz".
TEST(StoreTest, DamagedTermKeyIsReportedBySearchNotScoredWithout) {
  TempDir dir;
  const ModelFingerprint model = SmallModel(DType::kBF16, 2);
  {
    auto store = OpenOrDie(dir.path());
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->CreateTask(MakeTask("t", model)).ok());
    for (uint32_t b = 0; b < 6; ++b) {
      TestBlock tb = MakeBlock(model, 4, b, b * 5, 5, 3);
      ASSERT_TRUE(store->AppendBlock("t", tb.block).ok());
    }
    auto snap = store->BeginSnapshot();
    ASSERT_TRUE(snap.ok());
    auto hits = (*snap)->Search("t", "jazz", 6);
    ASSERT_TRUE(hits.ok());
    ASSERT_FALSE(hits->empty()) << "the fixture's texts must contain 'jazz'";
  }
  const std::string key = std::string("\0\0\0\1", 4) + "jazz";  // task id 1, term "jazz"
  ASSERT_TRUE(FlipInFile(dir.path() + "/data.mdb", std::vector<uint8_t>(key.begin(), key.end()),
                         key.size() - 1));  // 'z' ^ 0x10 = 'j'
  Store::Options ro;
  ro.read_only = true;
  auto store = OpenOrDie(dir.path(), ro);  // the file's structure is intact
  ASSERT_NE(store, nullptr);
  auto snap = store->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  for (bool demos : {false, true}) {
    auto hits =
        demos ? (*snap)->SearchDemos("t", "play jazz", 6) : (*snap)->Search("t", "play jazz", 6);
    EXPECT_TRUE(hits.status().IsCorruption()) << demos << " " << hits.status().ToString();
    EXPECT_NE(hits.status().message().find("'jazz'"), std::string::npos)
        << hits.status().ToString();
  }
  // A term that exists in no text still searches cleanly (its neighbours are intact).
  EXPECT_TRUE((*snap)->Search("t", "zebra", 6).ok());
  snap->reset();
  EXPECT_TRUE(store->Verify("", nullptr).IsCorruption());
}

class OlderFormatTest : public ::testing::TestWithParam<uint32_t> {};

// A version-1 or -2 store opens read-only only, reads (unchecked) and verifies, and its tasks move
// into a new store by export and import, which checks everything again.
TEST_P(OlderFormatTest, OpensReadOnlyAndMovesByExportImport) {
  const uint32_t version = GetParam();
  TempDir dir;
  const ModelFingerprint model = SmallModel(DType::kBF16, 2);
  {
    auto store = OpenOrDie(dir.Sub("old"));
    ASSERT_NE(store, nullptr);
    TaskInfo task = MakeTask("t", model);
    task.blocks.positions = PositionScheme::kSequential;
    ASSERT_TRUE(store->CreateTask(task).ok());
    AppendBlocks(store.get(), "t", model, 4, 0, 3, 0);
  }
  MakeOlderFormat(dir.Sub("old"), version);

  Result<std::unique_ptr<Store>> writable = Store::Open(dir.Sub("old"));
  ASSERT_FALSE(writable.ok());
  EXPECT_TRUE(writable.status().IsNotSupported()) << writable.status().ToString();
  EXPECT_NE(writable.status().message().find("export"), std::string::npos);
  EXPECT_NE(writable.status().message().find("version " + std::to_string(version)),
            std::string::npos);

  Store::Options ro;
  ro.read_only = true;
  auto old = OpenOrDie(dir.Sub("old"), ro);
  ASSERT_NE(old, nullptr);
  ExpectTaskContents(old.get(), "t", model, 4, 3);
  EXPECT_TRUE(old->Verify("", nullptr).ok());
  auto snap = old->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  EXPECT_EQ((*snap)->GetTask("t")->blocks.positions, PositionScheme::kSequential);
  EXPECT_TRUE((*snap)->Search("t", "alarm", 2).ok());
  EXPECT_EQ(old->format_version(), version);
  if (version == 1) {
    EXPECT_TRUE((*snap)->SearchDemos("t", "alarm", 2).status().IsNotSupported());
  } else {
    Result<std::vector<ScoredDoc>> demos = (*snap)->SearchDemos("t", "alarm", 100);
    ASSERT_TRUE(demos.ok()) << demos.status().ToString();
    EXPECT_EQ(demos->size(), 6u);
  }
  snap->reset();
  Result<StoreStats> stats = old->Stats();
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();

  const std::string file = dir.Sub("t.shotdb");
  ASSERT_TRUE(ExportTask(*old, "t", file).ok());
  auto fresh = OpenOrDie(dir.Sub("new"));
  ASSERT_NE(fresh, nullptr);
  ASSERT_TRUE(ImportTask(fresh.get(), file, nullptr).ok());
  ExpectTaskContents(fresh.get(), "t", model, 4, 3);
  EXPECT_TRUE(fresh->Verify("", nullptr).ok());
  auto fs = fresh->BeginSnapshot();
  ASSERT_TRUE(fs.ok());
  EXPECT_EQ((*fs)->GetTask("t")->blocks.positions, PositionScheme::kSequential);
  Result<std::vector<ScoredDoc>> demos = (*fs)->SearchDemos("t", "alarm", 100);
  ASSERT_TRUE(demos.ok()) << demos.status().ToString();
  EXPECT_EQ(demos->size(), 6u);
  EXPECT_EQ(fresh->format_version(), kStoreFormatVersion);
}

INSTANTIATE_TEST_SUITE_P(Versions, OlderFormatTest, ::testing::Values(1u, 2u),
                         [](const ::testing::TestParamInfo<uint32_t>& info) {
                           return "v" + std::to_string(info.param);
                         });

}  // namespace
}  // namespace shotdb

namespace shotdb {
namespace {

// Appends blocks of `tokens` tokens from `first` until one fails; returns that status and the
// number appended.
Status AppendUntilFull(Store* store, const ModelFingerprint& model, uint32_t first, uint32_t tokens,
                       uint32_t* appended) {
  for (uint32_t i = first;; ++i) {
    TestBlock tb = MakeBlock(model, 3, i, uint64_t{i} * tokens, tokens);
    Status s = store->AppendBlock("t", tb.block);
    if (!s.ok()) return s;
    ++*appended;
    if (*appended > 100000) return Status::OK();  // never full: the test fails below
  }
}

// A map that may not grow: the append that does not fit fails, nothing of it is stored, every
// committed block stays intact, and the store continues once it may grow.
TEST(StoreTest, FullMapRefusesTheAppendKeepsEverythingAndRecovers) {
  TempDir dir;
  const ModelFingerprint model = SmallModel(DType::kBF16, 4);
  Store::Options small;
  small.map_size = small.max_map_size = 1 << 20;
  small.sync = false;
  uint32_t appended = 0;
  {
    auto store = OpenOrDie(dir.path(), small);
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->CreateTask(MakeTask("t", model)).ok());
    Status s = AppendUntilFull(store.get(), model, 0, 400, &appended);
    EXPECT_TRUE(s.IsIOError()) << s.ToString();
    EXPECT_NE(s.message().find("max_map_size"), std::string::npos) << s.ToString();
    ASSERT_GT(appended, 3u);
    auto snap = store->BeginSnapshot();
    ASSERT_TRUE(snap.ok());
    EXPECT_EQ((*snap)->GetTask("t")->num_blocks, appended);
    EXPECT_TRUE((*snap)->GetBlock("t", appended).status().IsNotFound());
    snap->reset();
    EXPECT_TRUE(store->Verify("", nullptr).ok());
  }
  Store::Options larger = small;
  larger.max_map_size = 0;
  auto store = OpenOrDie(dir.path(), larger);
  ASSERT_NE(store, nullptr);
  for (uint32_t i = appended; i < appended + 5; ++i) {
    TestBlock tb = MakeBlock(model, 3, i, uint64_t{i} * 400, 400);
    ASSERT_TRUE(store->AppendBlock("t", tb.block).ok()) << "block " << i;
  }
  EXPECT_TRUE(store->Verify("", nullptr).ok());
  auto snap = store->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  for (uint32_t i = 0; i < appended + 5; ++i) {
    TestBlock want = MakeBlock(model, 3, i, uint64_t{i} * 400, 400);
    auto k = (*snap)->GetPayload("t", i, 2, TensorKind::kKey);
    ASSERT_TRUE(k.ok()) << k.status().ToString();
    EXPECT_EQ(std::memcmp(k->data, want.tensors[4].data(), k->size), 0) << "block " << i;
  }
}

// A full disk (a small tmpfs mounted by the test; skipped where mounting is not permitted): the
// append that does not fit fails with the OS error, nothing committed is lost, the store stays
// readable, and the next append succeeds once the filesystem has room.
TEST(StoreTest, FullDiskRefusesTheAppendKeepsEverythingAndRecovers) {
  TempDir dir;
  const std::string mnt = dir.Sub("fs");
  ASSERT_TRUE(std::filesystem::create_directory(mnt));
  if (std::system(("mount -t tmpfs -o size=2m tmpfs " + mnt + " 2>/dev/null").c_str()) != 0) {
    GTEST_SKIP() << "cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)";
  }
  struct Unmount {
    std::string path;
    ~Unmount() { (void)std::system(("umount " + path).c_str()); }
  } unmount{mnt};
  const ModelFingerprint model = SmallModel(DType::kBF16, 4);
  Store::Options options;
  options.map_size = 64 << 20;  // far beyond the disk: the disk fills first
  uint32_t appended = 0;
  {
    auto store = OpenOrDie(mnt + "/store", options);
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->CreateTask(MakeTask("t", model)).ok());
    Status s = AppendUntilFull(store.get(), model, 0, 400, &appended);
    EXPECT_TRUE(s.IsIOError()) << s.ToString();
    // LMDB reports the short write as EIO; the store adds how much room is left.
    EXPECT_NE(s.message().find("bytes free: is it full?"), std::string::npos) << s.ToString();
    ASSERT_GT(appended, 3u);
    EXPECT_TRUE(store->Verify("", nullptr).ok());
    auto snap = store->BeginSnapshot();
    ASSERT_TRUE(snap.ok());
    EXPECT_EQ((*snap)->GetTask("t")->num_blocks, appended);
  }
  ASSERT_EQ(std::system(("mount -o remount,size=16m " + mnt).c_str()), 0);
  auto store = OpenOrDie(mnt + "/store", options);
  ASSERT_NE(store, nullptr);
  TestBlock tb = MakeBlock(model, 3, appended, uint64_t{appended} * 400, 400);
  Status s = store->AppendBlock("t", tb.block);
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(store->Verify("", nullptr).ok());
  for (uint32_t i = 0; i <= appended; ++i) {
    auto snap = store->BeginSnapshot();
    ASSERT_TRUE(snap.ok());
    TestBlock want = MakeBlock(model, 3, i, uint64_t{i} * 400, 400);
    auto v = (*snap)->GetPayload("t", i, 3, TensorKind::kValue);
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    EXPECT_EQ(std::memcmp(v->data, want.tensors[7].data(), v->size), 0) << "block " << i;
  }
}

}  // namespace
}  // namespace shotdb
