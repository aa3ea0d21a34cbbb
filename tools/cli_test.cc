// Integration test of the shotdb inspection commands: builds stores through the engine API, runs
// the real `shotdb` binary (SHOTDB_CLI_BINARY) on them and checks its output and exit codes against
// what the engine says.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/store.h"
#include "engine/store_test_util.h"

extern char** environ;

namespace shotdb {
namespace {

using nlohmann::json;
using testing_util::FlipInFile;
using testing_util::MakeBlock;
using testing_util::MakeTask;
using testing_util::SmallModel;
using testing_util::TempDir;
using testing_util::TensorBytes;

struct RunResult {
  int rc = -1;
  std::string out, err;
};

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// Runs the shotdb binary with `args`, stdout and stderr captured through files (no pipe to fill).
RunResult RunShotdb(const TempDir& scratch, const std::vector<std::string>& args) {
  const std::string out_path = scratch.Sub("stdout"), err_path = scratch.Sub("stderr");
  std::vector<std::string> argv_strings = {SHOTDB_CLI_BINARY};
  argv_strings.insert(argv_strings.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_strings) argv.push_back(a.data());
  argv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, out_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, err_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  RunResult result;
  pid_t pid = 0;
  const int spawned = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (spawned != 0) {
    ADD_FAILURE() << "posix_spawn " << argv[0] << ": " << std::strerror(spawned);
    return result;
  }
  int wstatus = 0;
  if (waitpid(pid, &wstatus, 0) != pid || !WIFEXITED(wstatus)) {
    ADD_FAILURE() << "shotdb did not exit normally (status " << wstatus << ")";
    return result;
  }
  result.rc = WEXITSTATUS(wstatus);
  result.out = ReadFile(out_path);
  result.err = ReadFile(err_path);
  return result;
}

json ParseJson(const RunResult& r) {
  json j = json::parse(r.out, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(j.is_discarded()) << "not JSON: " << r.out;
  return j;
}

std::unique_ptr<Store> OpenStore(const std::string& dir) {
  Result<std::unique_ptr<Store>> store = Store::Open(dir);
  EXPECT_TRUE(store.ok()) << store.status().ToString();
  return store.ok() ? std::move(store).value() : nullptr;
}

// Every block, demonstration and payload of `task` in two stores, compared.
void ExpectTasksEqual(Store& a, Store& b, const std::string& task) {
  auto sa = a.BeginSnapshot();
  auto sb = b.BeginSnapshot();
  ASSERT_TRUE(sa.ok() && sb.ok());
  auto ta = (*sa)->GetTask(task);
  auto tb = (*sb)->GetTask(task);
  ASSERT_TRUE(ta.ok() && tb.ok());
  EXPECT_EQ(ta->model, tb->model);
  EXPECT_EQ(ta->codec, tb->codec);
  EXPECT_EQ(ta->prompt_template, tb->prompt_template);
  EXPECT_EQ(ta->num_blocks, tb->num_blocks);
  EXPECT_EQ(ta->num_demos, tb->num_demos);
  EXPECT_EQ(ta->num_tokens, tb->num_tokens);
  EXPECT_EQ(ta->payload_stored_bytes, tb->payload_stored_bytes);
  for (uint32_t i = 0; i < ta->num_blocks; ++i) {
    auto ba = (*sa)->GetBlock(task, i);
    auto bb = (*sb)->GetBlock(task, i);
    ASSERT_TRUE(ba.ok() && bb.ok());
    EXPECT_EQ(*ba, *bb);
    for (uint64_t id : ba->demo_ids) {
      auto da = (*sa)->GetDemonstration(task, id);
      auto db = (*sb)->GetDemonstration(task, id);
      ASSERT_TRUE(da.ok() && db.ok());
      EXPECT_EQ(*da, *db);
    }
    for (uint32_t layer = 0; layer < ta->model.num_layers; ++layer) {
      for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
        auto pa = (*sa)->GetPayload(task, i, layer, kind);
        auto pb = (*sb)->GetPayload(task, i, layer, kind);
        ASSERT_TRUE(pa.ok() && pb.ok());
        ASSERT_EQ(pa->size, pb->size);
        EXPECT_EQ(std::memcmp(pa->data, pb->data, pa->size), 0)
            << "block " << i << " layer " << layer;
      }
    }
  }
}

constexpr uint64_t kSeed = 7;
constexpr uint32_t kAlphaBlocks = 4, kBetaBlocks = 3, kBetaTokens = 64;

// A store with two tasks: "alpha" (bf16, 3 layers, raw, small blocks of 5..8 tokens and 2..4
// demonstrations) and "beta" (f32, 2 layers, shuffle-lz4, 64-token blocks).
class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    store_dir_ = dir_.Sub("store");
    auto store = OpenStore(store_dir_);
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->CreateTask(MakeTask("alpha", alpha_model_, Codec::kRaw)).ok());
    uint64_t offset = 0;
    for (uint32_t i = 0; i < kAlphaBlocks; ++i) {
      const uint32_t tokens = 5 + i;
      ASSERT_TRUE(
          store
              ->AppendBlock("alpha",
                            MakeBlock(alpha_model_, kSeed, i, offset, tokens, 2 + i % 3).block)
              .ok());
      offset += tokens;
    }
    ASSERT_TRUE(store->CreateTask(MakeTask("beta", beta_model_, Codec::kShuffleLz4)).ok());
    offset = 0;
    for (uint32_t i = 0; i < kBetaBlocks; ++i) {
      ASSERT_TRUE(
          store->AppendBlock("beta", MakeBlock(beta_model_, kSeed, i, offset, kBetaTokens).block)
              .ok());
      offset += kBetaTokens;
    }
  }

  RunResult Run(std::vector<std::string> args) {
    args.insert(args.begin(), {"--store", store_dir_});
    return RunShotdb(dir_, args);
  }

  TempDir dir_;
  std::string store_dir_;
  const ModelFingerprint alpha_model_ = SmallModel(DType::kBF16, 3);
  const ModelFingerprint beta_model_ = SmallModel(DType::kF32, 2);
};

TEST_F(CliTest, LsMatchesEngine) {
  RunResult r = Run({"ls", "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  json j = ParseJson(r);
  auto store = OpenStore(store_dir_);
  auto snap = store->BeginSnapshot();
  auto tasks = (*snap)->ListTasks();
  ASSERT_TRUE(tasks.ok());
  ASSERT_EQ(j.size(), tasks->size());
  for (size_t i = 0; i < tasks->size(); ++i) {
    const TaskInfo& t = (*tasks)[i];
    EXPECT_EQ(j[i]["name"], t.name);
    EXPECT_EQ(j[i]["blocks"], t.num_blocks);
    EXPECT_EQ(j[i]["demos"], t.num_demos);
    EXPECT_EQ(j[i]["tokens"], t.num_tokens);
    EXPECT_EQ(j[i]["payload_raw_bytes"], t.payload_raw_bytes);
    EXPECT_EQ(j[i]["payload_stored_bytes"], t.payload_stored_bytes);
    EXPECT_EQ(j[i]["codec"], std::string(CodecName(t.codec)));
  }
  // Independent of the engine's counters: alpha's raw bytes from its shape.
  uint64_t alpha_tokens = 0;
  for (uint32_t i = 0; i < kAlphaBlocks; ++i) alpha_tokens += 5 + i;
  EXPECT_EQ(j[0]["tokens"], alpha_tokens);
  EXPECT_EQ(j[0]["payload_raw_bytes"], alpha_tokens * 2 /*K,V*/ * 3 /*layers*/ * 2 * 8 * 2);

  RunResult text = Run({"ls"});
  ASSERT_EQ(text.rc, 0) << text.err;
  EXPECT_NE(text.out.find("alpha"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("shuffle-lz4"), std::string::npos) << text.out;
}

TEST_F(CliTest, InfoMatchesEngine) {
  RunResult r = Run({"info", "beta", "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  json j = ParseJson(r);
  const TaskInfo want = MakeTask("beta", beta_model_, Codec::kShuffleLz4);
  EXPECT_EQ(j["name"], "beta");
  EXPECT_EQ(j["model"]["architecture"], want.model.architecture);
  EXPECT_EQ(j["model"]["dtype"], "f32");
  EXPECT_EQ(j["model"]["num_layers"], 2);
  EXPECT_EQ(j["model"]["kv_heads"], want.model.kv_heads);
  EXPECT_EQ(j["model"]["head_dim"], want.model.head_dim);
  EXPECT_EQ(j["model"]["tokenizer_hash"], want.model.tokenizer_hash);
  EXPECT_EQ(j["block_config"]["demos_per_block"], want.blocks.demos_per_block);
  EXPECT_EQ(j["block_config"]["window"], want.blocks.window);
  EXPECT_EQ(j["block_config"]["sink_blocks"], want.blocks.sink_blocks);
  EXPECT_EQ(j["prompt_template"], want.prompt_template);
  EXPECT_EQ(j["separator"], want.separator);
  EXPECT_EQ(j["labels"], want.labels);
  EXPECT_EQ(j["metadata"]["source"], "test");
  EXPECT_EQ(j["codec"], "shuffle-lz4");
  EXPECT_EQ(j["blocks"], kBetaBlocks);
  EXPECT_EQ(j["tokens"], kBetaBlocks * kBetaTokens);
  EXPECT_EQ(j["payload_raw_bytes"], uint64_t{kBetaBlocks} * kBetaTokens * 2 * 2 * 2 * 8 * 4);
  EXPECT_EQ(j["version"], kBetaBlocks);

  RunResult text = Run({"info", "alpha"});
  ASSERT_EQ(text.rc, 0) << text.err;
  // The template is shown escaped on one line.
  EXPECT_NE(text.out.find(R"("utterance: {text}\nintent: {label}")"), std::string::npos)
      << text.out;
}

TEST_F(CliTest, BlocksMatchEngine) {
  RunResult r = Run({"blocks", "alpha", "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  json j = ParseJson(r);
  ASSERT_EQ(j.size(), kAlphaBlocks);
  auto store = OpenStore(store_dir_);
  auto snap = store->BeginSnapshot();
  uint64_t stored_sum = 0;
  for (uint32_t i = 0; i < kAlphaBlocks; ++i) {
    auto info = (*snap)->GetBlock("alpha", i);
    ASSERT_TRUE(info.ok());
    EXPECT_EQ(j[i]["index"], i);
    EXPECT_EQ(j[i]["position_offset"], info->position_offset);
    EXPECT_EQ(j[i]["tokens"], 5 + i);
    EXPECT_EQ(j[i]["demos"], 2 + i % 3);
    uint64_t stored = 0;
    for (uint32_t layer = 0; layer < 3; ++layer) {
      for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
        auto rec = (*snap)->GetRecord("alpha", i, layer, kind);
        ASSERT_TRUE(rec.ok());
        stored += kBlockRecordHeaderSize + rec->payload_size;
      }
    }
    EXPECT_EQ(j[i]["stored_bytes"], stored);
    // Raw codec: stored = raw payload + one header a record.
    EXPECT_EQ(j[i]["raw_bytes"], uint64_t{5 + i} * 2 * 8 * 2 * 6);
    EXPECT_EQ(stored, uint64_t{5 + i} * 2 * 8 * 2 * 6 + 6 * kBlockRecordHeaderSize);
    stored_sum += stored;
  }
  EXPECT_EQ(stored_sum, (*snap)->GetTask("alpha")->payload_stored_bytes);
}

// Min, max and mean in double of tensor (block, layer, kind) as the test wrote it.
struct Expected {
  double min, max, mean;
};
Expected ExpectedStats(const ModelFingerprint& model, uint32_t tokens, uint32_t block,
                       uint32_t layer, TensorKind kind) {
  const std::vector<uint8_t> bytes = TensorBytes(model, tokens, kSeed, block, layer, kind);
  std::vector<double> values;
  for (size_t i = 0; i < bytes.size(); i += DTypeSize(model.dtype)) {
    if (model.dtype == DType::kF32) {
      float f;
      std::memcpy(&f, &bytes[i], 4);
      values.push_back(f);
    } else {  // bf16: the upper half of a float32
      const uint32_t bits = static_cast<uint32_t>(bytes[i] | (bytes[i + 1] << 8)) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      values.push_back(f);
    }
  }
  double sum = 0;
  for (double v : values) sum += v;
  return {*std::min_element(values.begin(), values.end()),
          *std::max_element(values.begin(), values.end()), sum / values.size()};
}

TEST_F(CliTest, ShowReportsDemosRecordsAndValues) {
  RunResult r = Run({"show", "alpha", "2", "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  json j = ParseJson(r);
  auto store = OpenStore(store_dir_);
  auto snap = store->BeginSnapshot();
  auto block = (*snap)->GetBlock("alpha", 2);
  ASSERT_TRUE(block.ok());
  EXPECT_EQ(j["tokens"], 7);
  EXPECT_EQ(j["text"], block->text);
  ASSERT_EQ(j["demos"].size(), block->demo_ids.size());
  for (size_t d = 0; d < block->demo_ids.size(); ++d) {
    auto demo = (*snap)->GetDemonstration("alpha", block->demo_ids[d]);
    ASSERT_TRUE(demo.ok());
    EXPECT_EQ(j["demos"][d]["id"], demo->id);
    EXPECT_EQ(j["demos"][d]["text"], demo->text);
    EXPECT_EQ(j["demos"][d]["label"], demo->label);
  }
  ASSERT_EQ(j["tensors"].size(), 3u * 2);
  for (const json& t : j["tensors"]) {
    const uint32_t layer = t["layer"];
    const TensorKind kind = t["kind"] == "K" ? TensorKind::kKey : TensorKind::kValue;
    EXPECT_EQ(t["shape"], json({2, 7, 8}));
    EXPECT_EQ(t["dtype"], "bf16");
    EXPECT_EQ(t["codec"], "raw");
    EXPECT_EQ(t["raw_bytes"], 2 * 7 * 8 * 2);
    auto rec = (*snap)->GetRecord("alpha", 2, layer, kind);
    ASSERT_TRUE(rec.ok());
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx",
                  static_cast<unsigned long long>(rec->header.checksum));
    EXPECT_EQ(t["checksum"], hex);
    const Expected e = ExpectedStats(alpha_model_, 7, 2, layer, kind);
    EXPECT_DOUBLE_EQ(t["min"].get<double>(), e.min);
    EXPECT_DOUBLE_EQ(t["max"].get<double>(), e.max);
    EXPECT_NEAR(t["mean"].get<double>(), e.mean, 1e-12);
  }

  // --layers limits the tensors; a compressed f32 task reports its values after decoding.
  RunResult one = Run({"show", "beta", "1", "--layers", "1", "--json"});
  ASSERT_EQ(one.rc, 0) << one.err;
  json jo = ParseJson(one);
  ASSERT_EQ(jo["tensors"].size(), 2u);
  EXPECT_EQ(jo["tensors"][0]["layer"], 1);
  EXPECT_EQ(jo["tensors"][0]["kind"], "K");
  EXPECT_EQ(jo["tensors"][1]["kind"], "V");
  EXPECT_EQ(jo["tensors"][1]["codec"], "shuffle-lz4");
  const Expected e = ExpectedStats(beta_model_, kBetaTokens, 1, 1, TensorKind::kValue);
  EXPECT_DOUBLE_EQ(jo["tensors"][1]["min"].get<double>(), e.min);
  EXPECT_DOUBLE_EQ(jo["tensors"][1]["max"].get<double>(), e.max);
  EXPECT_NEAR(jo["tensors"][1]["mean"].get<double>(), e.mean, 1e-12);
  EXPECT_LT(jo["tensors"][1]["stored_bytes"].get<uint64_t>(),
            jo["tensors"][1]["raw_bytes"].get<uint64_t>() + kBlockRecordHeaderSize);

  RunResult text = Run({"show", "alpha", "0", "--layers", "0-1"});
  ASSERT_EQ(text.rc, 0) << text.err;
  EXPECT_NE(text.out.find("[2,5,8]"), std::string::npos) << text.out;

  RunResult bad_layer = Run({"show", "alpha", "0", "--layers", "3"});
  EXPECT_EQ(bad_layer.rc, 1);
  EXPECT_NE(bad_layer.err.find("3 layers"), std::string::npos) << bad_layer.err;
}

TEST_F(CliTest, SearchOrderEqualsSnapshotSearch) {
  for (const std::string query : {"alarm weather jazz", "play music", "remind me tomorrow"}) {
    RunResult r = Run({"search", "alpha", query, "-k", "10", "--json"});
    ASSERT_EQ(r.rc, 0) << r.err;
    json j = ParseJson(r);
    auto store = OpenStore(store_dir_);
    auto snap = store->BeginSnapshot();
    auto want = (*snap)->Search("alpha", query, 10);
    ASSERT_TRUE(want.ok());
    ASSERT_EQ(j.size(), want->size()) << query;
    for (size_t i = 0; i < want->size(); ++i) {
      EXPECT_EQ(j[i]["rank"], i + 1);
      EXPECT_EQ(j[i]["block"], (*want)[i].doc) << query << " rank " << i;
      EXPECT_DOUBLE_EQ(j[i]["score"].get<double>(), (*want)[i].score);
    }
  }
  RunResult top2 = Run({"search", "beta", "set an alarm", "-k", "2", "--json"});
  ASSERT_EQ(top2.rc, 0) << top2.err;
  EXPECT_EQ(ParseJson(top2).size(), 2u);
}

TEST_F(CliTest, VerifyReportsFlippedPayloadByte) {
  RunResult clean = Run({"verify"});
  EXPECT_EQ(clean.rc, 0) << clean.out << clean.err;
  EXPECT_NE(clean.out.find("OK"), std::string::npos) << clean.out;

  std::vector<uint8_t> payload;
  {
    auto store = OpenStore(store_dir_);
    auto snap = store->BeginSnapshot();
    auto rec = (*snap)->GetRecord("beta", 1, 0, TensorKind::kValue);
    ASSERT_TRUE(rec.ok());
    payload.assign(rec->payload, rec->payload + rec->payload_size);
  }
  ASSERT_TRUE(FlipInFile(store_dir_ + "/data.mdb", payload, payload.size() / 2))
      << "payload of beta block 1 layer 0 V not found in data.mdb";

  RunResult bad = Run({"verify"});
  EXPECT_EQ(bad.rc, 1);
  EXPECT_NE(bad.out.find("task beta block 1 layer 0 V"), std::string::npos) << bad.out;
  RunResult bad_json = Run({"verify", "beta", "--json"});
  EXPECT_EQ(bad_json.rc, 1);
  json j = ParseJson(bad_json);
  EXPECT_EQ(j["ok"], false);
  ASSERT_EQ(j["problems"].size(), 1u);
  EXPECT_NE(j["problems"][0].get<std::string>().find("block 1 layer 0 V"), std::string::npos);
  EXPECT_EQ(j["records_checked"], kBetaBlocks * 2 * 2);
  // The other task is intact.
  RunResult alpha = Run({"verify", "alpha"});
  EXPECT_EQ(alpha.rc, 0) << alpha.out;
  // show reports the damaged record and fails, but shows the rest.
  RunResult show = Run({"show", "beta", "1"});
  EXPECT_EQ(show.rc, 1);
  EXPECT_NE(show.out.find("CORRUPT"), std::string::npos) << show.out;
  EXPECT_NE(show.err.find("layer 0 V"), std::string::npos) << show.err;
}

TEST_F(CliTest, ExportImportRoundTrips) {
  const std::string file = dir_.Sub("alpha.shotdb");
  const std::string fresh = dir_.Sub("fresh");
  RunResult ex = Run({"export", "alpha", file});
  ASSERT_EQ(ex.rc, 0) << ex.err;
  ASSERT_TRUE(std::filesystem::exists(file));
  RunResult im = RunShotdb(dir_, {"--store", fresh, "import", file});
  ASSERT_EQ(im.rc, 0) << im.err;
  EXPECT_NE(im.out.find("alpha"), std::string::npos);
  RunResult verify = RunShotdb(dir_, {"--store", fresh, "verify"});
  EXPECT_EQ(verify.rc, 0) << verify.out << verify.err;
  // Importing again is refused: the task exists.
  RunResult again = RunShotdb(dir_, {"--store", fresh, "import", file});
  EXPECT_EQ(again.rc, 1);
  auto a = OpenStore(store_dir_);
  auto b = OpenStore(fresh);
  ASSERT_TRUE(a && b);
  ExpectTasksEqual(*a, *b, "alpha");
}

TEST_F(CliTest, CompactCopiesEverything) {
  const std::string dest = dir_.Sub("compacted");
  RunResult r = Run({"compact", dest});
  ASSERT_EQ(r.rc, 0) << r.err;
  RunResult verify = RunShotdb(dir_, {"--store", dest, "verify"});
  EXPECT_EQ(verify.rc, 0) << verify.out << verify.err;
  EXPECT_EQ(ParseJson(RunShotdb(dir_, {"--store", dest, "ls", "--json"})),
            ParseJson(Run({"ls", "--json"})));
  // A second compaction into the same directory is refused.
  EXPECT_EQ(Run({"compact", dest}).rc, 1);
}

TEST_F(CliTest, StatsMatchEngine) {
  RunResult r = Run({"stats", "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  json j = ParseJson(r);
  EXPECT_EQ(j["file_size"], std::filesystem::file_size(store_dir_ + "/data.mdb"));
  auto store = OpenStore(store_dir_);
  auto snap = store->BeginSnapshot();
  auto tasks = (*snap)->ListTasks();
  ASSERT_TRUE(tasks.ok());
  ASSERT_EQ(j["tasks"].size(), tasks->size());
  uint64_t raw = 0, stored = 0;
  for (size_t i = 0; i < tasks->size(); ++i) {
    EXPECT_EQ(j["tasks"][i]["name"], (*tasks)[i].name);
    EXPECT_EQ(j["tasks"][i]["payload_stored_bytes"], (*tasks)[i].payload_stored_bytes);
    raw += (*tasks)[i].payload_raw_bytes;
    stored += (*tasks)[i].payload_stored_bytes;
  }
  EXPECT_EQ(j["payload_raw_bytes"], raw);
  EXPECT_EQ(j["payload_stored_bytes"], stored);
  EXPECT_EQ(j["used_bytes"], (j["last_page"].get<uint64_t>() + 1) * j["page_size"].get<uint64_t>());
  bool has_payloads_db = false;
  for (const json& db : j["dbs"]) has_payloads_db |= db["name"] == "payloads";
  EXPECT_TRUE(has_payloads_db) << j["dbs"].dump();
  EXPECT_EQ(Run({"stats"}).rc, 0);
}

TEST_F(CliTest, RmRequiresYes) {
  RunResult refused = Run({"rm", "alpha"});
  EXPECT_EQ(refused.rc, 1);
  EXPECT_NE(refused.err.find("--yes"), std::string::npos) << refused.err;
  {
    auto store = OpenStore(store_dir_);
    auto snap = store->BeginSnapshot();
    EXPECT_TRUE((*snap)->GetTask("alpha").ok());
  }
  RunResult done = Run({"rm", "alpha", "--yes"});
  EXPECT_EQ(done.rc, 0) << done.err;
  auto store = OpenStore(store_dir_);
  auto snap = store->BeginSnapshot();
  EXPECT_TRUE((*snap)->GetTask("alpha").status().IsNotFound());
  EXPECT_TRUE((*snap)->GetTask("beta").ok());
}

TEST_F(CliTest, UsageErrorsExitTwo) {
  EXPECT_EQ(Run({}).rc, 2);
  EXPECT_EQ(Run({"frobnicate"}).rc, 2);
  EXPECT_EQ(Run({"info"}).rc, 2);
  EXPECT_EQ(Run({"show", "alpha", "notanumber"}).rc, 2);
  EXPECT_EQ(Run({"show", "alpha", "0", "--layers", "1-x"}).rc, 2);
  EXPECT_EQ(Run({"search", "alpha", "query", "-k", "0"}).rc, 2);
  RunResult help = Run({"verify", "--help"});
  EXPECT_EQ(help.rc, 0);
  EXPECT_NE(help.out.find("Usage"), std::string::npos) << help.out;
}

TEST_F(CliTest, MissingStoreTaskAndBlockAreNamed) {
  const std::string missing = dir_.Sub("no-store-here");
  for (const std::vector<std::string>& cmd : std::vector<std::vector<std::string>>{
           {"ls"}, {"info", "alpha"}, {"verify"}, {"stats"}, {"rm", "alpha", "--yes"}}) {
    std::vector<std::string> args = {"--store", missing};
    args.insert(args.end(), cmd.begin(), cmd.end());
    RunResult r = RunShotdb(dir_, args);
    EXPECT_EQ(r.rc, 1) << cmd[0];
    EXPECT_NE(r.err.find("no shotdb store at " + missing), std::string::npos) << r.err;
  }
  // Read-only commands did not create the directory.
  EXPECT_FALSE(std::filesystem::exists(missing));

  RunResult task = Run({"info", "gamma"});
  EXPECT_EQ(task.rc, 1);
  EXPECT_NE(task.err.find("no task 'gamma' (tasks: alpha, beta)"), std::string::npos) << task.err;
  RunResult block = Run({"show", "alpha", "9"});
  EXPECT_EQ(block.rc, 1);
  EXPECT_NE(block.err.find("task 'alpha' has no block 9 (blocks 0..3)"), std::string::npos)
      << block.err;
  RunResult file = Run({"import", dir_.Sub("nothing.shotdb")});
  EXPECT_EQ(file.rc, 1);
  EXPECT_NE(file.err.find("nothing.shotdb"), std::string::npos) << file.err;
}

}  // namespace
}  // namespace shotdb

namespace shotdb {
namespace {

// The model commands on the real default model (SmolLM2-135M, fetched by tools/fetch-model.sh; the
// test skips without it, or in a build without libtorch): the options issue 9 added and their
// errors. A pool of 30 example demonstrations in blocks of 5 keeps it to seconds on two cores.
class ModelCommandsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* env = std::getenv("SHOTDB_MODEL");
    const char* home = std::getenv("HOME");
    model_ = env != nullptr ? env
                            : std::string(home != nullptr ? home : "") +
                                  "/.cache/shotdb/models/SmolLM2-135M-Instruct.Q4_1.gguf";
    if (!std::ifstream(model_).good()) GTEST_SKIP() << "no default model at " << model_;
    if (RunShotdb(dir_, {"build", "--help"}).out.find("--demos") == std::string::npos) {
      GTEST_SKIP() << "shotdb was built without libtorch (no shotdb-model)";
    }
    store_ = dir_.Sub("store");
  }
  RunResult Run(std::vector<std::string> args) {
    args.insert(args.begin(), {"--store", store_});
    args.insert(args.end(), {"--model", model_, "--threads", "2"});
    return RunShotdb(dir_, args);
  }
  RunResult Inspect(std::vector<std::string> args) {
    args.insert(args.begin(), {"--store", store_});
    return RunShotdb(dir_, args);
  }
  std::vector<std::string> Build(std::vector<std::string> extra = {}, const char* limit = "30") {
    std::vector<std::string> args = {"build",
                                     "--task",
                                     "t",
                                     "--demos",
                                     std::string(SHOTDB_SOURCE_DIR) + "/examples/intents_demos.csv",
                                     "--limit",
                                     limit,
                                     "-k",
                                     "5"};
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  }

  TempDir dir_;
  std::string model_, store_;
};

TEST_F(ModelCommandsTest, WindowedRetrivTaskBudgetAndErrors) {
  RunResult built = Run(Build());
  ASSERT_EQ(built.rc, 0) << built.err;
  EXPECT_NE(built.out.find("windowed positions"), std::string::npos) << built.out;

  RunResult info = Inspect({"info", "t", "--json"});
  ASSERT_EQ(info.rc, 0) << info.err;
  const json j = ParseJson(info);
  EXPECT_EQ(j["block_config"]["positions"], "windowed");
  EXPECT_EQ(j["bm25_analyzer"]["kind"], "retriv");
  EXPECT_EQ(j["bm25"]["idf"], "lucene");
  EXPECT_EQ(j["bm25"]["k1"], 1.2);

  // Every block was encoded within sink + window + itself: 4 blocks of ~5 short demonstrations.
  RunResult blocks = Inspect({"blocks", "t", "--json"});
  ASSERT_EQ(blocks.rc, 0) << blocks.err;
  const json bj = ParseJson(blocks);
  ASSERT_EQ(bj.size(), 6u);
  EXPECT_EQ(bj[5]["encoded_at"].get<uint64_t>(), bj[0]["tokens"].get<uint64_t>() +
                                                     bj[3]["tokens"].get<uint64_t>() +
                                                     bj[4]["tokens"].get<uint64_t>());

  // Resuming with the task's own options adds nothing; asking for other ones is refused, named.
  RunResult again = Run(Build());
  EXPECT_EQ(again.rc, 0) << again.err;
  EXPECT_NE(again.out.find("encoded 0 new blocks"), std::string::npos) << again.out;
  RunResult other = Run(Build({"--positions", "sequential", "--bm25", "rank_bm25"}));
  EXPECT_EQ(other.rc, 1);
  EXPECT_NE(other.err.find("--positions sequential (the task has windowed)"), std::string::npos)
      << other.err;
  EXPECT_NE(other.err.find("--bm25"), std::string::npos) << other.err;
  EXPECT_EQ(Run(Build({"--positions", "diagonal"})).rc, 2);
  EXPECT_EQ(Run(Build({"--stopwords", dir_.Sub("missing.txt")})).rc, 2);

  // Queries report the budget; RetICL spends DBSA's tokens on single demonstrations.
  RunResult dbsa = Run({"query", "--task", "t", "wake me up at seven", "--ratio", "1", "--json"});
  ASSERT_EQ(dbsa.rc, 0) << dbsa.err;
  const json dj = ParseJson(dbsa);
  EXPECT_EQ(dj["blocks"].size(), 6u);
  EXPECT_EQ(dj["budget"].get<uint64_t>() + dj["prompt_tokens"].get<uint64_t>() > 8000, true);
  EXPECT_FALSE(dj["budget_bound"].get<bool>());
  RunResult reticl = Run({"query", "--task", "t", "wake me up at seven", "--ratio", "1", "--method",
                          "reticl", "--json"});
  ASSERT_EQ(reticl.rc, 0) << reticl.err;
  const json rj = ParseJson(reticl);
  EXPECT_GT(rj["demos"].size(), 20u);
  EXPECT_LE(rj["context_tokens"].get<uint64_t>(), dj["context_tokens"].get<uint64_t>());
  // A budget of two blocks binds the selection.
  const uint64_t two = bj[0]["tokens"].get<uint64_t>() + bj[1]["tokens"].get<uint64_t>();
  RunResult bound = Run({"query", "--task", "t", "wake me up at seven", "--ratio", "1",
                         "--max-context", std::to_string(two + 40), "--json"});
  ASSERT_EQ(bound.rc, 0) << bound.err;
  const json bdj = ParseJson(bound);
  EXPECT_TRUE(bdj["budget_bound"].get<bool>());
  EXPECT_LE(bdj["context_tokens"].get<uint64_t>() + bdj["prompt_tokens"].get<uint64_t>(), two + 40);
  RunResult tiny = Run({"query", "--task", "t", "wake me up at seven", "--max-context", "12"});
  EXPECT_EQ(tiny.rc, 1);
  EXPECT_NE(tiny.err.find("no room"), std::string::npos) << tiny.err;

  RunResult demos = Inspect({"search", "t", "wake me up", "--demos", "-k", "3", "--json"});
  ASSERT_EQ(demos.rc, 0) << demos.err;
  const json sj = ParseJson(demos);
  ASSERT_EQ(sj.size(), 3u);
  EXPECT_TRUE(sj[0].contains("demo"));
}

// Interrupted builds resume to exactly the uninterrupted result: `shotdb build` is SIGKILLed twice
// (after 2 and after 5 of its 8 blocks were committed), then re-run to the end; every block (info,
// demonstrations, K/V bytes) equals a build that was never interrupted.
TEST_F(ModelCommandsTest, KilledBuildsResumeToTheSameBlocks) {
  const std::string reference = store_;
  ASSERT_EQ(Run(Build({}, "40")).rc, 0);
  store_ = dir_.Sub("killed");
  for (uint64_t kill_after : {2u, 5u}) {
    std::vector<std::string> args = {SHOTDB_CLI_BINARY, "--store", store_};
    for (const std::string& a : Build({}, "40")) args.push_back(a);
    args.insert(args.end(), {"--model", model_, "--threads", "2"});
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
    pid_t pid = 0;
    ASSERT_EQ(posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ), 0);
    posix_spawn_file_actions_destroy(&actions);
    uint64_t blocks = 0;
    for (int i = 0; i < 6000 && blocks < kill_after; ++i) {  // up to 10 minutes
      usleep(100 * 1000);
      Store::Options ro;
      ro.read_only = true;
      auto store = Store::Open(store_, ro);
      if (!store.ok()) continue;
      auto snap = (*store)->BeginSnapshot();
      if (!snap.ok()) continue;
      auto task = (*snap)->GetTask("t");
      if (task.ok()) blocks = task->num_blocks;
    }
    ASSERT_GE(blocks, kill_after);
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    EXPECT_TRUE(WIFSIGNALED(status)) << "the build finished before it was killed";
  }
  RunResult resumed = Run(Build({}, "40"));
  ASSERT_EQ(resumed.rc, 0) << resumed.err;
  auto a = OpenStore(reference);
  auto b = OpenStore(store_);
  ASSERT_TRUE(a && b);
  ExpectTasksEqual(*a, *b, "t");
  EXPECT_TRUE(b->Verify("t", nullptr).ok());
}

}  // namespace
}  // namespace shotdb
