#include "query/model/layer_kernels.h"

#include <string>

#ifdef SHOTDB_HAVE_GPU
#include "gpu/layer_ops.h"
#endif

namespace shotdb {

#ifdef SHOTDB_HAVE_GPU
namespace {

// Kernels run on the default (legacy) stream, where libtorch's kernels run unless a current
// stream is set (shotdb sets none), as in the device K/V source.
const cudaStream_t kTorchStream = nullptr;

bool UnitLastStride(const torch::Tensor& t) { return t.dim() == 2 && t.stride(1) == 1; }

class CudaLayerKernels final : public LayerKernels {
 public:
  CudaLayerKernels(const ModelConfig& c, DType dtype, gpu::RopeParams rope)
      : config_(c), dtype_(dtype), rope_(rope) {}

  Result<torch::Tensor> RmsNorm(const torch::Tensor& x,
                                const torch::Tensor& weight) const override {
    if (!UnitLastStride(x) || !weight.is_contiguous()) {
      return Status::InvalidArgument("LayerKernels::RmsNorm: x must be 2-D with unit last stride");
    }
    torch::Tensor out = torch::empty({x.size(0), x.size(1)}, x.options());
    gpu::RmsNormArgs a;
    a.dtype = dtype_;
    a.rows = static_cast<uint32_t>(x.size(0));
    a.width = static_cast<uint32_t>(x.size(1));
    a.x = x.data_ptr();
    a.x_row_stride = x.stride(0);
    a.weight = weight.data_ptr();
    a.eps = static_cast<float>(config_.rms_norm_eps);
    a.out = out.data_ptr();
    SHOTDB_RETURN_IF_ERROR(gpu::LaunchRmsNorm(a, kTorchStream));
    return out;
  }

  Result<std::pair<torch::Tensor, torch::Tensor>> RopeQk(
      const torch::Tensor& qkv, const torch::Tensor& positions) const override {
    if (!UnitLastStride(qkv) || !positions.is_contiguous() ||
        positions.scalar_type() != torch::kInt64 || positions.device() != qkv.device()) {
      return Status::InvalidArgument(
          "LayerKernels::RopeQk: qkv must be 2-D with unit last stride, positions int64 on its "
          "device");
    }
    const int64_t t = qkv.size(0), hd = config_.head_dim;
    torch::Tensor q = torch::empty({config_.num_heads, t, hd}, qkv.options());
    torch::Tensor k = torch::empty({config_.num_kv_heads, t, hd}, qkv.options());
    gpu::RopeQkArgs a;
    a.dtype = dtype_;
    a.q_heads = static_cast<uint32_t>(config_.num_heads);
    a.kv_heads = static_cast<uint32_t>(config_.num_kv_heads);
    a.head_dim = static_cast<uint32_t>(hd);
    a.rows = static_cast<uint32_t>(t);
    a.qk = qkv.data_ptr();
    a.row_stride = qkv.stride(0);
    a.positions = positions.data_ptr<int64_t>();
    a.rope = rope_;
    a.q_out = q.data_ptr();
    a.k_out = k.data_ptr();
    SHOTDB_RETURN_IF_ERROR(gpu::LaunchRopeQk(a, kTorchStream));
    return std::make_pair(q, k);
  }

  Result<torch::Tensor> SiluMul(const torch::Tensor& gate_up) const override {
    if (!UnitLastStride(gate_up) || gate_up.size(1) % 2 != 0) {
      return Status::InvalidArgument(
          "LayerKernels::SiluMul: gate_up must be 2-D with an even width and unit last stride");
    }
    const int64_t f = gate_up.size(1) / 2;
    torch::Tensor out = torch::empty({gate_up.size(0), f}, gate_up.options());
    gpu::SiluMulArgs a;
    a.dtype = dtype_;
    a.rows = static_cast<uint32_t>(gate_up.size(0));
    a.width = static_cast<uint32_t>(f);
    a.gate_up = gate_up.data_ptr();
    a.row_stride = gate_up.stride(0);
    a.out = out.data_ptr();
    SHOTDB_RETURN_IF_ERROR(gpu::LaunchSiluMul(a, kTorchStream));
    return out;
  }

 private:
  ModelConfig config_;
  DType dtype_;
  gpu::RopeParams rope_;
};

}  // namespace

std::optional<gpu::RopeParams> KernelRope(const ModelConfig& config) {
  gpu::RopeParams rope;
  rope.theta = config.rope_theta;
  switch (config.rope_scaling.type) {
    case RopeScaling::Type::kNone:
      rope.llama3_scaling = false;
      return rope;
    case RopeScaling::Type::kLlama3:
      rope.llama3_scaling = true;
      rope.factor = config.rope_scaling.factor;
      rope.low_freq_factor = config.rope_scaling.low_freq_factor;
      rope.high_freq_factor = config.rope_scaling.high_freq_factor;
      rope.original_max_position_embeddings =
          static_cast<double>(config.rope_scaling.original_max_position_embeddings);
      return rope;
  }
  return std::nullopt;
}
#endif  // SHOTDB_HAVE_GPU

std::unique_ptr<LayerKernels> LayerKernels::Create(const ModelConfig& config, torch::Device device,
                                                   torch::ScalarType dtype) {
#ifdef SHOTDB_HAVE_GPU
  if (!device.is_cuda() || (dtype != torch::kBFloat16 && dtype != torch::kFloat16)) return nullptr;
  const std::optional<gpu::RopeParams> rope = KernelRope(config);
  if (!rope || config.head_dim % 4 != 0 || config.head_dim > 256 || config.hidden_size % 2 != 0 ||
      config.intermediate_size % 2 != 0) {
    return nullptr;
  }
  return std::make_unique<CudaLayerKernels>(
      config, dtype == torch::kBFloat16 ? DType::kBF16 : DType::kF16, *rope);
#else
  (void)config;
  (void)device;
  (void)dtype;
  return nullptr;
#endif
}

}  // namespace shotdb
