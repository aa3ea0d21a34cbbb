// Loading Llama-family weights into libtorch tensors under Hugging Face names
// ("model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.weight", "lm_head.weight", ...).
//
// Sources: a GGUF file (llama.cpp naming; any tensor type GgufFile can dequantize) or an HF
// checkpoint directory (config.json + model.safetensors or a sharded index). Every tensor is
// dequantized to float32 on the host, converted to LoadOptions::dtype and moved to
// LoadOptions::device. GGUF attn_q / attn_k rows are un-permuted: llama.cpp's converter reorders
// them for llama-architecture models (interleaved-pair RoPE); undoing that lets the HF
// rotate-half RoPE apply to both sources.
#ifndef SHOTDB_QUERY_MODEL_WEIGHTS_H_
#define SHOTDB_QUERY_MODEL_WEIGHTS_H_

#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

#include "query/model/config.h"
#include "util/status.h"

namespace shotdb {

struct LoadOptions {
  torch::Device device = torch::kCPU;
  // Parameter dtype: kFloat32 (CPU default), kBFloat16 (GPU), kFloat64 (reference tests).
  torch::ScalarType dtype = torch::kFloat32;
  // CUDA models in bf16/f16: the pointwise steps as single kernels (layer_kernels.h); CPU models
  // in float32/float64: RMSNorm and RoPE as single loops (llama.cc). False runs them as libtorch
  // operations (for comparisons).
  bool layer_kernels = true;
};

struct ModelWeights {
  ModelConfig config;
  // HF names -> tensors of the shapes ExpectedWeightShapes(config) lists. With tied embeddings
  // "lm_head.weight" is the same tensor as "model.embed_tokens.weight".
  std::map<std::string, torch::Tensor> tensors;
};

// Every tensor a model with `config` needs, by HF name, with its [out, in] (or [n]) shape.
std::map<std::string, std::vector<int64_t>> ExpectedWeightShapes(const ModelConfig& config);

// Loads `path`: a file ending in ".gguf", an HF checkpoint directory, or the config.json inside
// one. Returns NotFound / IOError when files are missing or unreadable, InvalidArgument when a
// tensor is missing or has the wrong shape (the message names the tensor, the expected and the
// found shape), NotSupported for an unsupported architecture or tensor type, and InvalidArgument
// for a dtype other than float32/bfloat16/float16/float64.
Result<ModelWeights> LoadWeights(const std::string& path, const LoadOptions& options);

// Undoes llama.cpp's q/k row permutation for one [n_head * head_dim, in] matrix (or a
// [n_head * head_dim] bias): rows ordered (head, pair, half) become (head, half, pair).
torch::Tensor UnpermuteGgufQK(const torch::Tensor& w, int64_t n_head);

}  // namespace shotdb

#endif  // SHOTDB_QUERY_MODEL_WEIGHTS_H_
