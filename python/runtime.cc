// The `shotdb._runtime` extension: queries through the C++ model runtime (query/dbsa/dbsa.h), so a
// Python user gets exactly the answers `shotdb query` gives. Built only with libtorch
// (`pip install . -C cmake.define.SHOTDB_WITH_TORCH=ON`); `import shotdb` never loads it.
//
// A Session uses the engine store of a `shotdb.Store` object (handed over as a capsule holding a
// shared reference, so one directory is opened once per process, as LMDB requires).
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <string>
#include <thread>

#include "engine/store.h"
#include "format/gguf.h"
#include "python/status_error.h"
#include "query/dbsa/dbsa.h"
#include "query/dbsa/kv_tensor.h"
#include "query/model/llama.h"
#include "query/tokenizer/tokenizer.h"
#include "util/file_util.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace shotdb::python {
namespace {

class Session {
 public:
  Session(nb::object store, const std::string& task, const std::string& model,
          const std::string& device, const std::string& dtype, int threads, double cache_gb,
          int64_t max_context) {
    nb::capsule cap = nb::cast<nb::capsule>(store.attr("_engine")());
    store_ = *static_cast<std::shared_ptr<Store>*>(cap.data());
    nb::gil_scoped_release release;
    torch::set_num_threads(threads > 0 ? threads
                                       : static_cast<int>(std::thread::hardware_concurrency()));
    LoadOptions options;
    try {
      options.device = torch::Device(device);
    } catch (const std::exception&) {
      Raise(Status::InvalidArgument("device '" + device + "': expected cpu or cuda[:N]"));
    }
    const std::string d = dtype.empty() ? (options.device.is_cuda() ? "bf16" : "f32") : dtype;
    const auto parsed = ParseDType(d);
    if (!parsed || IsScaledDType(*parsed)) {  // fp8 and int8 are storage dtypes, not compute ones
      Raise(Status::InvalidArgument("dtype '" + d + "': expected f32, bf16 or f64"));
    }
    options.dtype = TorchType(*parsed);
    model_ = Check(LlamaModel::Load(model, options));
    tokenizer_ = Check(LoadTokenizer(model));
    const std::string digest = Check(WeightsDigest(model));
    SessionOptions session;
    session.cache_bytes = static_cast<size_t>(cache_gb * (1ull << 30));
    session.max_context = max_context;
    session_ = Check(
        DbsaSession::Open(store_.get(), task, {model_.get(), tokenizer_.get(), digest}, session));
  }

  nb::dict Ask(const std::string& text, const std::string& method, double ratio, uint32_t count,
               const std::string& order, bool free, int64_t max_new_tokens) {
    const AnswerOptions o = Options(method, ratio, count, order, free, max_new_tokens);
    Answer a;
    {
      nb::gil_scoped_release release;
      a = Check(session_->Ask(text, o));
    }
    return ToDict(a);
  }

  nb::list AskBatch(const std::vector<std::string>& texts, double ratio, uint32_t count,
                    const std::string& order) {
    const AnswerOptions o = Options("dbsa", ratio, count, order, false, 0);
    std::vector<Answer> answers;
    {
      nb::gil_scoped_release release;
      answers = Check(session_->AskBatch(texts, o));
    }
    nb::list out;
    for (const Answer& a : answers) out.append(ToDict(a));
    return out;
  }

  std::vector<std::string> labels() const { return session_->task().labels; }
  int64_t max_context() const { return session_->max_context(); }

 private:
  static AnswerOptions Options(const std::string& method, double ratio, uint32_t count,
                               const std::string& order, bool free, int64_t max_new_tokens) {
    AnswerOptions o;
    const auto m = ParseMethod(method);
    if (!m) {
      Raise(Status::InvalidArgument("method '" + method +
                                    "': expected dbsa, reticl, reticl-blocks or fixedicl"));
    }
    if (order != "encoding" && order != "score") {
      Raise(Status::InvalidArgument("order '" + order + "': expected encoding or score"));
    }
    o.method = *m;
    o.selection.ratio = ratio;
    o.selection.count = count;
    o.selection.ascending_score = order == "score";
    o.free_text = free;
    o.max_new_tokens = max_new_tokens;
    return o;
  }

  static nb::dict ToDict(const Answer& a) {
    nb::dict timing;
    for (const auto& [key, value] : {std::pair{"select", a.timing.select},
                                     {"load", a.timing.load},
                                     {"gather", a.timing.gather},
                                     {"encode", a.timing.encode},
                                     {"decode", a.timing.decode},
                                     {"total", a.timing.total}}) {
      timing[key] = value;
    }
    nb::dict d;
    d["label"] = a.label;
    d["score"] = a.score;
    d["label_scores"] = a.label_scores;
    d["text"] = a.text;
    d["blocks"] = a.blocks;
    d["block_scores"] = a.block_scores;
    d["demos"] = a.demos;
    d["demo_scores"] = a.demo_scores;
    d["context_tokens"] = a.context_tokens;
    d["prompt_tokens"] = a.prompt_tokens;
    d["budget"] = a.budget;
    d["budget_bound"] = a.budget_bound;
    d["timing_ms"] = timing;
    return d;
  }

  std::shared_ptr<Store> store_;  // declared first: destroyed last
  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<DbsaSession> session_;
};

// The fingerprint PoolEncoder (MakeFingerprint) records for `model` with K/V stored in `kv_dtype`,
// without loading the weights (the same MakeFingerprint, from the config), plus what tokenizing a
// block needs: for shotdb.hf, so that a task it encodes is accepted by the C++ runtime and the CLI.
nb::dict ModelFingerprintOf(const std::string& model, const std::string& kv_dtype) {
  const auto dtype = ParseDType(kv_dtype);
  if (!dtype) {
    Raise(Status::InvalidArgument("dtype '" + kv_dtype +
                                  "': expected f32, f16, bf16, f64, i8 or f8e4m3"));
  }
  ModelConfig config;
  std::unique_ptr<Tokenizer> tokenizer;
  std::string digest;
  {
    nb::gil_scoped_release release;
    if (IsDirectory(model)) {
      config = Check(LoadHfConfig(JoinPath(model, "config.json")));
    } else {
      const GgufFile gguf = Check(GgufFile::Open(model));
      config = Check(ConfigFromGguf(gguf, model));
    }
    tokenizer = Check(LoadTokenizer(model));
    digest = Check(WeightsDigest(model));
  }
  const ModelFingerprint f = MakeFingerprint(config, *tokenizer, digest, *dtype);
  nb::dict d;
  d["architecture"] = f.architecture;
  d["dtype"] = std::string(DTypeName(f.dtype));
  d["tokenizer_hash"] = f.tokenizer_hash;
  d["num_layers"] = f.num_layers;
  d["kv_heads"] = f.kv_heads;
  d["head_dim"] = f.head_dim;
  d["weights_digest"] = digest;
  d["max_position_embeddings"] = config.max_position_embeddings;
  d["add_bos"] = tokenizer->add_bos_default() && tokenizer->bos_id() >= 0;
  d["bos_id"] = tokenizer->bos_id();
  return d;
}

// PlanBlocks: the grouping (and demonstration ids) `shotdb build` uses for `demos` and `seed`.
std::vector<std::vector<std::tuple<uint64_t, std::string, std::string>>> PlanBlocksOf(
    const std::vector<std::pair<std::string, std::string>>& demos, uint32_t demos_per_block,
    uint64_t seed) {
  if (demos_per_block == 0) {
    Raise(Status::InvalidArgument("demonstrations per block must be at least 1"));
  }
  std::vector<LabeledText> rows;
  for (const auto& [text, label] : demos) rows.push_back({text, label});
  std::vector<std::vector<std::tuple<uint64_t, std::string, std::string>>> out;
  for (const auto& group : PlanBlocks(rows, demos_per_block, seed)) {
    out.emplace_back();
    for (const Demonstration& d : group) out.back().emplace_back(d.id, d.text, d.label);
  }
  return out;
}

}  // namespace
}  // namespace shotdb::python

NB_MODULE(_runtime, m) {
  using namespace shotdb::python;
  m.doc() = "shotdb's model runtime (libtorch): DBSA and its baselines answering queries.";
  RegisterStatusErrors();
  nb::class_<Session>(m, "Session",
                      "Answers queries from a task's pool with the C++ runtime, as `shotdb query` "
                      "does. One query at a time per Session; open several for concurrency.")
      .def(nb::init<nb::object, const std::string&, const std::string&, const std::string&,
                    const std::string&, int, double, int64_t>(),
           "store"_a, "task"_a, "model"_a, "device"_a = "cpu", "dtype"_a = "", "threads"_a = 0,
           "cache_gb"_a = 0.0, "max_context"_a = 0,
           "Loads `model` (GGUF file or HF directory; the one the task was built with: "
           "FailedPreconditionError otherwise) on `device` in `dtype` (default f32 on CPU, bf16 "
           "on CUDA) and opens `task` of `store` (a shotdb.Store). max_context: the query "
           "budget's limit (0: the model's max_position_embeddings).")
      .def("ask", &Session::Ask, "text"_a, "method"_a = "dbsa", "ratio"_a = 0.3, "count"_a = 0,
           "order"_a = "encoding", "free"_a = false, "max_new_tokens"_a = 32,
           "Answers one query: a dict with label, score (summed log-probability), label_scores, "
           "text (free=True), blocks/block_scores (RetICL: demos/demo_scores), context_tokens, "
           "prompt_tokens, budget, budget_bound and timing_ms (select, load, gather, encode, "
           "decode, total).")
      .def("ask_batch", &Session::AskBatch, "texts"_a, "ratio"_a = 0.3, "count"_a = 0,
           "order"_a = "encoding",
           "Answers several DBSA label queries in one forward (the union of their blocks staged "
           "once on CUDA): a list of ask()'s dicts in query order, each as ask() would answer "
           "it; every timing_ms holds the whole batch's.")
      .def_prop_ro("labels", &Session::labels)
      .def_prop_ro("max_context", &Session::max_context);
  m.def("model_fingerprint", &ModelFingerprintOf, "model"_a, "kv_dtype"_a = "f32",
        "The task fingerprint `shotdb build` records for `model` (HF directory or GGUF file) with "
        "K/V stored in kv_dtype: a dict of architecture (with the weights digest), dtype, "
        "tokenizer_hash, num_layers, kv_heads, head_dim, plus weights_digest, "
        "max_position_embeddings, add_bos and bos_id (what block 0's tokens start with). Loads "
        "no weights.");
  m.def("plan_blocks", &PlanBlocksOf, "demos"_a, "demos_per_block"_a, "seed"_a,
        "How `shotdb build --seed` groups `demos` ((text, label) pairs): a list of blocks, each a "
        "list of (id, text, label).");
}
