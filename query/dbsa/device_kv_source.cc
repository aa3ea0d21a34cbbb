// The device KvSource (kv_source.h): gpu::Stager + gpu::BlockPageCache, attention over the pages in
// place with gpu::LaunchPagedAttention. Built only with gpu/.
#include <chrono>
#include <condition_variable>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <thread>

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

// Tasks of a scaled dtype (fp8, int8) are staged as bf16 pages: the dtype DBSA runs its GPU models
// in (an f16 model reads them through libtorch, converted).
constexpr DType kScaledPages = DType::kBF16;

// The default (legacy) stream, where libtorch's kernels run unless a current stream is set
// (shotdb sets none): the kernels here go there too, so the model's kernels are ordered after
// them without a host wait.
const cudaStream_t kTorchStream = nullptr;

double MsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

// One Stager::StageLayers call on a thread of its own, so that the caller's forward launches
// layer l's attention as soon as layer l's pages are pinned and its copies enqueued, not after the
// last layer's. What the Stager does on the host then overlaps the forward's earlier layers on the
// GPU: a hot query's pinning (9,600 pages for 95k tokens, 0.9-1.8 ms on the H200's host, run Q in
// docs/results.md), and a cold query's reading and enqueueing of its later layer groups. The same
// thread releases the pins once the last view of the pages is gone (Release), off the query's
// path: releasing 9,600 pins takes 0.4-0.8 ms.
//
// Until WaitStaged returns, the Stager and the snapshot are the staging thread's alone; until the
// object is destroyed (which waits for the release) the cache may still see its unpinning (the
// cache is thread-safe, but a cache whose budget is nearly all pinned could refuse a new page).
// The owner (DeviceKvSource) destroys the last query's staging before it stages the next.
class AsyncStaging {
 public:
  // Starts staging every one of `num_layers` layers of `blocks` and returns once layer 0 is
  // enqueued (the blocks' token counts are then known), or staging's error.
  static Result<std::shared_ptr<AsyncStaging>> Start(int device, gpu::Stager* stager,
                                                     gpu::BlockPageCache* cache, Snapshot* snapshot,
                                                     const std::string& task,
                                                     std::vector<uint32_t> blocks,
                                                     uint32_t num_layers) {
    std::shared_ptr<AsyncStaging> s(new AsyncStaging(num_layers, stager->stream()));
    AsyncStaging* self = s.get();
    const auto created = std::chrono::steady_clock::now();
    self->thread_ = std::thread(
        [self, device, stager, cache, snapshot, task, blocks = std::move(blocks), created] {
          self->thread_start_ms_ = MsSince(created);  // read after the first Publish (mu_)
          self->Run(device, stager, cache, snapshot, task, blocks);
        });
    std::unique_lock<std::mutex> lock(self->mu_);
    self->cv_.wait(lock, [self] { return self->published_ > 0 || self->done_; });
    if (self->published_ == 0) {  // `s` goes: the thread is joined
      if (self->status_.ok()) return Status::InvalidArgument("AsyncStaging: no layer to stage");
      return self->status_;
    }
    return s;
  }

  // Releases the pins now if no view did, and joins the thread (which first waits for the
  // deferred checksum verification: it reads the records in the snapshot's map).
  ~AsyncStaging() {
    Release();
    thread_.join();
  }
  AsyncStaging(const AsyncStaging&) = delete;
  AsyncStaging& operator=(const AsyncStaging&) = delete;

  // Waits (on the host) until layer `index` is enqueued, then makes `stream` wait (on the device)
  // for its copies. Its blocks' page refs, or staging's error.
  Result<const std::vector<gpu::KvBlockRef>*> WaitLayer(size_t index, cudaStream_t stream) {
    if (index >= layers_.size()) {
      return Status::InvalidArgument("AsyncStaging: layer " + std::to_string(index) + " of " +
                                     std::to_string(layers_.size()));
    }
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return published_ > index || done_; });
    if (published_ <= index) return status_;  // done_ without this layer: staging failed
    const Layer& layer = layers_[index];
    SHOTDB_RETURN_IF_ERROR(layer.ready.WaitOn(stream));
    return &layer.blocks;
  }

  // Host milliseconds from Start to the staging thread's first step. Valid once Start returned.
  double thread_start_ms() const { return thread_start_ms_; }

  // Waits until the thread's StageLayers has returned: its status.
  Status WaitStaged() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return done_; });
    return status_;
  }

  // WaitStaged, then the deferred checksum verification (Stager::Options::defer_verification).
  Status Verified() {
    SHOTDB_RETURN_IF_ERROR(WaitStaged());
    return verified_.valid() ? verified_.get() : Status::OK();
  }

  // Views: the pins are released when the last view is dropped. Dropped after every kernel
  // reading the pages has finished; or, `in_stream_order`, once they are all enqueued on
  // `consumer` (the last view then orders the Stager's stream after them: the page memory is only
  // ever rewritten on that stream, by later copies or the cache's stream-ordered frees).
  void AddView() {
    std::lock_guard<std::mutex> lock(mu_);
    ++views_;
  }
  void DropView(bool in_stream_order, cudaStream_t consumer) {
    std::lock_guard<std::mutex> lock(mu_);
    if (--views_ > 0) return;
    if (in_stream_order) {
      Result<gpu::CudaEvent> read = gpu::CudaEvent::Create();
      Status s = read.ok() ? read->Record(consumer) : read.status();
      if (s.ok()) s = read->WaitOn(stager_stream_);
      // Without the device-side order, hold the pages until the reads have finished.
      if (!s.ok()) cudaStreamSynchronize(consumer);
    }
    released_ = true;
    cv_.notify_all();
  }

  // Per requested block; set before Start returns.
  const std::vector<uint32_t>& block_tokens() const { return block_tokens_; }

 private:
  struct Layer {
    std::vector<gpu::KvBlockRef> blocks;
    gpu::CudaEvent ready;  // empty: the pages were ready when the layer was staged
  };
  AsyncStaging(uint32_t num_layers, cudaStream_t stager_stream)
      : layers_(num_layers), stager_stream_(stager_stream) {}

  void Release() {
    std::lock_guard<std::mutex> lock(mu_);
    released_ = true;
    cv_.notify_all();
  }

  // The thread: stages, then holds the pins until released.
  void Run(int device, gpu::Stager* stager, gpu::BlockPageCache* cache, Snapshot* snapshot,
           const std::string& task, const std::vector<uint32_t>& blocks) {
    std::vector<uint32_t> layers(layers_.size());
    std::iota(layers.begin(), layers.end(), 0u);
    auto stage = [&]() -> Result<gpu::StagedBatch> {
      SHOTDB_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));  // the device is per host thread
      return stager->StageLayers(snapshot, task, blocks, layers, cache,
                                 [this, stager](size_t index, const gpu::StagedLayer& layer) {
                                   return Publish(index, layer, stager->stream());
                                 });
    };
    Result<gpu::StagedBatch> staged = stage();
    std::optional<gpu::StagedBatch> batch;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (staged.ok()) {
        verified_ = staged->verified;
        batch.emplace(std::move(staged).value());
      } else {
        status_ = staged.status();
      }
      done_ = true;
      cv_.notify_all();
      cv_.wait(lock, [this] { return released_; });
    }
    if (verified_.valid()) verified_.wait();
    batch.reset();  // unpins, block by block
  }

  // The Stager's layer callback, on the staging thread. The layer's own event belongs to the
  // batch being built (destroyed with it if staging fails); a second event, recorded right after
  // it on the same stream, captures the same copies and lives here.
  Status Publish(size_t index, const gpu::StagedLayer& staged, cudaStream_t stager_stream) {
    Layer layer;
    layer.blocks = staged.blocks;
    if (staged.ready.get() != nullptr) {
      SHOTDB_ASSIGN_OR_RETURN(layer.ready, gpu::CudaEvent::Create());
      SHOTDB_RETURN_IF_ERROR(layer.ready.Record(stager_stream));
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (index == 0) {
      for (const gpu::KvBlockRef& b : layer.blocks) block_tokens_.push_back(b.tokens);
    }
    layers_[index] = std::move(layer);
    published_ = index + 1;  // the Stager calls back in request order
    cv_.notify_all();
    return Status::OK();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Layer> layers_;  // [0, published_) filled
  const cudaStream_t stager_stream_;
  size_t published_ = 0;
  bool done_ = false;                    // the thread's StageLayers returned
  Status status_;                        // its error
  std::shared_future<Status> verified_;  // its deferred verification
  std::vector<uint32_t> block_tokens_;
  int views_ = 0;
  bool released_ = false;
  double thread_start_ms_ = 0;
  std::thread thread_;
};

Result<torch::Tensor> MergeNewTokens(DType dtype, uint32_t kv_heads, const torch::Tensor& q,
                                     const torch::Tensor& k, const torch::Tensor& v,
                                     const torch::Tensor& allowed, const torch::Tensor& ctx_out,
                                     const torch::Tensor& ctx_lse);

// A kernel workspace of `bytes` on `device` (nullptr for 0), grown in `*ws` and reused across
// layers (stream-ordered on kTorchStream).
void* Workspace(torch::Tensor* ws, size_t bytes, const torch::Device& device) {
  if (bytes == 0) return nullptr;
  if (ws->numel() < static_cast<int64_t>(bytes)) {
    *ws = torch::empty({static_cast<int64_t>(bytes)},
                       torch::TensorOptions().dtype(torch::kUInt8).device(device));
  }
  return ws->data_ptr();
}

// The attention form: one query's blocks among a staged batch's pages (pinned while any view of
// the batch lives), read in place, each layer as soon as the staging thread has enqueued it.
class PagedContext final : public ContextAttention {
 public:
  // `index`: the query's blocks as positions in the staged block order, in the query's order.
  PagedContext(std::shared_ptr<AsyncStaging> staging, std::vector<uint32_t> index, DType dtype,
               gpu::RopeParams rope, const ModelConfig& config)
      : staging_(std::move(staging)),
        index_(std::move(index)),
        dtype_(dtype),
        rope_(rope),
        config_(config) {
    for (uint32_t i : index_) tokens_ += staging_->block_tokens()[i];
    staging_->AddView();
  }

  ~PagedContext() override {
    if (!released_) {
      // The pages go back to the cache once the last view is dropped: attention kernels may
      // still read them.
      cudaStreamSynchronize(kTorchStream);
      staging_->DropView(/*in_stream_order=*/false, kTorchStream);
    }
    // Staging and the deferred checksum verification read the snapshot's map, which may close
    // when this returns (done by now unless the forward failed).
    staging_->Verified();
  }

  // QueryContext::release: no Attend follows, and the attention is enqueued on kTorchStream.
  void Release() {
    if (released_) return;
    released_ = true;
    staging_->DropView(/*in_stream_order=*/true, kTorchStream);
  }

  static std::function<Status()> Verified(const std::shared_ptr<AsyncStaging>& staging) {
    return [staging]() -> Status { return staging->Verified(); };
  }

  int64_t tokens() const override { return static_cast<int64_t>(tokens_); }

  Result<torch::Tensor> Attend(int64_t layer, const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v,
                               const torch::Tensor& allowed) const override {
    if (!q.is_contiguous() || k.stride(2) != 1 || v.stride(2) != 1 || !allowed.is_contiguous() ||
        allowed.scalar_type() != torch::kBool || layer < 0) {
      return Status::InvalidArgument(
          "PagedContext: q and allowed (bool) must be contiguous, k and v contiguous per row");
    }
    if (released_) {
      return Status::FailedPrecondition("PagedContext: Attend after the pages were released");
    }
    SHOTDB_ASSIGN_OR_RETURN(const std::vector<gpu::KvBlockRef>* refs,
                            staging_->WaitLayer(static_cast<size_t>(layer), kTorchStream));
    const int64_t heads = q.size(0), rows = q.size(1), dim = q.size(2);
    const auto f32 = torch::TensorOptions().dtype(torch::kFloat32).device(q.device());
    const torch::Tensor ctx_out = torch::empty({heads, rows, dim}, f32);
    const torch::Tensor ctx_lse = torch::empty({heads, rows}, f32);
    gpu::PagedAttentionArgs args;
    args.dtype = dtype_;
    args.q_heads = static_cast<uint32_t>(heads);
    args.kv_heads = static_cast<uint32_t>(config_.num_kv_heads);
    args.head_dim = static_cast<uint32_t>(dim);
    args.rows = static_cast<uint32_t>(rows);
    args.q = q.data_ptr();
    args.blocks.reserve(index_.size());
    for (uint32_t i : index_) args.blocks.push_back((*refs)[i]);
    args.rotate_keys = true;
    args.rope = rope_;
    args.first_position = 0;
    args.out = ctx_out.data_ptr<float>();
    args.lse = ctx_lse.data_ptr<float>();
    args.workspace_bytes = gpu::PagedAttentionWorkspaceBytes(args.q_heads, args.kv_heads, args.rows,
                                                             args.head_dim, tokens_);
    args.workspace = Workspace(&workspace_, args.workspace_bytes, q.device());
    SHOTDB_RETURN_IF_ERROR(gpu::LaunchPagedAttention(args, kTorchStream));
    return MergeNewTokens(dtype_, args.kv_heads, q, k, v, allowed, ctx_out, ctx_lse);
  }

  // ContextAttention::Stack: a PagedBatchContext when every part is a view of this batch.
  std::unique_ptr<ContextAttention> Stack(const std::vector<ContextPart>& parts) const override;

  const std::vector<uint32_t>& index() const { return index_; }
  bool released() const { return released_; }

 private:
  std::shared_ptr<AsyncStaging> staging_;
  bool released_ = false;
  std::vector<uint32_t> index_;
  DType dtype_;
  uint64_t tokens_ = 0;
  gpu::RopeParams rope_;
  ModelConfig config_;
  mutable torch::Tensor workspace_;  // reused across layers (stream-ordered on kTorchStream)
};

// The new tokens' attention among themselves, merged with the context's result (ctx_out
// [heads, T, d], ctx_lse [heads, T] float32), in one kernel: [T, heads * d] in q's dtype.
Result<torch::Tensor> MergeNewTokens(DType dtype, uint32_t kv_heads, const torch::Tensor& q,
                                     const torch::Tensor& k, const torch::Tensor& v,
                                     const torch::Tensor& allowed, const torch::Tensor& ctx_out,
                                     const torch::Tensor& ctx_lse) {
  const int64_t heads = q.size(0), rows = q.size(1), dim = q.size(2);
  torch::Tensor out = torch::empty({rows, heads * dim}, q.options());
  gpu::MergeAttentionArgs m;
  m.dtype = dtype;
  m.q_heads = static_cast<uint32_t>(heads);
  m.kv_heads = kv_heads;
  m.head_dim = static_cast<uint32_t>(dim);
  m.rows = static_cast<uint32_t>(rows);
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

// The stacked form of several PagedContexts of one staged batch (ContextAttention::Stack): a
// layer's attention is one gpu::LaunchPagedAttentionBatch over the batch's pages and one
// LaunchMergeAttention over all the rows, instead of two launches, a copy of q and an output
// concatenation per query.
class PagedBatchContext final : public ContextAttention {
 public:
  // nullptr when the batch does not fit the kernel (MakePagedBatchLayout's limits).
  static std::unique_ptr<ContextAttention> Make(std::shared_ptr<AsyncStaging> staging,
                                                std::vector<const PagedContext*> parts,
                                                const std::vector<ContextPart>& stacked,
                                                DType dtype, gpu::RopeParams rope,
                                                const ModelConfig& config) {
    std::vector<gpu::PagedBatchQuery> queries;
    int64_t tokens = 0;
    for (size_t i = 0; i < parts.size(); ++i) {
      gpu::PagedBatchQuery q;
      q.rows = static_cast<uint32_t>(stacked[i].rows);
      q.blocks = parts[i]->index();
      q.first_position = 0;
      queries.push_back(std::move(q));
      tokens = std::max(tokens, parts[i]->tokens());
    }
    Result<gpu::PagedBatchLayout> layout = gpu::MakePagedBatchLayout(
        static_cast<uint32_t>(config.num_heads), static_cast<uint32_t>(config.num_kv_heads),
        static_cast<uint32_t>(config.head_dim), staging->block_tokens(), queries);
    if (!layout.ok()) return nullptr;
    return std::unique_ptr<ContextAttention>(
        new PagedBatchContext(std::move(staging), std::move(parts), std::move(*layout), tokens,
                              dtype, rope, static_cast<uint32_t>(config.num_kv_heads)));
  }

  int64_t tokens() const override { return tokens_; }

  Result<torch::Tensor> Attend(int64_t layer, const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v,
                               const torch::Tensor& allowed) const override {
    if (!q.is_contiguous() || k.stride(2) != 1 || v.stride(2) != 1 || !allowed.is_contiguous() ||
        allowed.scalar_type() != torch::kBool || layer < 0 ||
        q.size(1) != static_cast<int64_t>(layout_.rows)) {
      return Status::InvalidArgument(
          "PagedBatchContext: q (with the batch's rows) and allowed (bool) must be contiguous, k "
          "and v contiguous per row");
    }
    for (const PagedContext* p : parts_) {
      if (p->released()) {
        return Status::FailedPrecondition(
            "PagedBatchContext: Attend after a query's pages were released");
      }
    }
    SHOTDB_ASSIGN_OR_RETURN(const std::vector<gpu::KvBlockRef>* refs,
                            staging_->WaitLayer(static_cast<size_t>(layer), kTorchStream));
    if (!words_.defined()) {  // the layout, once per batch
      words_ = torch::from_blob(const_cast<uint32_t*>(layout_.words.data()),
                                {static_cast<int64_t>(layout_.words.size())}, torch::kInt32)
                   .to(q.device());
    }
    const int64_t heads = q.size(0), rows = q.size(1), dim = q.size(2);
    const auto f32 = torch::TensorOptions().dtype(torch::kFloat32).device(q.device());
    const torch::Tensor ctx_out = torch::empty({heads, rows, dim}, f32);
    const torch::Tensor ctx_lse = torch::empty({heads, rows}, f32);
    gpu::PagedBatchArgs args;
    args.dtype = dtype_;
    args.layout = &layout_;
    args.layout_words = words_.data_ptr();
    args.blocks = *refs;
    args.rope = rope_;
    args.q = q.data_ptr();
    args.out = ctx_out.data_ptr<float>();
    args.lse = ctx_lse.data_ptr<float>();
    args.workspace_bytes = gpu::PagedBatchWorkspaceBytes(layout_);
    args.workspace = Workspace(&workspace_, args.workspace_bytes, q.device());
    SHOTDB_RETURN_IF_ERROR(gpu::LaunchPagedAttentionBatch(args, kTorchStream));
    return MergeNewTokens(dtype_, kv_heads_, q, k, v, allowed, ctx_out, ctx_lse);
  }

 private:
  PagedBatchContext(std::shared_ptr<AsyncStaging> staging, std::vector<const PagedContext*> parts,
                    gpu::PagedBatchLayout layout, int64_t tokens, DType dtype, gpu::RopeParams rope,
                    uint32_t kv_heads)
      : staging_(std::move(staging)),
        parts_(std::move(parts)),
        layout_(std::move(layout)),
        tokens_(tokens),
        dtype_(dtype),
        rope_(rope),
        kv_heads_(kv_heads) {}

  std::shared_ptr<AsyncStaging> staging_;
  std::vector<const PagedContext*> parts_;  // not owned; they hold the pages
  gpu::PagedBatchLayout layout_;
  int64_t tokens_;
  DType dtype_;
  gpu::RopeParams rope_;
  uint32_t kv_heads_;
  mutable torch::Tensor words_;      // layout_.words on the device
  mutable torch::Tensor workspace_;  // reused across layers (stream-ordered on kTorchStream)
};

std::unique_ptr<ContextAttention> PagedContext::Stack(const std::vector<ContextPart>& parts) const {
  std::vector<const PagedContext*> views;
  for (const ContextPart& p : parts) {
    const auto* view = dynamic_cast<const PagedContext*>(p.context);
    if (view == nullptr || view->staging_ != staging_ || view->released_ || p.rows <= 0) {
      return nullptr;
    }
    views.push_back(view);
  }
  return PagedBatchContext::Make(staging_, std::move(views), parts, dtype_, rope_, config_);
}

class DeviceKvSource final : public KvSource {
 public:
  DeviceKvSource(int device, std::unique_ptr<gpu::Stager> stager,
                 std::unique_ptr<gpu::BlockPageCache> cache)
      : device_(device), stager_(std::move(stager)), cache_(std::move(cache)) {}

  ~DeviceKvSource() override {
    RetireStaging();
    stager_->WaitPending();  // a deferred verification invalidates pages in the cache
    cache_.reset();          // its pages are freed on the stager's stream
    stager_.reset();
  }

  Result<QueryContext> Load(Snapshot* snapshot, const TaskInfo& task,
                            const std::vector<uint32_t>& blocks, const LlamaModel& model,
                            bool want_tensors, double* load_ms, double* gather_ms) override {
    RetireStaging();  // the Stager takes one call at a time
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
    if (paged) {
      SHOTDB_ASSIGN_OR_RETURN(std::shared_ptr<AsyncStaging> staging,
                              AsyncStaging::Start(device_, stager_.get(), cache_.get(), snapshot,
                                                  task.name, blocks, num_layers));
      staging_ = staging;
      thread_start_ms_ += staging->thread_start_ms();
      *load_ms = MsSince(start);
      std::vector<uint32_t> index(blocks.size());
      std::iota(index.begin(), index.end(), 0u);
      context.verified = PagedContext::Verified(staging);
      auto view = std::make_unique<PagedContext>(std::move(staging), std::move(index),
                                                 PageDType(task), *rope, config);
      context.release = [p = view.get()] { p->Release(); };
      context.attention = std::move(view);
      context.tokens = static_cast<uint64_t>(context.attention->tokens());
      *gather_ms = 0;
      return context;
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
    RetireStaging();
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
    SHOTDB_ASSIGN_OR_RETURN(std::shared_ptr<AsyncStaging> staging,
                            AsyncStaging::Start(device_, stager_.get(), cache_.get(), snapshot,
                                                task.name, std::move(all), task.model.num_layers));
    staging_ = staging;
    *load_ms = MsSince(start);
    std::vector<QueryContext> contexts;
    for (const std::vector<uint32_t>& query : blocks) {
      std::vector<uint32_t> index;
      for (uint32_t b : query) index.push_back(position.at(b));
      QueryContext c;
      c.verified = PagedContext::Verified(staging);
      auto view =
          std::make_unique<PagedContext>(staging, std::move(index), PageDType(task), *rope, config);
      c.release = [p = view.get()] { p->Release(); };
      c.attention = std::move(view);
      c.tokens = static_cast<uint64_t>(c.attention->tokens());
      contexts.push_back(std::move(c));
    }
    *gather_ms = 0;
    return contexts;
  }

  Stats stats() const override {
    WaitStaged();
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
    out.first_layer_ms = stager_->stats().first_layer_ms;
    out.thread_start_ms = thread_start_ms_;
    return out;
  }

  void Clear() override {
    RetireStaging();
    cache_->Clear();
  }

 private:
  // The model computes in the pages' dtype (the stored one, or bf16 for scaled ones), one the
  // kernels take.
  static bool KernelDType(const TaskInfo& task, const LlamaModel& model) {
    const DType pages = PageDType(task);
    return model.dtype() == TorchType(pages) && (pages == DType::kBF16 || pages == DType::kF16);
  }
  static DType PageDType(const TaskInfo& task) {
    return IsScaledDType(task.model.dtype) ? kScaledPages : task.model.dtype;
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

  // Waits for the last query's staging thread to finish staging (the Stager is then free)...
  void WaitStaged() const {
    if (staging_ != nullptr) staging_->WaitStaged();
  }
  // ... and, where its contexts are gone, to release its pins (the cache is then all ours).
  void RetireStaging() {
    WaitStaged();
    staging_.reset();
  }

  int device_;
  std::unique_ptr<gpu::Stager> stager_;
  std::unique_ptr<gpu::BlockPageCache> cache_;
  std::shared_ptr<AsyncStaging> staging_;  // the last query's, also owned by its contexts
  double thread_start_ms_ = 0;             // summed over the stagings started
};

}  // namespace

bool DeviceKvSourceAvailable() { return true; }

Result<std::unique_ptr<KvSource>> MakeDeviceKvSource(size_t cache_bytes, int device_index) {
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_index));
  gpu::Stager::Options options;
  options.threads = 16;  // reading the map into pinned slabs is the bottleneck (docs/gpu.md)
  // Any stored dtype: the kernels take bf16/f16, the others are concatenated by libtorch.
  options.kernel_dtypes_only = false;
  options.scaled_pages = kScaledPages;
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
