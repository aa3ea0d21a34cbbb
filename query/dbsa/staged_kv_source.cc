#include "query/dbsa/staged_kv_source.h"

#include <chrono>
#include <numeric>

#include "gpu/cuda_util.h"
#include "gpu/stager.h"
#include "query/dbsa/kv_tensor.h"

namespace shotdb {

namespace {

double MsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
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

  Result<std::vector<LayerKV>> Gather(Snapshot* snapshot, const TaskInfo& task,
                                      const std::vector<uint32_t>& blocks,
                                      const torch::TensorOptions& options, double* load_ms,
                                      double* gather_ms) override {
    auto start = std::chrono::steady_clock::now();
    SHOTDB_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    std::vector<uint32_t> layers(task.model.num_layers);
    std::iota(layers.begin(), layers.end(), 0u);
    SHOTDB_ASSIGN_OR_RETURN(
        gpu::StagedBatch batch,
        stager_->StageLayers(snapshot, task.name, blocks, layers, cache_.get()));
    // libtorch's kernels run on its own stream: let the copies finish first.
    SHOTDB_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stager_->stream()));
    *load_ms = MsSince(start);

    start = std::chrono::steady_clock::now();
    const int64_t heads = batch.kv_heads, dim = batch.head_dim;
    const auto stored =
        torch::TensorOptions().dtype(TorchType(batch.dtype)).device(torch::kCUDA, device_);
    const std::vector<int64_t> lengths(batch.block_tokens.begin(), batch.block_tokens.end());
    std::vector<LayerKV> context = ConcatenateBlocks(
        task.model.num_layers, heads, dim, lengths, options, [&](size_t i, uint32_t l, int kv) {
          const gpu::KvBlockRef& ref = batch.layers[l].blocks[i];
          return torch::from_blob(const_cast<void*>(kv == 0 ? ref.k : ref.v),
                                  {heads, lengths[i], dim}, stored);
        });
    // The batch unpins its pages when it goes out of scope; the copies above must be done by then.
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
