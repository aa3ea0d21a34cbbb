#include "gpu/stager.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <future>
#include <mutex>
#include <numeric>
#include <thread>
#include <unordered_set>
#include <utility>

#include "format/kv_values.h"
#include "gpu/cuda_util.h"
#include "gpu/unpack_kv.h"

namespace shotdb {
namespace gpu {

// A fixed set of threads running one ParallelFor at a time (the caller's thread takes part).
class Stager::Workers {
 public:
  explicit Workers(int n) {
    for (int i = 0; i < n - 1; ++i) threads_.emplace_back([this] { Loop(); });
  }
  ~Workers() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : threads_) t.join();
  }

  // Runs fn(0..n-1) across the threads; returns when all calls have returned.
  void ParallelFor(size_t n, const std::function<void(size_t)>& fn) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      n_ = n;
      next_.store(0);
      active_ = threads_.size();
      ++generation_;
    }
    cv_.notify_all();
    Drain();
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] { return active_ == 0; });
    fn_ = nullptr;
  }

 private:
  void Drain() {
    for (size_t i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) (*fn_)(i);
  }
  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      Drain();
      std::lock_guard<std::mutex> lock(mu_);
      if (--active_ == 0) done_cv_.notify_one();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(size_t)>* fn_ = nullptr;
  size_t n_ = 0;
  std::atomic<size_t> next_{0};
  size_t active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

namespace {

double MsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

// A layer whose pages all hit needs no copy: it can be published as soon as it is pinned.
bool AllFilled(const StagedLayer& layer) {
  return std::all_of(layer.pages.begin(), layer.pages.end(),
                     [](const PageHandle& p) { return p.filled(); });
}

size_t RoundUp256(uint64_t n) { return static_cast<size_t>((n + 255) / 256 * 256); }

std::string RecordWhat(const std::string& task, uint32_t block, uint32_t layer, TensorKind kind) {
  return "task " + task + " block " + std::to_string(block) + " layer " + std::to_string(layer) +
         " " + std::string(TensorKindName(kind));
}

// The store checks these in GetPayload; GetRecord (used here for zero-copy views that worker
// threads can read) checks only the header itself.
Status CheckRecord(const BlockRecordView& view, const TaskInfo& task, uint32_t block,
                   uint32_t layer, TensorKind kind, uint32_t tokens) {
  const BlockRecordMeta& m = view.header.meta;
  if (m.layer != layer || m.kind != kind || m.dtype != task.model.dtype ||
      m.kv_heads != task.model.kv_heads || m.tokens != tokens ||
      m.head_dim != task.model.head_dim) {
    return Status::Corruption(
        RecordWhat(task.name, block, layer, kind) + ": record header says layer " +
        std::to_string(m.layer) + " " + std::string(TensorKindName(m.kind)) + " " +
        std::string(DTypeName(m.dtype)) + " [" + std::to_string(m.kv_heads) + ", " +
        std::to_string(m.tokens) + ", " + std::to_string(m.head_dim) + "], expected layer " +
        std::to_string(layer) + " " + std::string(TensorKindName(kind)) + " " +
        std::string(DTypeName(task.model.dtype)) + " [" + std::to_string(task.model.kv_heads) +
        ", " + std::to_string(tokens) + ", " + std::to_string(task.model.head_dim) + "]");
  }
  return Status::OK();
}

// Straight from the map: a missing page's K or V record.
struct MapPiece {
  BlockRecordView view;
  PageKey key;
  size_t li, bi;  // its page: batch.layers[li].pages[bi]
  TensorKind kind;
  size_t landing = 0;  // offset of its payload in its landing buffer
};

// The pieces' checksums, spread by `parallel_for(n, fn)` over the worker threads: per piece OK,
// or Corruption naming the record (the name is built only for a failure).
template <typename ParallelFor>
std::vector<Status> VerifyPieces(const std::vector<MapPiece>& pieces, const std::string& task,
                                 ParallelFor&& parallel_for) {
  std::vector<Status> results(pieces.size());
  parallel_for(pieces.size(), [&](size_t i) {
    const MapPiece& p = pieces[i];
    results[i] = VerifyBlockRecord(p.view, {});
    if (!results[i].ok()) {  // again, for the message with the record's name
      results[i] = VerifyBlockRecord(p.view, RecordWhat(task, p.key.block, p.key.layer, p.kind));
    }
  });
  return results;
}

}  // namespace

Stager::Stager(const Options& options) : options_(options) {}

Result<std::unique_ptr<Stager>> Stager::Create(const Options& options) {
  if (options.threads < 1 || options.num_slabs == 0 || options.slab_bytes == 0) {
    return Status::InvalidArgument("Stager: threads, num_slabs and slab_bytes must be > 0");
  }
  if (options.landing_bytes < options.slab_bytes) {
    return Status::InvalidArgument("Stager: landing_bytes must be >= slab_bytes");
  }
  if (options.scaled_pages != DType::kBF16 && options.scaled_pages != DType::kF16) {
    return Status::InvalidArgument("Stager: scaled_pages must be bf16 or f16, not " +
                                   std::string(DTypeName(options.scaled_pages)));
  }
  std::unique_ptr<Stager> s(new Stager(options));
  SHOTDB_ASSIGN_OR_RETURN(s->stream_, CudaStream::Create());
  SHOTDB_ASSIGN_OR_RETURN(s->landing_, NewCudaPoolAllocator(s->stream_.get()));
  PinnedPool::Options po;
  po.slab_bytes = options.slab_bytes;
  po.max_slabs = options.num_slabs;
  SHOTDB_ASSIGN_OR_RETURN(s->pool_, PinnedPool::Create(po));
  s->workers_ = std::make_unique<Workers>(options.threads);
  if (options.direct_from_map) {
    s->map_ = std::make_unique<MapRegistry>(NewCudaHostRegistrar());
  } else {
    s->map_status_ = Status::NotSupported("Stager: direct_from_map is off");
  }
  return s;
}

Stager::~Stager() {
  // Slabs go back to the pool, and the map is unregistered, only after the copies reading them
  // are done.
  WaitPending();
  if (stream_.get() != nullptr) cudaStreamSynchronize(stream_.get());
  in_flight_.clear();
  map_.reset();
}

Result<std::unique_ptr<BlockPageCache>> Stager::CreateCache(size_t budget_bytes) {
  SHOTDB_ASSIGN_OR_RETURN(std::unique_ptr<DeviceAllocator> alloc,
                          NewCudaPoolAllocator(stream_.get()));
  BlockPageCache::Options o;
  o.budget_bytes = budget_bytes;
  return BlockPageCache::Create(o, std::move(alloc));
}

Status Stager::WaitInFlight() {
  InFlight f = std::move(in_flight_.front());
  in_flight_.pop_front();
  SHOTDB_RETURN_IF_ERROR(f.done.Synchronize());
  f.slab.Release();
  spare_events_.push_back(std::move(f.done));
  return Status::OK();
}

Result<PinnedSlab> Stager::AcquireSlab() {
  // Reclaim finished slabs first, so the pool's most recently used (warm) slabs are reused.
  while (!in_flight_.empty()) {
    SHOTDB_ASSIGN_OR_RETURN(bool done, in_flight_.front().done.Query());
    if (!done) break;
    SHOTDB_RETURN_IF_ERROR(WaitInFlight());
  }
  if (in_flight_.size() >= options_.num_slabs) {
    ++stats_.slab_waits;
    SHOTDB_RETURN_IF_ERROR(WaitInFlight());
  }
  return pool_->Acquire();
}

Status Stager::Flush(PinnedSlab slab, std::vector<CopyJob>* jobs) {
  if (jobs->empty()) return Status::OK();
  std::vector<Status> results(jobs->size());
  const bool verify = options_.verify_checksums;
  uint8_t* base = slab.data();
  workers_->ParallelFor(jobs->size(), [&](size_t i) {
    const CopyJob& j = (*jobs)[i];
    uint8_t* dst = base + j.slab_offset;
    if (j.view.header.codec == Codec::kRaw && !verify) {
      std::memcpy(dst, j.view.payload, j.size);
    } else {
      results[i] = DecodeBlockRecord(j.view, dst, j.size, j.what);
    }
  });
  for (const Status& s : results) SHOTDB_RETURN_IF_ERROR(s);
  for (const CopyJob& j : *jobs) {
    cudaError_t err =
        cudaMemcpyAsync(j.dst, base + j.slab_offset, j.size, cudaMemcpyHostToDevice, stream_.get());
    if (err != cudaSuccess) {
      // Copies enqueued before this one may still read the slab, which goes back to the pool on
      // return.
      cudaStreamSynchronize(stream_.get());
      return CudaStatus(err, "cudaMemcpyAsync", "Stager::Flush");
    }
    stats_.bytes_copied += j.size;
    ++stats_.copies;
  }
  CudaEvent done;
  if (!spare_events_.empty()) {
    done = std::move(spare_events_.back());
    spare_events_.pop_back();
  } else {
    SHOTDB_ASSIGN_OR_RETURN(done, CudaEvent::Create());
  }
  SHOTDB_RETURN_IF_ERROR(done.Record(stream_.get()));
  in_flight_.push_back(InFlight{std::move(slab), std::move(done)});
  ++stats_.slabs_flushed;
  jobs->clear();
  return Status::OK();
}

bool Stager::CoverMap(Snapshot* snapshot) {
  if (!map_status_.ok()) return false;
  const auto start = std::chrono::steady_clock::now();
  Result<Snapshot::MappedRange> range = snapshot->Mapped();
  Status s = range.ok() ? map_->Cover(range->base, range->bytes, range->reserved) : range.status();
  stats_.map_register_ms += MsSince(start);
  if (s.ok()) return true;
  // Fall back to the slabs for good; earlier copies may still read the registered part.
  cudaStreamSynchronize(stream_.get());
  map_.reset();
  map_status_ = std::move(s);
  return false;
}

void Stager::WaitPending() {
  if (pending_.valid()) pending_.wait();
  pending_ = {};
}

Result<StagedBatch> Stager::StageLayers(Snapshot* snapshot, const std::string& task,
                                        const std::vector<uint32_t>& blocks,
                                        const std::vector<uint32_t>& layers, BlockPageCache* cache,
                                        const LayerCallback& on_layer) {
  const auto start = std::chrono::steady_clock::now();
  // A deferred check still running uses the worker threads, and the pages it fails must be gone
  // before this call looks them up.
  WaitPending();
  bool first = true;
  const LayerCallback timed = [&](size_t index, const StagedLayer& layer) -> Status {
    if (first) {
      stats_.first_layer_ms += MsSince(start);
      first = false;
    }
    return on_layer ? on_layer(index, layer) : Status::OK();
  };
  Result<StagedBatch> batch = Stage(snapshot, task, blocks, layers, cache, timed);
  // Copies already enqueued may read the map (and fill pages being discarded): let them finish
  // before the caller may end the snapshot.
  if (!batch.ok()) cudaStreamSynchronize(stream_.get());
  stats_.stage_ms += MsSince(start);
  return batch;
}

Result<StagedBatch> Stager::Stage(Snapshot* snapshot, const std::string& task,
                                  const std::vector<uint32_t>& blocks,
                                  const std::vector<uint32_t>& layers, BlockPageCache* cache,
                                  const LayerCallback& on_layer) {
  SHOTDB_ASSIGN_OR_RETURN(TaskInfo info, snapshot->GetTask(task));
  if (blocks.empty()) return Status::InvalidArgument("StageLayers: task " + task + ": no blocks");
  const DType stored = info.model.dtype;
  const bool scaled = IsScaledDType(stored);
  const DType page_dtype = scaled ? options_.scaled_pages : stored;
  if (options_.kernel_dtypes_only && page_dtype != DType::kBF16 && page_dtype != DType::kF16) {
    return Status::InvalidArgument("StageLayers: task " + task + " stores " +
                                   std::string(DTypeName(stored)) +
                                   "; the kernels take bf16, f16, f8e4m3 or i8");
  }
  std::unordered_set<uint32_t> seen;
  for (uint32_t b : blocks) {
    if (!seen.insert(b).second) {
      return Status::InvalidArgument("StageLayers: task " + task + ": block " + std::to_string(b) +
                                     " requested twice");
    }
  }
  std::unordered_set<uint32_t> seen_layers;
  for (uint32_t l : layers) {
    if (!seen_layers.insert(l).second) {
      return Status::InvalidArgument("StageLayers: task " + task + ": layer " + std::to_string(l) +
                                     " requested twice");
    }
    if (l >= info.model.num_layers) {
      return Status::InvalidArgument("StageLayers: task " + task + ": layer " + std::to_string(l) +
                                     " >= its " + std::to_string(info.model.num_layers) +
                                     " layers");
    }
  }
  StagedBatch batch;
  batch.dtype = page_dtype;
  batch.kv_heads = info.model.kv_heads;
  batch.head_dim = info.model.head_dim;
  // Per block: the raw bytes of one of its records, and of one 16-bit (or stored-dtype) page.
  std::vector<size_t> record_bytes, page_bytes;
  size_t landing_bytes = 0;  // scaled dtypes: every record of one layer
  const std::string task_key = task + "@" + std::to_string(info.created_unix);
  if (block_tokens_.size() >= kMaxKnownTasks && block_tokens_.count(task_key) == 0) {
    block_tokens_.clear();  // bounded: tasks deleted or recreated leave their entries behind
  }
  std::vector<uint32_t>& known_tokens = block_tokens_[task_key];
  for (uint32_t b : blocks) {
    uint32_t tokens = b < known_tokens.size() ? known_tokens[b] : 0;
    if (tokens == 0) {
      SHOTDB_ASSIGN_OR_RETURN(BlockInfo bi, snapshot->GetBlock(task, b));
      tokens = bi.token_count;
      if (b >= known_tokens.size()) known_tokens.resize(size_t{b} + 1, 0);
      known_tokens[b] = tokens;
    }
    const uint64_t bytes = *KvRawBytes(stored, info.model.kv_heads, tokens, info.model.head_dim);
    record_bytes.push_back(bytes);
    page_bytes.push_back(static_cast<size_t>(info.model.kv_heads) * tokens * info.model.head_dim *
                         DTypeSize(page_dtype));
    landing_bytes += 2 * RoundUp256(bytes);
    if (bytes > options_.slab_bytes) {
      return Status::InvalidArgument("StageLayers: task " + task + " block " + std::to_string(b) +
                                     ": a " + std::to_string(bytes) +
                                     "-byte tensor does not fit a " +
                                     std::to_string(options_.slab_bytes) + "-byte pinned slab");
    }
    batch.block_tokens.push_back(tokens);
    batch.total_tokens += tokens;
  }
  const uint64_t bytes_before = stats_.bytes_copied;
  const uint32_t task_id = cache->InternTask(task_key);
  const bool direct = info.codec == Codec::kRaw && CoverMap(snapshot);
  if (direct) {
    return StageFromMap(snapshot, task, info, blocks, layers, cache, on_layer, task_id, page_bytes,
                        std::move(batch));
  }

  // Through the slabs, layer by layer. scaled dtypes: the records land here, and each layer's
  // LaunchUnpackKv writes the pages. Freed in stream
  // order, after the last kernel that reads it.
  uint8_t* landing = nullptr;
  if (scaled) {
    SHOTDB_ASSIGN_OR_RETURN(void* p, landing_->Allocate(landing_bytes));
    landing = static_cast<uint8_t*>(p);
  }
  struct LandingGuard {
    DeviceAllocator* alloc;
    void* p;
    ~LandingGuard() {
      if (p != nullptr) alloc->Free(p);
    }
  } landing_guard{landing_.get(), landing};

  std::vector<CopyJob> jobs;
  PinnedSlab slab;
  size_t slab_used = 0;
  // The first layer is pinned alone and, if its pages all hit, published at once (as on the
  // direct path).
  size_t first_layer = 0;
  const size_t pinned_first = std::min<size_t>(1, layers.size());
  SHOTDB_RETURN_IF_ERROR(
      PinLayers(cache, task_id, blocks, layers, 0, pinned_first, page_bytes, &batch));
  if (pinned_first == 1 && AllFilled(batch.layers[0])) {
    SHOTDB_RETURN_IF_ERROR(MarkReady(&batch.layers[0]));
    if (on_layer) SHOTDB_RETURN_IF_ERROR(on_layer(0, batch.layers[0]));
    first_layer = 1;
  }
  SHOTDB_RETURN_IF_ERROR(
      PinLayers(cache, task_id, blocks, layers, pinned_first, layers.size(), page_bytes, &batch));
  for (size_t li = first_layer; li < layers.size(); ++li) {
    const uint32_t layer = layers[li];
    StagedLayer& staged = batch.layers[li];
    std::vector<UnpackKvJob> dequantize;
    size_t landing_used = 0;
    for (size_t bi = 0; bi < blocks.size(); ++bi) {
      const uint32_t block = blocks[bi];
      const size_t bytes = record_bytes[bi];
      const PageHandle& page = staged.pages[bi];
      if (page.filled()) continue;
      for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
        std::string what = RecordWhat(task, block, layer, kind);
        SHOTDB_ASSIGN_OR_RETURN(BlockRecordView view,
                                snapshot->GetRecord(task, block, layer, kind));
        SHOTDB_RETURN_IF_ERROR(CheckRecord(view, info, block, layer, kind, batch.block_tokens[bi]));
        void* dst = kind == TensorKind::kKey ? page.k() : page.v();
        if (scaled) {
          dequantize.push_back(UnpackKvJob{landing + landing_used, dst, batch.block_tokens[bi]});
          dst = landing + landing_used;
          landing_used += RoundUp256(bytes);
        }
        if (!slab.valid() || slab_used + bytes > slab.size()) {
          if (slab.valid()) SHOTDB_RETURN_IF_ERROR(Flush(std::move(slab), &jobs));
          SHOTDB_ASSIGN_OR_RETURN(slab, AcquireSlab());
          slab_used = 0;
        }
        CopyJob job;
        job.view = view;
        job.what = std::move(what);
        job.dst = dst;
        job.size = bytes;
        job.slab_offset = slab_used;
        // 256-byte alignment keeps each job's destination in the slab on its own cache lines.
        slab_used += RoundUp256(bytes);
        jobs.push_back(std::move(job));
      }
    }
    // The layer's last copies must be enqueued before its event.
    if (slab.valid()) {
      SHOTDB_RETURN_IF_ERROR(Flush(std::move(slab), &jobs));
      slab_used = 0;
    }
    if (!dequantize.empty()) {
      UnpackKvArgs args;
      args.stored = stored;
      args.dtype = page_dtype;
      args.kv_heads = info.model.kv_heads;
      args.head_dim = info.model.head_dim;
      args.jobs = std::move(dequantize);
      SHOTDB_RETURN_IF_ERROR(LaunchUnpackKv(args, stream_.get()));
    }
    for (PageHandle& p : staged.pages) p.MarkFilled();
    SHOTDB_RETURN_IF_ERROR(MarkReady(&staged));
    if (on_layer) SHOTDB_RETURN_IF_ERROR(on_layer(li, staged));
  }
  stats_.pages_hit += batch.pages_hit;
  stats_.pages_filled += batch.pages_filled;
  batch.bytes_copied = stats_.bytes_copied - bytes_before;
  return batch;
}

StagedBatch::~StagedBatch() {
  size_t blocks = 0;
  for (const StagedLayer& l : layers) blocks = std::max(blocks, l.pages.size());
  for (size_t bi = 0; bi < blocks; ++bi) {
    for (StagedLayer& l : layers) {
      if (bi < l.pages.size()) l.pages[bi].Reset();
    }
  }
}

Status Stager::MarkReady(StagedLayer* staged) {
  // Everything enqueued on the stream so far (this call's copies for the layer included) is done:
  // the pages hold their data now, and an empty event says so without creating one (a query
  // whose pages all hit skips 32 event creations, records, waits and destructions).
  const cudaError_t idle = cudaStreamQuery(stream_.get());
  if (idle == cudaSuccess) return Status::OK();
  if (idle != cudaErrorNotReady) return CudaStatus(idle, "cudaStreamQuery", "Stager::MarkReady");
  SHOTDB_ASSIGN_OR_RETURN(staged->ready, CudaEvent::Create());
  return staged->ready.Record(stream_.get());
}

Status Stager::PinLayers(BlockPageCache* cache, uint32_t task_id,
                         const std::vector<uint32_t>& blocks, const std::vector<uint32_t>& layers,
                         size_t l0, size_t l1, const std::vector<size_t>& page_bytes,
                         StagedBatch* batch) {
  const auto start = std::chrono::steady_clock::now();
  const size_t nb = blocks.size(), n = l1 - l0;
  for (size_t li = l0; li < l1; ++li) {
    StagedLayer staged;
    staged.layer = layers[li];
    staged.pages.resize(nb);
    staged.blocks.resize(nb);
    batch->layers.push_back(std::move(staged));
  }
  std::vector<PageHandle> pins(n);
  for (size_t bi = 0; bi < nb; ++bi) {
    SHOTDB_RETURN_IF_ERROR(cache->AcquireLayers(task_id, blocks[bi], layers.data() + l0, n,
                                                page_bytes[bi], page_bytes[bi], pins.data()));
    for (size_t i = 0; i < n; ++i) {
      StagedLayer& staged = batch->layers[l0 + i];
      ++(pins[i].filled() ? batch->pages_hit : batch->pages_filled);
      staged.blocks[bi] = KvBlockRef{pins[i].k(), pins[i].v(), batch->block_tokens[bi]};
      staged.pages[bi] = std::move(pins[i]);
    }
  }
  stats_.pin_ms += MsSince(start);
  return Status::OK();
}

Result<StagedBatch> Stager::StageFromMap(Snapshot* snapshot, const std::string& task,
                                         const TaskInfo& info, const std::vector<uint32_t>& blocks,
                                         const std::vector<uint32_t>& layers, BlockPageCache* cache,
                                         const LayerCallback& on_layer, uint32_t task_id,
                                         const std::vector<size_t>& page_bytes, StagedBatch batch) {
  const size_t nb = blocks.size(), nl = layers.size();
  const DType stored = info.model.dtype;
  auto start = std::chrono::steady_clock::now();
  auto lap = [&start] {
    const auto now = std::chrono::steady_clock::now();
    const double ms = std::chrono::duration<double, std::milli>(now - start).count();
    start = now;
    return ms;
  };
  std::vector<MapPiece> pieces;
  const uintptr_t alignment = IsScaledDType(stored) ? 4 : 8;
  auto aligned = [&](const uint8_t* p) { return reinterpret_cast<uintptr_t>(p) % alignment == 0; };

  // Copies pieces[first..]: runs of records close together in the map, in address order, each in
  // one copy. A record keeps its address modulo 256 in the landing buffer (its alignment), or, if
  // it is not aligned as the unpacking kernel needs (records inside LMDB's leaf pages are only
  // 2-byte aligned), is copied alone to an aligned place. Then one LaunchUnpackKv a buffer.
  auto copy_pieces = [&](size_t first) -> Status {
    std::vector<size_t> order(pieces.size() - first);
    std::iota(order.begin(), order.end(), first);
    std::sort(order.begin(), order.end(),
              [&](size_t a, size_t b) { return pieces[a].view.payload < pieces[b].view.payload; });
    struct Run {
      const uint8_t* src;
      size_t bytes;
      size_t landing;                 // offset in its buffer
      size_t first_piece, end_piece;  // [first, end) of `order`
    };
    struct Buffer {
      size_t bytes = 0;
      size_t first_run = 0, end_run = 0;
    };
    std::vector<Run> runs;
    std::vector<Buffer> buffers(1);
    for (size_t oi = 0; oi < order.size(); ++oi) {
      const BlockRecordView& v = pieces[order[oi]].view;
      if (!runs.empty() && aligned(v.payload) && aligned(runs.back().src)) {
        Run& r = runs.back();
        const uint8_t* end = r.src + r.bytes;
        const size_t grown = static_cast<size_t>(v.payload + v.payload_size - r.src);
        if (v.payload >= end && static_cast<size_t>(v.payload - end) <= options_.max_gap_bytes &&
            r.landing + grown <= options_.landing_bytes && map_->Contains(r.src, grown)) {
          buffers.back().bytes = r.landing + grown;
          stats_.gap_bytes += static_cast<size_t>(v.payload - end);
          r.bytes = grown;
          r.end_piece = oi + 1;
          continue;
        }
      }
      // A new run, in the current buffer if it fits, else in the next one.
      const uintptr_t phase = aligned(v.payload) ? reinterpret_cast<uintptr_t>(v.payload) % 256 : 0;
      size_t at = RoundUp256(buffers.back().bytes) + phase;
      if (at + v.payload_size > options_.landing_bytes && buffers.back().bytes > 0) {
        buffers.back().end_run = runs.size();
        buffers.push_back(Buffer{0, runs.size(), runs.size()});
        at = phase;
      }
      runs.push_back(Run{v.payload, v.payload_size, at, oi, oi + 1});
      buffers.back().bytes = at + v.payload_size;
    }
    buffers.back().end_run = runs.size();
    for (const Run& r : runs) {
      for (size_t oi = r.first_piece; oi < r.end_piece; ++oi) {
        MapPiece& p = pieces[order[oi]];
        p.landing = r.landing + static_cast<size_t>(p.view.payload - r.src);
      }
    }
    // The buffer goes back to the pool in stream order, after its kernel.
    for (const Buffer& buf : buffers) {
      if (buf.first_run == buf.end_run) continue;
      SHOTDB_ASSIGN_OR_RETURN(void* mem, landing_->Allocate(buf.bytes));
      uint8_t* landing = static_cast<uint8_t*>(mem);
      Status s;
      UnpackKvArgs args;
      args.stored = stored;
      args.dtype = batch.dtype;
      args.kv_heads = info.model.kv_heads;
      args.head_dim = info.model.head_dim;
      for (size_t ri = buf.first_run; ri < buf.end_run; ++ri) {
        const Run& r = runs[ri];
        const cudaError_t err = cudaMemcpyAsync(landing + r.landing, r.src, r.bytes,
                                                cudaMemcpyHostToDevice, stream_.get());
        if (err != cudaSuccess) {
          s = CudaStatus(err, "cudaMemcpyAsync", "Stager::StageFromMap");
          break;
        }
        ++stats_.copies;
        for (size_t oi = r.first_piece; oi < r.end_piece; ++oi) {
          const MapPiece& p = pieces[order[oi]];
          const PageHandle& page = batch.layers[p.li].pages[p.bi];
          args.jobs.push_back(UnpackKvJob{landing + p.landing,
                                          p.kind == TensorKind::kKey ? page.k() : page.v(),
                                          p.view.header.meta.tokens});
          batch.bytes_copied += p.view.payload_size;
          stats_.bytes_copied += p.view.payload_size;
          stats_.bytes_from_map += p.view.payload_size;
        }
      }
      if (s.ok()) s = LaunchUnpackKv(args, stream_.get());
      landing_->Free(mem);
      SHOTDB_RETURN_IF_ERROR(s);
    }
    return Status::OK();
  };

  // Layer groups, in request order: each group's records are read and their copies enqueued
  // before the next group's are read, and its layers' events follow its copies. Layers whose pages
  // all hit need no copy: they are published (in order) as soon as they are pinned, and the first
  // layer is pinned alone, so that a hot query's consumer starts after 1/nl of the pinning.
  const size_t groups = std::min<size_t>(std::max<uint32_t>(options_.layer_groups, 1), nl);
  std::vector<uint32_t> missing;
  std::vector<size_t> missing_li;
  size_t published = 0;  // layers [0, published) have their events and on_layer calls
  auto publish = [&](size_t end, bool hits_only) -> Status {
    for (; published < end; ++published) {
      StagedLayer& staged = batch.layers[published];
      if (hits_only && !AllFilled(staged)) break;
      SHOTDB_RETURN_IF_ERROR(MarkReady(&staged));
      if (on_layer) SHOTDB_RETURN_IF_ERROR(on_layer(published, staged));
    }
    return Status::OK();
  };
  for (size_t g = 0; g < groups; ++g) {
    const size_t l0 = nl * g / groups, l1 = nl * (g + 1) / groups;
    if (l0 == 0 && l1 > 1) {
      SHOTDB_RETURN_IF_ERROR(PinLayers(cache, task_id, blocks, layers, 0, 1, page_bytes, &batch));
      SHOTDB_RETURN_IF_ERROR(publish(1, /*hits_only=*/true));
      SHOTDB_RETURN_IF_ERROR(PinLayers(cache, task_id, blocks, layers, 1, l1, page_bytes, &batch));
    } else {
      SHOTDB_RETURN_IF_ERROR(PinLayers(cache, task_id, blocks, layers, l0, l1, page_bytes, &batch));
    }
    SHOTDB_RETURN_IF_ERROR(publish(l1, /*hits_only=*/true));
    const size_t first = pieces.size();
    for (size_t bi = 0; bi < nb; ++bi) {
      missing.clear();
      missing_li.clear();
      for (size_t li = l0; li < l1; ++li) {
        if (batch.layers[li].pages[bi].filled()) continue;
        missing.push_back(layers[li]);
        missing_li.push_back(li);
      }
      if (missing.empty()) continue;
      SHOTDB_ASSIGN_OR_RETURN(std::vector<BlockRecordView> views,
                              snapshot->GetBlockRecords(task, blocks[bi], missing));
      for (size_t i = 0; i < views.size(); ++i) {
        const uint32_t layer = missing[i / 2];
        const TensorKind kind = i % 2 == 0 ? TensorKind::kKey : TensorKind::kValue;
        const BlockRecordView& view = views[i];
        SHOTDB_RETURN_IF_ERROR(
            CheckRecord(view, info, blocks[bi], layer, kind, batch.block_tokens[bi]));
        if (view.header.codec != Codec::kRaw) {
          return Status::Corruption(RecordWhat(task, blocks[bi], layer, kind) +
                                    ": record header says codec " +
                                    std::string(CodecName(view.header.codec)) + " in a raw task");
        }
        if (!map_->Contains(view.payload, view.payload_size)) {  // Snapshot::Mapped() promises it
          return Status::FailedPrecondition(RecordWhat(task, blocks[bi], layer, kind) +
                                            ": record outside the registered map");
        }
        pieces.push_back(
            MapPiece{view, PageKey{task_id, blocks[bi], layer}, missing_li[i / 2], bi, kind});
      }
    }
    stats_.records_ms += lap();
    SHOTDB_RETURN_IF_ERROR(copy_pieces(first));
    SHOTDB_RETURN_IF_ERROR(publish(l1, /*hits_only=*/false));
    lap();
  }
  stats_.pages_hit += batch.pages_hit;
  stats_.pages_filled += batch.pages_filled;

  // The checksums, while the copies run. Deferred: every page counts as filled now and the check
  // runs on the worker threads in the background; a page whose records fail is invalidated.
  if (options_.verify_checksums && options_.defer_verification && !pieces.empty()) {
    for (StagedLayer& l : batch.layers) {
      for (PageHandle& p : l.pages) p.MarkFilled();
    }
    Workers* workers = workers_.get();
    pending_ = std::async(std::launch::async,
                          [workers, cache, task, pieces = std::move(pieces)]() -> Status {
                            const std::vector<Status> results =
                                VerifyPieces(pieces, task, [workers](size_t n, const auto& fn) {
                                  workers->ParallelFor(n, fn);
                                });
                            Status first_error;
                            for (size_t i = 0; i < pieces.size(); ++i) {
                              if (results[i].ok()) continue;
                              cache->Invalidate(pieces[i].key);
                              if (first_error.ok()) first_error = results[i];
                            }
                            return first_error;
                          })
                   .share();
    batch.verified = pending_;
    return batch;
  }
  std::vector<Status> results(pieces.size());
  if (options_.verify_checksums) {
    results = VerifyPieces(pieces, task,
                           [this](size_t n, const auto& fn) { workers_->ParallelFor(n, fn); });
  }
  stats_.verify_ms += lap();
  // A page is filled only if both its records pass.
  Status first_error;
  for (size_t i = 0; i < pieces.size(); ++i) {
    if (results[i].ok()) continue;
    batch.layers[pieces[i].li].pages[pieces[i].bi].Reset();  // discarded: never filled
    if (first_error.ok()) first_error = results[i];
  }
  for (StagedLayer& l : batch.layers) {
    for (PageHandle& p : l.pages) p.MarkFilled();  // a no-op on the discarded ones
  }
  SHOTDB_RETURN_IF_ERROR(first_error);
  return batch;
}

}  // namespace gpu
}  // namespace shotdb
