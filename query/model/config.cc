#include "query/model/config.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "format/gguf.h"

namespace shotdb {
namespace {

using nlohmann::json;

Status CheckPositive(int64_t value, const char* field) {
  if (value <= 0) {
    return Status::InvalidArgument(std::string("model config: ") + field +
                                   " must be positive, got " + std::to_string(value));
  }
  return Status::OK();
}

// Reads an integer field; missing -> InvalidArgument naming it.
Result<int64_t> RequiredInt(const json& j, const char* key, const std::string& source) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_integer()) {
    return Status::InvalidArgument(source + ": field \"" + key + "\" (integer) is missing");
  }
  return it->get<int64_t>();
}

// Reads a boolean field: missing or null -> fallback; another type -> InvalidArgument naming it
// (e.g. "attention_bias": "float32" is not silently false).
Result<bool> OptionalBool(const json& j, const char* key, bool fallback,
                          const std::string& source) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) {
    return Status::InvalidArgument(source + ": field \"" + key + "\" must be true or false, got " +
                                   it->dump());
  }
  return it->get<bool>();
}

double OptionalDouble(const json& j, const char* key, double fallback) {
  auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<double>() : fallback;
}

// Fills rope_theta and rope_scaling from either `rope_parameters` (transformers 5) or
// `rope_theta` + `rope_scaling` (transformers 4).
Status ParseRope(const json& j, const std::string& source, ModelConfig* c) {
  c->rope_theta = OptionalDouble(j, "rope_theta", 10000.0);
  const json* scaling = nullptr;
  auto params = j.find("rope_parameters");
  if (params != j.end() && params->is_object()) {
    c->rope_theta = OptionalDouble(*params, "rope_theta", c->rope_theta);
    scaling = &*params;
  }
  auto legacy = j.find("rope_scaling");
  if (legacy != j.end() && legacy->is_object()) scaling = &*legacy;
  if (scaling == nullptr) return Status::OK();

  std::string type = "default";
  for (const char* key : {"rope_type", "type"}) {
    auto it = scaling->find(key);
    if (it != scaling->end() && it->is_string()) {
      type = it->get<std::string>();
      break;
    }
  }
  if (type == "default") return Status::OK();
  if (type != "llama3") {
    return Status::NotSupported(source + ": rope type \"" + type +
                                "\" (supported: default, llama3)");
  }
  RopeScaling& r = c->rope_scaling;
  r.type = RopeScaling::Type::kLlama3;
  r.factor = OptionalDouble(*scaling, "factor", 0.0);
  r.low_freq_factor = OptionalDouble(*scaling, "low_freq_factor", 0.0);
  r.high_freq_factor = OptionalDouble(*scaling, "high_freq_factor", 0.0);
  auto omp = scaling->find("original_max_position_embeddings");
  r.original_max_position_embeddings =
      omp != scaling->end() && omp->is_number_integer() ? omp->get<int64_t>() : 0;
  return Status::OK();
}

}  // namespace

Status ModelConfig::Validate() const {
  if (architecture != "llama" && architecture != "mistral" && architecture != "qwen2") {
    return Status::NotSupported("model config: architecture \"" + architecture +
                                "\" (supported: llama, mistral, qwen2)");
  }
  SHOTDB_RETURN_IF_ERROR(CheckPositive(num_layers, "num_layers"));
  SHOTDB_RETURN_IF_ERROR(CheckPositive(hidden_size, "hidden_size"));
  SHOTDB_RETURN_IF_ERROR(CheckPositive(num_heads, "num_heads"));
  SHOTDB_RETURN_IF_ERROR(CheckPositive(num_kv_heads, "num_kv_heads"));
  SHOTDB_RETURN_IF_ERROR(CheckPositive(head_dim, "head_dim"));
  SHOTDB_RETURN_IF_ERROR(CheckPositive(intermediate_size, "intermediate_size"));
  SHOTDB_RETURN_IF_ERROR(CheckPositive(vocab_size, "vocab_size"));
  if (num_heads % num_kv_heads != 0) {
    return Status::InvalidArgument("model config: num_heads " + std::to_string(num_heads) +
                                   " is not a multiple of num_kv_heads " +
                                   std::to_string(num_kv_heads));
  }
  if (head_dim % 2 != 0) {
    return Status::InvalidArgument("model config: head_dim " + std::to_string(head_dim) +
                                   " must be even for RoPE");
  }
  if (!(rope_theta > 0.0)) {
    return Status::InvalidArgument("model config: rope_theta must be positive");
  }
  if (!(rms_norm_eps > 0.0)) {
    return Status::InvalidArgument("model config: rms_norm_eps must be positive");
  }
  if (rope_scaling.type == RopeScaling::Type::kLlama3) {
    const RopeScaling& r = rope_scaling;
    if (!(r.factor > 0.0) || !(r.low_freq_factor > 0.0) ||
        !(r.high_freq_factor > r.low_freq_factor) || r.original_max_position_embeddings <= 0) {
      return Status::InvalidArgument(
          "model config: llama3 rope scaling needs factor > 0, 0 < low_freq_factor < "
          "high_freq_factor and original_max_position_embeddings > 0");
    }
  }
  return Status::OK();
}

static Result<ModelConfig> ParseHfConfigFields(const std::string& json_text,
                                               const std::string& source);

Result<ModelConfig> ParseHfConfig(const std::string& json_text, const std::string& source) {
  // The fields are read with typed checks; a type nlohmann::json still refuses becomes an error
  // naming the file, never an exception out of here.
  try {
    return ParseHfConfigFields(json_text, source);
  } catch (const json::exception& e) {
    return Status::InvalidArgument(source + ": " + e.what());
  }
}

static Result<ModelConfig> ParseHfConfigFields(const std::string& json_text,
                                               const std::string& source) {
  json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return Status::InvalidArgument(source + ": not a JSON object");
  }
  ModelConfig c;
  auto type = j.find("model_type");
  if (type == j.end() || !type->is_string()) {
    return Status::InvalidArgument(source + ": field \"model_type\" (string) is missing");
  }
  c.architecture = type->get<std::string>();
  if (c.architecture != "llama" && c.architecture != "mistral" && c.architecture != "qwen2") {
    return Status::InvalidArgument(source + ": model_type \"" + c.architecture +
                                   "\" is not a Llama-family model (llama, mistral, qwen2)");
  }
  SHOTDB_ASSIGN_OR_RETURN(c.num_layers, RequiredInt(j, "num_hidden_layers", source));
  SHOTDB_ASSIGN_OR_RETURN(c.hidden_size, RequiredInt(j, "hidden_size", source));
  SHOTDB_ASSIGN_OR_RETURN(c.num_heads, RequiredInt(j, "num_attention_heads", source));
  SHOTDB_ASSIGN_OR_RETURN(c.intermediate_size, RequiredInt(j, "intermediate_size", source));
  SHOTDB_ASSIGN_OR_RETURN(c.vocab_size, RequiredInt(j, "vocab_size", source));
  auto kv = j.find("num_key_value_heads");
  c.num_kv_heads = kv != j.end() && kv->is_number_integer() ? kv->get<int64_t>() : c.num_heads;
  auto hd = j.find("head_dim");
  c.head_dim = hd != j.end() && hd->is_number_integer()
                   ? hd->get<int64_t>()
                   : (c.num_heads > 0 ? c.hidden_size / c.num_heads : 0);
  c.rms_norm_eps = OptionalDouble(j, "rms_norm_eps", 1e-6);
  SHOTDB_ASSIGN_OR_RETURN(c.tie_word_embeddings,
                          OptionalBool(j, "tie_word_embeddings", false, source));
  SHOTDB_ASSIGN_OR_RETURN(const bool attention_bias,
                          OptionalBool(j, "attention_bias", false, source));
  c.attention_bias = c.architecture == "qwen2" || attention_bias;
  auto mpe = j.find("max_position_embeddings");
  c.max_position_embeddings = mpe != j.end() && mpe->is_number_integer() ? mpe->get<int64_t>() : 0;
  SHOTDB_ASSIGN_OR_RETURN(const bool mlp_bias, OptionalBool(j, "mlp_bias", false, source));
  if (mlp_bias) {
    return Status::NotSupported(source + ": mlp_bias = true");
  }
  auto act = j.find("hidden_act");
  if (act != j.end() && act->is_string() && act->get<std::string>() != "silu") {
    return Status::NotSupported(source + ": hidden_act \"" + act->get<std::string>() +
                                "\" (only silu)");
  }
  // Sliding-window attention changes the mask; refuse rather than silently attend everywhere.
  SHOTDB_ASSIGN_OR_RETURN(const bool sliding, OptionalBool(j, "use_sliding_window",
                                                           c.architecture == "mistral", source));
  auto window = j.find("sliding_window");
  if (sliding && window != j.end() && window->is_number_integer()) {
    return Status::NotSupported(source + ": sliding-window attention (sliding_window = " +
                                std::to_string(window->get<int64_t>()) + ")");
  }
  SHOTDB_RETURN_IF_ERROR(ParseRope(j, source, &c));
  Status valid = c.Validate();
  if (!valid.ok()) return valid.WithContext(source);
  return c;
}

Result<ModelConfig> LoadHfConfig(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IOError(path + ": cannot open model config");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return Status::IOError(path + ": read failed");
  return ParseHfConfig(text.str(), path);
}

Result<ModelConfig> ConfigFromGguf(const GgufFile& gguf, const std::string& source) {
  ModelConfig c;
  SHOTDB_ASSIGN_OR_RETURN(c.architecture, gguf.GetString("general.architecture"));
  if (c.architecture != "llama" && c.architecture != "mistral" && c.architecture != "qwen2") {
    return Status::NotSupported(source + ": general.architecture \"" + c.architecture +
                                "\" (supported: llama, mistral, qwen2)");
  }
  const std::string a = c.architecture + ".";
  auto uint_key = [&](const std::string& key) -> Result<int64_t> {
    Result<uint64_t> v = gguf.GetUInt(a + key);
    if (!v.ok()) return v.status().WithContext(source);
    return static_cast<int64_t>(*v);
  };
  SHOTDB_ASSIGN_OR_RETURN(c.num_layers, uint_key("block_count"));
  SHOTDB_ASSIGN_OR_RETURN(c.hidden_size, uint_key("embedding_length"));
  SHOTDB_ASSIGN_OR_RETURN(c.intermediate_size, uint_key("feed_forward_length"));
  SHOTDB_ASSIGN_OR_RETURN(c.num_heads, uint_key("attention.head_count"));
  c.num_kv_heads = c.num_heads;
  if (gguf.GetUInt(a + "attention.head_count_kv").ok()) {
    SHOTDB_ASSIGN_OR_RETURN(c.num_kv_heads, uint_key("attention.head_count_kv"));
  }
  c.head_dim = c.num_heads > 0 ? c.hidden_size / c.num_heads : 0;
  if (gguf.GetUInt(a + "rope.dimension_count").ok()) {
    SHOTDB_ASSIGN_OR_RETURN(c.head_dim, uint_key("rope.dimension_count"));
  }
  if (gguf.GetUInt(a + "attention.key_length").ok()) {
    SHOTDB_ASSIGN_OR_RETURN(c.head_dim, uint_key("attention.key_length"));
  }
  if (gguf.GetUInt(a + "context_length").ok()) {
    SHOTDB_ASSIGN_OR_RETURN(c.max_position_embeddings, uint_key("context_length"));
  }
  Result<double> eps = gguf.GetFloat(a + "attention.layer_norm_rms_epsilon");
  if (!eps.ok()) return eps.status().WithContext(source);
  c.rms_norm_eps = *eps;
  Result<double> theta = gguf.GetFloat(a + "rope.freq_base");
  if (theta.ok()) c.rope_theta = *theta;
  Result<std::string> scaling = gguf.GetString(a + "rope.scaling.type");
  if (scaling.ok() && *scaling != "none") {
    return Status::NotSupported(source + ": " + a + "rope.scaling.type \"" + *scaling + "\"");
  }
  if (gguf.FindTensor("rope_freqs.weight") != nullptr) {
    return Status::NotSupported(source +
                                ": rope_freqs.weight (per-frequency RoPE factors, e.g. llama3 "
                                "scaling in GGUF); load the HF safetensors checkpoint instead");
  }
  const GgufTensorInfo* embd = gguf.FindTensor("token_embd.weight");
  if (embd == nullptr) {
    return Status::InvalidArgument(source + ": tensor token_embd.weight is missing");
  }
  if (embd->dims.size() != 2) {
    return Status::InvalidArgument(source + ": token_embd.weight must be 2-D");
  }
  c.vocab_size = static_cast<int64_t>(embd->dims[1]);
  c.tie_word_embeddings = gguf.FindTensor("output.weight") == nullptr;
  c.attention_bias = gguf.FindTensor("blk.0.attn_q.bias") != nullptr;
  Status valid = c.Validate();
  if (!valid.ok()) return valid.WithContext(source);
  return c;
}

}  // namespace shotdb
