// The records a store keeps besides K/V payloads: tasks, blocks and demonstrations, and their
// serialized form (the value bytes in LMDB and in export files; docs/storage.md).
//
// Thread-safety: plain values; the functions are pure.
#ifndef SHOTDB_ENGINE_TASK_H_
#define SHOTDB_ENGINE_TASK_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/analyzer.h"
#include "engine/bm25.h"
#include "format/codec.h"
#include "format/dtype.h"
#include "util/status.h"

namespace shotdb {

// Identifies the model whose K/V a task stores. Blocks are only appended by the same model: K/V of
// another architecture, dtype, tokenizer or shape would be silently wrong at query time.
struct ModelFingerprint {
  std::string architecture;    // e.g. "llama"
  DType dtype = DType::kBF16;  // element type of the stored K/V
  std::string tokenizer_hash;  // any stable digest of the tokenizer (vocabulary, merges)
  uint32_t num_layers = 0;
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;

  // "llama bf16 layers=32 kv_heads=8 head_dim=128 tokenizer=<hash>": used in mismatch messages.
  std::string ToString() const;
  bool operator==(const ModelFingerprint& o) const {
    return architecture == o.architecture && dtype == o.dtype &&
           tokenizer_hash == o.tokenizer_hash && num_layers == o.num_layers &&
           kv_heads == o.kv_heads && head_dim == o.head_dim;
  }
  bool operator!=(const ModelFingerprint& o) const { return !(*this == o); }
};

// The RoPE positions a block's tokens, and the tokens it attends to, take while it is encoded.
// (Stored K is pre-RoPE either way; queries re-apply RoPE at new contiguous positions.)
enum class PositionScheme : uint8_t {
  // The paper's: the whole pool at positions 0..N-1, each block at its BlockInfo::position_offset.
  // Positions grow with the pool; past the model's trained context (max_position_embeddings) the
  // stored K/V of late blocks degrade (docs/results.md).
  kSequential = 0,
  // While block b is encoded, what it sees is laid out contiguously from position 0: the sink
  // block(s), then the previous `window` blocks, then block b, each in block order. The largest
  // position is bounded by the tokens of sink + window + 1 blocks, whatever the pool size.
  kWindowed = 1,
};
std::string_view PositionSchemeName(PositionScheme scheme);  // "sequential" / "windowed"
std::optional<PositionScheme> ParsePositionScheme(std::string_view name);

// How the pool was encoded (method.md): k demonstrations a block, each block attending to the sink
// blocks and the previous `window` blocks, at the positions `positions` says. The defaults are the
// best configuration measured (docs/results.md section 6): the paper's k = 50 selects too coarsely
// for large pools (50.8% vs 70.0% with k = 5 on 19,287 NLU demonstrations).
struct BlockConfig {
  uint32_t demos_per_block = 5;  // k
  uint32_t window = 2;           // j
  uint32_t sink_blocks = 1;
  PositionScheme positions = PositionScheme::kWindowed;
  bool operator==(const BlockConfig& o) const {
    return demos_per_block == o.demos_per_block && window == o.window &&
           sink_blocks == o.sink_blocks && positions == o.positions;
  }
  bool operator!=(const BlockConfig& o) const { return !(*this == o); }
};

struct TaskInfo {
  std::string name;  // 1..255 bytes, unique in the store
  ModelFingerprint model;
  BlockConfig blocks;
  Codec codec = Codec::kRaw;    // how payloads of this task are stored
  std::string prompt_template;  // e.g. "utterance: {text}\nintent: {label}"
  std::string separator;        // e.g. "\n==\n"
  std::vector<std::string> labels;
  // Turns block texts, demonstrations and queries into BM25 terms (both indexes of the task).
  AnalyzerOptions analyzer;
  Bm25Params bm25;            // scoring parameters of Search and SearchDemos
  std::string metadata_json;  // free-form, stored as given

  // Maintained by the store (ignored by CreateTask).
  uint64_t num_blocks = 0;
  uint64_t num_demos = 0;
  uint64_t num_tokens = 0;            // sum of the blocks' token_count
  uint64_t payload_raw_bytes = 0;     // sum of the payload records' raw (decoded) sizes
  uint64_t payload_stored_bytes = 0;  // sum of the payload records' sizes as stored (header incl.)
  uint64_t version = 0;               // +1 at every committed append: a cache key for readers
  int64_t created_unix = 0;           // seconds since the epoch, set by CreateTask
};

struct Demonstration {
  uint64_t id = 0;  // unique within its task, chosen by the caller
  std::string text;
  std::string label;
  bool operator==(const Demonstration& o) const {
    return id == o.id && text == o.text && label == o.label;
  }
};

struct BlockInfo {
  uint32_t index = 0;  // 0, 1, 2, ... in order of appending
  // The block's first token in the pool (PoolEncoder: the sum of the token counts of the blocks
  // before it). With PositionScheme::kSequential it is also that token's RoPE position while the
  // block is encoded.
  uint64_t position_offset = 0;
  uint32_t token_count = 0;  // tokens of the block = the `tokens` dim of its K/V
  std::vector<uint64_t> demo_ids;
  std::string text;  // the block's text as encoded; the BM25 index counts its terms
  bool operator==(const BlockInfo& o) const {
    return index == o.index && position_offset == o.position_offset &&
           token_count == o.token_count && demo_ids == o.demo_ids && text == o.text;
  }
};

// The blocks block `index` attends to while it is encoded: the sink blocks 0..sink_blocks-1 and
// the previous `window` blocks, each once, ascending (empty for block 0).
std::vector<uint32_t> ContextBlocks(const BlockConfig& config, uint32_t index);

// The first RoPE position of each context block (ContextBlocks order) and of the block itself while
// `block` is encoded, and one past the last position used. `context` holds the context blocks'
// infos in ContextBlocks order.
struct EncodingPositions {
  std::vector<uint64_t> context;
  uint64_t block = 0;
  uint64_t end = 0;
};
EncodingPositions PositionsForEncoding(PositionScheme scheme,
                                       const std::vector<const BlockInfo*>& context,
                                       const BlockInfo& block);

// Serialized forms. Encode* never fails; Decode* returns Corruption naming `what` when the bytes
// are truncated, have trailing bytes or hold an out-of-range enum.
std::string EncodeTaskInfo(const TaskInfo& task);
Result<TaskInfo> DecodeTaskInfo(std::string_view bytes, const std::string& what);
std::string EncodeBlockInfo(const BlockInfo& block);
Result<BlockInfo> DecodeBlockInfo(std::string_view bytes, const std::string& what);
std::string EncodeDemonstration(const Demonstration& demo);
Result<Demonstration> DecodeDemonstration(std::string_view bytes, const std::string& what);

}  // namespace shotdb

#endif  // SHOTDB_ENGINE_TASK_H_
