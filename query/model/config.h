// ModelConfig: the shape and hyper-parameters of a Llama-family decoder (Llama, Mistral, Qwen2),
// read from a Hugging Face config.json or from GGUF metadata.
//
// Both readers validate what they return (ModelConfig::Validate), so a loaded config is always
// internally consistent: head counts divide, head_dim is even, RoPE scaling parameters are sane.
#ifndef SHOTDB_QUERY_MODEL_CONFIG_H_
#define SHOTDB_QUERY_MODEL_CONFIG_H_

#include <cstdint>
#include <string>

#include "util/status.h"

namespace shotdb {

class GgufFile;

// How RoPE inverse frequencies are derived from theta.
struct RopeScaling {
  enum class Type {
    kNone,    // inv_freq[i] = theta^(-2i/head_dim)
    kLlama3,  // Llama 3.1: low frequencies divided by `factor`, a smooth band in between
  };
  Type type = Type::kNone;
  // kLlama3 only (names as in HF's rope_scaling / rope_parameters).
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 0;
};

struct ModelConfig {
  std::string architecture;  // "llama", "mistral" or "qwen2"
  int64_t num_layers = 0;
  int64_t hidden_size = 0;
  int64_t num_heads = 0;     // query heads
  int64_t num_kv_heads = 0;  // key/value heads (GQA when < num_heads); divides num_heads
  int64_t head_dim = 0;      // usually hidden_size / num_heads; even
  int64_t intermediate_size = 0;
  int64_t vocab_size = 0;
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-5;
  bool tie_word_embeddings = false;  // lm_head shares the token embedding matrix
  bool attention_bias = false;       // q/k/v projections carry a bias (always true for qwen2)
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 0;  // informational; 0 when the source does not say

  // OK, or InvalidArgument naming the first field that is missing, non-positive or inconsistent.
  Status Validate() const;
};

// Parses the text of an HF config.json. `source` names the file in error messages. Accepts both
// the transformers-4 spelling (rope_theta, rope_scaling) and the transformers-5 one
// (rope_parameters). Returns InvalidArgument for malformed JSON, a missing required field or an
// unknown model_type, NotSupported for a rope type other than default/llama3 or for
// sliding-window attention, and the Validate() error otherwise.
Result<ModelConfig> ParseHfConfig(const std::string& json_text, const std::string& source);

// Reads and parses `path` (a config.json). IOError if it cannot be read, then as ParseHfConfig.
Result<ModelConfig> LoadHfConfig(const std::string& path);

// Builds the config from GGUF metadata (general.architecture, {arch}.block_count,
// .embedding_length, .feed_forward_length, .attention.head_count(_kv),
// .attention.layer_norm_rms_epsilon, .rope.freq_base, .rope.dimension_count, .context_length).
// vocab_size comes from the token_embd.weight shape; tie_word_embeddings is true when there is
// no output.weight tensor. NotSupported for an architecture other than llama/mistral/qwen2 or for
// RoPE scaling stored in the file (rope.scaling.* or a rope_freqs tensor); InvalidArgument for a
// missing key.
Result<ModelConfig> ConfigFromGguf(const GgufFile& gguf, const std::string& source);

}  // namespace shotdb

#endif  // SHOTDB_QUERY_MODEL_CONFIG_H_
