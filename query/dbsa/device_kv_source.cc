// The device KvSource (kv_source.h): gpu::Stager + gpu::BlockPageCache, attention over the pages in
// place with gpu::LaunchPagedAttention. Built only with gpu/.
#include <chrono>
#include <map>
#include <memory>
#include <numeric>
#include <optional>

#include "gpu/cuda_util.h"
#include "gpu/merge_attention.h"
#include "gpu/paged_attention.h"
#include "gpu/rope_gather.h"
#include "gpu/stager.h"
#include "query/dbsa/kv_source.h"
#include "query/dbsa/kv_tensor.h"
#include "query/model/layer_kernels.h"  // KernelRope

namespace shotdb {

namespace {

// fp8 tasks are staged as bf16 pages: the dtype DBSA runs its GPU models in (an f16 model reads
// them through libtorch, converted).
constexpr DType kFp8Pages = DType::kBF16;

// The default (legacy) stream, where libtorch's kernels run unless a current stream is set
// (shotdb sets none): the kernels here go there too, so the model's kernels are ordered after
// them without a host wait.
const cudaStream_t kTorchStream = nullptr;

double MsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

// The attention form: one query's blocks among a staged batch's pages (pinned while any view of
// the batch lives), read in place.
class PagedContext final : public ContextAttention {
 public:
  // `index`: the query's blocks as positions in the batch's block order, in the query's order.
  PagedContext(std::shared_ptr<const gpu::StagedBatch> batch, std::vector<uint32_t> index,
               gpu::RopeParams rope, const ModelConfig& config)
      : batch_(std::move(batch)), index_(std::move(index)), rope_(rope), config_(config) {
    for (uint32_t i : index_) tokens_ += batch_->block_tokens[i];
  }

  ~PagedContext() override {
    // The pages go back to the cache when the batch dies; attention kernels may still read them,
    // and a deferred checksum verification may still read the records in the snapshot's map.
    cudaStreamSynchronize(kTorchStream);
    if (batch_->verified.valid()) batch_->verified.wait();
  }

  // The batch's deferred checksum verification (Stager::Options::defer_verification).
  static std::function<Status()> Verified(const std::shared_ptr<const gpu::StagedBatch>& batch) {
    if (!batch->verified.valid()) return {};
    return [batch]() -> Status { return batch->verified.get(); };
  }

  int64_t tokens() const override { return static_cast<int64_t>(tokens_); }

  Result<torch::Tensor> Attend(int64_t layer, const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v,
                               const torch::Tensor& allowed) const override {
    if (!q.is_contiguous() || k.stride(2) != 1 || v.stride(2) != 1 || !allowed.is_contiguous() ||
        allowed.scalar_type() != torch::kBool) {
      return Status::InvalidArgument(
          "PagedContext: q and allowed (bool) must be contiguous, k and v contiguous per row");
    }
    const gpu::StagedLayer& staged = batch_->layers.at(static_cast<size_t>(layer));
    SHOTDB_RETURN_IF_ERROR(staged.ready.WaitOn(kTorchStream));  // this layer's copies
    const int64_t heads = q.size(0), rows = q.size(1), dim = q.size(2);
    const auto f32 = torch::TensorOptions().dtype(torch::kFloat32).device(q.device());
    const torch::Tensor ctx_out = torch::empty({heads, rows, dim}, f32);
    const torch::Tensor ctx_lse = torch::empty({heads, rows}, f32);
    gpu::PagedAttentionArgs args;
    args.dtype = batch_->dtype;
    args.q_heads = static_cast<uint32_t>(heads);
    args.kv_heads = static_cast<uint32_t>(config_.num_kv_heads);
    args.head_dim = static_cast<uint32_t>(dim);
    args.rows = static_cast<uint32_t>(rows);
    args.q = q.data_ptr();
    args.blocks.reserve(index_.size());
    for (uint32_t i : index_) args.blocks.push_back(staged.blocks[i]);
    args.rotate_keys = true;
    args.rope = rope_;
    args.first_position = 0;
    args.out = ctx_out.data_ptr<float>();
    args.lse = ctx_lse.data_ptr<float>();
    const size_t bytes = gpu::PagedAttentionWorkspaceBytes(args.q_heads, args.kv_heads, args.rows,
                                                           args.head_dim, tokens_);
    if (bytes > 0 && workspace_.numel() < static_cast<int64_t>(bytes)) {
      workspace_ = torch::empty({static_cast<int64_t>(bytes)},
                                torch::TensorOptions().dtype(torch::kUInt8).device(q.device()));
    }
    args.workspace = bytes > 0 ? workspace_.data_ptr() : nullptr;
    args.workspace_bytes = bytes;
    SHOTDB_RETURN_IF_ERROR(gpu::LaunchPagedAttention(args, kTorchStream));

    // The new tokens among themselves, merged with the context's result, in one kernel.
    torch::Tensor out = torch::empty({rows, heads * dim}, q.options());
    gpu::MergeAttentionArgs m;
    m.dtype = batch_->dtype;
    m.q_heads = args.q_heads;
    m.kv_heads = args.kv_heads;
    m.head_dim = args.head_dim;
    m.rows = args.rows;
    m.q = q.data_ptr();
    m.q_head_stride = q.stride(0);
    m.q_row_stride = q.stride(1);
    m.k = k.data_ptr();
    m.k_head_stride = k.stride(0);
    m.k_row_stride = k.stride(1);
    m.v = v.data_ptr();
    m.v_head_stride = v.stride(0);
    m.v_row_stride = v.stride(1);
    m.mask = static_cast<const uint8_t*>(allowed.data_ptr());  // bool: one byte each
    m.ctx_out = ctx_out.data_ptr<float>();
    m.ctx_lse = ctx_lse.data_ptr<float>();
    m.out = out.data_ptr();
    SHOTDB_RETURN_IF_ERROR(gpu::LaunchMergeAttention(m, kTorchStream));
    return out;
  }

 private:
  std::shared_ptr<const gpu::StagedBatch> batch_;
  std::vector<uint32_t> index_;
  uint64_t tokens_ = 0;
  gpu::RopeParams rope_;
  ModelConfig config_;
  mutable torch::Tensor workspace_;  // reused across layers (stream-ordered on kTorchStream)
};

class DeviceKvSource final : public KvSource {
 public:
  DeviceKvSource(int device, std::unique_ptr<gpu::Stager> stager,
                 std::unique_ptr<gpu::BlockPageCache> cache)
      : device_(device), stager_(std::move(stager)), cache_(std::move(cache)) {}

  ~DeviceKvSource() override {
    stager_->WaitPending();  // a deferred verification invalidates pages in the cache
    cache_.reset();          // its pages are freed on the stager's stream
    stager_.reset();
  }

  Result<QueryContext> Load(Snapshot* snapshot, const TaskInfo& task,
                            const std::vector<uint32_t>& blocks, const LlamaModel& model,
                            bool want_tensors, double* load_ms, double* gather_ms) override {
    auto start = std::chrono::steady_clock::now();
    SHOTDB_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    const ModelConfig& config = model.config();
    const uint32_t num_layers = task.model.num_layers;
    std::vector<uint32_t> layers(num_layers);
    std::iota(layers.begin(), layers.end(), 0u);
    const int64_t heads = task.model.kv_heads, dim = task.model.head_dim;
    const std::optional<gpu::RopeParams> rope = KernelRope(config);
    const bool paged = rope.has_value() && Paged(task, model, blocks.size(), want_tensors);
    const bool gather = rope.has_value() && KernelDType(task, model) && !paged &&
                        blocks.size() <= gpu::kMaxKernelBlocks && dim % 4 == 0 &&
                        dim <= gpu::kMaxKernelHeadDim;
    const auto options = torch::TensorOptions().dtype(model.dtype()).device(model.device());

    QueryContext context;
    context.rotated = gather;
    gpu::Stager::LayerCallback gather_layer;
    if (gather) {
      // As each layer's pages arrive, copy them into the context tensors, rotating K.
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
        args.dtype = PageDType(task);
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
    *load_ms = MsSince(start);
    start = std::chrono::steady_clock::now();
    context.tokens = staged->total_tokens;
    if (paged) {
      std::vector<uint32_t> index(blocks.size());
      std::iota(index.begin(), index.end(), 0u);
      auto batch = std::make_shared<const gpu::StagedBatch>(std::move(staged).value());
      context.verified = PagedContext::Verified(batch);
      context.attention =
          std::make_unique<PagedContext>(std::move(batch), std::move(index), *rope, config);
      *gather_ms = MsSince(start);
      return context;
    }
    // The tensors outlive this call's knowledge of the batch: verified before they are returned.
    if (staged->verified.valid()) {
      const Status verified = staged->verified.get();
      if (!verified.ok()) {
        torch::cuda::synchronize();  // gathers may still read the pages
        return verified;
      }
    }
    if (!gather) {
      // libtorch's kernels run on its own stream: let the copies finish first.
      SHOTDB_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stager_->stream()));
      const gpu::StagedBatch& batch = *staged;
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
    if (!want_tensors) SHOTDB_RETURN_IF_ERROR(ToAttentionForm(model, &context));
    *gather_ms = MsSince(start);
    return context;
  }

  Result<std::vector<QueryContext>> LoadBatch(Snapshot* snapshot, const TaskInfo& task,
                                              const std::vector<std::vector<uint32_t>>& blocks,
                                              const LlamaModel& model, double* load_ms,
                                              double* gather_ms) override {
    // The union of the queries' blocks, staged once; each query views its own.
    std::vector<uint32_t> all;
    std::map<uint32_t, uint32_t> position;  // block -> position in `all`
    for (const std::vector<uint32_t>& query : blocks) {
      for (uint32_t b : query) {
        if (position.emplace(b, static_cast<uint32_t>(all.size())).second) all.push_back(b);
      }
    }
    const ModelConfig& config = model.config();
    const std::optional<gpu::RopeParams> rope = KernelRope(config);
    if (!Paged(task, model, all.size(), /*want_tensors=*/false) || !rope) {
      // Not for the kernels: each query on its own (TensorContextAttention over its tensors).
      return KvSource::LoadBatch(snapshot, task, blocks, model, load_ms, gather_ms);
    }
    auto start = std::chrono::steady_clock::now();
    SHOTDB_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    std::vector<uint32_t> layers(task.model.num_layers);
    std::iota(layers.begin(), layers.end(), 0u);
    Result<gpu::StagedBatch> staged =
        stager_->StageLayers(snapshot, task.name, all, layers, cache_.get());
    if (!staged.ok()) return staged.status();
    auto batch = std::make_shared<const gpu::StagedBatch>(std::move(staged).value());
    *load_ms = MsSince(start);
    std::vector<QueryContext> contexts;
    for (const std::vector<uint32_t>& query : blocks) {
      std::vector<uint32_t> index;
      for (uint32_t b : query) index.push_back(position.at(b));
      QueryContext c;
      c.verified = PagedContext::Verified(batch);
      c.attention = std::make_unique<PagedContext>(batch, std::move(index), *rope, config);
      c.tokens = static_cast<uint64_t>(c.attention->tokens());
      contexts.push_back(std::move(c));
    }
    *gather_ms = 0;
    return contexts;
  }

  Stats stats() const override {
    const gpu::BlockPageCache::Stats s = cache_->stats();
    Stats out;
    out.hits = s.hits;
    out.misses = s.misses;
    out.evictions = s.evictions;
    out.bytes_loaded = stager_->stats().bytes_copied;
    out.copies = stager_->stats().copies;
    out.bytes_resident = s.bytes_in_use;
    out.stage_ms = stager_->stats().stage_ms;
    out.pin_ms = stager_->stats().pin_ms;
    return out;
  }

  void Clear() override { cache_->Clear(); }

 private:
  // The model computes in the pages' dtype (the stored one, or bf16 for fp8 tasks), one the
  // kernels take.
  static bool KernelDType(const TaskInfo& task, const LlamaModel& model) {
    const DType pages = PageDType(task);
    return model.dtype() == TorchType(pages) && (pages == DType::kBF16 || pages == DType::kF16);
  }
  static DType PageDType(const TaskInfo& task) {
    return task.model.dtype == DType::kF8E4M3 ? kFp8Pages : task.model.dtype;
  }
  // The attention form applies: LaunchPagedAttention takes these shapes (RoPE checked apart).
  static bool Paged(const TaskInfo& task, const LlamaModel& model, size_t blocks,
                    bool want_tensors) {
    const ModelConfig& c = model.config();
    const int64_t group = c.num_heads / c.num_kv_heads;
    return !want_tensors && KernelDType(task, model) && blocks <= gpu::kMaxKernelBlocks &&
           (c.head_dim == 64 || c.head_dim == 128) &&
           group <= static_cast<int64_t>(gpu::kMaxPagedAttentionGroup);
  }

  int device_;
  std::unique_ptr<gpu::Stager> stager_;
  std::unique_ptr<gpu::BlockPageCache> cache_;
};

}  // namespace

bool DeviceKvSourceAvailable() { return true; }

Result<std::unique_ptr<KvSource>> MakeDeviceKvSource(size_t cache_bytes, int device_index) {
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_index));
  gpu::Stager::Options options;
  options.threads = 16;  // reading the map into pinned slabs is the bottleneck (docs/gpu.md)
  // Any stored dtype: the kernels take bf16/f16, the others are concatenated by libtorch.
  options.kernel_dtypes_only = false;
  options.fp8_pages = kFp8Pages;
  // Checksums verified while the copies and the forward run; DbsaSession waits for
  // QueryContext::verified before it answers.
  options.defer_verification = true;
  SHOTDB_ASSIGN_OR_RETURN(std::unique_ptr<gpu::Stager> stager, gpu::Stager::Create(options));
  SHOTDB_ASSIGN_OR_RETURN(std::unique_ptr<gpu::BlockPageCache> cache,
                          stager->CreateCache(cache_bytes));
  return std::unique_ptr<KvSource>(
      new DeviceKvSource(device_index, std::move(stager), std::move(cache)));
}

}  // namespace shotdb
