#include "query/model/generate.h"

#include <map>
#include <utility>

#include "query/model/context_attention.h"
#include "query/model/phase_clock.h"

namespace shotdb {
namespace {

torch::Tensor IdsTensor(const std::vector<int32_t>& ids, torch::Device device) {
  std::vector<int64_t> wide(ids.begin(), ids.end());
  return torch::tensor(wide, torch::kInt64).to(device);
}

torch::Tensor Range(int64_t start, int64_t n, torch::Device device) {
  return torch::arange(start, start + n,
                       torch::TensorOptions().dtype(torch::kInt64).device(device));
}

Status CheckIds(const LlamaModel& model, const std::vector<int32_t>& ids, const std::string& what) {
  for (int32_t id : ids) {
    if (id < 0 || id >= model.config().vocab_size) {
      return Status::InvalidArgument(what + ": token id " + std::to_string(id) +
                                     " is outside the vocabulary [0, " +
                                     std::to_string(model.config().vocab_size) + ")");
    }
  }
  return Status::OK();
}

// Context length C after checking that the context is complete and consistently shaped.
Result<int64_t> ContextLength(const LlamaModel& model, const DecodeContext& ctx) {
  if (ctx.attention != nullptr) {
    if (ctx.kv != nullptr) {
      return Status::InvalidArgument("DecodeContext: kv and attention given together");
    }
    return ctx.attention->tokens();
  }
  if (ctx.kv == nullptr) return int64_t{0};
  const ModelConfig& c = model.config();
  if (static_cast<int64_t>(ctx.kv->size()) != c.num_layers || !ctx.positions.defined() ||
      ctx.positions.dim() != 1 || ctx.positions.scalar_type() != torch::kInt64) {
    return Status::InvalidArgument("DecodeContext: kv needs one entry per layer (" +
                                   std::to_string(c.num_layers) +
                                   ") and positions a 1-D int64 tensor");
  }
  const int64_t n = ctx.positions.size(0);
  for (const LayerKV& kv : *ctx.kv) {
    for (const torch::Tensor* x : {&kv.k, &kv.v}) {
      if (!x->defined() || x->dim() != 3 || x->size(0) != c.num_kv_heads || x->size(1) != n ||
          x->size(2) != c.head_dim) {
        return Status::InvalidArgument("DecodeContext: every K/V must be [" +
                                       std::to_string(c.num_kv_heads) + ", " + std::to_string(n) +
                                       ", " + std::to_string(c.head_dim) + "]");
      }
    }
  }
  return n;
}

// Preallocated per-layer K (RoPE applied) / V and positions; the filled prefix is passed to Forward
// as narrowed views with context_rotated, so appending a token copies only that token's K/V and a
// step never re-rotates or copies the context.
class KvCache {
 public:
  KvCache(const LlamaModel& model, int64_t capacity) : model_(model) {
    const ModelConfig& c = model.config();
    auto opts = torch::TensorOptions().dtype(model.dtype()).device(model.device());
    for (int64_t l = 0; l < c.num_layers; ++l) {
      layers_.push_back({torch::empty({c.num_kv_heads, capacity, c.head_dim}, opts),
                         torch::empty({c.num_kv_heads, capacity, c.head_dim}, opts)});
    }
    positions_ = torch::empty({capacity}, opts.dtype(torch::kInt64));
  }

  // Appends K/V of positions.size(0) tokens at `positions` (int64 on the model's device); K is
  // rotated at those positions first unless `rotated`. RotateKeys' errors for malformed K.
  Status Append(const std::vector<LayerKV>& kv, const torch::Tensor& positions, bool rotated) {
    const int64_t n = positions.size(0);
    std::vector<LayerKV> keys = kv;  // shares the tensors; K is replaced where rotated
    if (!rotated) {
      SHOTDB_RETURN_IF_ERROR(model_.RotateLayerKeys(&keys, positions).WithContext("K/V cache"));
    }
    for (size_t l = 0; l < layers_.size(); ++l) {
      layers_[l].k.narrow(1, size_, n).copy_(keys[l].k);
      layers_[l].v.narrow(1, size_, n).copy_(kv[l].v);
    }
    positions_.narrow(0, size_, n).copy_(positions);
    size_ += n;
    return Status::OK();
  }

  // Points `r` at the filled prefix (views stay valid until the next Append).
  void Attach(ForwardRequest* r) {
    views_.clear();
    for (const LayerKV& kv : layers_) {
      views_.push_back({kv.k.narrow(1, 0, size_), kv.v.narrow(1, 0, size_)});
    }
    r->context = &views_;
    r->context_positions = positions_.narrow(0, 0, size_);
    r->context_rotated = true;
  }

  int64_t size() const { return size_; }

 private:
  const LlamaModel& model_;
  std::vector<LayerKV> layers_, views_;
  torch::Tensor positions_;
  int64_t size_ = 0;
};

// Charges the decode loops' phases to DecodeContext's profile counters; inert without a profile.
class DecodeClock {
 public:
  DecodeClock(const LlamaModel& model, const DecodeContext& ctx)
      : model_(model), ctx_(ctx), clock_(model.device(), ctx.profile != nullptr) {}

  // The interval since the last mark was cache work (allocation, rotation, appends).
  void Cache() { clock_.Charge(ctx_.profile != nullptr ? &ctx_.profile->attention_ms : nullptr); }
  // The interval since the last mark was choosing tokens / scoring labels.
  void Sampling() { clock_.Charge(ctx_.sampling_ms); }
  // Runs `r` with the context's profile; Forward charges its own parts, so the clock skips them.
  Result<ForwardResult> Forward(ForwardRequest* r) {
    r->profile = ctx_.profile;
    Result<ForwardResult> out = model_.Forward(*r);
    clock_.Charge(nullptr);
    return out;
  }

 private:
  const LlamaModel& model_;
  const DecodeContext& ctx_;
  PhaseClock clock_;
};

// Position of the first prompt token: DecodeContext::prompt_position, or right after the context.
int64_t PromptStart(const DecodeContext& ctx, int64_t context_len) {
  return ctx.prompt_position >= 0 ? ctx.prompt_position : context_len;
}

// Runs the prompt after the (optional) context, leaving context + prompt K/V in `cache`.
Result<ForwardResult> RunPrompt(const LlamaModel& model, const std::vector<int32_t>& prompt,
                                const DecodeContext& ctx, int64_t context_len, KvCache* cache,
                                DecodeClock* clock, int64_t* next_position) {
  if (ctx.kv != nullptr) {
    SHOTDB_RETURN_IF_ERROR(cache->Append(*ctx.kv, ctx.positions.to(model.device()), ctx.rotated)
                               .WithContext("DecodeContext"));
  }
  clock->Cache();
  const int64_t start = PromptStart(ctx, context_len);
  ForwardRequest r;
  r.tokens = IdsTensor(prompt, model.device());
  r.positions = Range(start, static_cast<int64_t>(prompt.size()), model.device());
  if (cache->size() > 0) cache->Attach(&r);
  r.return_kv = true;
  SHOTDB_ASSIGN_OR_RETURN(ForwardResult out, clock->Forward(&r));
  SHOTDB_RETURN_IF_ERROR(cache->Append(out.kv, r.positions, /*rotated=*/false));
  clock->Cache();
  *next_position = start + static_cast<int64_t>(prompt.size());
  return out;
}

}  // namespace

Result<GenerateResult> GenerateGreedy(const LlamaModel& model, const std::vector<int32_t>& prompt,
                                      const GenerateOptions& options,
                                      const DecodeContext& context) {
  if (prompt.empty()) return Status::InvalidArgument("GenerateGreedy: empty prompt");
  if (options.max_new_tokens < 1) {
    return Status::InvalidArgument("GenerateGreedy: max_new_tokens must be >= 1");
  }
  if (!options.stop_strings.empty() && !options.detokenize) {
    return Status::InvalidArgument("GenerateGreedy: stop_strings need a detokenize function");
  }
  SHOTDB_RETURN_IF_ERROR(CheckIds(model, prompt, "GenerateGreedy prompt"));
  if (context.attention != nullptr) {
    return Status::InvalidArgument(
        "GenerateGreedy: needs the context as K/V tensors (DecodeContext::kv), not attention");
  }
  SHOTDB_ASSIGN_OR_RETURN(int64_t context_len, ContextLength(model, context));
  GenerateResult result;
  try {
    c10::InferenceMode guard;
    DecodeClock clock(model, context);
    KvCache cache(model,
                  context_len + static_cast<int64_t>(prompt.size()) + options.max_new_tokens);
    int64_t position = 0;
    SHOTDB_ASSIGN_OR_RETURN(ForwardResult out, RunPrompt(model, prompt, context, context_len,
                                                         &cache, &clock, &position));
    result.forward_calls = 1;
    while (true) {
      const int32_t next = static_cast<int32_t>(out.logits[0].argmax().item<int64_t>());
      bool eos = false;
      for (int32_t e : options.eos_ids) eos = eos || e == next;
      if (eos) {
        result.stop = GenerateResult::Stop::kEos;
        clock.Sampling();
        break;
      }
      result.tokens.push_back(next);
      if (options.detokenize) {
        result.text = options.detokenize(result.tokens);
        size_t cut = std::string::npos;
        for (const std::string& s : options.stop_strings) cut = std::min(cut, result.text.find(s));
        if (cut != std::string::npos) {
          result.text.resize(cut);
          result.stop = GenerateResult::Stop::kStopString;
          clock.Sampling();
          break;
        }
      }
      if (static_cast<int64_t>(result.tokens.size()) >= options.max_new_tokens) {
        result.stop = GenerateResult::Stop::kMaxTokens;
        clock.Sampling();
        break;
      }
      ForwardRequest r;
      r.tokens = IdsTensor({next}, model.device());
      r.positions = Range(position++, 1, model.device());
      clock.Sampling();
      cache.Attach(&r);
      r.return_kv = true;
      SHOTDB_ASSIGN_OR_RETURN(out, clock.Forward(&r));
      ++result.forward_calls;
      SHOTDB_RETURN_IF_ERROR(cache.Append(out.kv, r.positions, /*rotated=*/false));
      clock.Cache();
    }
  } catch (const c10::Error& e) {
    return Status::IOError(std::string("GenerateGreedy: libtorch failed: ") +
                           e.what_without_backtrace());
  }
  return result;
}

Result<LabelDecodeResult> DecodeLabel(const LlamaModel& model, const std::vector<int32_t>& prompt,
                                      const std::vector<std::vector<int32_t>>& labels,
                                      const DecodeContext& context, LabelScoring scoring) {
  SHOTDB_ASSIGN_OR_RETURN(std::vector<LabelDecodeResult> results,
                          DecodeLabelBatch(model, {prompt}, labels, {context}, scoring));
  return std::move(results.front());
}

Result<std::vector<LabelDecodeResult>> DecodeLabelBatch(
    const LlamaModel& model, const std::vector<std::vector<int32_t>>& prompts,
    const std::vector<std::vector<int32_t>>& labels, const std::vector<DecodeContext>& contexts,
    LabelScoring scoring) {
  if (prompts.empty() || prompts.size() != contexts.size()) {
    return Status::InvalidArgument("DecodeLabel: need one context per prompt (" +
                                   std::to_string(prompts.size()) + " prompts, " +
                                   std::to_string(contexts.size()) + " contexts)");
  }
  const size_t batch = prompts.size();
  for (size_t q = 0; q < batch; ++q) {
    if (prompts[q].empty()) return Status::InvalidArgument("DecodeLabel: empty prompt");
    SHOTDB_RETURN_IF_ERROR(CheckIds(model, prompts[q], "DecodeLabel prompt"));
    if (batch > 1 && contexts[q].kv != nullptr) {
      return Status::InvalidArgument(
          "DecodeLabel: a batch takes its contexts as attention (DecodeContext::attention), not "
          "kv");
    }
  }
  if (labels.empty()) return Status::InvalidArgument("DecodeLabel: no labels");
  for (size_t i = 0; i < labels.size(); ++i) {
    if (labels[i].empty()) {
      return Status::InvalidArgument("DecodeLabel: label " + std::to_string(i) + " has no tokens");
    }
    SHOTDB_RETURN_IF_ERROR(CheckIds(model, labels[i], "DecodeLabel label " + std::to_string(i)));
  }
  std::vector<int64_t> context_lens;
  for (const DecodeContext& c : contexts) {
    SHOTDB_ASSIGN_OR_RETURN(int64_t len, ContextLength(model, c));
    context_lens.push_back(len);
  }

  // Token trie; node 0 is the root (the prompt's last position).
  struct Node {
    int64_t parent;
    int32_t token;
    int64_t depth;
    bool has_children = false;
    int64_t row = -1;  // row in the tree Forward (internal non-root nodes only)
  };
  std::vector<Node> nodes = {{-1, -1, 0}};
  std::map<std::pair<int64_t, int32_t>, int64_t> child;
  std::vector<std::vector<int64_t>> paths(labels.size());  // node of each label token
  for (size_t i = 0; i < labels.size(); ++i) {
    int64_t at = 0;
    for (int32_t tok : labels[i]) {
      auto [it, fresh] = child.try_emplace({at, tok}, static_cast<int64_t>(nodes.size()));
      if (fresh) nodes.push_back({at, tok, nodes[at].depth + 1});
      nodes[at].has_children = true;
      at = it->second;
      paths[i].push_back(at);
    }
  }
  std::vector<int64_t> internal;  // non-root nodes with children, parents before children
  for (size_t n = 1; n < nodes.size(); ++n) {
    if (nodes[n].has_children) {
      nodes[n].row = static_cast<int64_t>(internal.size());
      internal.push_back(static_cast<int64_t>(n));
    }
  }

  std::vector<LabelDecodeResult> results(batch);
  const DecodeContext& first = contexts.front();  // its profile and clock serve the batch
  try {
    c10::InferenceMode guard;
    DecodeClock clock(model, first);
    // One Forward for the batch: per query its prompt's tokens, then every internal trie node.
    // A tensor context (one query) is passed as it is (no copy into a cache; Forward rotates it
    // unless the caller did); attention contexts are stacked, one per query's rows.
    const int64_t n = static_cast<int64_t>(internal.size());
    const bool tensor_context = first.kv != nullptr;
    const int64_t c = tensor_context ? context_lens.front() : 0;  // mask columns before the rows
    std::vector<int32_t> tokens;
    std::vector<int64_t> positions, rows, first_row;
    int64_t total = 0;
    for (size_t q = 0; q < batch; ++q) {
      const int64_t p = static_cast<int64_t>(prompts[q].size());
      first_row.push_back(total);
      const int64_t start = PromptStart(contexts[q], context_lens[q]);
      tokens.insert(tokens.end(), prompts[q].begin(), prompts[q].end());
      for (int64_t i = 0; i < p; ++i) positions.push_back(start + i);
      rows.push_back(total + p - 1);  // logits after the prompt, then after each node
      for (int64_t r = 0; r < n; ++r) {
        const Node& node = nodes[internal[r]];
        tokens.push_back(node.token);
        positions.push_back(start + p + node.depth - 1);
        rows.push_back(total + p + r);
      }
      total += p + n;
    }
    ForwardRequest req;
    req.tokens = IdsTensor(tokens, model.device());
    req.positions = torch::tensor(positions, torch::kInt64).to(model.device());
    if (tensor_context) {
      req.context = first.kv;
      req.context_positions = first.positions.to(model.device());
      req.context_rotated = first.rotated;
    }
    std::unique_ptr<StackedContextAttention> stacked;
    if (first.attention != nullptr) {
      std::vector<StackedContextAttention::Part> parts;
      for (size_t q = 0; q < batch; ++q) {
        if (contexts[q].attention == nullptr) {
          return Status::InvalidArgument("DecodeLabel: query " + std::to_string(q) +
                                         " of a batch has no context");
        }
        parts.push_back({contexts[q].attention, static_cast<int64_t>(prompts[q].size()) + n});
      }
      stacked = std::make_unique<StackedContextAttention>(std::move(parts));
      req.context_attention = stacked.get();
    }
    if (n > 0 || batch > 1) {
      // Per query: prompt rows see the context and the causal prefix of the prompt; node rows the
      // context, the whole prompt and the node's ancestors up to itself (tree attention). No row
      // sees another query's tokens. Attention contexts are implied ([T, T] mask).
      torch::Tensor mask = torch::zeros({total, c + total}, torch::kBool);
      mask.narrow(1, 0, c).fill_(true);
      auto m = mask.accessor<bool, 2>();
      for (size_t q = 0; q < batch; ++q) {
        const int64_t p = static_cast<int64_t>(prompts[q].size()), o = first_row[q];
        for (int64_t i = 0; i < p; ++i) {
          for (int64_t j = 0; j <= i; ++j) m[o + i][c + o + j] = true;
        }
        for (int64_t r = 0; r < n; ++r) {
          for (int64_t j = 0; j < p; ++j) m[o + p + r][c + o + j] = true;
          for (int64_t a = internal[r]; a != 0; a = nodes[a].parent) {
            m[o + p + r][c + o + p + nodes[a].row] = true;
          }
        }
      }
      req.mask = mask.to(model.device());
    }
    req.logit_rows = torch::tensor(rows, torch::kInt64);
    clock.Sampling();
    SHOTDB_ASSIGN_OR_RETURN(ForwardResult out, clock.Forward(&req));
    for (const DecodeContext& c : contexts) {
      if (c.enqueued) c.enqueued();
    }
    // Per query: row 0 = after the prompt, row 1 + r = after internal node `internal[r]`.
    // Only the label tokens' log-probabilities are read: log p = logit - logsumexp(row), in
    // float64, for the columns of the tokens the trie holds ([rows, U] copied to the host instead
    // of [rows, vocab]; a full log_softmax over a 128k vocabulary took ~80 us on the H200).
    std::vector<int64_t> columns;  // distinct label tokens
    std::map<int32_t, int64_t> column_of;
    for (size_t i = 1; i < nodes.size(); ++i) {
      if (column_of.emplace(nodes[i].token, static_cast<int64_t>(columns.size())).second) {
        columns.push_back(nodes[i].token);
      }
    }
    const torch::Tensor logits = out.logits.to(torch::kFloat64);
    const torch::Tensor logp =
        (logits.index_select(1, torch::tensor(columns, torch::kInt64).to(logits.device())) -
         torch::logsumexp(logits, -1, /*keepdim=*/true))
            .cpu();
    auto lp = logp.accessor<double, 2>();
    for (size_t q = 0; q < batch; ++q) {
      LabelDecodeResult& result = results[q];
      result.trie_nodes = static_cast<int64_t>(nodes.size()) - 1;
      result.forward_calls = 1;
      const int64_t base = static_cast<int64_t>(q) * (1 + n);
      for (size_t i = 0; i < labels.size(); ++i) {
        double sum = 0;
        for (int64_t node : paths[i]) {
          const int64_t parent = nodes[node].parent;
          sum +=
              lp[base + (parent == 0 ? 0 : 1 + nodes[parent].row)][column_of.at(nodes[node].token)];
        }
        result.sum_logprob.push_back(sum);
        result.mean_logprob.push_back(sum / static_cast<double>(labels[i].size()));
      }
      const std::vector<double>& s =
          scoring == LabelScoring::kSum ? result.sum_logprob : result.mean_logprob;
      for (size_t i = 1; i < s.size(); ++i) {
        if (s[i] > s[result.label]) result.label = i;
      }
      result.score = s[result.label];
    }
    clock.Sampling();
  } catch (const c10::Error& e) {
    return Status::IOError(std::string("DecodeLabel: libtorch failed: ") +
                           e.what_without_backtrace());
  }
  return results;
}

}  // namespace shotdb
