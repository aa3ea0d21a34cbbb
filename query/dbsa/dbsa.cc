#include "query/dbsa/dbsa.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "query/dbsa/kv_tensor.h"
#include "query/model/generate.h"

namespace shotdb {

namespace {

// Wall-clock milliseconds of device work: waits for queued GPU kernels before reading the clock.
class Stopwatch {
 public:
  explicit Stopwatch(torch::Device device) : device_(device) { Restart(); }
  void Restart() { start_ = std::chrono::steady_clock::now(); }
  double LapMs() {
    if (device_.is_cuda()) torch::cuda::synchronize();
    const auto now = std::chrono::steady_clock::now();
    const double ms = std::chrono::duration<double, std::milli>(now - start_).count();
    start_ = now;
    return ms;
  }

 private:
  torch::Device device_;
  std::chrono::steady_clock::time_point start_;
};

torch::Tensor TokenTensor(const std::vector<int32_t>& ids, torch::Device device) {
  return torch::tensor(std::vector<int64_t>(ids.begin(), ids.end()),
                       torch::TensorOptions().dtype(torch::kInt64))
      .to(device);
}

}  // namespace

std::string_view MethodName(Method method) {
  switch (method) {
    case Method::kDbsa:
      return "dbsa";
    case Method::kRetIcl:
      return "reticl";
    case Method::kRetIclBlocks:
      return "reticl-blocks";
    case Method::kFixedIcl:
      return "fixedicl";
  }
  return "?";
}

std::optional<Method> ParseMethod(std::string_view name) {
  for (Method m : {Method::kDbsa, Method::kRetIcl, Method::kRetIclBlocks, Method::kFixedIcl}) {
    if (name == MethodName(m)) return m;
  }
  return std::nullopt;
}

uint32_t SelectionSize(uint64_t num_blocks, const SelectionOptions& options) {
  double want = options.count > 0 ? options.count : std::round(options.ratio * num_blocks);
  want = std::clamp(want, 1.0, static_cast<double>(std::max<uint64_t>(num_blocks, 1)));
  return static_cast<uint32_t>(want);
}

Result<std::unique_ptr<DbsaSession>> DbsaSession::Open(const Store* store,
                                                       const std::string& task_name,
                                                       PoolModel model,
                                                       const SessionOptions& options) {
  SHOTDB_ASSIGN_OR_RETURN(auto snapshot, store->BeginSnapshot());
  SHOTDB_ASSIGN_OR_RETURN(TaskInfo task, snapshot->GetTask(task_name));
  const ModelFingerprint ours = MakeFingerprint(model, task.model.dtype);
  if (ours != task.model) {
    return Status::FailedPrecondition("task '" + task_name + "' was encoded with model " +
                                      task.model.ToString() + ", not " + ours.ToString());
  }
  if (task.num_blocks == 0) {
    return Status::FailedPrecondition("task '" + task_name + "' has no blocks yet");
  }
  if (task.labels.empty()) {
    return Status::FailedPrecondition("task '" + task_name + "' has no labels");
  }
  SHOTDB_ASSIGN_OR_RETURN(PromptFormat format,
                          PromptFormat::Create(task.prompt_template, task.separator));
  if (options.prefill_chunk <= 0) {
    return Status::InvalidArgument("prefill chunk must be positive");
  }
  if (options.max_context < 0) {
    return Status::InvalidArgument("max context must be >= 0 (0: the model's), got " +
                                   std::to_string(options.max_context));
  }
  std::vector<uint32_t> block_tokens;
  for (uint64_t b = 0; b < task.num_blocks; ++b) {
    SHOTDB_ASSIGN_OR_RETURN(BlockInfo info, snapshot->GetBlock(task.name, uint32_t(b)));
    block_tokens.push_back(info.token_count);
  }
  snapshot.reset();
  std::unique_ptr<DbsaSession> session(
      new DbsaSession(store, std::move(task), std::move(model), std::move(format), options));
  session->block_tokens_ = std::move(block_tokens);
  session->max_context_ = options.max_context > 0
                              ? options.max_context
                              : session->model_.model->config().max_position_embeddings;
  const torch::Device device = session->model_.model->device();
  if (options.cache_bytes > 0 && device.is_cuda() && DeviceKvSourceAvailable()) {
    SHOTDB_ASSIGN_OR_RETURN(
        session->kv_source_,
        MakeDeviceKvSource(options.cache_bytes, std::max(0, int(device.index()))));
  } else {
    session->kv_source_ = MakeHostKvSource();
  }
  for (const auto& label : session->task_.labels) {
    SHOTDB_ASSIGN_OR_RETURN(
        std::vector<int32_t> ids,
        session->model_.tokenizer->Encode(session->format_.LabelContinuation(label),
                                          /*add_bos=*/false, /*parse_special=*/false));
    session->longest_label_ = std::max(session->longest_label_, ids.size());
    session->label_tokens_.push_back(std::move(ids));
  }
  return session;
}

Status DbsaSession::SelectBlocks(Snapshot* snapshot, std::string_view query,
                                 const SelectionOptions& options, uint64_t budget, Answer* answer) {
  const uint32_t num_blocks = static_cast<uint32_t>(task_.num_blocks);
  const uint32_t sinks = std::min(task_.blocks.sink_blocks, num_blocks);
  const uint32_t m = std::max(SelectionSize(num_blocks, options), sinks);
  uint64_t used = 0;
  for (uint32_t s = 0; s < sinks; ++s) used += block_tokens_[s];
  if (budget > 0 && used > budget) {
    return Status::InvalidArgument(
        "the context budget of " + std::to_string(budget) + " tokens cannot hold the " +
        std::to_string(sinks) + " sink block(s) of task '" + task_.name + "' (" +
        std::to_string(used) + " tokens); raise --max-context or use smaller blocks");
  }
  // Ask for enough hits that m non-sink blocks remain when every sink block is among them.
  SHOTDB_ASSIGN_OR_RETURN(std::vector<ScoredDoc> hits,
                          snapshot->Search(task_.name, query, size_t{m} + sinks));
  std::vector<double> sink_scores(sinks, 0.0);
  std::vector<ScoredDoc> chosen;
  answer->budget_bound = false;
  for (const ScoredDoc& h : hits) {
    if (h.doc < sinks) {
      sink_scores[h.doc] = h.score;
      continue;
    }
    if (chosen.size() + sinks >= m || answer->budget_bound) continue;
    if (budget > 0 && used + block_tokens_[h.doc] > budget) {
      answer->budget_bound = true;
      continue;
    }
    chosen.push_back(h);
    used += block_tokens_[h.doc];
  }
  if (options.ascending_score) {
    std::stable_sort(chosen.begin(), chosen.end(),
                     [](const ScoredDoc& a, const ScoredDoc& b) { return a.score < b.score; });
  } else {
    std::sort(chosen.begin(), chosen.end(),
              [](const ScoredDoc& a, const ScoredDoc& b) { return a.doc < b.doc; });
  }
  answer->blocks.clear();
  answer->block_scores.clear();
  for (uint32_t s = 0; s < sinks; ++s) {
    answer->blocks.push_back(s);
    answer->block_scores.push_back(sink_scores[s]);
  }
  for (const ScoredDoc& c : chosen) {
    answer->blocks.push_back(c.doc);
    answer->block_scores.push_back(c.score);
  }
  answer->context_tokens = used;
  return Status::OK();
}

Result<std::vector<int32_t>> DbsaSession::SelectDemos(Snapshot* snapshot, std::string_view query,
                                                      const SelectionOptions& options,
                                                      uint64_t target, Answer* answer) {
  const Tokenizer& tokenizer = *model_.tokenizer;
  const uint64_t num_demos = task_.num_demos;
  // Best-first while the demonstrations' estimated tokens (each with its separator) fit; the hits
  // are fetched in growing batches, since how many fit is known only while counting.
  struct Pick {
    ScoredDoc hit;
    std::string text;
  };
  std::vector<Pick> picks;
  uint64_t estimate = tokenizer.add_bos_default() && tokenizer.bos_id() >= 0 ? 1 : 0;
  bool full = false;
  for (size_t k = 64, seen = 0; !full && seen < num_demos; k *= 4) {
    SHOTDB_ASSIGN_OR_RETURN(std::vector<ScoredDoc> hits,
                            snapshot->SearchDemos(task_.name, query, k));
    for (; seen < hits.size() && !full; ++seen) {
      SHOTDB_ASSIGN_OR_RETURN(Demonstration demo, snapshot->DemoAt(task_.name, hits[seen].doc));
      std::string text = format_.FormatDemo(demo.text, demo.label);
      SHOTDB_ASSIGN_OR_RETURN(std::vector<int32_t> ids,
                              tokenizer.Encode(format_.separator() + text, false, false));
      if (estimate + ids.size() > target) {
        full = true;
        break;
      }
      estimate += ids.size();
      picks.push_back({hits[seen], std::move(text)});
    }
    if (hits.size() < k) break;  // every demonstration was ranked
  }
  // The text as placed; tokens merge differently at the joins than counted one by one, so drop
  // the lowest-scoring demonstrations until the whole fits.
  for (;;) {
    std::vector<const Pick*> placed;
    for (const Pick& p : picks) placed.push_back(&p);
    if (options.ascending_score) {
      std::stable_sort(placed.begin(), placed.end(),
                       [](const Pick* a, const Pick* b) { return a->hit.score < b->hit.score; });
    } else {
      std::sort(placed.begin(), placed.end(),
                [](const Pick* a, const Pick* b) { return a->hit.doc < b->hit.doc; });
    }
    std::string text;
    for (size_t i = 0; i < placed.size(); ++i) {
      if (i > 0) text += format_.separator();
      text += placed[i]->text;
    }
    std::vector<int32_t> ids;
    if (!placed.empty()) {
      SHOTDB_ASSIGN_OR_RETURN(ids, TokenizeBlock(tokenizer, text, 0));
    }
    if (ids.size() <= target || picks.empty()) {
      answer->demos.clear();
      answer->demo_scores.clear();
      for (const Pick* p : placed) {
        answer->demos.push_back(p->hit.doc);
        answer->demo_scores.push_back(p->hit.score);
      }
      return ids;
    }
    picks.pop_back();
  }
}

Result<std::vector<int32_t>> DbsaSession::BlockTokens(Snapshot* snapshot,
                                                      const std::vector<uint32_t>& blocks) {
  std::vector<int32_t> ids;
  for (uint32_t b : blocks) {
    SHOTDB_ASSIGN_OR_RETURN(BlockInfo info, snapshot->GetBlock(task_.name, b));
    SHOTDB_ASSIGN_OR_RETURN(std::vector<int32_t> block_ids,
                            TokenizeBlock(*model_.tokenizer, info.text, b));
    ids.insert(ids.end(), block_ids.begin(), block_ids.end());
  }
  return ids;
}

Result<std::vector<LayerKV>> DbsaSession::EncodeTokens(const std::vector<int32_t>& ids) {
  const LlamaModel& model = *model_.model;
  const int64_t n = static_cast<int64_t>(ids.size());
  const auto int64 = torch::TensorOptions().dtype(torch::kInt64).device(model.device());
  const torch::Tensor all = TokenTensor(ids, model.device());
  std::vector<LayerKV> kv;
  for (int64_t start = 0; start < n; start += options_.prefill_chunk) {
    const int64_t len = std::min(options_.prefill_chunk, n - start);
    ForwardRequest request;
    request.tokens = all.narrow(0, start, len);
    request.positions = torch::arange(start, start + len, int64);
    if (start > 0) {
      request.context = &kv;
      request.context_positions = torch::arange(start, int64);
    }
    request.return_kv = true;
    request.profile = profile();
    SHOTDB_ASSIGN_OR_RETURN(ForwardResult result, model.Forward(request));
    if (start == 0) {
      kv = std::move(result.kv);
    } else {
      for (size_t l = 0; l < kv.size(); ++l) {
        kv[l].k = torch::cat({kv[l].k, result.kv[l].k}, 1);
        kv[l].v = torch::cat({kv[l].v, result.kv[l].v}, 1);
      }
    }
  }
  return kv;
}

Status DbsaSession::Decode(const QueryContext& context, const std::vector<int32_t>& prompt,
                           const AnswerOptions& options, Answer* answer) {
  const LlamaModel& model = *model_.model;
  DecodeContext ctx;
  ctx.attention = context.attention.get();
  ctx.kv = context.attention || context.kv.empty() ? nullptr : &context.kv;
  if (ctx.kv != nullptr) {
    ctx.positions =
        torch::arange(static_cast<int64_t>(context.tokens),
                      torch::TensorOptions().dtype(torch::kInt64).device(model.device()));
  }
  ctx.rotated = context.rotated;
  ctx.enqueued = context.release;
  ctx.profile = profile();
  ctx.sampling_ms = &sampling_ms_;
  if (options.free_text) {
    GenerateOptions g;
    g.max_new_tokens = options.max_new_tokens;
    if (model_.tokenizer->eos_id() >= 0) g.eos_ids = {model_.tokenizer->eos_id()};
    g.stop_strings = {"\n", format_.separator()};
    const Tokenizer* tok = model_.tokenizer;
    g.detokenize = [tok](const std::vector<int32_t>& ids) { return tok->Decode(ids); };
    SHOTDB_ASSIGN_OR_RETURN(GenerateResult r, GenerateGreedy(model, prompt, g, ctx));
    answer->text = r.text;
    return Status::OK();
  }
  SHOTDB_ASSIGN_OR_RETURN(LabelDecodeResult r, DecodeLabel(model, prompt, label_tokens_, ctx));
  answer->label = task_.labels[r.label];
  answer->score = r.score;
  answer->label_scores = r.sum_logprob;
  return Status::OK();
}

void DbsaSession::FillProfileTiming(Timing* timing) const {
  if (!options_.profile) return;
  timing->attention = profile_.attention_ms;
  timing->mlp = profile_.mlp_ms;
  timing->sampling = profile_.other_ms + sampling_ms_;
  timing->qkv = profile_.qkv_ms;
  timing->attention_core = profile_.core_ms;
}

Result<std::vector<int32_t>> DbsaSession::Prompt(std::string_view query,
                                                 const AnswerOptions& options, Answer* answer) {
  SHOTDB_ASSIGN_OR_RETURN(std::vector<int32_t> prompt,
                          model_.tokenizer->Encode(format_.FormatQuery(query), /*add_bos=*/false,
                                                   /*parse_special=*/false));
  answer->prompt_tokens = prompt.size();
  // What the context may take: the limit less the prompt and the longest label (generation may
  // run up to max_new_tokens instead).
  const uint64_t answer_tokens =
      options.free_text ? static_cast<uint64_t>(std::max<int64_t>(options.max_new_tokens, 0))
                        : longest_label_;
  if (max_context_ > 0) {
    const uint64_t limit = static_cast<uint64_t>(max_context_);
    if (prompt.size() + answer_tokens >= limit) {
      return Status::InvalidArgument(
          "the query prompt (" + std::to_string(prompt.size()) + " tokens) and the longest " +
          (options.free_text ? std::string("answer") : std::string("label")) + " (" +
          std::to_string(answer_tokens) + ") leave no room for a context within the limit of " +
          std::to_string(limit) + " tokens (--max-context)");
    }
    answer->budget = limit - prompt.size() - answer_tokens;
  }
  return prompt;
}

Result<std::vector<Answer>> DbsaSession::AskBatch(const std::vector<std::string>& queries,
                                                  const AnswerOptions& options) {
  if (options.method != Method::kDbsa || options.free_text) {
    return Status::InvalidArgument(
        "AskBatch answers DBSA label queries; ask free text and the baselines one by one");
  }
  if (queries.empty()) return std::vector<Answer>();
  Stopwatch total(model_.model->device()), lap(model_.model->device());
  profile_ = ForwardProfile();
  sampling_ms_ = 0;
  std::vector<Answer> answers(queries.size());
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::vector<uint32_t>> blocks;
  SHOTDB_ASSIGN_OR_RETURN(auto snapshot, store_->BeginSnapshot());
  for (size_t q = 0; q < queries.size(); ++q) {
    Answer& a = answers[q];
    SHOTDB_ASSIGN_OR_RETURN(std::vector<int32_t> prompt, Prompt(queries[q], options, &a));
    prompts.push_back(std::move(prompt));
    SHOTDB_RETURN_IF_ERROR(
        SelectBlocks(snapshot.get(), queries[q], options.selection, a.budget, &a));
    blocks.push_back(a.blocks);
  }
  Timing timing;
  timing.select = lap.LapMs();
  SHOTDB_ASSIGN_OR_RETURN(std::vector<QueryContext> contexts,
                          kv_source_->LoadBatch(snapshot.get(), task_, blocks, *model_.model,
                                                &timing.load, &timing.gather));
  lap.Restart();
  std::vector<DecodeContext> decode(queries.size());
  for (size_t q = 0; q < queries.size(); ++q) {
    answers[q].context_tokens = contexts[q].tokens;
    decode[q].attention = contexts[q].attention.get();
    decode[q].enqueued = contexts[q].release;
  }
  decode.front().profile = profile();
  decode.front().sampling_ms = &sampling_ms_;
  SHOTDB_ASSIGN_OR_RETURN(std::vector<LabelDecodeResult> results,
                          DecodeLabelBatch(*model_.model, prompts, label_tokens_, decode));
  for (const QueryContext& c : contexts) {
    if (c.verified) SHOTDB_RETURN_IF_ERROR(c.verified());
  }
  timing.decode = lap.LapMs();
  contexts.clear();  // waits for the kernels reading their pages, before the snapshot ends
  snapshot.reset();
  timing.total = total.LapMs();
  FillProfileTiming(&timing);
  for (size_t q = 0; q < queries.size(); ++q) {
    const LabelDecodeResult& r = results[q];
    answers[q].label = task_.labels[r.label];
    answers[q].score = r.score;
    answers[q].label_scores = r.sum_logprob;
    answers[q].timing = timing;
  }
  return answers;
}

Result<Answer> DbsaSession::Ask(std::string_view query, const AnswerOptions& options) {
  Stopwatch total(model_.model->device()), lap(model_.model->device());
  Answer answer;
  profile_ = ForwardProfile();
  sampling_ms_ = 0;
  SHOTDB_ASSIGN_OR_RETURN(std::vector<int32_t> prompt, Prompt(query, options, &answer));
  SHOTDB_ASSIGN_OR_RETURN(auto snapshot, store_->BeginSnapshot());
  QueryContext context;
  const QueryContext* use = &context;
  switch (options.method) {
    case Method::kDbsa: {
      SHOTDB_RETURN_IF_ERROR(
          SelectBlocks(snapshot.get(), query, options.selection, answer.budget, &answer));
      answer.timing.select = lap.LapMs();
      SHOTDB_ASSIGN_OR_RETURN(
          context, kv_source_->Load(snapshot.get(), task_, answer.blocks, *model_.model,
                                    /*want_tensors=*/options.free_text, &answer.timing.load,
                                    &answer.timing.gather));
      answer.context_tokens = context.tokens;
      lap.Restart();
      break;
    }
    case Method::kRetIcl: {
      // As many tokens as DBSA's context for this query, spent on single demonstrations.
      Answer dbsa;
      SHOTDB_RETURN_IF_ERROR(
          SelectBlocks(snapshot.get(), query, options.selection, answer.budget, &dbsa));
      SHOTDB_ASSIGN_OR_RETURN(
          std::vector<int32_t> ids,
          SelectDemos(snapshot.get(), query, options.selection, dbsa.context_tokens, &answer));
      // Running out of DBSA's token count is how RetICL's selection always ends; what the budget
      // bound is DBSA's selection, which set that count.
      answer.budget_bound = dbsa.budget_bound;
      answer.timing.select = lap.LapMs();
      answer.context_tokens = ids.size();
      context.tokens = ids.size();
      SHOTDB_ASSIGN_OR_RETURN(context.kv, EncodeTokens(ids));
      answer.timing.encode = lap.LapMs();
      break;
    }
    case Method::kRetIclBlocks: {
      SHOTDB_RETURN_IF_ERROR(
          SelectBlocks(snapshot.get(), query, options.selection, answer.budget, &answer));
      answer.timing.select = lap.LapMs();
      SHOTDB_ASSIGN_OR_RETURN(std::vector<int32_t> ids, BlockTokens(snapshot.get(), answer.blocks));
      answer.context_tokens = ids.size();
      context.tokens = ids.size();
      SHOTDB_ASSIGN_OR_RETURN(context.kv, EncodeTokens(ids));
      answer.timing.encode = lap.LapMs();
      break;
    }
    case Method::kFixedIcl: {
      // The first blocks, as many as the selection size and the budget allow.
      const uint32_t m = SelectionSize(task_.num_blocks, options.selection);
      std::vector<uint32_t> prefix;
      uint64_t used = 0;
      for (uint32_t b = 0; b < m; ++b) {
        if (answer.budget > 0 && used + block_tokens_[b] > answer.budget) {
          answer.budget_bound = true;
          break;
        }
        used += block_tokens_[b];
        prefix.push_back(b);
      }
      if (prefix.empty()) {
        return Status::InvalidArgument("the context budget of " + std::to_string(answer.budget) +
                                       " tokens cannot hold block 0 (" +
                                       std::to_string(block_tokens_[0]) + " tokens)");
      }
      if (fixed_blocks_ != prefix.size()) {
        SHOTDB_ASSIGN_OR_RETURN(std::vector<int32_t> ids, BlockTokens(snapshot.get(), prefix));
        SHOTDB_ASSIGN_OR_RETURN(fixed_context_.kv, EncodeTokens(ids));
        fixed_context_.tokens = ids.size();
        fixed_blocks_ = static_cast<uint32_t>(prefix.size());
        answer.timing.encode = lap.LapMs();
        fixed_seconds_ = answer.timing.encode / 1000.0;
      }
      answer.blocks = prefix;
      answer.block_scores.assign(prefix.size(), 0.0);
      use = &fixed_context_;
      answer.context_tokens = fixed_context_.tokens;
      break;
    }
  }
  // The snapshot stays open through the decode: a device context's cold copies may still read
  // the map (kv_source.h).
  SHOTDB_RETURN_IF_ERROR(Decode(*use, prompt, options, &answer));
  // No answer from K/V whose checksums are still being verified, or failed.
  if (use->verified) SHOTDB_RETURN_IF_ERROR(use->verified());
  answer.timing.decode = lap.LapMs();
  context = QueryContext();  // waits for the kernels reading its pages, before the snapshot ends
  snapshot.reset();
  answer.timing.total = total.LapMs();
  FillProfileTiming(&answer.timing);
  return answer;
}

}  // namespace shotdb
