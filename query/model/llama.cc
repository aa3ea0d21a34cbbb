#include "query/model/llama.h"

#include <ATen/Parallel.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "query/model/context_attention.h"
#include "query/model/phase_clock.h"

// at::scaled_dot_product_attention (with its `scale` argument) exists from libtorch 2.1; Debian's
// libtorch 1.13, which the CPU-only builds use, has neither.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
#define SHOTDB_HAVE_SDPA 1
#else
#define SHOTDB_HAVE_SDPA 0
#endif

namespace shotdb {
namespace {

// New tokens from which CUDA attention uses the fused kernel (see LlamaModel::Attend).
constexpr int64_t kFusedMinTokens = 64;
// Query rows per chunk of CPU prefill attention (see LlamaModel::Run).
constexpr int64_t kRowChunk = 128;

// A ContextAttention's or a LayerKernels' error, carried out of Run to Forward.
struct KernelError {
  Status status;
};

template <typename T>
T OrThrow(Result<T> r) {
  if (!r.ok()) throw KernelError{r.status()};
  return std::move(r).value();
}

std::string SizesString(const torch::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// Norms, RoPE angles and softmax run in float32 at least (HF does the same), so bfloat16 models
// keep their statistics accurate; float64 models stay float64 throughout.
torch::ScalarType AccumulationType(torch::ScalarType t) {
  return t == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
}

// rotate_half as HF: [x1, x2] -> [-x2, x1] over the last dimension.
torch::Tensor RotateHalf(const torch::Tensor& x) {
  auto halves = x.chunk(2, -1);
  return torch::cat({-halves[1], halves[0]}, -1);
}

// The pointwise steps on the CPU in float32/float64 as one pass each, threads over rows, instead
// of the libtorch form's 5-8 operations with a temporary each (on 2 cores they were ~10% of a
// 512-token prefill; docs/results.md section 2). Same operations in the same order as the
// libtorch form below them.
bool CpuLoops(const torch::Tensor& x) {
  return x.device().is_cpu() &&
         (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kFloat64);
}

// x [H, N, hd] (unit last stride, any other strides), cos/sin [N, hd] contiguous in x's dtype:
// x * cos + rotate_half(x) * sin, [H, N, hd] contiguous.
template <typename T>
torch::Tensor ApplyRopeCpu(const torch::Tensor& x, const torch::Tensor& cos,
                           const torch::Tensor& sin) {
  const int64_t heads = x.size(0), n = x.size(1), d = x.size(2), half = d / 2;
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  torch::Tensor out = torch::empty({heads, n, d}, x.options());
  const T* const xp = x.data_ptr<T>();
  const T* const cp = cos.data_ptr<T>();
  const T* const sp = sin.data_ptr<T>();
  T* const op = out.data_ptr<T>();
  at::parallel_for(0, heads * n, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       const T* const xr = xp + (r / n) * s0 + (r % n) * s1;
                       const T* const cr = cp + (r % n) * d;
                       const T* const sr = sp + (r % n) * d;
                       T* const o = op + r * d;
                       for (int64_t i = 0; i < half; ++i) {
                         const T a = xr[i] * cr[i];
                         const T b = -xr[i + half] * sr[i];
                         o[i] = a + b;
                       }
                       for (int64_t i = half; i < d; ++i) {
                         const T a = xr[i] * cr[i];
                         const T b = xr[i - half] * sr[i];
                         o[i] = a + b;
                       }
                     }
                   });
  return out;
}

// x [rows, width] (unit last stride), w [width] contiguous, both of dtype T:
// w * (x * rsqrt(mean(x^2) + eps)), [rows, width] contiguous. The mean is summed in double.
template <typename T>
torch::Tensor RmsNormCpu(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  const int64_t rows = x.size(0), width = x.size(1), stride = x.stride(0);
  torch::Tensor out = torch::empty({rows, width}, x.options());
  const T* const xp = x.data_ptr<T>();
  const T* const wp = w.data_ptr<T>();
  T* const op = out.data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       const T* const xr = xp + r * stride;
                       T* const o = op + r * width;
                       double sum = 0;
                       for (int64_t i = 0; i < width; ++i) {
                         const T sq = xr[i] * xr[i];
                         sum += sq;
                       }
                       const T var = static_cast<T>(sum / static_cast<double>(width));
                       const T inv = T(1) / std::sqrt(var + static_cast<T>(eps));
                       for (int64_t i = 0; i < width; ++i) {
                         const T h = xr[i] * inv;
                         o[i] = wp[i] * h;
                       }
                     }
                   });
  return out;
}

// ApplyRopeCpu on contiguous x, written over x itself: the same operations element by element
// (each pair read before either is written), without a new tensor. A loop of its own: ApplyRopeCpu
// written as this pair loop with a separate output pointer (one function for both) made a CPU DBSA
// query's gather ~3 ms slower (20.1-20.7 -> 23.0-24.4 ms, demo store, dev VM), the compiler no
// longer vectorising the in-place case.
template <typename T>
void ApplyRopeCpuInPlace(torch::Tensor* x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t n = x->size(1), d = x->size(2), half = d / 2;
  T* const xp = x->data_ptr<T>();
  const T* const cp = cos.data_ptr<T>();
  const T* const sp = sin.data_ptr<T>();
  at::parallel_for(0, x->size(0) * n, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       T* const xr = xp + r * d;
                       const T* const cr = cp + (r % n) * d;
                       const T* const sr = sp + (r % n) * d;
                       for (int64_t i = 0; i < half; ++i) {
                         const T lo = xr[i], hi = xr[i + half];
                         const T a = lo * cr[i];
                         const T b = -hi * sr[i];
                         const T c = hi * cr[i + half];
                         const T e = lo * sr[i + half];
                         xr[i] = a + b;
                         xr[i + half] = c + e;
                       }
                     }
                   });
}

// Whether the CPU loops take x with these tables.
bool RopeLoopsApply(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                    bool loops) {
  return loops && CpuLoops(x) && x.dim() == 3 && x.stride(2) == 1 && cos.dim() == 2 &&
         cos.size(0) == x.size(1) && cos.size(1) == x.size(2) && x.size(2) % 2 == 0 &&
         cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() &&
         cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type();
}

// `loops`: the CPU loop where it applies (LoadOptions::layer_kernels), else libtorch operations.
torch::Tensor ApplyRope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        bool loops) {
  if (RopeLoopsApply(x, cos, sin, loops)) {
    return x.scalar_type() == torch::kFloat32 ? ApplyRopeCpu<float>(x, cos, sin)
                                              : ApplyRopeCpu<double>(x, cos, sin);
  }
  return x * cos + RotateHalf(x) * sin;
}

// Eager attention of query rows qg [kvh, R, hd] over the context keys (undefined: none) and N
// new keys, all K rotated. `bias` [R, C+N] in the score dtype is 0 where allowed and -inf
// elsewhere. Returns [kvh, R, hd] in q's dtype.
torch::Tensor EagerAttention(const torch::Tensor& qg, const torch::Tensor& ctx_k,
                             const torch::Tensor& ctx_v, const torch::Tensor& k,
                             const torch::Tensor& v, const torch::Tensor& bias, double scale) {
  const int64_t c = ctx_k.defined() ? ctx_k.size(1) : 0, n = k.size(1);
  torch::Tensor scores;  // [kvh, R, C+N] in the score dtype, scaled and masked
  if (qg.scalar_type() == bias.scalar_type()) {
    // float32/float64 models: scale and mask are applied by the GEMM itself (baddbmm), so the
    // scores are written once before the softmax instead of three times.
    scores = torch::baddbmm(bias.narrow(1, c, n), qg, k.transpose(1, 2), 1.0, scale);
    if (c > 0) {
      scores = torch::cat(
          {torch::baddbmm(bias.narrow(1, 0, c), qg, ctx_k.transpose(1, 2), 1.0, scale), scores},
          -1);
    }
  } else {
    // bfloat16/half: the products in the model dtype, the softmax in float32 (as HF).
    scores = torch::matmul(qg, k.transpose(1, 2));
    if (c > 0) scores = torch::cat({torch::matmul(qg, ctx_k.transpose(1, 2)), scores}, -1);
    scores = scores.to(bias.scalar_type()).mul_(scale).add_(bias);
  }
  torch::Tensor probs = torch::softmax(scores, -1).to(qg.scalar_type());
  torch::Tensor attn = torch::matmul(probs.narrow(-1, c, n), v);  // [kvh, R, hd]
  if (c > 0) attn = attn + torch::matmul(probs.narrow(-1, 0, c), ctx_v);
  return attn;
}

}  // namespace

torch::Tensor RopeInverseFrequencies(const ModelConfig& c) {
  const int64_t half = c.head_dim / 2;
  torch::Tensor inv = torch::empty({half}, torch::kFloat64);
  auto a = inv.accessor<double, 1>();
  const RopeScaling& r = c.rope_scaling;
  for (int64_t i = 0; i < half; ++i) {
    double f = std::pow(c.rope_theta, -2.0 * static_cast<double>(i) / c.head_dim);
    if (r.type == RopeScaling::Type::kLlama3) {
      // Llama 3.1: wavelengths longer than original_max / low_freq_factor are stretched by
      // `factor`; shorter than original_max / high_freq_factor are kept; in between, a linear
      // blend in original_max / wavelength.
      const double old_len = static_cast<double>(r.original_max_position_embeddings);
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > old_len / r.low_freq_factor) {
        f /= r.factor;
      } else if (wavelen >= old_len / r.high_freq_factor) {
        const double smooth =
            (old_len / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
        f = (1.0 - smooth) * f / r.factor + smooth * f;
      }
    }
    a[i] = f;
  }
  return inv;
}

Result<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& path,
                                                     const LoadOptions& options) {
  SHOTDB_ASSIGN_OR_RETURN(ModelWeights weights, LoadWeights(path, options));
  return FromWeights(std::move(weights), options.layer_kernels);
}

Result<std::unique_ptr<LlamaModel>> LlamaModel::FromWeights(ModelWeights weights,
                                                            bool layer_kernels) {
  const ModelConfig& c = weights.config;
  SHOTDB_RETURN_IF_ERROR(c.Validate());
  const auto expected = ExpectedWeightShapes(c);
  torch::Tensor first = weights.tensors.count("model.embed_tokens.weight")
                            ? weights.tensors.at("model.embed_tokens.weight")
                            : torch::Tensor();
  if (!first.defined()) {
    return Status::InvalidArgument("LlamaModel: tensor model.embed_tokens.weight is missing");
  }
  for (const auto& [name, shape] : expected) {
    auto it = weights.tensors.find(name);
    if (it == weights.tensors.end()) {
      return Status::InvalidArgument("LlamaModel: tensor " + name + " is missing");
    }
    const torch::Tensor& t = it->second;
    if (t.sizes().vec() != shape || t.device() != first.device() ||
        t.scalar_type() != first.scalar_type()) {
      return Status::InvalidArgument("LlamaModel: tensor " + name + " is " + SizesString(t) + " " +
                                     c10::toString(t.scalar_type()) + " on " + t.device().str() +
                                     "; expected the listed shape, dtype " +
                                     c10::toString(first.scalar_type()) + " and device " +
                                     first.device().str());
    }
  }
  if (!torch::isFloatingType(first.scalar_type())) {
    return Status::InvalidArgument("LlamaModel: weights must be floating point");
  }

  std::unique_ptr<LlamaModel> m(new LlamaModel());
  m->config_ = c;
  m->device_ = first.device();
  m->dtype_ = first.scalar_type();
  auto& w = weights.tensors;
  try {
    c10::InferenceMode guard;
    m->inv_freq_ = RopeInverseFrequencies(c);
    m->inv_freq_dev_ = m->inv_freq_.to(m->device_, AccumulationType(m->dtype_));
    m->embed_ = w.at("model.embed_tokens.weight");
    m->final_norm_ = w.at("model.norm.weight");
    m->lm_head_ = w.at("lm_head.weight");
    for (int64_t l = 0; l < c.num_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      Layer layer;
      layer.attn_norm = w.at(p + "input_layernorm.weight");
      // One matmul for q, k and v (and one for gate and up): fewer, larger GEMMs.
      layer.wqkv =
          torch::cat({w.at(p + "self_attn.q_proj.weight"), w.at(p + "self_attn.k_proj.weight"),
                      w.at(p + "self_attn.v_proj.weight")},
                     0);
      if (c.attention_bias) {
        layer.bqkv =
            torch::cat({w.at(p + "self_attn.q_proj.bias"), w.at(p + "self_attn.k_proj.bias"),
                        w.at(p + "self_attn.v_proj.bias")},
                       0);
      }
      layer.wo = w.at(p + "self_attn.o_proj.weight");
      layer.ffn_norm = w.at(p + "post_attention_layernorm.weight");
      layer.w_gate_up =
          torch::cat({w.at(p + "mlp.gate_proj.weight"), w.at(p + "mlp.up_proj.weight")}, 0);
      layer.w_down = w.at(p + "mlp.down_proj.weight");
      m->layers_.push_back(std::move(layer));
    }
    if (layer_kernels) m->kernels_ = LayerKernels::Create(c, m->device_, m->dtype_);
    m->cpu_loops_ = layer_kernels;
  } catch (const c10::Error& e) {
    return Status::IOError(std::string("LlamaModel: libtorch failed preparing weights: ") +
                           e.what_without_backtrace());
  }
  return m;
}

Status LlamaModel::Validate(const ForwardRequest& r) const {
  auto bad = [](const std::string& msg) { return Status::InvalidArgument("Forward: " + msg); };
  if (!r.tokens.defined() || r.tokens.dim() != 1 || r.tokens.size(0) < 1 ||
      r.tokens.scalar_type() != torch::kInt64) {
    return bad("tokens must be a non-empty 1-D int64 tensor");
  }
  const int64_t t = r.tokens.size(0);
  if (!r.positions.defined() || r.positions.dim() != 1 || r.positions.size(0) != t ||
      r.positions.scalar_type() != torch::kInt64) {
    return bad("positions must be a 1-D int64 tensor with one entry per token (" +
               std::to_string(t) + ")");
  }
  int64_t c = 0;
  const int64_t kvh = config_.num_kv_heads, hd = config_.head_dim;
  if (r.context != nullptr) {
    if (static_cast<int64_t>(r.context->size()) != config_.num_layers) {
      return bad("context has " + std::to_string(r.context->size()) + " layers, expected " +
                 std::to_string(config_.num_layers));
    }
    if (!r.context_positions.defined() || r.context_positions.dim() != 1 ||
        r.context_positions.scalar_type() != torch::kInt64) {
      return bad("context_positions must be a 1-D int64 tensor when context is given");
    }
    c = r.context_positions.size(0);
    for (size_t l = 0; l < r.context->size(); ++l) {
      const LayerKV& kv = (*r.context)[l];
      for (const torch::Tensor* x : {&kv.k, &kv.v}) {
        const char* which = x == &kv.k ? "k" : "v";
        if (!x->defined() || x->dim() != 3 || x->size(0) != kvh || x->size(1) != c ||
            x->size(2) != hd) {
          return bad("context layer " + std::to_string(l) + " " + which + " is " +
                     (x->defined() ? SizesString(*x) : "undefined") + ", expected [" +
                     std::to_string(kvh) + ", " + std::to_string(c) + ", " + std::to_string(hd) +
                     "] (C from context_positions)");
        }
        if (x->scalar_type() != dtype_ || x->device() != device_) {
          return bad("context layer " + std::to_string(l) + " " + which + " is " +
                     c10::toString(x->scalar_type()) + " on " + x->device().str() +
                     ", expected the model's " + c10::toString(dtype_) + " on " + device_.str());
        }
      }
    }
  } else if (r.context_positions.defined() && r.context_positions.numel() > 0) {
    return bad("context_positions given without context");
  }
  if (r.context_attention != nullptr) {
    if (r.context != nullptr) return bad("context and context_attention given together");
    c = r.context_attention->tokens();
    if (c < 1) return bad("context_attention has no tokens");
  }
  if (r.logit_rows.defined()) {
    if (r.logit_rows.dim() != 1 || r.logit_rows.scalar_type() != torch::kInt64 ||
        r.logit_rows.numel() == 0) {
      return bad("logit_rows must be a non-empty 1-D int64 tensor");
    }
    const torch::Tensor rows = r.logit_rows.cpu();
    if (rows.min().item<int64_t>() < 0 || rows.max().item<int64_t>() >= t) {
      return bad("logit_rows holds a row outside [0, " + std::to_string(t) + ")");
    }
  }
  if (r.mask.defined()) {
    // With context_attention the mask may leave out the context's columns.
    const int64_t cols =
        r.context_attention != nullptr && r.mask.dim() == 2 && r.mask.size(1) == t ? t : c + t;
    if (r.mask.dim() != 2 || r.mask.size(0) != t || r.mask.size(1) != cols ||
        r.mask.scalar_type() != torch::kBool) {
      return bad("mask is " + SizesString(r.mask) + " " + c10::toString(r.mask.scalar_type()) +
                 ", expected bool [" + std::to_string(t) + ", " + std::to_string(c + t) + "]" +
                 (r.context_attention != nullptr
                      ? " or [" + std::to_string(t) + ", " + std::to_string(t) + "]"
                      : std::string()));
    }
    if (!r.mask.any(1).all().item<bool>() && r.context_attention == nullptr) {
      return bad("mask has a row that allows no column (a query must attend to something)");
    }
    if (r.context_attention != nullptr && cols == c + t &&
        !r.mask.narrow(1, 0, c).all().item<bool>()) {
      return bad("mask hides a context column from a row; context_attention attends to all");
    }
  }
  return Status::OK();
}

torch::Tensor LlamaModel::RmsNorm(const torch::Tensor& x, const torch::Tensor& w) const {
  if (kernels_ != nullptr && x.dim() == 2 && x.stride(1) == 1) {
    return OrThrow(kernels_->RmsNorm(x, w));
  }
  if (cpu_loops_ && CpuLoops(x) && x.dim() == 2 && x.stride(1) == 1 && w.dim() == 1 &&
      w.is_contiguous() && w.size(0) == x.size(1) && w.scalar_type() == x.scalar_type() &&
      x.scalar_type() == dtype_) {
    return x.scalar_type() == torch::kFloat32 ? RmsNormCpu<float>(x, w, config_.rms_norm_eps)
                                              : RmsNormCpu<double>(x, w, config_.rms_norm_eps);
  }
  torch::Tensor h = x.to(AccumulationType(dtype_));
  h = h * torch::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + config_.rms_norm_eps);
  return w * h.to(dtype_);
}

std::pair<torch::Tensor, torch::Tensor> LlamaModel::RopeQk(const torch::Tensor& qkv,
                                                           const torch::Tensor& positions,
                                                           const torch::Tensor& cos,
                                                           const torch::Tensor& sin) const {
  const int64_t t = qkv.size(0), nh = config_.num_heads, kvh = config_.num_kv_heads;
  const int64_t hd = config_.head_dim;
  if (kernels_ != nullptr) return OrThrow(kernels_->RopeQk(qkv, positions));
  // Q and K rotated together (adjacent in qkv): one RoPE instead of two.
  const torch::Tensor qk =
      ApplyRope(qkv.narrow(1, 0, (nh + kvh) * hd).view({t, nh + kvh, hd}).transpose(0, 1), cos, sin,
                cpu_loops_);
  return {qk.narrow(0, 0, nh), qk.narrow(0, nh, kvh)};
}

torch::Tensor LlamaModel::SiluMul(const torch::Tensor& gate_up) const {
  if (kernels_ != nullptr) return OrThrow(kernels_->SiluMul(gate_up));
  auto halves = gate_up.chunk(2, -1);
  return torch::silu_(halves[0]).mul_(halves[1]);
}

std::pair<torch::Tensor, torch::Tensor> LlamaModel::RopeTables(
    const torch::Tensor& positions) const {
  torch::Tensor angles =
      torch::outer(positions.to(device_, inv_freq_dev_.scalar_type()), inv_freq_dev_);
  torch::Tensor emb = torch::cat({angles, angles}, -1);  // [N, head_dim], rotate-half layout
  return {emb.cos().to(dtype_), emb.sin().to(dtype_)};
}

torch::Tensor LlamaModel::Attend(const torch::Tensor& q, const torch::Tensor& ctx_k,
                                 const torch::Tensor& ctx_v, const torch::Tensor& k,
                                 const torch::Tensor& v, const torch::Tensor& allowed,
                                 const torch::Tensor& bias,
                                 const std::vector<RowChunk>& row_chunks) const {
  const int64_t nh = config_.num_heads, kvh = config_.num_kv_heads, hd = config_.head_dim;
  const int64_t group = nh / kvh, t = q.size(1);
  const int64_t c = ctx_k.defined() ? ctx_k.size(1) : 0;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
#if SHOTDB_HAVE_SDPA
  // Prefill on CUDA: the fused kernel never materialises the [heads, T, C+T] scores (the eager
  // path's float32 scores take several GB per layer for a 2048-token chunk over a long context).
  // Concatenating the context K/V and repeating its heads costs about 2 x group copies of it per
  // layer, which only pays off for many queries: the eager path writes and reads its float32
  // scores (T x group x C x 4 bytes per KV head) several times, more traffic than the copies from
  // roughly T = 64 on (kFusedMinTokens). Query head h reads K/V head h / group, as in the eager
  // path. Below that (decode, a query prompt, a label tree) the eager split reads the context once
  // without any copy: with the threshold at 16, the copies made a DBSA query's decode over 28k
  // context tokens 3-4x slower on the H100 (docs/results.md).
  if (!bias.defined()) {
    torch::Tensor keys = c > 0 ? torch::cat({ctx_k, k}, 1) : k;  // [kvh, C+T, hd]
    torch::Tensor values = c > 0 ? torch::cat({ctx_v, v}, 1) : v;
    if (group > 1) {
      keys = keys.repeat_interleave(group, 0);  // [nh, C+T, hd]
      values = values.repeat_interleave(group, 0);
    }
    // Bool attn_mask: true = may attend; [T, C+T] broadcasts over [1, nh, T, C+T].
    return at::scaled_dot_product_attention(q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                                            allowed, /*dropout_p=*/0.0,
                                            /*is_causal=*/false, scale)
        .squeeze(0);
  }
#else
  (void)allowed;  // only the fused path reads the bool mask
#endif
  // Eager grouped-query attention without repeating K/V: each KV head's query group is folded
  // into rows. The context and the new tokens are scored by separate matmuls and only the scores
  // are concatenated, so the context K/V (C can be ~100k tokens) is never copied.
  if (row_chunks.empty()) {
    return EagerAttention(q.reshape({kvh, group * t, hd}), ctx_k, ctx_v, k, v, bias, scale)
        .view({nh, t, hd});
  }
  torch::Tensor out = torch::empty_like(q);
  const torch::Tensor bias3 = bias.view({group, t, c + t});
  for (const RowChunk& rc : row_chunks) {
    const int64_t new_keys = rc.keys - c;
    torch::Tensor part =
        EagerAttention(q.narrow(1, rc.first_row, rc.rows).reshape({kvh, group * rc.rows, hd}),
                       ctx_k, ctx_v, k.narrow(1, 0, new_keys), v.narrow(1, 0, new_keys),
                       bias3.narrow(1, rc.first_row, rc.rows)
                           .narrow(2, 0, rc.keys)
                           .reshape({group * rc.rows, rc.keys}),
                       scale);
    out.narrow(1, rc.first_row, rc.rows).copy_(part.view({nh, rc.rows, hd}));
  }
  return out;
}

ForwardResult LlamaModel::Run(const ForwardRequest& r) const {
  const ModelConfig& cf = config_;
  const int64_t t = r.tokens.size(0);
  const ContextAttention* paged = r.context_attention;
  const int64_t c = r.context != nullptr ? r.context_positions.size(0)
                    : paged != nullptr   ? paged->tokens()
                                         : 0;
  const int64_t nh = cf.num_heads, kvh = cf.num_kv_heads, hd = cf.head_dim;
  const int64_t group = nh / kvh;
  const int64_t q_width = nh * hd, kv_width = kvh * hd;
  ForwardProfile unused;
  ForwardProfile& prof = r.profile != nullptr ? *r.profile : unused;
  PhaseClock clock(device_, r.profile != nullptr);

  ForwardResult result;
  torch::Tensor x = torch::embedding(embed_, r.tokens.to(device_));  // [T, H]
  clock.Charge(&prof.other_ms);

  // The new tokens' RoPE: positions on the device for the kernel, else cos/sin tables [T, hd].
  torch::Tensor positions, cos, sin;
  if (kernels_ != nullptr) {
    positions = r.positions.to(device_).contiguous();
  } else {
    std::tie(cos, sin) = RopeTables(r.positions);
  }
  torch::Tensor ctx_cos, ctx_sin;
  if (r.context != nullptr && c > 0 && !r.context_rotated) {
    std::tie(ctx_cos, ctx_sin) = RopeTables(r.context_positions);
  }

  torch::Tensor allowed = r.mask.defined() ? r.mask.to(device_) : torch::Tensor();
  if (!allowed.defined()) {
    auto opts = torch::TensorOptions().dtype(torch::kBool).device(device_);
    allowed = paged != nullptr  // the context's columns are implied
                  ? torch::ones({t, t}, opts).tril()
                  : torch::cat({torch::ones({t, c}, opts), torch::ones({t, t}, opts).tril()}, 1);
  }
  // Eager attention takes an additive mask [group*T, C+T] in the score dtype (0 where allowed, -inf
  // elsewhere); the fused kernel (see Attend) takes `allowed` itself and needs no bias.
  // It is repeated for the query heads of a group, which the eager path folds into rows. With a
  // ContextAttention it covers the new tokens' columns only.
  torch::Tensor bias, allowed_new;  // allowed_new: with a ContextAttention, [T, T]
  const bool fused =
      SHOTDB_HAVE_SDPA && device_.is_cuda() && t >= kFusedMinTokens && paged == nullptr;
  if (paged != nullptr) {
    allowed_new = (allowed.size(1) != t ? allowed.narrow(1, c, t) : allowed).contiguous();
  } else if (!fused) {
    bias = AdditiveMask(allowed, group, AccumulationType(dtype_));
  }
  // CPU prefill: query rows in chunks that skip the key columns no row of theirs may see (a
  // causal mask hides the upper triangle: about a third less attention work at 512 tokens).
  std::vector<RowChunk> row_chunks;
  if (!fused && paged == nullptr && device_.is_cpu() && t >= 2 * kRowChunk) {
    const torch::Tensor any_row = allowed.cpu();
    for (int64_t first = 0; first < t; first += kRowChunk) {
      const int64_t rows = std::min(kRowChunk, t - first);
      const torch::Tensor seen = any_row.narrow(0, first, rows).any(0).nonzero();
      const int64_t keys = std::max(seen.numel() > 0 ? seen.max().item<int64_t>() + 1 : 0, c + 1);
      row_chunks.push_back({first, rows, keys});
    }
  }
  clock.Charge(&prof.attention_ms);

  for (int64_t l = 0; l < cf.num_layers; ++l) {
    const Layer& L = layers_[l];
    torch::Tensor h = RmsNorm(x, L.attn_norm);
    torch::Tensor qkv =
        L.bqkv.defined() ? torch::addmm(L.bqkv, h, L.wqkv.t()) : torch::matmul(h, L.wqkv.t());
    // [T, heads*hd] -> [heads, T, hd]
    torch::Tensor k = qkv.narrow(1, q_width, kv_width).view({t, kvh, hd}).transpose(0, 1);
    torch::Tensor v =
        qkv.narrow(1, q_width + kv_width, kv_width).view({t, kvh, hd}).transpose(0, 1);
    if (r.return_kv) result.kv.push_back({k.contiguous(), v.contiguous()});
    double qkv_ms = 0, core_ms = 0, out_ms = 0;
    clock.Charge(&qkv_ms);

    const auto [q_rot, k_rot] = RopeQk(qkv, positions, cos, sin);
    torch::Tensor attn;  // [T, nh * hd]
    if (paged != nullptr) {
      attn = OrThrow(paged->Attend(l, q_rot.contiguous(), k_rot, v, allowed_new));
    } else {
      torch::Tensor ctx_k, ctx_v;
      if (c > 0) {
        const LayerKV& ctx = (*r.context)[l];
        ctx_k = r.context_rotated ? ctx.k : ApplyRope(ctx.k, ctx_cos, ctx_sin, cpu_loops_);
        ctx_v = ctx.v;
      }
      attn = Attend(q_rot, ctx_k, ctx_v, k_rot, v, allowed, bias, row_chunks)
                 .transpose(0, 1)
                 .reshape({t, q_width});
    }
    clock.Charge(&core_ms);
    x = torch::addmm(x, attn, L.wo.t());  // the residual added by the GEMM
    clock.Charge(&out_ms);
    prof.attention_ms += qkv_ms + core_ms + out_ms;
    prof.qkv_ms += qkv_ms;
    prof.core_ms += core_ms;

    h = RmsNorm(x, L.ffn_norm);
    x = torch::addmm(x, SiluMul(torch::matmul(h, L.w_gate_up.t())), L.w_down.t());
    clock.Charge(&prof.mlp_ms);
  }
  if (r.logit_rows.defined()) {
    x = x.index_select(0, r.logit_rows.to(device_));
  } else if (!r.all_logits) {
    x = x.narrow(0, t - 1, 1);
  }
  x = RmsNorm(x, final_norm_);
  result.logits = torch::matmul(x, lm_head_.t()).to(AccumulationType(dtype_));
  clock.Charge(&prof.other_ms);
  return result;
}

Result<ForwardResult> LlamaModel::Forward(const ForwardRequest& request) const {
  try {
    c10::InferenceMode guard;
    SHOTDB_RETURN_IF_ERROR(Validate(request));
    return Run(request);
  } catch (const KernelError& e) {
    return e.status;
  } catch (const c10::Error& e) {
    return Status::IOError(std::string("Forward: libtorch failed: ") + e.what_without_backtrace());
  }
}

Status LlamaModel::CheckKeys(const torch::Tensor& k, const torch::Tensor& positions) const {
  const int64_t kvh = config_.num_kv_heads, hd = config_.head_dim;
  if (!k.defined() || k.dim() != 3 || k.size(0) != kvh || k.size(2) != hd ||
      k.scalar_type() != dtype_ || k.device() != device_) {
    return Status::InvalidArgument(
        "RotateKeys: k is " +
        (k.defined()
             ? SizesString(k) + " " + c10::toString(k.scalar_type()) + " on " + k.device().str()
             : std::string("undefined")) +
        ", expected [" + std::to_string(kvh) + ", N, " + std::to_string(hd) + "] " +
        c10::toString(dtype_) + " on " + device_.str());
  }
  if (!positions.defined() || positions.dim() != 1 || positions.size(0) != k.size(1) ||
      positions.scalar_type() != torch::kInt64) {
    return Status::InvalidArgument("RotateKeys: positions must be a 1-D int64 tensor of " +
                                   std::to_string(k.size(1)) + " entries (one per key)");
  }
  return Status::OK();
}

Result<torch::Tensor> LlamaModel::RotateKeys(const torch::Tensor& k,
                                             const torch::Tensor& positions) const {
  std::vector<LayerKV> one = {{k, torch::Tensor()}};
  SHOTDB_RETURN_IF_ERROR(RotateLayerKeys(&one, positions));
  return one[0].k;
}

Status LlamaModel::RotateLayerKeys(std::vector<LayerKV>* kv, const torch::Tensor& positions,
                                   bool in_place) const {
  for (size_t l = 0; l < kv->size(); ++l) {
    const Status s = CheckKeys((*kv)[l].k, positions);
    if (!s.ok()) return kv->size() == 1 ? s : s.WithContext("layer " + std::to_string(l));
  }
  if (kv->empty()) return Status::OK();
  std::vector<torch::Tensor> rotated;
  try {
    c10::InferenceMode guard;
    auto [cos, sin] = RopeTables(positions);
    for (LayerKV& layer : *kv) {
      if (in_place && layer.k.is_contiguous() && RopeLoopsApply(layer.k, cos, sin, cpu_loops_)) {
        if (layer.k.scalar_type() == torch::kFloat32) {
          ApplyRopeCpuInPlace<float>(&layer.k, cos, sin);
        } else {
          ApplyRopeCpuInPlace<double>(&layer.k, cos, sin);
        }
        rotated.push_back(layer.k);
      } else {
        rotated.push_back(ApplyRope(layer.k, cos, sin, cpu_loops_));
      }
    }
  } catch (const c10::Error& e) {
    return Status::IOError(std::string("RotateKeys: libtorch failed: ") +
                           e.what_without_backtrace());
  }
  for (size_t l = 0; l < kv->size(); ++l) (*kv)[l].k = std::move(rotated[l]);
  return Status::OK();
}

}  // namespace shotdb
