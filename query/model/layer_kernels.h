// LayerKernels: the forward's pointwise steps (RMSNorm, RoPE of the new tokens' Q and K, SiLU*up)
// as single CUDA kernels (gpu/layer_ops.h) instead of ~20 libtorch operations a layer.
//
// LlamaModel uses them for CUDA models in bf16/f16 when shotdb is built with gpu/ and the model's
// RoPE scaling is one the kernels implement (none, llama3); elsewhere (CPU, float32/float64, no
// gpu/ in the build) Create returns null and the model runs the libtorch form. The results agree
// with the libtorch form within the dtype's rounding (gpu/layer_ops.h has the numerics; the
// kernels are tested against float64 over many shapes, the model on CUDA against its float64 CPU
// forward).
//
// Thread-safety: immutable after Create; the functions may be called from several threads. Work is
// enqueued on libtorch's current CUDA stream of the tensors' device.
#ifndef SHOTDB_QUERY_MODEL_LAYER_KERNELS_H_
#define SHOTDB_QUERY_MODEL_LAYER_KERNELS_H_

#include <torch/torch.h>

#include <memory>
#include <optional>
#include <utility>

#include "query/model/config.h"
#include "util/status.h"

#ifdef SHOTDB_HAVE_GPU
#include "gpu/rope.h"
#endif

namespace shotdb {

class LayerKernels {
 public:
  // The kernels for a model of `config` on `device` in `dtype`, or null where they do not apply
  // (header comment).
  static std::unique_ptr<LayerKernels> Create(const ModelConfig& config, torch::Device device,
                                              torch::ScalarType dtype);
  virtual ~LayerKernels() = default;

  // weight * normalise(x), x [rows, hidden] with unit stride in the last dimension; a new
  // contiguous tensor.
  virtual Result<torch::Tensor> RmsNorm(const torch::Tensor& x,
                                        const torch::Tensor& weight) const = 0;
  // qkv [T, >= (num_heads + num_kv_heads) * head_dim] (Q's columns, then K's; unit last stride),
  // positions [T] int64 on the device: Q [num_heads, T, head_dim] and K [num_kv_heads, T,
  // head_dim], rotated, contiguous.
  virtual Result<std::pair<torch::Tensor, torch::Tensor>> RopeQk(
      const torch::Tensor& qkv, const torch::Tensor& positions) const = 0;
  // gate_up [rows, 2F] (gate, then up; unit last stride): silu(gate) * up, [rows, F] contiguous.
  virtual Result<torch::Tensor> SiluMul(const torch::Tensor& gate_up) const = 0;
};

#ifdef SHOTDB_HAVE_GPU
// The model's RoPE in the kernels' terms; nullopt for a scaling the kernels do not implement.
// Shared by LayerKernels and the device K/V source (query/dbsa/kv_source.h).
std::optional<gpu::RopeParams> KernelRope(const ModelConfig& config);
#endif

}  // namespace shotdb

#endif  // SHOTDB_QUERY_MODEL_LAYER_KERNELS_H_
