// build, append, query, eval: the commands that run a model (built only with libtorch).
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "engine/store.h"
#include "query/dbsa/dbsa.h"
#include "query/dbsa/eval.h"
#include "query/dbsa/kv_tensor.h"
#include "query/dbsa/pool_encoder.h"
#include "query/model/llama.h"
#include "query/tokenizer/tokenizer.h"
#include "tools/cli_util.h"
#include "tools/commands.h"

namespace shotdb::cli {

namespace {

std::string DefaultModelPath() {
  if (const char* env = std::getenv("SHOTDB_MODEL")) return env;
  std::string cache;
  if (const char* c = std::getenv("SHOTDB_CACHE")) {
    cache = c;
  } else if (const char* home = std::getenv("HOME")) {
    cache = std::string(home) + "/.cache/shotdb";
  }
  return cache + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

// "\n", "\t" and "\\" in template/separator arguments, so shells need no $'...' quoting.
std::string Unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size()) {
      const char c = s[++i];
      out += c == 'n' ? '\n' : c == 't' ? '\t' : c;
    } else {
      out += s[i];
    }
  }
  return out;
}

struct ModelOptions {
  std::string path;
  std::string device = "cpu";
  std::string dtype;  // default: f32 on CPU, bf16 on CUDA
  int threads = 0;
};

void AddModelOptions(CLI::App* sub, ModelOptions* m) {
  m->path = DefaultModelPath();
  sub->add_option("--model", m->path,
                  "GGUF file or HF model directory (default: $SHOTDB_MODEL or "
                  "the fetched SmolLM2-135M-Instruct)")
      ->capture_default_str();
  sub->add_option("--device", m->device, "cpu or cuda[:N]")->capture_default_str();
  sub->add_option("--dtype", m->dtype,
                  "compute dtype: f32, bf16, f64 (default f32 on CPU, bf16 on CUDA)");
  sub->add_option("--threads", m->threads, "CPU threads for libtorch (default: all cores)");
}

// A loaded model with everything a task fingerprint needs.
struct LoadedModel {
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<Tokenizer> tokenizer;
  PoolModel pool() const { return {model.get(), tokenizer.get(), digest}; }
  std::string digest;
};

Result<LoadedModel> LoadModel(const ModelOptions& m) {
  torch::set_num_threads(m.threads > 0 ? m.threads
                                       : static_cast<int>(std::thread::hardware_concurrency()));
  LoadOptions options;
  try {
    options.device = torch::Device(m.device);
  } catch (const std::exception&) {
    return Status::InvalidArgument("--device '" + m.device + "': expected cpu or cuda[:N]");
  }
  std::string dtype = m.dtype.empty() ? (options.device.is_cuda() ? "bf16" : "f32") : m.dtype;
  auto parsed = ParseDType(dtype);
  if (!parsed || IsScaledDType(*parsed))  // fp8 and int8 are K/V storage dtypes (--kv-dtype)
    return Status::InvalidArgument("--dtype '" + dtype + "': expected f32, bf16, f16 or f64");
  options.dtype = TorchType(*parsed);
  LoadedModel loaded;
  SHOTDB_ASSIGN_OR_RETURN(loaded.model, LlamaModel::Load(m.path, options));
  SHOTDB_ASSIGN_OR_RETURN(loaded.tokenizer, LoadTokenizer(m.path));
  SHOTDB_ASSIGN_OR_RETURN(loaded.digest, WeightsDigest(m.path));
  return loaded;
}

struct InputOptions {
  std::string path;
  DemoFileOptions file;
  size_t sample = 0;  // build/append: a seeded random sample of this many rows (0 = all)
};

void AddInputOptions(CLI::App* sub, InputOptions* in, const char* flag, const char* what) {
  sub->add_option(flag, in->path, what)->required()->check(CLI::ExistingFile);
  sub->add_option("--text-col", in->file.text_column, "column/field holding the text")
      ->capture_default_str();
  sub->add_option("--label-col", in->file.label_column, "column/field holding the label")
      ->capture_default_str();
  sub->add_option("--format", in->file.format, "csv or jsonl (default: by extension)");
  sub->add_option("--label-map", in->file.label_map_path,
                  "file of 'id<TAB>label text' lines mapping label ids to label text");
  sub->add_option("--limit", in->file.limit, "read at most N rows (0 = all)");
}

std::string FormatEta(double seconds) {
  char buf[32];
  const int s = static_cast<int>(seconds + 0.5);
  std::snprintf(buf, sizeof buf, "%d:%02d", s / 60, s % 60);
  return buf;
}

// Encodes demonstrations with a progress bar (tokens/s, ETA) and a closing summary line.
int RunEncode(const char* command, const GlobalOptions& global, const ModelOptions& m,
              const std::string& task, const PoolTaskOptions& task_options,
              const InputOptions& input, uint64_t seed) {
  auto demos = ReadLabeledTexts(input.path, input.file);
  if (!demos.ok()) return Fail(command, demos.status());
  if (input.sample > 0 && input.sample < demos->size()) {
    // Data files are often sorted by label; --limit would then keep a few labels only. The shuffle
    // is GroupIntoBlocks' (the same on every platform), so a sample of n is the first n rows of a
    // larger sample with the same seed: pools of growing size are nested.
    const std::vector<size_t> order =
        GroupIntoBlocks(demos->size(), demos->size(), seed ^ 0x5eed5a3b1eULL).front();
    std::vector<LabeledText> sample;
    for (size_t i = 0; i < input.sample; ++i) sample.push_back((*demos)[order[i]]);
    *demos = std::move(sample);
  }
  auto loaded = LoadModel(m);
  if (!loaded.ok()) return Fail(command, loaded.status());
  auto store = Store::Open(global.store_dir);
  if (!store.ok()) return Fail(command, store.status());

  PoolEncoder encoder(store->get(), loaded->pool());
  ProgressBar bar(std::string(command) + " " + task, 0);
  EncodeProgress last;
  auto progress = [&](const EncodeProgress& p) {
    last = p;
    const double rate = p.seconds > 0 ? p.tokens_done / p.seconds : 0;
    const double eta =
        p.blocks_done ? p.seconds * (p.blocks_total - p.blocks_done) / p.blocks_done : 0;
    char detail[96];
    std::snprintf(detail, sizeof detail, "%.0f tok/s, ETA %s", rate, FormatEta(eta).c_str());
    bar.SetDetail(detail);
    bar.Update(p.blocks_done, p.blocks_total);
  };
  Status s = encoder.AddDemonstrations(task, task_options, *demos, seed, progress);
  bar.Finish();
  if (!s.ok()) return Fail(command, s);
  const int64_t window = loaded->model->config().max_position_embeddings;
  if (window > 0 && last.max_position > static_cast<uint64_t>(window)) {
    std::fprintf(stderr,
                 "%s: warning: blocks were encoded at RoPE positions up to %llu, beyond the "
                 "model's trained context of %lld (max_position_embeddings); their K/V are "
                 "degraded. Build with --positions windowed (docs/results.md).\n",
                 command, static_cast<unsigned long long>(last.max_position),
                 static_cast<long long>(window));
  }
  auto snapshot = (*store)->BeginSnapshot();
  if (!snapshot.ok()) return Fail(command, snapshot.status());
  auto info = (*snapshot)->GetTask(task);
  if (!info.ok()) return Fail(command, info.status());
  std::printf(
      "%s: task '%s': encoded %llu new blocks (%llu tokens) in %.1f s (%.0f tok/s, %s positions, "
      "largest %llu); now %llu blocks, %llu demonstrations, %llu tokens\n",
      command, task.c_str(), static_cast<unsigned long long>(last.blocks_done),
      static_cast<unsigned long long>(last.tokens_done), last.seconds,
      last.seconds > 0 ? last.tokens_done / last.seconds : 0.0,
      std::string(PositionSchemeName(info->blocks.positions)).c_str(),
      static_cast<unsigned long long>(last.max_position),
      static_cast<unsigned long long>(info->num_blocks),
      static_cast<unsigned long long>(info->num_demos),
      static_cast<unsigned long long>(info->num_tokens));
  if (last.blocks_done > 0) {
    std::printf(
        "%s: where the %.1f s went: forward %.1f s, K/V to the stored dtype %.1f s, store "
        "appends %.1f s, the rest %.1f s\n",
        command, last.seconds, last.forward_seconds, last.convert_seconds, last.append_seconds,
        last.seconds - last.forward_seconds - last.convert_seconds - last.append_seconds);
  }
  if (last.blocks_on_device > 0 || !last.device_mismatch.empty()) {
    std::printf(
        "%s: K/V quantised on the GPU for %llu of %llu blocks (checked against the host "
        "every %llu)\n",
        command, static_cast<unsigned long long>(last.blocks_on_device),
        static_cast<unsigned long long>(last.blocks_done),
        static_cast<unsigned long long>(kDeviceCheckInterval));
  }
  if (!last.device_mismatch.empty()) {
    std::fprintf(stderr,
                 "%s: warning: the GPU's K/V quantisation differed from the host's (%s); the "
                 "blocks from there on were quantised on the host. Please report this.\n",
                 command, last.device_mismatch.c_str());
  }
  return 0;
}

struct SelectionFlags {
  SelectionOptions selection;
  std::string order = "encoding";
  double cache_gb = 4;
  int64_t max_context = 0;
};

void AddSelectionOptions(CLI::App* sub, SelectionFlags* f) {
  sub->add_option("--ratio", f->selection.ratio, "fraction of blocks to select (block 0 included)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  sub->add_option("--count", f->selection.count, "select this many blocks instead of --ratio");
  sub->add_option("--order", f->order, "order of selected blocks: encoding or score (ascending)")
      ->capture_default_str()
      ->check(CLI::IsMember({"encoding", "score"}));
  sub->add_option("--cache-gb", f->cache_gb,
                  "block cache in GiB, on the model's device: K/V of recently used blocks, "
                  "converted to the model dtype (0 = read every block from the store)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  sub->add_option("--max-context", f->max_context,
                  "longest sequence a query may form: context + prompt + longest label (default "
                  "0: the model's max_position_embeddings)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
}

SessionOptions SessionFor(const SelectionFlags& f) {
  SessionOptions options;
  options.cache_bytes = static_cast<size_t>(f.cache_gb * (1ull << 30));
  options.max_context = f.max_context;
  return options;
}

constexpr const char* kMethodNames[] = {"dbsa", "reticl", "reticl-blocks", "fixedicl"};

// "blocks (3): 0(0.00) 12(4.21) 40(3.90)": what a query used, for the text output of `query`.
std::string SelectionLine(const Answer& a) {
  std::string out;
  char b[64];
  const bool demos = !a.demos.empty();
  const auto& ids = demos ? a.demos : a.blocks;
  const auto& scores = demos ? a.demo_scores : a.block_scores;
  out = demos ? "demonstrations (" + std::to_string(ids.size()) + "):"
              : "blocks (" + std::to_string(ids.size()) + "):";
  for (size_t i = 0; i < ids.size() && i < 32; ++i) {
    std::snprintf(b, sizeof b, " %u(%.2f)", ids[i], scores[i]);
    out += b;
  }
  if (ids.size() > 32) out += " ...";
  return out;
}

// Options of `build` a user gave explicitly that an existing task does not have: the task keeps
// its own, so asking for others is an error rather than silently ignored.
Status CheckExistingTask(const TaskInfo& t, const PoolTaskOptions& o, const CLI::App& sub) {
  const auto given = [&](const char* flag) { return sub.count(flag) > 0; };
  std::string diff;
  const auto differ = [&](const char* flag, const std::string& have, const std::string& want) {
    if (given(flag) && have != want) {
      diff += std::string(diff.empty() ? "" : "; ") + flag + " " + want + " (the task has " + have +
              ")";
    }
  };
  differ("--positions", std::string(PositionSchemeName(t.blocks.positions)),
         std::string(PositionSchemeName(o.blocks.positions)));
  differ("--demos-per-block", std::to_string(t.blocks.demos_per_block),
         std::to_string(o.blocks.demos_per_block));
  differ("--window", std::to_string(t.blocks.window), std::to_string(o.blocks.window));
  differ("--sink-blocks", std::to_string(t.blocks.sink_blocks),
         std::to_string(o.blocks.sink_blocks));
  differ("--kv-dtype", std::string(DTypeName(t.model.dtype)), std::string(DTypeName(o.kv_dtype)));
  differ("--codec", std::string(CodecName(t.codec)), std::string(CodecName(o.codec)));
  differ("--template", t.prompt_template, o.demo_template);
  differ("--separator", t.separator, o.separator);
  differ("--bm25", t.analyzer.Describe(), o.analyzer.Describe());
  differ("--bm25-tokenizer", t.analyzer.tokenizer.Serialize(), o.analyzer.tokenizer.Serialize());
  if (given("--stopwords") && t.analyzer.stopwords != o.analyzer.stopwords) {
    diff += std::string(diff.empty() ? "" : "; ") + "--stopwords (another stop list)";
  }
  if (diff.empty()) return Status::OK();
  return Status::FailedPrecondition("task '" + t.name + "' exists with other options: " + diff +
                                    ". Build a task of another name, or `shotdb rm` this one.");
}

}  // namespace

void RegisterModelCommands(CLI::App& app, const GlobalOptions& global) {
  // build -------------------------------------------------------------------------------------
  {
    auto* sub = app.add_subcommand("build", "Encode a demonstration pool into a task (resumable)");
    auto m = std::make_shared<ModelOptions>();
    auto in = std::make_shared<InputOptions>();
    auto task = std::make_shared<std::string>();
    auto opts = std::make_shared<PoolTaskOptions>();
    auto kv_dtype = std::make_shared<std::string>("bf16");
    auto codec = std::make_shared<std::string>("raw");
    auto bm25_tokenizer = std::make_shared<std::string>(opts->analyzer.tokenizer.Serialize());
    auto bm25 = std::make_shared<std::string>("retriv");
    auto stopwords = std::make_shared<std::string>();
    auto positions = std::make_shared<std::string>("windowed");
    auto seed = std::make_shared<uint64_t>(0);
    AddModelOptions(sub, m.get());
    sub->add_option("--task", *task, "task name")->required();
    AddInputOptions(sub, in.get(), "--demos", "demonstrations (CSV or JSON Lines)");
    sub->add_option("--sample", in->sample, "use a random sample of N rows (seeded by --seed)");
    sub->add_option("--demos-per-block,-k", opts->blocks.demos_per_block,
                    "demonstrations per block")
        ->capture_default_str()
        ->check(CLI::Range(1, 1 << 20));
    sub->add_option("--window,-j", opts->blocks.window, "previous blocks each block attends to")
        ->capture_default_str();
    sub->add_option("--sink-blocks", opts->blocks.sink_blocks,
                    "leading blocks every block attends to (the attention sink, >= 1)")
        ->capture_default_str()
        ->check(CLI::Range(1, 1 << 20));
    sub->add_option("--positions", *positions,
                    "RoPE positions while encoding: windowed (what a block sees laid out from 0; "
                    "any pool size stays inside the model's context) or sequential (the whole "
                    "pool at 0..N-1, the paper's)")
        ->capture_default_str()
        ->check(CLI::IsMember({"windowed", "sequential"}));
    sub->add_option("--template", opts->demo_template,
                    "demonstration template ({text}, {label}; \\n allowed)")
        ->capture_default_str();
    sub->add_option("--separator", opts->separator, "text between demonstrations (\\n allowed)")
        ->capture_default_str();
    sub->add_option("--kv-dtype", *kv_dtype,
                    "stored K/V dtype: bf16, f16, f32, f64, i8 (int8 with a scale per head, "
                    "channel and 128 tokens: 0.51x bf16's bytes on disk and over PCIe, within a "
                    "point of bf16's accuracy on the NLU pools), or f8e4m3 (fp8 with a scale per "
                    "head: 0.5x, up to 2.4 points less accurate there; docs/results.md section 9)")
        ->capture_default_str();
    sub->add_option("--codec", *codec, "payload codec: raw, lz4, shuffle-lz4")
        ->capture_default_str();
    sub->add_option("--bm25", *bm25,
                    "BM25 retrieval: retriv (the DBSA reference's retriever: lowercasing, "
                    "punctuation removal, English stop words, Snowball English stemmer, k1=1.2, "
                    "Lucene idf) or rank_bm25 (plain tokens, BM25Okapi k1=1.5, epsilon floor)")
        ->capture_default_str()
        ->check(CLI::IsMember({"retriv", "rank_bm25"}));
    sub->add_option("--stopwords", *stopwords,
                    "stop list for --bm25 retriv, one word per line (default: the built-in "
                    "English list)")
        ->check(CLI::ExistingFile);
    sub->add_option("--bm25-tokenizer", *bm25_tokenizer,
                    "tokens for --bm25 rank_bm25, e.g. lower,nonalnum or keepcase,whitespace")
        ->capture_default_str();
    sub->add_option("--seed", *seed, "seed of the random grouping into blocks")
        ->capture_default_str();
    SetAction(sub, [=, &global] {
      PoolTaskOptions o = *opts;
      o.demo_template = Unescape(o.demo_template);
      o.separator = Unescape(o.separator);
      o.blocks.positions = *ParsePositionScheme(*positions);
      auto dt = ParseDType(*kv_dtype);
      if (!dt)
        return Fail("build",
                    "--kv-dtype '" + *kv_dtype + "': expected bf16, f16, f32, f64, i8 or f8e4m3");
      o.kv_dtype = *dt;
      auto c = ParseCodec(*codec);
      if (!c) return Fail("build", "--codec '" + *codec + "': expected raw, lz4 or shuffle-lz4");
      o.codec = *c;
      if (*bm25 == "retriv") {
        if (sub->count("--bm25-tokenizer")) {
          return Fail("build", "--bm25-tokenizer applies to --bm25 rank_bm25 only");
        }
        std::vector<std::string> words = DefaultStopwords();
        if (!stopwords->empty()) {
          auto read = ReadStopwordFile(*stopwords);
          if (!read.ok()) return Fail("build", read.status());
          words = std::move(*read);
        } else if (words.empty()) {
          return Fail("build",
                      "this shotdb was built without a default stop list "
                      "(liblingua-stopwords-perl); pass --stopwords FILE");
        }
        o.analyzer = AnalyzerOptions::Retriv(std::move(words));
        o.bm25 = Bm25Params::Retriv();
      } else {
        if (!stopwords->empty()) return Fail("build", "--stopwords applies to --bm25 retriv only");
        auto t = TextTokenizerOptions::Parse(*bm25_tokenizer);
        if (!t.ok()) return Fail("build", t.status());
        o.analyzer = AnalyzerOptions{};
        o.analyzer.tokenizer = *t;
        o.bm25 = Bm25Params{};
      }
      if (!in->file.label_map_path.empty()) {
        auto map = ReadLabelMap(in->file.label_map_path);
        if (!map.ok()) return Fail("build", map.status());
        for (const auto& [id, label] : *map) o.labels.push_back(label);
      }
      // An existing task keeps its options: refuse explicit flags that ask for others.
      Store::Options read_only;
      read_only.read_only = true;
      if (auto store = Store::Open(global.store_dir, read_only); store.ok()) {
        auto snapshot = (*store)->BeginSnapshot();
        if (!snapshot.ok()) return Fail("build", snapshot.status());
        if (auto t = (*snapshot)->GetTask(*task); t.ok()) {
          Status same = CheckExistingTask(*t, o, *sub);
          if (!same.ok()) return Fail("build", same);
        }
      }
      return RunEncode("build", global, *m, *task, o, *in, *seed);
    });
  }
  // append ------------------------------------------------------------------------------------
  {
    auto* sub = app.add_subcommand("append", "Add demonstrations to a task as new blocks");
    auto m = std::make_shared<ModelOptions>();
    auto in = std::make_shared<InputOptions>();
    auto task = std::make_shared<std::string>();
    auto seed = std::make_shared<uint64_t>(0);
    AddModelOptions(sub, m.get());
    sub->add_option("--task", *task, "task name (must exist)")->required();
    AddInputOptions(sub, in.get(), "--demos", "demonstrations (CSV or JSON Lines)");
    sub->add_option("--sample", in->sample, "use a random sample of N rows (seeded by --seed)");
    sub->add_option("--seed", *seed, "seed of the random grouping into blocks")
        ->capture_default_str();
    SetAction(sub, [=, &global] {
      auto store = Store::Open(global.store_dir);
      if (!store.ok()) return Fail("append", store.status());
      auto snapshot = (*store)->BeginSnapshot();
      if (!snapshot.ok()) return Fail("append", snapshot.status());
      if (auto t = (*snapshot)->GetTask(*task); !t.ok()) return Fail("append", t.status());
      snapshot->reset();
      store->reset();
      // The task exists, so the options of a new task are not used.
      return RunEncode("append", global, *m, *task, PoolTaskOptions{}, *in, *seed);
    });
  }
  // query -------------------------------------------------------------------------------------
  {
    auto* sub = app.add_subcommand("query", "Answer a query from a task's pool");
    auto m = std::make_shared<ModelOptions>();
    auto task = std::make_shared<std::string>();
    auto text = std::make_shared<std::string>();
    auto sel = std::make_shared<SelectionFlags>();
    auto method = std::make_shared<std::string>("dbsa");
    auto free_text = std::make_shared<bool>(false);
    auto max_new = std::make_shared<int64_t>(32);
    auto json = std::make_shared<bool>(false);
    AddModelOptions(sub, m.get());
    sub->add_option("--task", *task, "task name")->required();
    sub->add_option("text", *text, "the query")->required();
    AddSelectionOptions(sub, sel.get());
    sub->add_option("--method", *method,
                    "dbsa, reticl (single demonstrations re-encoded), reticl-blocks (DBSA's "
                    "blocks re-encoded) or fixedicl")
        ->capture_default_str()
        ->check(CLI::IsMember(
            std::vector<std::string>(std::begin(kMethodNames), std::end(kMethodNames))));
    sub->add_flag("--free", *free_text, "greedy free text instead of a label");
    sub->add_option("--max-new-tokens", *max_new, "limit for --free")->capture_default_str();
    sub->add_flag("--json", *json, "print JSON");
    SetAction(sub, [=, &global] {
      auto loaded = LoadModel(*m);
      if (!loaded.ok()) return Fail("query", loaded.status());
      Store::Options so;
      so.read_only = true;
      auto store = Store::Open(global.store_dir, so);
      if (!store.ok()) return Fail("query", store.status());
      auto session = DbsaSession::Open(store->get(), *task, loaded->pool(), SessionFor(*sel));
      if (!session.ok()) return Fail("query", session.status());
      AnswerOptions o;
      o.method = *ParseMethod(*method);
      o.selection = sel->selection;
      o.selection.ascending_score = sel->order == "score";
      o.free_text = *free_text;
      o.max_new_tokens = *max_new;
      auto a = (*session)->Ask(*text, o);
      if (!a.ok()) return Fail("query", a.status());
      const Timing& t = a->timing;
      if (*json) {
        nlohmann::json j = {{"label", a->label},
                            {"score", a->score},
                            {"text", a->text},
                            {"blocks", a->blocks},
                            {"block_scores", a->block_scores},
                            {"demos", a->demos},
                            {"demo_scores", a->demo_scores},
                            {"context_tokens", a->context_tokens},
                            {"prompt_tokens", a->prompt_tokens},
                            {"budget", a->budget},
                            {"budget_bound", a->budget_bound},
                            {"timing_ms", TimingToJson(t)}};
        std::cout << j.dump(2) << "\n";
        return 0;
      }
      if (*free_text) {
        std::printf("text: %s\n", a->text.c_str());
      } else {
        std::printf("label: %s   (log-prob %.3f)\n", a->label.c_str(), a->score);
      }
      std::printf("%s\n", SelectionLine(*a).c_str());
      if (a->budget > 0) {
        std::printf(
            "context: %llu tokens of a %llu-token budget (%lld max context - %llu prompt "
            "- longest label)%s\n",
            static_cast<unsigned long long>(a->context_tokens),
            static_cast<unsigned long long>(a->budget),
            static_cast<long long>((*session)->max_context()),
            static_cast<unsigned long long>(a->prompt_tokens),
            a->budget_bound ? "; the budget ended the selection" : "");
      } else {
        std::printf("context: %llu tokens (no context limit)\n",
                    static_cast<unsigned long long>(a->context_tokens));
      }
      std::printf("time: %.1f ms (bm25 %.1f, load %.1f, gather %.1f, encode %.1f, decode %.1f)\n",
                  t.total, t.select, t.load, t.gather, t.encode, t.decode);
      return 0;
    });
  }
  // eval --------------------------------------------------------------------------------------
  {
    auto* sub = app.add_subcommand("eval", "Accuracy and latency over a labelled test set");
    auto m = std::make_shared<ModelOptions>();
    auto in = std::make_shared<InputOptions>();
    auto task = std::make_shared<std::string>();
    auto sel = std::make_shared<SelectionFlags>();
    auto baseline = std::make_shared<bool>(false);
    auto methods = std::make_shared<std::vector<std::string>>();
    auto json_out = std::make_shared<std::string>();
    AddModelOptions(sub, m.get());
    sub->add_option("--task", *task, "task name")->required();
    AddInputOptions(sub, in.get(), "--test", "test examples (CSV or JSON Lines)");
    AddSelectionOptions(sub, sel.get());
    sub->add_flag("--baseline", *baseline, "also run RetICL, reticl-blocks and FixedICL");
    sub->add_option("--methods", *methods, "methods to run (dbsa, reticl, reticl-blocks, fixedicl)")
        ->check(CLI::IsMember(
            std::vector<std::string>(std::begin(kMethodNames), std::end(kMethodNames))));
    sub->add_option("--json-out", *json_out, "write the report (per-query records too) as JSON");
    SetAction(sub, [=, &global] {
      auto tests = ReadLabeledTexts(in->path, in->file);
      if (!tests.ok()) return Fail("eval", tests.status());
      auto loaded = LoadModel(*m);
      if (!loaded.ok()) return Fail("eval", loaded.status());
      Store::Options so;
      so.read_only = true;
      auto store = Store::Open(global.store_dir, so);
      if (!store.ok()) return Fail("eval", store.status());
      auto session = DbsaSession::Open(store->get(), *task, loaded->pool(), SessionFor(*sel));
      if (!session.ok()) return Fail("eval", session.status());
      EvalOptions o;
      o.methods.clear();
      for (const auto& name : *methods) o.methods.push_back(*ParseMethod(name));
      if (o.methods.empty()) o.methods.push_back(Method::kDbsa);
      if (*baseline) {
        for (Method b : {Method::kRetIcl, Method::kRetIclBlocks, Method::kFixedIcl}) {
          if (std::find(o.methods.begin(), o.methods.end(), b) == o.methods.end())
            o.methods.push_back(b);
        }
      }
      o.answer.selection = sel->selection;
      o.answer.selection.ascending_score = sel->order == "score";
      std::unique_ptr<ProgressBar> bar;
      Method current = o.methods.front();
      o.progress = [&](Method method, size_t done, size_t total) {
        if (!bar || method != current) {
          bar = std::make_unique<ProgressBar>("eval " + std::string(MethodName(method)), total);
          current = method;
        }
        bar->Update(done, total);
      };
      auto report = RunEval(session->get(), *tests, o);
      if (bar) bar->Finish();
      if (!report.ok()) return Fail("eval", report.status());
      const TaskInfo& ti = (*session)->task();
      std::printf(
          "task '%s' (%s positions, %s), %zu test examples, %llu blocks, selection %s, "
          "max context %lld\n",
          task->c_str(), std::string(PositionSchemeName(ti.blocks.positions)).c_str(),
          ti.analyzer.Describe().c_str(), tests->size(),
          static_cast<unsigned long long>(ti.num_blocks),
          sel->selection.count ? (std::to_string(sel->selection.count) + " blocks").c_str()
                               : (std::to_string(sel->selection.ratio) + " of blocks").c_str(),
          static_cast<long long>((*session)->max_context()));
      std::fputs(report->ToTable().c_str(), stdout);
      if (!json_out->empty()) {
        std::ofstream out(*json_out);
        out << report->ToJson() << "\n";
        if (!out) return Fail("eval", "cannot write " + *json_out);
      }
      return 0;
    });
  }
}

}  // namespace shotdb::cli
