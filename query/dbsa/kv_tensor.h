// Glue between stored K/V payloads (engine/, format/) and libtorch tensors.
#ifndef SHOTDB_QUERY_DBSA_KV_TENSOR_H_
#define SHOTDB_QUERY_DBSA_KV_TENSOR_H_

#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "format/dtype.h"
#include "query/model/llama.h"
#include "util/status.h"

namespace shotdb {

// The torch type of a dtype's elements. The scaled dtypes (kF8E4M3, kI8) map to kByte: their
// codes, which are values only with their scales (use StoredKvTensor); they are storage dtypes,
// never compute dtypes.
torch::ScalarType TorchType(DType dtype);
// NotSupported for a torch type with no stored equivalent.
Result<DType> StoredType(torch::ScalarType type);

// A stored K/V tensor's raw payload (format/kv_values.h) as a CPU tensor [kv_heads, tokens,
// head_dim]: for the float dtypes a view of `raw` (which must outlive it; any alignment the dtype
// needs), for the scaled dtypes a new float32 tensor of the dequantised values.
torch::Tensor StoredKvTensor(DType dtype, const void* raw, int64_t kv_heads, int64_t tokens,
                             int64_t head_dim);

// Concatenates, per layer, the K and V of consecutive blocks along the token axis into
// [kv_heads, sum(lengths), head_dim] tensors with `options`; block_kv(i, layer, kv) gives block i's
// K (kv = 0) or V (kv = 1) of `lengths[i]` tokens, in any dtype and on any device (one copy_
// converts and moves it).
using BlockKvFn = std::function<torch::Tensor(size_t block, uint32_t layer, int kv)>;
std::vector<LayerKV> ConcatenateBlocks(uint32_t layers, int64_t kv_heads, int64_t head_dim,
                                       const std::vector<int64_t>& lengths,
                                       const torch::TensorOptions& options,
                                       const BlockKvFn& block_kv);

// A stable hex digest identifying the model's weights: xxh3-64 over the GGUF file, or over
// config.json and every *.safetensors file of an HF directory. Part of a task's fingerprint, so a
// pool built with one checkpoint is never queried with another of the same shape.
Result<std::string> WeightsDigest(const std::string& model_path);

}  // namespace shotdb

#endif  // SHOTDB_QUERY_DBSA_KV_TENSOR_H_
