#include "query/dbsa/staged_kv_source.h"

#include <chrono>
#include <numeric>
#include <optional>

#include "gpu/cuda_util.h"
#include "gpu/rope_gather.h"
#include "gpu/stager.h"
#include "query/dbsa/kv_tensor.h"

namespace shotdb {

namespace {

// The default (legacy) stream, where libtorch's kernels run unless a current stream is set.
const cudaStream_t kTorchStream = nullptr;

double MsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

// The model's RoPE in the kernel's terms; nullopt for a scaling the kernel does not implement.
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

class StagerKvSource final : public StagedKvSource {
 public:
  StagerKvSource(int device, std::unique_ptr<gpu::Stager> stager,
                 std::unique_ptr<gpu::BlockPageCache> cache)
      : device_(device), stager_(std::move(stager)), cache_(std::move(cache)) {}

  ~StagerKvSource() override {
    cache_.reset();  // its pages are freed on the stager's stream
    stager_.reset();
  }

  Result<StagedContext> Gather(Snapshot* snapshot, const TaskInfo& task,
                               const std::vector<uint32_t>& blocks, const ModelConfig& config,
                               const torch::TensorOptions& options, double* load_ms,
                               double* gather_ms) override {
    auto start = std::chrono::steady_clock::now();
    SHOTDB_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    const uint32_t num_layers = task.model.num_layers;
    std::vector<uint32_t> layers(num_layers);
    std::iota(layers.begin(), layers.end(), 0u);
    const int64_t heads = task.model.kv_heads, dim = task.model.head_dim;
    const std::optional<gpu::RopeParams> rope = KernelRope(config);
    StagedContext context;
    context.rotated = rope.has_value() && options.dtype() == TorchType(task.model.dtype) &&
                      blocks.size() <= gpu::kMaxKernelBlocks && dim % 4 == 0 &&
                      dim <= gpu::kMaxKernelHeadDim;

    gpu::Stager::LayerCallback gather_layer;
    if (context.rotated) {
      // libtorch runs its kernels on the device's default stream (shotdb sets no other current
      // stream): the gather goes there too, after the layer's copies, so later model kernels are
      // ordered after it without a host wait.
      gather_layer = [&](size_t index, const gpu::StagedLayer& layer) -> Status {
        if (context.kv.empty()) {  // the first layer: the Stager has read the blocks' lengths
          int64_t total = 0;
          for (const gpu::KvBlockRef& b : layer.blocks) total += b.tokens;
          for (uint32_t l = 0; l < num_layers; ++l) {
            context.kv.push_back({torch::empty({heads, total, dim}, options),
                                  torch::empty({heads, total, dim}, options)});
          }
        }
        SHOTDB_RETURN_IF_ERROR(layer.ready.WaitOn(kTorchStream));
        gpu::GatherRopeArgs args;
        args.dtype = task.model.dtype;
        args.kv_heads = static_cast<uint32_t>(heads);
        args.head_dim = static_cast<uint32_t>(dim);
        args.blocks = layer.blocks;
        args.rope = *rope;
        args.first_position = 0;
        args.k_out = context.kv[index].k.data_ptr();
        args.v_out = context.kv[index].v.data_ptr();
        return gpu::LaunchGatherRope(args, kTorchStream);
      };
    }
    Result<gpu::StagedBatch> staged =
        stager_->StageLayers(snapshot, task.name, blocks, layers, cache_.get(), gather_layer);
    if (!staged.ok()) {
      // Gathers of the layers before the failure may still read their pages.
      torch::cuda::synchronize();
      return staged.status();
    }
    const gpu::StagedBatch& batch = *staged;
    *load_ms = MsSince(start);

    start = std::chrono::steady_clock::now();
    if (!context.rotated) {
      // libtorch's kernels run on its own stream: let the copies finish first.
      SHOTDB_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stager_->stream()));
      const auto stored =
          torch::TensorOptions().dtype(TorchType(batch.dtype)).device(torch::kCUDA, device_);
      const std::vector<int64_t> lengths(batch.block_tokens.begin(), batch.block_tokens.end());
      context.kv = ConcatenateBlocks(
          num_layers, heads, dim, lengths, options, [&](size_t i, uint32_t l, int kv) {
            const gpu::KvBlockRef& ref = batch.layers[l].blocks[i];
            return torch::from_blob(const_cast<void*>(kv == 0 ? ref.k : ref.v),
                                    {heads, lengths[i], dim}, stored);
          });
    }
    // The batch unpins its pages when it goes out of scope; the reads above must be done by then.
    torch::cuda::synchronize();
    *gather_ms = MsSince(start);
    return context;
  }

  BlockCache::Stats stats() const override {
    const gpu::BlockPageCache::Stats s = cache_->stats();
    BlockCache::Stats out;
    out.hits = s.hits;
    out.misses = s.misses;
    out.evictions = s.evictions;
    out.bytes_loaded = stager_->stats().bytes_copied;
    out.bytes_resident = s.bytes_in_use;
    return out;
  }

  void Clear() override { cache_->Clear(); }

 private:
  int device_;
  std::unique_ptr<gpu::Stager> stager_;
  std::unique_ptr<gpu::BlockPageCache> cache_;
};

}  // namespace

bool StagedKvSourceSupports(DType dtype) { return dtype == DType::kBF16 || dtype == DType::kF16; }

Result<std::unique_ptr<StagedKvSource>> MakeStagedKvSource(size_t cache_bytes, int device_index) {
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_index));
  gpu::Stager::Options options;
  options.threads = 16;  // reading the map into pinned slabs is the bottleneck (docs/gpu.md)
  SHOTDB_ASSIGN_OR_RETURN(std::unique_ptr<gpu::Stager> stager, gpu::Stager::Create(options));
  SHOTDB_ASSIGN_OR_RETURN(std::unique_ptr<gpu::BlockPageCache> cache,
                          stager->CreateCache(cache_bytes));
  return std::unique_ptr<StagedKvSource>(
      new StagerKvSource(device_index, std::move(stager), std::move(cache)));
}

}  // namespace shotdb
