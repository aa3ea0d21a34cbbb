#include "query/model/weights.h"

#include <sstream>

#include "format/gguf.h"
#include "format/safetensors.h"
#include "util/file_util.h"

namespace shotdb {
namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

std::string LayerName(int64_t layer, const char* suffix) {
  return "model.layers." + std::to_string(layer) + "." + suffix;
}

// HF suffix inside a layer -> GGUF suffix inside blk.N.
const std::pair<const char*, const char*> kLayerNames[] = {
    {"input_layernorm.weight", "attn_norm.weight"},
    {"self_attn.q_proj.weight", "attn_q.weight"},
    {"self_attn.k_proj.weight", "attn_k.weight"},
    {"self_attn.v_proj.weight", "attn_v.weight"},
    {"self_attn.q_proj.bias", "attn_q.bias"},
    {"self_attn.k_proj.bias", "attn_k.bias"},
    {"self_attn.v_proj.bias", "attn_v.bias"},
    {"self_attn.o_proj.weight", "attn_output.weight"},
    {"post_attention_layernorm.weight", "ffn_norm.weight"},
    {"mlp.gate_proj.weight", "ffn_gate.weight"},
    {"mlp.up_proj.weight", "ffn_up.weight"},
    {"mlp.down_proj.weight", "ffn_down.weight"},
};

// Places a host float32 tensor on the requested device and dtype after checking its shape.
Status Store(const std::string& name, torch::Tensor host,
             const std::map<std::string, std::vector<int64_t>>& expected,
             const LoadOptions& options, const std::string& source, ModelWeights* out) {
  auto it = expected.find(name);
  if (it == expected.end()) return Status::OK();  // a tensor this runtime does not use
  std::vector<int64_t> shape(host.sizes().begin(), host.sizes().end());
  if (shape != it->second) {
    return Status::InvalidArgument(source + ": tensor " + name + " has shape " +
                                   ShapeString(shape) + ", expected " + ShapeString(it->second));
  }
  out->tensors[name] = host.to(options.device, options.dtype).contiguous();
  return Status::OK();
}

// Checks that every expected tensor arrived; ties lm_head when allowed.
Status Finish(const std::map<std::string, std::vector<int64_t>>& expected,
              const std::string& source, ModelWeights* w) {
  if (w->config.tie_word_embeddings && w->tensors.count("lm_head.weight") == 0) {
    auto embed = w->tensors.find("model.embed_tokens.weight");
    if (embed != w->tensors.end()) w->tensors["lm_head.weight"] = embed->second;
  }
  for (const auto& [name, shape] : expected) {
    if (w->tensors.count(name) == 0) {
      return Status::InvalidArgument(source + ": tensor " + name + " " + ShapeString(shape) +
                                     " is missing");
    }
  }
  return Status::OK();
}

Result<ModelWeights> LoadGguf(const std::string& path, const LoadOptions& options) {
  SHOTDB_ASSIGN_OR_RETURN(GgufFile gguf, GgufFile::Open(path));
  ModelWeights w;
  SHOTDB_ASSIGN_OR_RETURN(w.config, ConfigFromGguf(gguf, path));
  const ModelConfig& c = w.config;
  const auto expected = ExpectedWeightShapes(c);
  // llama.cpp permutes q/k only for the llama-architecture converters (llama, mistral).
  const bool permuted = c.architecture == "llama" || c.architecture == "mistral";

  std::map<std::string, std::string> gguf_to_hf = {
      {"token_embd.weight", "model.embed_tokens.weight"},
      {"output_norm.weight", "model.norm.weight"},
      {"output.weight", "lm_head.weight"},
  };
  for (int64_t l = 0; l < c.num_layers; ++l) {
    for (const auto& [hf, gg] : kLayerNames) {
      gguf_to_hf["blk." + std::to_string(l) + "." + gg] = LayerName(l, hf);
    }
  }
  for (const GgufTensorInfo& info : gguf.tensors()) {
    auto name = gguf_to_hf.find(info.name);
    if (name == gguf_to_hf.end()) continue;
    // GGUF lists dimensions fastest-first; torch wants them slowest-first.
    std::vector<int64_t> shape(info.dims.rbegin(), info.dims.rend());
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    torch::Tensor host = torch::empty(shape, torch::kFloat32);
    SHOTDB_RETURN_IF_ERROR(gguf.ReadFloat32(info, host.data_ptr<float>(), static_cast<size_t>(n)));
    const std::string& hf = name->second;
    if (permuted && hf.find("self_attn.q_proj.weight") != std::string::npos) {
      host = UnpermuteGgufQK(host, c.num_heads);
    } else if (permuted && hf.find("self_attn.k_proj.weight") != std::string::npos) {
      host = UnpermuteGgufQK(host, c.num_kv_heads);
    }
    SHOTDB_RETURN_IF_ERROR(Store(hf, host, expected, options, path, &w));
  }
  SHOTDB_RETURN_IF_ERROR(Finish(expected, path, &w));
  return w;
}

Result<ModelWeights> LoadHfDir(const std::string& dir, const LoadOptions& options) {
  ModelWeights w;
  SHOTDB_ASSIGN_OR_RETURN(w.config, LoadHfConfig(dir + "/config.json"));
  const auto expected = ExpectedWeightShapes(w.config);
  SHOTDB_ASSIGN_OR_RETURN(SafetensorsCheckpoint ckpt, SafetensorsCheckpoint::OpenDir(dir));
  for (const auto& [name, shape] : expected) {
    Result<SafetensorsTensor> t = ckpt.Find(name);
    if (!t.ok()) {
      if (t.status().IsNotFound()) continue;  // Finish() reports it unless it is a tied lm_head
      return t.status();
    }
    std::vector<int64_t> dims(t->shape.begin(), t->shape.end());
    torch::Tensor host = torch::empty(dims, torch::kFloat32);
    SHOTDB_RETURN_IF_ERROR(
        SafetensorsToFloat32(*t, host.data_ptr<float>(), static_cast<size_t>(host.numel())));
    SHOTDB_RETURN_IF_ERROR(Store(name, host, expected, options, dir, &w));
  }
  SHOTDB_RETURN_IF_ERROR(Finish(expected, dir, &w));
  return w;
}

}  // namespace

std::map<std::string, std::vector<int64_t>> ExpectedWeightShapes(const ModelConfig& c) {
  const int64_t q_out = c.num_heads * c.head_dim;
  const int64_t kv_out = c.num_kv_heads * c.head_dim;
  std::map<std::string, std::vector<int64_t>> s;
  s["model.embed_tokens.weight"] = {c.vocab_size, c.hidden_size};
  s["model.norm.weight"] = {c.hidden_size};
  s["lm_head.weight"] = {c.vocab_size, c.hidden_size};
  for (int64_t l = 0; l < c.num_layers; ++l) {
    s[LayerName(l, "input_layernorm.weight")] = {c.hidden_size};
    s[LayerName(l, "self_attn.q_proj.weight")] = {q_out, c.hidden_size};
    s[LayerName(l, "self_attn.k_proj.weight")] = {kv_out, c.hidden_size};
    s[LayerName(l, "self_attn.v_proj.weight")] = {kv_out, c.hidden_size};
    if (c.attention_bias) {
      s[LayerName(l, "self_attn.q_proj.bias")] = {q_out};
      s[LayerName(l, "self_attn.k_proj.bias")] = {kv_out};
      s[LayerName(l, "self_attn.v_proj.bias")] = {kv_out};
    }
    s[LayerName(l, "self_attn.o_proj.weight")] = {c.hidden_size, q_out};
    s[LayerName(l, "post_attention_layernorm.weight")] = {c.hidden_size};
    s[LayerName(l, "mlp.gate_proj.weight")] = {c.intermediate_size, c.hidden_size};
    s[LayerName(l, "mlp.up_proj.weight")] = {c.intermediate_size, c.hidden_size};
    s[LayerName(l, "mlp.down_proj.weight")] = {c.hidden_size, c.intermediate_size};
  }
  return s;
}

torch::Tensor UnpermuteGgufQK(const torch::Tensor& w, int64_t n_head) {
  const int64_t out = w.size(0);
  std::vector<int64_t> split = {n_head, out / n_head / 2, 2};
  std::vector<int64_t> rest(w.sizes().begin() + 1, w.sizes().end());
  split.insert(split.end(), rest.begin(), rest.end());
  return w.reshape(split).transpose(1, 2).reshape(w.sizes()).contiguous();
}

Result<ModelWeights> LoadWeights(const std::string& path, const LoadOptions& options) {
  const torch::ScalarType dt = options.dtype;
  if (dt != torch::kFloat32 && dt != torch::kBFloat16 && dt != torch::kFloat16 &&
      dt != torch::kFloat64) {
    return Status::InvalidArgument(std::string("LoadWeights: dtype ") + c10::toString(dt) +
                                   " (expected float32, bfloat16, float16 or float64)");
  }
  try {
    if (IsDirectory(path)) return LoadHfDir(path, options);
    if (Extension(path) == ".gguf") return LoadGguf(path, options);
    if (BaseName(path) == "config.json") return LoadHfDir(DirName(path), options);
  } catch (const c10::Error& e) {
    return Status::IOError(
        path + ": libtorch failed while placing weights: " + e.what_without_backtrace());
  }
  if (!PathExists(path)) return Status::NotFound(path + ": no such model file or directory");
  return Status::InvalidArgument(path +
                                 ": expected a .gguf file, an HF checkpoint directory or its "
                                 "config.json");
}

}  // namespace shotdb
