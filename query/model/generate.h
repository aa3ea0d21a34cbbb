// Decoding on top of LlamaModel::Forward: greedy generation with stop conditions, and
// constrained decoding to a fixed set of label token sequences (DBSA answers are labels).
//
// Both take an optional DecodeContext: K/V of tokens that precede the prompt (for DBSA, the
// selected demonstration blocks) with the positions at which RoPE is applied to them. The context
// K is rotated once (unless the caller already did) into a preallocated cache that holds ROTATED
// keys; the prompt's and the generated tokens' K/V are rotated and appended after it, so every
// step is one Forward of the new token(s) over the cached context with
// ForwardRequest::context_rotated (no re-encoding, no per-step RoPE or copy of the context).
//
// Thread-safety: the functions are re-entrant; they only read the model.
#ifndef SHOTDB_QUERY_MODEL_GENERATE_H_
#define SHOTDB_QUERY_MODEL_GENERATE_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "query/model/llama.h"
#include "util/status.h"

namespace shotdb {

struct DecodeContext {
  // Optional: num_layers entries, each K/V [num_kv_heads, C, head_dim] in the model's dtype and
  // device. Not owned; must outlive the call.
  const std::vector<LayerKV>* kv = nullptr;
  // [C] int64 RoPE positions of the context tokens; required with `kv`.
  torch::Tensor positions;
  // Alternative to `kv` (not both): a context the model attends to through a ContextAttention
  // (e.g. K/V pages on the GPU read in place). Not owned. DecodeLabel only: GenerateGreedy
  // appends to a K/V cache and needs `kv`.
  const ContextAttention* attention = nullptr;
  // Position of the first prompt token; the following tokens take consecutive positions.
  // -1 = C (directly after the context), i.e. 0 without context.
  int64_t prompt_position = -1;
  // kv's K already has RoPE applied at `positions` (LlamaModel::RotateKeys or the GPU gather+RoPE
  // kernel); otherwise it is pre-RoPE and is rotated once when it enters the cache.
  bool rotated = false;
  // Optional, not owned, for measurement only (adds a device synchronisation at every phase
  // boundary): every Forward adds its split to *profile, and the cache work (allocating it,
  // rotating and appending K/V) is added to profile->attention_ms.
  ForwardProfile* profile = nullptr;
  // Optional, not owned, measured only together with `profile`: adds the milliseconds spent
  // outside Forward and the cache choosing the answer (argmax and stop checks for generation;
  // building the label trie's tokens and mask, log-softmax and label scoring for DecodeLabel).
  double* sampling_ms = nullptr;
  // Optional (DecodeLabel only): called once the forward that reads `attention` has been
  // enqueued, before the host waits for its result; no Attend on `attention` follows. A device
  // context hands its pages back to its cache there (QueryContext::release), while the GPU runs.
  std::function<void()> enqueued;
};

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  // Generation stops (without emitting it) at any of these token ids.
  std::vector<int32_t> eos_ids;
  // Generation stops once the decoded text contains any of these strings; needs `detokenize`.
  std::vector<std::string> stop_strings;
  // Turns generated ids into text (e.g. Tokenizer::Decode). When set, GenerateResult::text is
  // filled (cut before the first stop string).
  std::function<std::string(const std::vector<int32_t>&)> detokenize;
};

struct GenerateResult {
  enum class Stop { kEos, kMaxTokens, kStopString };
  std::vector<int32_t> tokens;  // generated ids, without the EOS id that ended generation
  std::string text;             // detokenized tokens, cut before a stop string (needs detokenize)
  Stop stop = Stop::kMaxTokens;
  int64_t forward_calls = 0;  // 1 for the prompt + 1 per further generated token
};

// Greedy (argmax) generation after `prompt` (non-empty ids). InvalidArgument for an empty prompt,
// max_new_tokens < 1, stop_strings without detokenize, or a malformed context; Forward's errors
// otherwise.
Result<GenerateResult> GenerateGreedy(const LlamaModel& model, const std::vector<int32_t>& prompt,
                                      const GenerateOptions& options,
                                      const DecodeContext& context = {});

// How a label's log-probability is summarised:
//   kSum:  sum over the label's tokens of log p(token | prompt, previous label tokens), i.e. the
//          log-probability of the whole label sequence (the natural choice; favours short labels
//          only as much as the model does);
//   kMean: that sum divided by the number of tokens (length-normalised).
enum class LabelScoring { kSum, kMean };

struct LabelDecodeResult {
  size_t label = 0;                  // index of the winning label (lowest index on a tie)
  double score = 0;                  // its score under the requested scoring
  std::vector<double> sum_logprob;   // per label
  std::vector<double> mean_logprob;  // per label
  int64_t forward_calls = 0;         // always 1 (prompt and label trie in one Forward)
  int64_t trie_nodes = 0;            // distinct label prefixes scored
};

// Scores every label continuation of `prompt` exactly and returns the best. `labels` holds each
// label's token ids as they follow the prompt (e.g. the ids of " positive"; the caller tokenizes
// according to the prompt format). The labels form a token trie; the prompt and all trie nodes
// that have children run together in ONE Forward whose mask lets each prompt token attend to the
// context and the prompt before it, and each node to the context, the whole prompt and its own
// ancestors (tree attention), placing each node at position prompt_end + depth - 1; the LM head
// runs only on the rows that are scored (the last prompt token and the nodes). The context K/V is
// read in place (no cache copy). This equals restricting each decoding step to the children of the
// current trie node, evaluated for every branch, so the winner is the best label under `scoring`,
// not just the greedy path. InvalidArgument for an empty prompt, no labels, an empty label or a
// token id outside the vocabulary.
Result<LabelDecodeResult> DecodeLabel(const LlamaModel& model, const std::vector<int32_t>& prompt,
                                      const std::vector<std::vector<int32_t>>& labels,
                                      const DecodeContext& context = {},
                                      LabelScoring scoring = LabelScoring::kSum);

// DecodeLabel for several prompts in ONE Forward (the weights are read once for the batch):
// prompts[q] after contexts[q], each query's rows attending to its own context and tokens only.
// With more than one prompt every context is given as `attention` (a ContextAttention per query,
// e.g. views of one set of staged pages); the first context's profile and sampling_ms collect the
// batch's times. Results in prompt order, each equal to DecodeLabel of that prompt alone up to
// the rounding of batched matrix products. InvalidArgument as DecodeLabel, or for a count
// mismatch or a batch with a tensor context.
Result<std::vector<LabelDecodeResult>> DecodeLabelBatch(
    const LlamaModel& model, const std::vector<std::vector<int32_t>>& prompts,
    const std::vector<std::vector<int32_t>>& labels, const std::vector<DecodeContext>& contexts,
    LabelScoring scoring = LabelScoring::kSum);

}  // namespace shotdb

#endif  // SHOTDB_QUERY_MODEL_GENERATE_H_
