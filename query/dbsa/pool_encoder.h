// PoolEncoder: encodes a demonstration pool into a store once, block by block, with DBSA's
// block-sparse attention, and appends to it later at the cost of the new blocks only.
//
// Block i attends at every layer to the sink block(s) 0..s-1, the previous j blocks i-j..i-1, and
// itself causally; nothing else. Its tokens and theirs take RoPE positions by the task's
// PositionScheme (engine/task.h): sequential over the pool, or windowed (what the block sees laid
// out from position 0, so positions stay below the tokens of s + j + 1 blocks). The context blocks'
// K/V are the values as stored (in the task's K/V dtype), so encoding a block gives the same result
// whether its predecessors were encoded in this run, an earlier interrupted run, or an earlier
// append. Each block (every layer's pre-RoPE K and V, its texts, its BM25 postings) is one store
// transaction: an interrupted build leaves a readable store, and re-running continues after the
// last committed block.
#ifndef SHOTDB_QUERY_DBSA_POOL_ENCODER_H_
#define SHOTDB_QUERY_DBSA_POOL_ENCODER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "engine/store.h"
#include "query/dbsa/demo_file.h"
#include "query/dbsa/prompt.h"
#include "query/model/llama.h"
#include "query/tokenizer/tokenizer.h"

namespace shotdb {

// The model a pool is encoded with. Not owned.
struct PoolModel {
  const LlamaModel* model = nullptr;
  const Tokenizer* tokenizer = nullptr;
  std::string weights_digest;  // WeightsDigest() of the checkpoint
};

// The fingerprint a task records: architecture and weights digest, stored K/V dtype, tokenizer
// fingerprint, and the K/V shape (layers, kv heads, head dim).
ModelFingerprint MakeFingerprint(const PoolModel& model, DType kv_dtype);
// The same from the checkpoint's config, without loading its weights (shotdb.hf records it).
ModelFingerprint MakeFingerprint(const ModelConfig& config, const Tokenizer& tokenizer,
                                 const std::string& weights_digest, DType kv_dtype);

struct PoolTaskOptions {
  std::string demo_template = std::string(PromptFormat::kDefaultTemplate);
  std::string separator = std::string(PromptFormat::kDefaultSeparator);
  BlockConfig blocks;  // k (demos per block), j (window), sink blocks, position scheme
  DType kv_dtype = DType::kBF16;
  Codec codec = Codec::kRaw;
  AnalyzerOptions analyzer;  // BM25 terms of blocks, demonstrations and queries
  Bm25Params bm25;
  // The label set decoding is constrained to; empty = the distinct labels of the first build's
  // demonstrations, sorted.
  std::vector<std::string> labels;
};

struct EncodeProgress {
  uint64_t blocks_done = 0, blocks_total = 0;  // of this call
  uint64_t tokens_done = 0;                    // of this call
  double seconds = 0;                          // since this call started
  // One past the largest RoPE position any block of this call was encoded at (compare it with the
  // model's max_position_embeddings: beyond it the model runs outside its trained range).
  uint64_t max_position = 0;
  // Where `seconds` went: the model's forward passes (until the device finished them), the K/V's
  // conversion to the stored dtype (device -> host, fp8/int8 quantisation, and the stored values
  // that later blocks attend to back onto the device; on a GPU, the quantisation and those values
  // stay there and only the payloads come to the host), and the store's appends (checksums, the
  // LMDB write, BM25 postings). The rest is tokenization, reading context blocks and planning.
  double forward_seconds = 0, convert_seconds = 0, append_seconds = 0;
  // Scaled dtypes (fp8, int8) of a bf16/f16 model on a GPU are quantised there
  // (gpu/quantize_kv.h) instead of on the host: blocks converted that way. The first block of a
  // call and every kDeviceCheckInterval-th are also converted on the host and compared, payload
  // bytes and values as stored; where they differ, the device conversion is off for the rest of
  // the call (those blocks are the host's), and this names the first difference (else empty).
  uint64_t blocks_on_device = 0;
  std::string device_mismatch;
};
constexpr uint64_t kDeviceCheckInterval = 64;
using EncodeProgressFn = std::function<void(const EncodeProgress&)>;

class PoolEncoder {
 public:
  PoolEncoder(Store* store, PoolModel model) : store_(store), model_(std::move(model)) {}

  // Creates `task` if it does not exist (FailedPrecondition if it exists with another model
  // fingerprint), then adds every demonstration of `demos` that the task does not hold yet, in the
  // blocks PlanBlocks(demos, k, seed) groups them into. A demonstration's id is derived from its
  // text, label and occurrence number in `demos`, and the plan from the input and the seed alone,
  // so re-running after an interruption skips the committed blocks and encodes exactly the ones
  // an uninterrupted run would have (byte-identical). Every row is checked before anything is
  // written (InvalidArgument naming the demonstration's number: a label not the task's, text that
  // does not encode, e.g. invalid UTF-8, or blocks that could pass the model's context). Use it for
  // both `build` and `append`.
  Status AddDemonstrations(const std::string& task, const PoolTaskOptions& options,
                           const std::vector<LabeledText>& demos, uint64_t seed,
                           const EncodeProgressFn& progress = {});

  // Appends one block per group, in order, after the task's existing blocks (the task must
  // exist). The building block of AddDemonstrations, public so that tests can fix the grouping.
  Status EncodeBlocks(const std::string& task,
                      const std::vector<std::vector<Demonstration>>& groups,
                      const EncodeProgressFn& progress = {});

 private:
  using BlockKV = std::vector<LayerKV>;
  Result<BlockKV> ContextBlock(Snapshot* snapshot, const TaskInfo& task, uint32_t index);

  Store* store_;
  PoolModel model_;
  std::map<uint32_t, BlockKV> window_;  // recently encoded blocks' K/V as stored, model dtype
  std::string window_task_;
};

// How AddDemonstrations groups `demos` (ids derived from text, label and occurrence; a seeded
// shuffle of the whole input into blocks of `demos_per_block`, the last one smaller).
std::vector<std::vector<Demonstration>> PlanBlocks(const std::vector<LabeledText>& demos,
                                                   uint32_t demos_per_block, uint64_t seed);

// The tokens of a block's text: BOS first for block 0 when the tokenizer asks for it.
Result<std::vector<int32_t>> TokenizeBlock(const Tokenizer& tokenizer, const std::string& text,
                                           uint32_t block_index);

}  // namespace shotdb

#endif  // SHOTDB_QUERY_DBSA_POOL_ENCODER_H_
