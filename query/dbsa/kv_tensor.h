// Glue between stored K/V payloads (engine/, format/) and libtorch tensors.
#ifndef SHOTDB_QUERY_DBSA_KV_TENSOR_H_
#define SHOTDB_QUERY_DBSA_KV_TENSOR_H_

#include <torch/torch.h>

#include <string>

#include "format/dtype.h"
#include "util/status.h"

namespace shotdb {

torch::ScalarType TorchType(DType dtype);
// NotSupported for a torch type with no stored equivalent.
Result<DType> StoredType(torch::ScalarType type);

// A stable hex digest identifying the model's weights: xxh3-64 over the GGUF file, or over
// config.json and every *.safetensors file of an HF directory. Part of a task's fingerprint, so a
// pool built with one checkpoint is never queried with another of the same shape.
Result<std::string> WeightsDigest(const std::string& model_path);

}  // namespace shotdb

#endif  // SHOTDB_QUERY_DBSA_KV_TENSOR_H_
