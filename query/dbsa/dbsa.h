// DbsaSession: answers queries from an encoded pool, with DBSA or one of the baselines.
//
// DBSA (the product): BM25 selects the best blocks of the task (the sink blocks always, first);
// their stored pre-RoPE K/V are concatenated in encoding order (or by ascending score), RoPE is
// applied at new contiguous positions 0..L-1, the query tokens run with full attention over them,
// and decoding is constrained to the task's labels (or free greedy text).
// Baselines, all decoded the same way:
//   RetICL (the paper's): BM25 over single demonstrations (the store's per-demonstration index),
//     the best ones up to as many tokens as DBSA's context for the same query, re-encoded with
//     full causal attention for every query, placed in pool order (or by ascending score).
//   reticl-blocks (a control): DBSA's selected blocks, their TEXT re-encoded with full attention.
//   FixedICL: the first blocks' text encoded once with full attention; that prefix serves every
//     query.
//
// The context budget. A query's sequence (context + prompt + the longest label) never exceeds the
// model's context, max_position_embeddings (SessionOptions::max_context overrides it): every
// method takes its blocks or demonstrations best-first while they fit, and Answer says how many it
// took and whether the budget, rather than --ratio/--count, stopped it. A budget that cannot hold
// the sink blocks is an error, never a silent overrun.
//
// Thread-safety: one session serves one query at a time; open several for concurrent queries (the
// store and the model may be shared).
#ifndef SHOTDB_QUERY_DBSA_DBSA_H_
#define SHOTDB_QUERY_DBSA_DBSA_H_

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/store.h"
#include "query/dbsa/kv_source.h"
#include "query/dbsa/pool_encoder.h"
#include "query/dbsa/prompt.h"

namespace shotdb {

enum class Method { kDbsa, kRetIcl, kRetIclBlocks, kFixedIcl };
// "dbsa", "reticl", "reticl-blocks", "fixedicl"
std::string_view MethodName(Method method);
std::optional<Method> ParseMethod(std::string_view name);

struct SelectionOptions {
  double ratio = 0.3;            // fraction of the task's blocks to select (sink blocks included)
  uint32_t count = 0;            // if > 0, select this many blocks instead of `ratio`
  bool ascending_score = false;  // order: false = encoding (pool) order; true = lowest to highest
};
// How many blocks a query may use before the budget: count, or round(ratio * num_blocks), clamped
// to [1, num_blocks].
uint32_t SelectionSize(uint64_t num_blocks, const SelectionOptions& options);

struct AnswerOptions {
  Method method = Method::kDbsa;
  SelectionOptions selection;
  bool free_text = false;       // greedy text instead of a label
  int64_t max_new_tokens = 32;  // for free_text
};

struct Timing {       // milliseconds
  double select = 0;  // BM25
  double load = 0;    // DBSA: reading blocks' K/V from the store onto the device (cache misses)
  double gather = 0;  // DBSA: concatenating the selected blocks' K/V in the model's dtype
  double encode = 0;  // re-encoding context text (RetICL; FixedICL's first query)
  double decode = 0;  // query tokens + label scoring or generation
  double total = 0;
  // Only with SessionOptions::profile (else 0): the model's work in encode + decode split by part
  // (ForwardProfile). attention: norms, QKV/output projections, RoPE (also of the context, unless
  // the GPU gather rotated it), attention, and for free text the decode K/V cache's copies (label
  // scoring runs one Forward over the context in place); mlp: norms and the
  // MLP; sampling: embedding, final norm and LM head, plus choosing the answer (log-softmax and
  // label scoring, or argmax for free text).
  double attention = 0;
  double mlp = 0;
  double sampling = 0;
  // Parts of attention (ForwardProfile): the norm and QKV projection; RoPE and attention itself.
  double qkv = 0;
  double attention_core = 0;
};

struct Answer {
  std::string label;                 // the winning label (empty with free_text)
  double score = 0;                  // its summed log-probability
  std::vector<double> label_scores;  // summed log-probability of every label, in task order
  std::string text;                  // free_text output
  // DBSA, reticl-blocks, FixedICL: the blocks in the order their K/V or text was placed, and the
  // BM25 score of each (sink blocks: their own score; FixedICL: 0).
  std::vector<uint32_t> blocks;
  std::vector<double> block_scores;
  // RetICL: the demonstrations (numbers in pool order, Snapshot::DemoAt) in placement order, and
  // the BM25 score of each.
  std::vector<uint32_t> demos;
  std::vector<double> demo_scores;
  uint64_t context_tokens = 0;  // tokens before the prompt
  uint64_t prompt_tokens = 0;   // tokens of the query prompt
  // Tokens the context could take: the limit minus the prompt and the longest label (0 when the
  // model states no limit and none was given).
  uint64_t budget = 0;
  // The budget, not --ratio/--count, ended the selection (RetICL: ended DBSA's selection, whose
  // token count RetICL fills).
  bool budget_bound = false;
  Timing timing;
};

struct SessionOptions {
  // Where DBSA's K/V come from (kv_source.h). With a CUDA model in a build with gpu/ and
  // cache_bytes > 0: the device source, whose page cache keeps up to this many bytes of blocks'
  // K/V on the GPU between queries. Otherwise (CPU models, or 0) the host source reads every
  // query's blocks from the store's memory map.
  size_t cache_bytes = 0;
  // RetICL/FixedICL re-encode their context in chunks of this many tokens (each chunk attends to
  // the K/V of the chunks before it), which bounds attention memory to chunk x context.
  int64_t prefill_chunk = 2048;
  // Fill Timing::attention/mlp/sampling. Waits for the device at every part boundary of every
  // forward, which slows queries down: for measurement, not for serving or latency numbers.
  bool profile = false;
  // The longest sequence a query may form (context + prompt + longest label). 0 = the model's
  // max_position_embeddings, or no limit when the model does not state one.
  int64_t max_context = 0;
};

class DbsaSession {
 public:
  // Opens `task` for querying with `model`: FailedPrecondition if the model's fingerprint differs
  // from the one the pool was encoded with; NotFound for an unknown task; InvalidArgument for a
  // negative max_context or a non-positive prefill chunk.
  static Result<std::unique_ptr<DbsaSession>> Open(const Store* store, const std::string& task,
                                                   PoolModel model,
                                                   const SessionOptions& options = {});

  // Answers one query. Besides the model's and the store's errors: InvalidArgument when the budget
  // cannot hold the prompt and the longest label, or the sink blocks on top of them (the message
  // gives the numbers); NotSupported for RetICL on a task without a per-demonstration index.
  Result<Answer> Ask(std::string_view query, const AnswerOptions& options);

  // Answers several DBSA label queries together: each selects its blocks as Ask does, the union of
  // the blocks is read (staged) once, and ONE Forward runs every query's prompt and label tree,
  // each query attending to its own blocks in its own order (the model's weights are read once
  // for the batch). Answers in query order, each as Ask's up to the rounding of batched products;
  // every answer's timing holds the whole batch's. InvalidArgument for another method or free
  // text; otherwise Ask's errors.
  Result<std::vector<Answer>> AskBatch(const std::vector<std::string>& queries,
                                       const AnswerOptions& options);

  const TaskInfo& task() const { return task_; }
  // The limit Ask applies (0: none): SessionOptions::max_context or the model's.
  int64_t max_context() const { return max_context_; }
  // Seconds spent encoding FixedICL's prefix (0 until a FixedICL query ran).
  double fixed_prefix_seconds() const { return fixed_seconds_; }
  // The K/V source's cache statistics (all zero for the host source, which keeps no cache).
  KvSource::Stats cache_stats() const { return kv_source_->stats(); }
  void ClearCache() { kv_source_->Clear(); }

 private:
  DbsaSession(const Store* store, TaskInfo task, PoolModel model, PromptFormat format,
              const SessionOptions& options)
      : store_(store),
        task_(std::move(task)),
        model_(std::move(model)),
        format_(std::move(format)),
        options_(options) {}

  // The query's prompt tokens; sets prompt_tokens and budget (InvalidArgument when the limit
  // leaves no room for a context).
  Result<std::vector<int32_t>> Prompt(std::string_view query, const AnswerOptions& options,
                                      Answer* answer);
  // DBSA's blocks for `query`: the sink blocks, then the best-scoring others while the selection
  // size and `budget` (0: none) allow, ordered as options say. Fills blocks, block_scores,
  // budget_bound and context_tokens.
  Status SelectBlocks(Snapshot* snapshot, std::string_view query, const SelectionOptions& options,
                      uint64_t budget, Answer* answer);
  // RetICL's demonstrations: the best-scoring ones while their text fits `target` tokens, ordered
  // as options say. Returns the context's token ids and fills demos, demo_scores.
  Result<std::vector<int32_t>> SelectDemos(Snapshot* snapshot, std::string_view query,
                                           const SelectionOptions& options, uint64_t target,
                                           Answer* answer);
  // The token ids of the blocks' texts, in order (what the baselines re-encode).
  Result<std::vector<int32_t>> BlockTokens(Snapshot* snapshot, const std::vector<uint32_t>& blocks);
  // Baselines: `ids` encoded with full causal attention from position 0.
  Result<std::vector<LayerKV>> EncodeTokens(const std::vector<int32_t>& ids);
  // Answers after `context` (its tensors or its attention, placed at positions
  // 0..context.tokens-1); `prompt` is the query's token ids.
  Status Decode(const QueryContext& context, const std::vector<int32_t>& prompt,
                const AnswerOptions& options, Answer* answer);

  // With options_.profile: copies the current query's split into `timing`'s profile fields.
  void FillProfileTiming(Timing* timing) const;
  // With options_.profile: the current query's split (reset by Ask), else null.
  ForwardProfile* profile() { return options_.profile ? &profile_ : nullptr; }

  const Store* store_;
  TaskInfo task_;
  PoolModel model_;
  PromptFormat format_;
  SessionOptions options_;
  std::unique_ptr<KvSource> kv_source_;
  std::vector<std::vector<int32_t>> label_tokens_;
  size_t longest_label_ = 0;            // tokens of the longest label continuation
  int64_t max_context_ = 0;             // 0: no limit
  std::vector<uint32_t> block_tokens_;  // token_count of every block, by index
  // FixedICL's cached prefix, for the block count it was built for.
  uint32_t fixed_blocks_ = 0;
  QueryContext fixed_context_;
  double fixed_seconds_ = 0;
  ForwardProfile profile_;
  double sampling_ms_ = 0;
};

}  // namespace shotdb

#endif  // SHOTDB_QUERY_DBSA_DBSA_H_
