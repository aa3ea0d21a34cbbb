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
    case Method::kFixedIcl:
      return "fixedicl";
  }
  return "?";
}

std::optional<Method> ParseMethod(std::string_view name) {
  for (Method m : {Method::kDbsa, Method::kRetIcl, Method::kFixedIcl}) {
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
  std::unique_ptr<DbsaSession> session(
      new DbsaSession(store, std::move(task), std::move(model), std::move(format), options));
  const torch::Device device = session->model_.model->device();
#ifdef SHOTDB_HAVE_GPU
  if (options.cache_bytes > 0 && device.is_cuda() &&
      StagedKvSourceSupports(session->task_.model.dtype)) {
    SHOTDB_ASSIGN_OR_RETURN(session->staged_, MakeStagedKvSource(options.cache_bytes,
                                                                 std::max(0, int(device.index()))));
  }
#endif
  if (options.cache_bytes > 0 && !session->staged_) {
    session->cache_ = std::make_unique<BlockCache>(options.cache_bytes, device);
  }
  for (const auto& label : session->task_.labels) {
    SHOTDB_ASSIGN_OR_RETURN(
        std::vector<int32_t> ids,
        session->model_.tokenizer->Encode(session->format_.LabelContinuation(label),
                                          /*add_bos=*/false, /*parse_special=*/false));
    session->label_tokens_.push_back(std::move(ids));
  }
  return session;
}

Status DbsaSession::Select(Snapshot* snapshot, std::string_view query,
                           const SelectionOptions& options, Answer* answer) {
  const uint32_t m = SelectionSize(task_.num_blocks, options);
  // Ask for m hits: block 0 may be among them, and is placed first regardless.
  SHOTDB_ASSIGN_OR_RETURN(std::vector<ScoredDoc> hits, snapshot->Search(task_.name, query, m));
  double block0_score = 0;
  std::vector<ScoredDoc> chosen;
  for (const auto& h : hits) {
    if (h.doc == 0) {
      block0_score = h.score;
    } else if (chosen.size() + 1 < m) {
      chosen.push_back(h);
    }
  }
  if (options.ascending_score) {
    std::stable_sort(chosen.begin(), chosen.end(),
                     [](const ScoredDoc& a, const ScoredDoc& b) { return a.score < b.score; });
  } else {
    std::sort(chosen.begin(), chosen.end(),
              [](const ScoredDoc& a, const ScoredDoc& b) { return a.doc < b.doc; });
  }
  answer->blocks = {0};
  answer->block_scores = {block0_score};
  for (const auto& c : chosen) {
    answer->blocks.push_back(c.doc);
    answer->block_scores.push_back(c.score);
  }
  return Status::OK();
}

Result<std::vector<LayerKV>> DbsaSession::LoadStoredContext(Snapshot* snapshot,
                                                            const std::vector<uint32_t>& blocks,
                                                            uint64_t* tokens, bool* rotated,
                                                            Timing* timing) {
  const LlamaModel& model = *model_.model;
  const uint32_t layers = task_.model.num_layers;
  if (staged_) {
    SHOTDB_ASSIGN_OR_RETURN(
        StagedContext staged,
        staged_->Gather(snapshot, task_, blocks, model.config(),
                        torch::TensorOptions().dtype(model.dtype()).device(model.device()),
                        &timing->load, &timing->gather));
    *tokens = static_cast<uint64_t>(staged.kv.front().k.size(1));  // a task has >= 1 layer
    *rotated = staged.rotated;
    return std::move(staged.kv);
  }
  Stopwatch lap(model.device());
  // Each selected block's K/V, per layer: device-resident from the cache, or views of the store's
  // map (zero-copy for raw payloads) while the snapshot lives.
  std::vector<std::shared_ptr<const BlockCache::BlockKV>> cached;
  std::vector<std::vector<PayloadRef>> payloads;
  std::vector<int64_t> lengths;
  uint64_t total = 0;
  for (uint32_t b : blocks) {
    SHOTDB_ASSIGN_OR_RETURN(BlockInfo info, snapshot->GetBlock(task_.name, b));
    lengths.push_back(info.token_count);
    total += info.token_count;
    if (cache_) {
      SHOTDB_ASSIGN_OR_RETURN(auto kv, cache_->Get(snapshot, task_, b));
      cached.push_back(std::move(kv));
      continue;
    }
    std::vector<PayloadRef> refs;
    for (uint32_t l = 0; l < layers; ++l) {
      for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
        SHOTDB_ASSIGN_OR_RETURN(PayloadRef ref, snapshot->GetPayload(task_.name, b, l, kind));
        refs.push_back(std::move(ref));
      }
    }
    payloads.push_back(std::move(refs));
  }
  timing->load = lap.LapMs();

  const auto stored = torch::TensorOptions().dtype(TorchType(task_.model.dtype));
  std::vector<LayerKV> context = ConcatenateBlocks(
      layers, task_.model.kv_heads, task_.model.head_dim, lengths,
      torch::TensorOptions().dtype(model.dtype()).device(model.device()),
      [&](size_t i, uint32_t l, int kv) {
        if (cache_) return kv == 0 ? (*cached[i])[l].k : (*cached[i])[l].v;
        const PayloadRef& ref = payloads[i][2 * l + kv];
        return torch::from_blob(const_cast<void*>(ref.data),
                                {task_.model.kv_heads, lengths[i], task_.model.head_dim}, stored);
      });
  timing->gather = lap.LapMs();
  *tokens = total;
  return context;
}

Result<std::vector<LayerKV>> DbsaSession::EncodeTextContext(Snapshot* snapshot,
                                                            const std::vector<uint32_t>& blocks,
                                                            uint64_t* tokens) {
  std::vector<int32_t> ids;
  for (uint32_t b : blocks) {
    SHOTDB_ASSIGN_OR_RETURN(BlockInfo info, snapshot->GetBlock(task_.name, b));
    SHOTDB_ASSIGN_OR_RETURN(std::vector<int32_t> block_ids,
                            TokenizeBlock(*model_.tokenizer, info.text, b));
    ids.insert(ids.end(), block_ids.begin(), block_ids.end());
  }
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
  *tokens = ids.size();
  return kv;
}

Status DbsaSession::Decode(const std::vector<LayerKV>* context, uint64_t context_tokens,
                           bool context_rotated, std::string_view query,
                           const AnswerOptions& options, Answer* answer) {
  const LlamaModel& model = *model_.model;
  SHOTDB_ASSIGN_OR_RETURN(std::vector<int32_t> prompt,
                          model_.tokenizer->Encode(format_.FormatQuery(query), /*add_bos=*/false,
                                                   /*parse_special=*/false));
  DecodeContext ctx;
  ctx.kv = context;
  ctx.positions = torch::arange(static_cast<int64_t>(context_tokens),
                                torch::TensorOptions().dtype(torch::kInt64).device(model.device()));
  ctx.rotated = context_rotated;
  ctx.profile = profile();
  ctx.sampling_ms = &sampling_ms_;
  answer->context_tokens = context_tokens;
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

Result<Answer> DbsaSession::Ask(std::string_view query, const AnswerOptions& options) {
  Stopwatch total(model_.model->device()), lap(model_.model->device());
  Answer answer;
  profile_ = ForwardProfile();
  sampling_ms_ = 0;
  SHOTDB_ASSIGN_OR_RETURN(auto snapshot, store_->BeginSnapshot());
  std::vector<LayerKV> context;
  const std::vector<LayerKV>* use = &context;
  uint64_t tokens = 0;
  bool rotated = false;  // DBSA on the GPU path: K arrives with RoPE applied
  switch (options.method) {
    case Method::kDbsa: {
      SHOTDB_RETURN_IF_ERROR(Select(snapshot.get(), query, options.selection, &answer));
      answer.timing.select = lap.LapMs();
      SHOTDB_ASSIGN_OR_RETURN(context, LoadStoredContext(snapshot.get(), answer.blocks, &tokens,
                                                         &rotated, &answer.timing));
      lap.Restart();
      break;
    }
    case Method::kRetIcl: {
      SHOTDB_RETURN_IF_ERROR(Select(snapshot.get(), query, options.selection, &answer));
      answer.timing.select = lap.LapMs();
      SHOTDB_ASSIGN_OR_RETURN(context, EncodeTextContext(snapshot.get(), answer.blocks, &tokens));
      answer.timing.encode = lap.LapMs();
      break;
    }
    case Method::kFixedIcl: {
      const uint32_t m = SelectionSize(task_.num_blocks, options.selection);
      std::vector<uint32_t> prefix(m);
      std::iota(prefix.begin(), prefix.end(), 0u);
      if (fixed_blocks_ != m) {
        SHOTDB_ASSIGN_OR_RETURN(fixed_context_,
                                EncodeTextContext(snapshot.get(), prefix, &fixed_tokens_));
        fixed_blocks_ = m;
        answer.timing.encode = lap.LapMs();
        fixed_seconds_ = answer.timing.encode / 1000.0;
      }
      answer.blocks = prefix;
      answer.block_scores.assign(m, 0.0);
      use = &fixed_context_;
      tokens = fixed_tokens_;
      break;
    }
  }
  snapshot.reset();  // DBSA's context was copied out of the map; release the read transaction
  SHOTDB_RETURN_IF_ERROR(Decode(use, tokens, rotated, query, options, &answer));
  answer.timing.decode = lap.LapMs();
  answer.timing.total = total.LapMs();
  if (options_.profile) {
    answer.timing.attention = profile_.attention_ms;
    answer.timing.mlp = profile_.mlp_ms;
    answer.timing.sampling = profile_.other_ms + sampling_ms_;
  }
  return answer;
}

}  // namespace shotdb
