// ls, info, blocks, show, search, verify, stats, rm, export, import, compact: the commands that
// read or manage a store without running a model (docs/cli.md).

#include <algorithm>
#include <charconv>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <iostream>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "engine/export.h"
#include "engine/store.h"
#include "format/kv_values.h"
#include "tools/cli_util.h"
#include "tools/commands.h"
#include "util/file_util.h"

namespace shotdb::cli {

namespace {

using json = nlohmann::ordered_json;

// How a command opens the store. Only commands that add data may create one: a mistyped --store
// must not leave an empty store behind an `ls`.
enum class OpenMode {
  kReadOnly,       // the store must exist; opened MDB_RDONLY
  kWriteExisting,  // the store must exist
  kCreate,         // created if missing
};

Result<std::unique_ptr<Store>> OpenStore(const GlobalOptions& global, OpenMode mode) {
  Store::Options options;
  options.read_only = mode == OpenMode::kReadOnly;
  options.create_if_missing = mode == OpenMode::kCreate;
  Result<std::unique_ptr<Store>> store = Store::Open(global.store_dir, options);
  if (store.status().IsNotFound()) {
    return Status::NotFound("no shotdb store at " + global.store_dir +
                            " (give --store DIR or set SHOTDB_STORE; `shotdb build` or "
                            "`shotdb import` creates one)");
  }
  return store;
}

std::string JoinTaskNames(const std::vector<TaskInfo>& tasks) {
  if (tasks.empty()) return "the store has no tasks";
  std::string names = "tasks: ";
  for (size_t i = 0; i < tasks.size(); ++i) names += (i > 0 ? ", " : "") + tasks[i].name;
  return names;
}

// The task, or NotFound "no task 'x' (tasks: a, b)" listing what exists.
Result<TaskInfo> FindTask(Snapshot& snapshot, const std::string& name) {
  Result<TaskInfo> task = snapshot.GetTask(name);
  if (!task.status().IsNotFound()) return task;
  Result<std::vector<TaskInfo>> all = snapshot.ListTasks();
  if (!all.ok()) return all.status();
  return Status::NotFound("no task '" + name + "' (" + JoinTaskNames(*all) + ")");
}

// The same, in a snapshot of its own, for commands that need nothing else from the store's
// contents.
Result<TaskInfo> FindTask(const Store& store, const std::string& name) {
  SHOTDB_ASSIGN_OR_RETURN(std::unique_ptr<Snapshot> snapshot, store.BeginSnapshot());
  return FindTask(*snapshot, name);
}

Result<BlockInfo> FindBlock(Snapshot& snapshot, const TaskInfo& task, uint32_t index) {
  if (index >= task.num_blocks) {
    return Status::NotFound("task '" + task.name + "' has no block " + std::to_string(index) +
                            (task.num_blocks == 0
                                 ? " (it has no blocks)"
                                 : " (blocks 0.." + std::to_string(task.num_blocks - 1) + ")"));
  }
  return snapshot.GetBlock(task.name, index);
}

double Ratio(uint64_t raw, uint64_t stored) {
  return stored == 0 ? std::numeric_limits<double>::quiet_NaN()
                     : static_cast<double>(raw) / static_cast<double>(stored);
}

// A finite double as JSON, NaN/inf as null (JSON has no NaN).
json JsonNumber(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

std::string FormatDouble(double v, const char* format = "%.6g") {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

std::string FormatTime(int64_t unix_seconds) {
  const std::time_t t = static_cast<std::time_t>(unix_seconds);
  std::tm tm{};
  if (gmtime_r(&t, &tm) == nullptr) return std::to_string(unix_seconds);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S UTC", &tm);
  return buf;
}

// A string shown quoted with escapes ("a\nb"), so that templates with newlines stay on one line.
std::string Quoted(const std::string& s) { return json(s).dump(); }

void PrintJson(const json& j) { std::cout << j.dump(2) << '\n'; }

json ModelJson(const ModelFingerprint& m) {
  return {{"architecture", m.architecture},
          {"dtype", std::string(DTypeName(m.dtype))},
          {"tokenizer_hash", m.tokenizer_hash},
          {"num_layers", m.num_layers},
          {"kv_heads", m.kv_heads},
          {"head_dim", m.head_dim}};
}

json TaskSummaryJson(const TaskInfo& t) {
  return {{"name", t.name},
          {"model", ModelJson(t.model)},
          {"codec", std::string(CodecName(t.codec))},
          {"blocks", t.num_blocks},
          {"demos", t.num_demos},
          {"tokens", t.num_tokens},
          {"payload_raw_bytes", t.payload_raw_bytes},
          {"payload_stored_bytes", t.payload_stored_bytes},
          {"compression_ratio", JsonNumber(Ratio(t.payload_raw_bytes, t.payload_stored_bytes))}};
}

// ---- ls
// ------------------------------------------------------------------------------------------

int RunLs(const GlobalOptions& global, bool as_json) {
  constexpr const char* kCmd = "ls";
  auto store = OpenStore(global, OpenMode::kReadOnly);
  if (!store.ok()) return Fail(kCmd, store.status());
  auto snapshot = (*store)->BeginSnapshot();
  if (!snapshot.ok()) return Fail(kCmd, snapshot.status());
  auto tasks = (*snapshot)->ListTasks();
  if (!tasks.ok()) return Fail(kCmd, tasks.status());
  if (as_json) {
    json j = json::array();
    for (const TaskInfo& t : *tasks) j.push_back(TaskSummaryJson(t));
    PrintJson(j);
    return 0;
  }
  if (tasks->empty()) {
    std::cout << "no tasks in " << global.store_dir << '\n';
    return 0;
  }
  Table table({"TASK", "MODEL", "CODEC", "BLOCKS", "DEMOS", "TOKENS", "RAW", "STORED", "RATIO"});
  for (size_t c = 3; c <= 8; ++c) table.SetNumeric(c);
  for (const TaskInfo& t : *tasks) {
    table.AddRow({t.name, t.model.architecture + " " + std::string(DTypeName(t.model.dtype)),
                  std::string(CodecName(t.codec)), std::to_string(t.num_blocks),
                  std::to_string(t.num_demos), std::to_string(t.num_tokens),
                  HumanBytes(t.payload_raw_bytes), HumanBytes(t.payload_stored_bytes),
                  FormatRatio(Ratio(t.payload_raw_bytes, t.payload_stored_bytes))});
  }
  table.Print(std::cout);
  return 0;
}

// ---- info
// ----------------------------------------------------------------------------------------

int RunInfo(const GlobalOptions& global, const std::string& name, bool as_json) {
  constexpr const char* kCmd = "info";
  auto store = OpenStore(global, OpenMode::kReadOnly);
  if (!store.ok()) return Fail(kCmd, store.status());
  auto snapshot = (*store)->BeginSnapshot();
  if (!snapshot.ok()) return Fail(kCmd, snapshot.status());
  auto task = FindTask(**snapshot, name);
  if (!task.ok()) return Fail(kCmd, task.status());
  const TaskInfo& t = *task;
  if (as_json) {
    json j = TaskSummaryJson(t);
    j["block_config"] = {{"demos_per_block", t.blocks.demos_per_block},
                         {"window", t.blocks.window},
                         {"sink_blocks", t.blocks.sink_blocks},
                         {"positions", PositionSchemeName(t.blocks.positions)}};
    j["prompt_template"] = t.prompt_template;
    j["separator"] = t.separator;
    j["labels"] = t.labels;
    j["bm25_analyzer"] = {
        {"kind", t.analyzer.kind == AnalyzerOptions::Kind::kRetriv ? "retriv" : "simple"},
        {"tokenizer", t.analyzer.tokenizer.Serialize()},
        {"stopwords", t.analyzer.stopwords}};
    j["bm25"] = {{"k1", t.bm25.k1},
                 {"b", t.bm25.b},
                 {"epsilon", t.bm25.epsilon},
                 {"idf", t.bm25.idf == Bm25Idf::kLucene ? "lucene" : "okapi"}};
    // Metadata is stored as given; embed it as JSON when it parses, else as a string.
    json metadata = json::parse(t.metadata_json, nullptr, /*allow_exceptions=*/false);
    j["metadata"] = metadata.is_discarded() ? json(t.metadata_json) : metadata;
    j["version"] = t.version;
    j["created_unix"] = t.created_unix;
    PrintJson(j);
    return 0;
  }
  const ModelFingerprint& m = t.model;
  std::string labels;
  for (size_t i = 0; i < t.labels.size(); ++i) labels += (i > 0 ? ", " : "") + t.labels[i];
  Table table({"FIELD", "VALUE"});
  table.AddRow({"task", t.name});
  table.AddRow({"model", m.architecture});
  table.AddRow({"dtype", std::string(DTypeName(m.dtype))});
  table.AddRow({"layers", std::to_string(m.num_layers)});
  table.AddRow({"kv_heads", std::to_string(m.kv_heads)});
  table.AddRow({"head_dim", std::to_string(m.head_dim)});
  table.AddRow({"tokenizer_hash", m.tokenizer_hash});
  table.AddRow({"demos_per_block (k)", std::to_string(t.blocks.demos_per_block)});
  table.AddRow({"window (j)", std::to_string(t.blocks.window)});
  table.AddRow({"sink_blocks", std::to_string(t.blocks.sink_blocks)});
  table.AddRow({"positions", std::string(PositionSchemeName(t.blocks.positions))});
  table.AddRow({"codec", std::string(CodecName(t.codec))});
  table.AddRow({"prompt_template", Quoted(t.prompt_template)});
  table.AddRow({"separator", Quoted(t.separator)});
  table.AddRow({"labels", std::to_string(t.labels.size()) + (labels.empty() ? "" : ": ") +
                              Snippet(labels, 200)});
  table.AddRow({"bm25_analyzer", t.analyzer.Describe()});
  table.AddRow({"bm25", "k1=" + FormatDouble(t.bm25.k1) + " b=" + FormatDouble(t.bm25.b) +
                            (t.bm25.idf == Bm25Idf::kLucene
                                 ? std::string(" idf=lucene")
                                 : " idf=okapi epsilon=" + FormatDouble(t.bm25.epsilon))});
  table.AddRow({"metadata", Snippet(t.metadata_json, 200)});
  table.AddRow({"blocks", std::to_string(t.num_blocks)});
  table.AddRow({"demos", std::to_string(t.num_demos)});
  table.AddRow({"tokens", std::to_string(t.num_tokens)});
  table.AddRow({"payload_raw", HumanBytes(t.payload_raw_bytes) + " (" +
                                   std::to_string(t.payload_raw_bytes) + " bytes)"});
  table.AddRow({"payload_stored", HumanBytes(t.payload_stored_bytes) + " (" +
                                      std::to_string(t.payload_stored_bytes) + " bytes)"});
  table.AddRow(
      {"compression_ratio", FormatRatio(Ratio(t.payload_raw_bytes, t.payload_stored_bytes))});
  table.AddRow({"version", std::to_string(t.version)});
  table.AddRow({"created", FormatTime(t.created_unix)});
  table.Print(std::cout);
  return 0;
}

// ---- blocks
// --------------------------------------------------------------------------------------

struct BlockSizes {
  uint64_t raw = 0, stored = 0;  // over all layers, K and V; stored includes the record headers
};

// Sums the record sizes of one block from the record headers (the payloads are not read).
Result<BlockSizes> SumBlockSizes(Snapshot& snapshot, const TaskInfo& task, uint32_t block) {
  BlockSizes sizes;
  for (uint32_t layer = 0; layer < task.model.num_layers; ++layer) {
    for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
      SHOTDB_ASSIGN_OR_RETURN(BlockRecordView view,
                              snapshot.GetRecord(task.name, block, layer, kind));
      sizes.raw += view.header.raw_size;
      sizes.stored += kBlockRecordHeaderSize + view.payload_size;
    }
  }
  return sizes;
}

int RunBlocks(const GlobalOptions& global, const std::string& name, bool as_json) {
  constexpr const char* kCmd = "blocks";
  auto store = OpenStore(global, OpenMode::kReadOnly);
  if (!store.ok()) return Fail(kCmd, store.status());
  auto snapshot = (*store)->BeginSnapshot();
  if (!snapshot.ok()) return Fail(kCmd, snapshot.status());
  auto task = FindTask(**snapshot, name);
  if (!task.ok()) return Fail(kCmd, task.status());
  json j = json::array();
  Table table({"BLOCK", "POSITION", "TOKENS", "ENCODED_AT", "DEMOS", "RAW", "STORED", "RATIO"});
  for (size_t c = 0; c < 8; ++c) table.SetNumeric(c);
  std::vector<BlockInfo> spans;  // every block's offset and size (texts dropped)
  for (uint32_t b = 0; b < task->num_blocks; ++b) {
    auto info = (*snapshot)->GetBlock(name, b);
    if (!info.ok()) return Fail(kCmd, info.status());
    auto sizes = SumBlockSizes(**snapshot, *task, b);
    if (!sizes.ok()) return Fail(kCmd, sizes.status());
    // The RoPE positions the block was encoded at, by the task's scheme.
    std::vector<const BlockInfo*> context;
    for (uint32_t c : ContextBlocks(task->blocks, b)) context.push_back(&spans[c]);
    const EncodingPositions at = PositionsForEncoding(task->blocks.positions, context, *info);
    if (as_json) {
      j.push_back({{"index", info->index},
                   {"position_offset", info->position_offset},
                   {"tokens", info->token_count},
                   {"encoded_at", at.block},
                   {"demos", info->demo_ids.size()},
                   {"raw_bytes", sizes->raw},
                   {"stored_bytes", sizes->stored}});
    } else {
      table.AddRow({std::to_string(info->index), std::to_string(info->position_offset),
                    std::to_string(info->token_count),
                    std::to_string(at.block) + ".." + std::to_string(at.end - 1),
                    std::to_string(info->demo_ids.size()), HumanBytes(sizes->raw),
                    HumanBytes(sizes->stored), FormatRatio(Ratio(sizes->raw, sizes->stored))});
    }
    info->text.clear();
    spans.push_back(std::move(*info));
  }
  if (as_json) {
    PrintJson(j);
  } else {
    table.Print(std::cout);
  }
  return 0;
}

// ---- show
// ----------------------------------------------------------------------------------------

// Parses one layer number: decimal digits only, the whole of `text`, fitting in 32 bits.
bool ParseLayerNumber(std::string_view text, uint32_t* value) {
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, *value);
  return ec == std::errc() && ptr == end && !text.empty();
}

// Parses a --layers list such as "0,2,5-7" into ascending unique layer numbers. Returns an empty
// vector (and sets *error) on a malformed list.
std::vector<uint32_t> ParseLayerList(const std::string& spec, std::string* error) {
  std::vector<uint32_t> layers;
  size_t start = 0;
  while (start <= spec.size()) {
    const size_t comma = std::min(spec.find(',', start), spec.size());
    const std::string_view item = std::string_view(spec).substr(start, comma - start);
    const size_t dash = item.find('-');
    uint32_t lo = 0, hi = 0;
    const bool ok = dash == item.npos
                        ? ParseLayerNumber(item, &lo) && (hi = lo, true)
                        : ParseLayerNumber(item.substr(0, dash), &lo) &&
                              ParseLayerNumber(item.substr(dash + 1), &hi) && lo <= hi;
    if (!ok) {
      *error = "'" + std::string(item) + "' is not a layer number or a range like 2-5";
      return {};
    }
    // No model has this many layers; the bound keeps "0-4000000000" from allocating gigabytes.
    constexpr uint32_t kMaxLayer = 65535;
    if (hi > kMaxLayer) {
      *error = "layer " + std::to_string(hi) + " is above " + std::to_string(kMaxLayer);
      return {};
    }
    for (uint32_t l = lo; l <= hi; ++l) layers.push_back(l);
    start = comma + 1;
  }
  std::sort(layers.begin(), layers.end());
  layers.erase(std::unique(layers.begin(), layers.end()), layers.end());
  return layers;
}

struct ValueStats {
  double min = std::numeric_limits<double>::quiet_NaN();
  double max = std::numeric_limits<double>::quiet_NaN();
  double mean = std::numeric_limits<double>::quiet_NaN();
};

// Min, max and mean (accumulated in double) of the values of a record's raw payload (scaled
// dtypes dequantised); NaN elements are skipped.
ValueStats ComputeStats(const BlockRecordMeta& m, const void* data) {
  ValueStats s;
  const uint64_t per_head = uint64_t{m.tokens} * m.head_dim;
  std::vector<float> f(m.kv_heads * per_head);
  KvToFloat(m.dtype, m.kv_heads, m.tokens, m.head_dim, data, f.data());
  double sum = 0;
  size_t count = 0;
  for (float v : f) {
    if (std::isnan(v)) continue;
    const double d = v;
    if (count == 0 || d < s.min) s.min = d;
    if (count == 0 || d > s.max) s.max = d;
    sum += d;
    ++count;
  }
  if (count > 0) s.mean = sum / static_cast<double>(count);
  return s;
}

struct ShowOptions {
  std::string task;
  uint32_t block = 0;
  std::string layers;
  bool json = false;
};

int RunShow(const GlobalOptions& global, const ShowOptions& o) {
  constexpr const char* kCmd = "show";
  auto store = OpenStore(global, OpenMode::kReadOnly);
  if (!store.ok()) return Fail(kCmd, store.status());
  auto snapshot = (*store)->BeginSnapshot();
  if (!snapshot.ok()) return Fail(kCmd, snapshot.status());
  Snapshot& snap = **snapshot;
  auto task = FindTask(snap, o.task);
  if (!task.ok()) return Fail(kCmd, task.status());
  auto block = FindBlock(snap, *task, o.block);
  if (!block.ok()) return Fail(kCmd, block.status());
  const uint32_t num_layers = task->model.num_layers;

  std::vector<uint32_t> layers;
  if (o.layers.empty()) {
    for (uint32_t l = 0; l < num_layers; ++l) layers.push_back(l);
  } else {
    std::string error;
    layers = ParseLayerList(o.layers, &error);
    if (!error.empty()) return Fail(kCmd, "--layers: " + error);
    if (!layers.empty() && layers.back() >= num_layers) {
      return Fail(kCmd, "--layers names layer " + std::to_string(layers.back()) + " but task '" +
                            task->name + "' has " + std::to_string(num_layers) + " layers (0.." +
                            std::to_string(num_layers - 1) + ")");
    }
  }

  json demos_json = json::array();
  Table demos({"ID", "LABEL", "TEXT"});
  demos.SetNumeric(0);
  for (uint64_t id : block->demo_ids) {
    auto demo = snap.GetDemonstration(task->name, id);
    if (!demo.ok()) return Fail(kCmd, demo.status());
    demos_json.push_back({{"id", demo->id}, {"label", demo->label}, {"text", demo->text}});
    demos.AddRow({std::to_string(demo->id), demo->label, Snippet(demo->text, 100)});
  }

  int rc = 0;
  json tensors_json = json::array();
  Table tensors({"LAYER", "KIND", "SHAPE", "DTYPE", "CODEC", "RAW", "STORED", "CHECKSUM", "MIN",
                 "MAX", "MEAN"});
  for (size_t c : {0, 5, 6, 8, 9, 10}) tensors.SetNumeric(c);
  for (uint32_t layer : layers) {
    for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
      const std::string kind_name(TensorKindName(kind));
      auto record = snap.GetRecord(task->name, o.block, layer, kind);
      Status status = record.status();
      // Decoded into our own buffer (8-byte aligned for every dtype) rather than read through
      // GetPayload's zero-copy pointer: KvToFloat needs element-aligned input.
      std::vector<double> values;
      if (status.ok()) {
        values.resize((record->header.raw_size + sizeof(double) - 1) / sizeof(double));
        status = snap.DecodePayloadInto(task->name, o.block, layer, kind, values.data(),
                                        record->header.raw_size);
      }
      if (!status.ok()) {
        // Show the rest of the block; the damage is reported and makes the exit code 1.
        Fail(kCmd, status);
        rc = 1;
        tensors_json.push_back(
            {{"layer", layer}, {"kind", kind_name}, {"error", status.ToString()}});
        tensors.AddRow({std::to_string(layer), kind_name, "CORRUPT"});
        continue;
      }
      const BlockRecordHeader& h = record->header;
      const uint64_t stored = kBlockRecordHeaderSize + record->payload_size;
      const ValueStats s = ComputeStats(h.meta, values.data());
      char payload_sum[9];
      std::snprintf(payload_sum, sizeof payload_sum, "%08" PRIx32, h.payload_checksum);
      const std::string shape = "[" + std::to_string(h.meta.kv_heads) + "," +
                                std::to_string(h.meta.tokens) + "," +
                                std::to_string(h.meta.head_dim) + "]";
      tensors_json.push_back({{"layer", layer},
                              {"kind", kind_name},
                              {"shape", {h.meta.kv_heads, h.meta.tokens, h.meta.head_dim}},
                              {"dtype", std::string(DTypeName(h.meta.dtype))},
                              {"codec", std::string(CodecName(h.codec))},
                              {"raw_bytes", h.raw_size},
                              {"stored_bytes", stored},
                              {"checksum", Hex64(h.checksum)},
                              {"payload_checksum", payload_sum},
                              {"min", JsonNumber(s.min)},
                              {"max", JsonNumber(s.max)},
                              {"mean", JsonNumber(s.mean)}});
      tensors.AddRow({std::to_string(layer), kind_name, shape, std::string(DTypeName(h.meta.dtype)),
                      std::string(CodecName(h.codec)), HumanBytes(h.raw_size), HumanBytes(stored),
                      Hex64(h.checksum), FormatDouble(s.min, "%.4g"), FormatDouble(s.max, "%.4g"),
                      FormatDouble(s.mean, "%.4g")});
    }
  }

  if (o.json) {
    PrintJson({{"task", task->name},
               {"block", block->index},
               {"position_offset", block->position_offset},
               {"tokens", block->token_count},
               {"text", block->text},
               {"demos", demos_json},
               {"tensors", tensors_json}});
    return rc;
  }
  std::cout << "task " << task->name << " block " << block->index << ": position "
            << block->position_offset << ", " << block->token_count << " tokens, "
            << block->demo_ids.size() << " demonstrations\n\n";
  demos.Print(std::cout);
  std::cout << '\n';
  tensors.Print(std::cout);
  return rc;
}

// ---- search
// --------------------------------------------------------------------------------------

int RunSearch(const GlobalOptions& global, const std::string& name, const std::string& query,
              size_t k, bool demos, bool as_json) {
  constexpr const char* kCmd = "search";
  auto store = OpenStore(global, OpenMode::kReadOnly);
  if (!store.ok()) return Fail(kCmd, store.status());
  auto snapshot = (*store)->BeginSnapshot();
  if (!snapshot.ok()) return Fail(kCmd, snapshot.status());
  auto task = FindTask(**snapshot, name);
  if (!task.ok()) return Fail(kCmd, task.status());
  auto hits =
      demos ? (*snapshot)->SearchDemos(name, query, k) : (*snapshot)->Search(name, query, k);
  if (!hits.ok()) return Fail(kCmd, hits.status());
  json j = json::array();
  Table table({"RANK", demos ? "DEMO" : "BLOCK", "SCORE", "TEXT"});
  for (size_t c = 0; c < 3; ++c) table.SetNumeric(c);
  for (size_t rank = 0; rank < hits->size(); ++rank) {
    const ScoredDoc& hit = (*hits)[rank];
    std::string text;
    if (demos) {
      auto demo = (*snapshot)->DemoAt(name, hit.doc);
      if (!demo.ok()) return Fail(kCmd, demo.status());
      text = demo->text + " -> " + demo->label;
    } else {
      auto block = (*snapshot)->GetBlock(name, hit.doc);
      if (!block.ok()) return Fail(kCmd, block.status());
      text = std::move(block->text);
    }
    j.push_back({{"rank", rank + 1},
                 {demos ? "demo" : "block", hit.doc},
                 {"score", hit.score},
                 {"snippet", Snippet(text, 160)}});
    table.AddRow({std::to_string(rank + 1), std::to_string(hit.doc),
                  FormatDouble(hit.score, "%.4f"), Snippet(text, 80)});
  }
  if (as_json) {
    PrintJson(j);
  } else {
    table.Print(std::cout);
  }
  return 0;
}

// ---- verify
// --------------------------------------------------------------------------------------

int RunVerify(const GlobalOptions& global, const std::string& name, bool as_json) {
  constexpr const char* kCmd = "verify";
  auto store = OpenStore(global, OpenMode::kReadOnly);
  if (!store.ok()) return Fail(kCmd, store.status());
  if (!name.empty()) {
    // Resolve the name first so that a typo gets the list of tasks, not a bare NotFound.
    auto task = FindTask(**store, name);
    if (!task.ok()) return Fail(kCmd, task.status());
  }
  VerifyReport report;
  Status status;
  {
    ProgressBar bar(name.empty() ? "verify" : "verify " + name, 0);
    status = (*store)->Verify(name, &report,
                              [&bar](uint64_t done, uint64_t total) { bar.Update(done, total); });
  }
  if (!status.ok() && !status.IsCorruption()) return Fail(kCmd, status);
  // Verify's status names the first problem; the report lists them all (up to kMaxProblems).
  std::vector<std::string> problems = report.problems;
  if (problems.empty() && !status.ok()) problems.push_back(status.message());
  if (as_json) {
    PrintJson({{"ok", problems.empty()},
               {"tasks_checked", report.tasks_checked},
               {"blocks_checked", report.blocks_checked},
               {"records_checked", report.records_checked},
               {"raw_bytes_checked", report.raw_bytes_checked},
               {"problems", problems}});
  } else {
    for (const std::string& p : problems) std::cout << "CORRUPT " << p << '\n';
    std::cout << "checked " << report.tasks_checked << " task(s), " << report.blocks_checked
              << " block(s), " << report.records_checked << " record(s), "
              << HumanBytes(report.raw_bytes_checked) << ": "
              << (problems.empty() ? "OK" : std::to_string(problems.size()) + " problem(s)")
              << '\n';
  }
  if (problems.empty()) return 0;
  std::cerr << "shotdb verify: " << problems.size() << " problem(s) found in " << global.store_dir
            << '\n';
  return 1;
}

// ---- stats
// ---------------------------------------------------------------------------------------

int RunStats(const GlobalOptions& global, bool as_json) {
  constexpr const char* kCmd = "stats";
  auto store = OpenStore(global, OpenMode::kReadOnly);
  if (!store.ok()) return Fail(kCmd, store.status());
  auto stats = (*store)->Stats();
  if (!stats.ok()) return Fail(kCmd, stats.status());
  const StoreStats& s = *stats;
  uint64_t raw = 0, stored = 0;
  for (const TaskStats& t : s.tasks) {
    raw += t.payload_raw_bytes;
    stored += t.payload_stored_bytes;
  }
  if (as_json) {
    json tasks = json::array();
    for (const TaskStats& t : s.tasks) {
      tasks.push_back(
          {{"name", t.name},
           {"codec", std::string(CodecName(t.codec))},
           {"blocks", t.blocks},
           {"demos", t.demos},
           {"tokens", t.tokens},
           {"payload_raw_bytes", t.payload_raw_bytes},
           {"payload_stored_bytes", t.payload_stored_bytes},
           {"compression_ratio", JsonNumber(Ratio(t.payload_raw_bytes, t.payload_stored_bytes))}});
    }
    json dbs = json::array();
    for (const DbStats& d : s.dbs) {
      dbs.push_back({{"name", d.name},
                     {"entries", d.entries},
                     {"depth", d.depth},
                     {"branch_pages", d.branch_pages},
                     {"leaf_pages", d.leaf_pages},
                     {"overflow_pages", d.overflow_pages}});
    }
    PrintJson({{"store", global.store_dir},
               {"file_size", s.file_size},
               {"used_bytes", s.used_bytes},
               {"page_size", s.page_size},
               {"last_page", s.last_page},
               {"map_size", s.map_size},
               {"payload_raw_bytes", raw},
               {"payload_stored_bytes", stored},
               {"compression_ratio", JsonNumber(Ratio(raw, stored))},
               {"tasks", tasks},
               {"dbs", dbs}});
    return 0;
  }
  std::cout << "store        " << global.store_dir << '\n'
            << "file size    " << HumanBytes(s.file_size) << " (" << s.file_size << " bytes)\n"
            << "pages used   " << s.last_page + 1 << " x " << s.page_size
            << " B = " << HumanBytes(s.used_bytes) << '\n'
            << "map size     " << HumanBytes(s.map_size) << '\n'
            << "payloads     " << HumanBytes(raw) << " raw, " << HumanBytes(stored)
            << " stored, ratio " << FormatRatio(Ratio(raw, stored)) << "\n\n";
  if (!s.tasks.empty()) {
    Table tasks({"TASK", "CODEC", "BLOCKS", "DEMOS", "TOKENS", "RAW", "STORED", "RATIO"});
    for (size_t c = 2; c < 8; ++c) tasks.SetNumeric(c);
    for (const TaskStats& t : s.tasks) {
      tasks.AddRow({t.name, std::string(CodecName(t.codec)), std::to_string(t.blocks),
                    std::to_string(t.demos), std::to_string(t.tokens),
                    HumanBytes(t.payload_raw_bytes), HumanBytes(t.payload_stored_bytes),
                    FormatRatio(Ratio(t.payload_raw_bytes, t.payload_stored_bytes))});
    }
    tasks.Print(std::cout);
    std::cout << '\n';
  }
  Table dbs({"DB", "ENTRIES", "DEPTH", "BRANCH", "LEAF", "OVERFLOW", "PAGES"});
  for (size_t c = 1; c < 7; ++c) dbs.SetNumeric(c);
  for (const DbStats& d : s.dbs) {
    dbs.AddRow({d.name, std::to_string(d.entries), std::to_string(d.depth),
                std::to_string(d.branch_pages), std::to_string(d.leaf_pages),
                std::to_string(d.overflow_pages),
                HumanBytes((d.branch_pages + d.leaf_pages + d.overflow_pages) * s.page_size)});
  }
  dbs.Print(std::cout);
  return 0;
}

// ---- rm, export, import, compact
// -----------------------------------------------------------------

int RunRm(const GlobalOptions& global, const std::string& name, bool yes) {
  constexpr const char* kCmd = "rm";
  auto store = OpenStore(global, OpenMode::kWriteExisting);
  if (!store.ok()) return Fail(kCmd, store.status());
  auto task = FindTask(**store, name);
  if (!task.ok()) return Fail(kCmd, task.status());
  const std::string what = "task '" + name + "' (" + std::to_string(task->num_blocks) +
                           " blocks, " + HumanBytes(task->payload_stored_bytes) + ")";
  if (!yes) return Fail(kCmd, "refusing to delete " + what + " without --yes");
  Status s = (*store)->DeleteTask(name);
  if (!s.ok()) return Fail(kCmd, s);
  std::cout << "deleted " << what << '\n';
  return 0;
}

int RunExport(const GlobalOptions& global, const std::string& name, const std::string& path) {
  constexpr const char* kCmd = "export";
  auto store = OpenStore(global, OpenMode::kReadOnly);
  if (!store.ok()) return Fail(kCmd, store.status());
  auto task = FindTask(**store, name);
  if (!task.ok()) return Fail(kCmd, task.status());
  Status s = ExportTask(**store, name, path);
  if (!s.ok()) return Fail(kCmd, s);
  const uint64_t size = FileSizeOrZero(path);
  std::cout << "exported task '" << name << "' (" << task->num_blocks << " blocks) to " << path
            << " (" << HumanBytes(size) << ")\n";
  return 0;
}

int RunImport(const GlobalOptions& global, const std::string& path) {
  constexpr const char* kCmd = "import";
  // Check the file before opening the store, so that a wrong path does not create an empty store.
  if (!PathExists(path)) return Fail(kCmd, path + ": no such file");
  auto store = OpenStore(global, OpenMode::kCreate);
  if (!store.ok()) return Fail(kCmd, store.status());
  std::string name;
  Status s = ImportTask(store->get(), path, &name);
  if (!s.ok()) return Fail(kCmd, s.WithContext(path));
  auto snapshot = (*store)->BeginSnapshot();
  if (!snapshot.ok()) return Fail(kCmd, snapshot.status());
  auto task = (*snapshot)->GetTask(name);
  if (!task.ok()) return Fail(kCmd, task.status());
  std::cout << "imported task '" << name << "' (" << task->num_blocks << " blocks, "
            << task->num_demos << " demos) into " << global.store_dir << '\n';
  return 0;
}

int RunCompact(const GlobalOptions& global, const std::string& dest) {
  constexpr const char* kCmd = "compact";
  auto store = OpenStore(global, OpenMode::kReadOnly);
  if (!store.ok()) return Fail(kCmd, store.status());
  auto before = (*store)->Stats();
  if (!before.ok()) return Fail(kCmd, before.status());
  Status s = (*store)->Compact(dest);
  if (!s.ok()) return Fail(kCmd, s);
  const uint64_t after = FileSizeOrZero(JoinPath(dest, "data.mdb"));
  std::cout << "compacted " << global.store_dir << " (" << HumanBytes(before->file_size)
            << ") into " << dest << " (" << HumanBytes(after) << ")\n";
  return 0;
}

}  // namespace

void RegisterInspectCommands(CLI::App& app, const GlobalOptions& global) {
  // Option values live as long as the App: each command's are owned by its callback.
  {
    auto as_json = std::make_shared<bool>(false);
    CLI::App* sub = app.add_subcommand("ls", "List the tasks with their sizes");
    sub->add_flag("--json", *as_json, "Print JSON");
    SetAction(sub, [&global, as_json] { return RunLs(global, *as_json); });
  }
  {
    struct Opts {
      std::string task;
      bool json = false;
    };
    auto o = std::make_shared<Opts>();
    CLI::App* sub = app.add_subcommand(
        "info", "Show a task: model fingerprint, block config, prompt template, counts, sizes");
    sub->add_option("task", o->task, "Task name")->required();
    sub->add_flag("--json", o->json, "Print JSON");
    SetAction(sub, [&global, o] { return RunInfo(global, o->task, o->json); });
  }
  {
    struct Opts {
      std::string task;
      bool json = false;
    };
    auto o = std::make_shared<Opts>();
    CLI::App* sub = app.add_subcommand(
        "blocks", "List a task's blocks: position, tokens, demonstrations, stored bytes");
    sub->add_option("task", o->task, "Task name")->required();
    sub->add_flag("--json", o->json, "Print JSON");
    SetAction(sub, [&global, o] { return RunBlocks(global, o->task, o->json); });
  }
  {
    auto o = std::make_shared<ShowOptions>();
    CLI::App* sub = app.add_subcommand(
        "show", "Show one block: its demonstrations, and per layer the K/V records and values");
    sub->add_option("task", o->task, "Task name")->required();
    sub->add_option("block", o->block, "Block index")->required();
    sub->add_option("--layers", o->layers, "Layers to show, e.g. 0,3,8-11 (default: all)")
        ->check(CLI::Validator(
            [](std::string& spec) {
              std::string error;
              ParseLayerList(spec, &error);
              return error;
            },
            "LIST", "layer list"));
    sub->add_flag("--json", o->json, "Print JSON");
    SetAction(sub, [&global, o] { return RunShow(global, *o); });
  }
  {
    struct Opts {
      std::string task, query;
      size_t k = 5;
      bool demos = false;
      bool json = false;
    };
    auto o = std::make_shared<Opts>();
    CLI::App* sub = app.add_subcommand(
        "search", "Rank a task's blocks (or single demonstrations) for a query with BM25");
    sub->add_option("task", o->task, "Task name")->required();
    sub->add_option("query", o->query, "Query text")->required();
    sub->add_option("-k,--top", o->k, "Number of results")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    sub->add_flag("--demos", o->demos,
                  "Rank single demonstrations (the per-demonstration index RetICL uses)");
    sub->add_flag("--json", o->json, "Print JSON");
    SetAction(sub, [&global, o] {
      return RunSearch(global, o->task, o->query, o->k, o->demos, o->json);
    });
  }
  {
    struct Opts {
      std::string task;
      bool json = false;
    };
    auto o = std::make_shared<Opts>();
    CLI::App* sub = app.add_subcommand(
        "verify",
        "Recompute every checksum and check the structure; exit 1 if anything is corrupt");
    sub->add_option("task", o->task, "Only this task (default: every task)");
    sub->add_flag("--json", o->json, "Print JSON");
    SetAction(sub, [&global, o] { return RunVerify(global, o->task, o->json); });
  }
  {
    auto as_json = std::make_shared<bool>(false);
    CLI::App* sub = app.add_subcommand(
        "stats", "Show sizes, compression ratios and LMDB page use of the store");
    sub->add_flag("--json", *as_json, "Print JSON");
    SetAction(sub, [&global, as_json] { return RunStats(global, *as_json); });
  }
  {
    struct Opts {
      std::string task;
      bool yes = false;
    };
    auto o = std::make_shared<Opts>();
    CLI::App* sub = app.add_subcommand("rm", "Delete a task and everything of it");
    sub->add_option("task", o->task, "Task name")->required();
    sub->add_flag("-y,--yes", o->yes, "Really delete (required)");
    SetAction(sub, [&global, o] { return RunRm(global, o->task, o->yes); });
  }
  {
    struct Opts {
      std::string task, file;
    };
    auto o = std::make_shared<Opts>();
    CLI::App* sub = app.add_subcommand("export", "Write one task to a portable, checksummed file");
    sub->add_option("task", o->task, "Task name")->required();
    sub->add_option("file", o->file, "Output file (written atomically)")->required();
    SetAction(sub, [&global, o] { return RunExport(global, o->task, o->file); });
  }
  {
    auto file = std::make_shared<std::string>();
    CLI::App* sub = app.add_subcommand(
        "import", "Add the task of an export file to the store (created if missing)");
    sub->add_option("file", *file, "Export file")->required();
    SetAction(sub, [&global, file] { return RunImport(global, *file); });
  }
  {
    auto dest = std::make_shared<std::string>();
    CLI::App* sub = app.add_subcommand(
        "compact", "Write a compacted copy of the store (free pages dropped) into DEST");
    sub->add_option("dest", *dest, "Destination directory (must not hold a store)")->required();
    SetAction(sub, [&global, dest] { return RunCompact(global, *dest); });
  }
}

}  // namespace shotdb::cli
