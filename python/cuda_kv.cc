#include "python/cuda_kv.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "gpu/cuda_util.h"
#include "gpu/stager.h"

namespace shotdb::python {

namespace {

// Makes `device` current on the calling thread for the scope and restores the caller's device
// (torch keeps its own notion of the current device in the same runtime).
class ScopedDevice {
 public:
  explicit ScopedDevice(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      cudaGetLastError();
      previous_ = -1;
    }
    if (previous_ != device) {
      const cudaError_t err = cudaSetDevice(device);
      if (err != cudaSuccess) status_ = gpu::CudaStatus(err, "cudaSetDevice", "load_kv");
    }
    device_ = device;
  }
  ~ScopedDevice() {
    if (previous_ >= 0 && previous_ != device_) cudaSetDevice(previous_);
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;
  const Status& status() const { return status_; }

 private:
  int previous_ = -1, device_ = -1;
  Status status_;
};

size_t PageBytes(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

class DeviceStager {
 public:
  DeviceStager(std::shared_ptr<Store> store, int device)
      : store_(std::move(store)), device_(device) {}
  ~DeviceStager() {
    ScopedDevice scope(device_);
    cache_.reset();  // its pages are freed on the Stager's stream
    stager_.reset();
  }
  DeviceStager(const DeviceStager&) = delete;
  DeviceStager& operator=(const DeviceStager&) = delete;

  Status Init(size_t cache_bytes) {
    ScopedDevice scope(device_);
    SHOTDB_RETURN_IF_ERROR(scope.status());
    gpu::Stager::Options o;
    o.slab_bytes = size_t(64) << 20;  // pinned lazily: only LZ4 codecs, or a map that cannot be
    o.num_slabs = 4;                  // page-locked, go through slabs
    o.threads = static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 16u));
    o.verify_checksums = true;
    o.direct_from_map = true;
    o.kernel_dtypes_only = false;  // plain staging: any dtype
    o.scaled_pages = kScaledPageDType;
    SHOTDB_ASSIGN_OR_RETURN(stager_, gpu::Stager::Create(o));
    SHOTDB_ASSIGN_OR_RETURN(cache_, stager_->CreateCache(cache_bytes));
    return Status::OK();
  }

  std::mutex& mu() const { return mu_; }
  int device() const { return device_; }
  gpu::Stager& stager() const { return *stager_; }
  gpu::BlockPageCache& cache() const { return *cache_; }

 private:
  std::shared_ptr<Store> store_;  // the map the Stager registered stays mapped while it lives
  const int device_;
  mutable std::mutex mu_;  // a Stager runs one StageLayers at a time
  std::unique_ptr<gpu::Stager> stager_;
  std::unique_ptr<gpu::BlockPageCache> cache_;
};

namespace {

class StagedKv : public DeviceKv {
 public:
  StagedKv(std::shared_ptr<DeviceStager> stager, gpu::StagedBatch batch,
           std::vector<size_t> layer_at, std::vector<size_t> block_at)
      : stager_(std::move(stager)),
        batch_(std::move(batch)),
        layer_at_(std::move(layer_at)),
        block_at_(std::move(block_at)) {}
  ~StagedKv() override {
    ScopedDevice scope(stager_->device());
    batch_ = gpu::StagedBatch();  // unpins the pages before the DeviceStager reference goes
  }
  int device() const override { return stager_->device(); }
  void* data(size_t layer, size_t block, int kind) const override {
    const gpu::PageHandle& page = batch_.layers[layer_at_[layer]].pages[block_at_[block]];
    return kind == 0 ? page.k() : page.v();
  }

 private:
  std::shared_ptr<DeviceStager> stager_;
  gpu::StagedBatch batch_;
  std::vector<size_t> layer_at_, block_at_;  // request position -> position in the staged batch
};

// Distinct values in first-seen order, and where each request position went.
std::vector<uint32_t> Distinct(const std::vector<uint32_t>& in, std::vector<size_t>* at) {
  std::vector<uint32_t> out;
  std::unordered_map<uint32_t, size_t> seen;
  for (uint32_t v : in) {
    auto [it, inserted] = seen.emplace(v, out.size());
    if (inserted) out.push_back(v);
    at->push_back(it->second);
  }
  return out;
}

}  // namespace

int CudaDeviceCount() { return gpu::CudaDeviceCount(); }

Result<int> CudaCurrentDevice() {
  int device = 0;
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  return device;
}

Result<std::shared_ptr<DeviceStager>> GetDeviceStager(const std::shared_ptr<Store>& store,
                                                      int device, size_t cache_bytes) {
  static std::mutex mu;
  static std::map<std::pair<const Store*, int>, std::weak_ptr<DeviceStager>> alive;
  const int count = CudaDeviceCount();
  if (device < 0 || device >= count) {
    return Status::InvalidArgument("cuda:" + std::to_string(device) + ": no such device (" +
                                   std::to_string(count) + " visible)");
  }
  std::lock_guard<std::mutex> lock(mu);
  std::weak_ptr<DeviceStager>& slot = alive[{store.get(), device}];
  if (std::shared_ptr<DeviceStager> existing = slot.lock()) return existing;
  auto created = std::make_shared<DeviceStager>(store, device);
  SHOTDB_RETURN_IF_ERROR(created->Init(cache_bytes).WithContext("cuda:" + std::to_string(device)));
  slot = created;
  // Forget entries of stagers that are gone (a later store may reuse the address).
  for (auto it = alive.begin(); it != alive.end();) {
    it = it->second.expired() ? alive.erase(it) : std::next(it);
  }
  return created;
}

Result<std::unique_ptr<DeviceKv>> StageKv(const std::shared_ptr<DeviceStager>& stager,
                                          Snapshot* snapshot, const TaskInfo& task,
                                          const std::vector<uint32_t>& blocks,
                                          const std::vector<uint32_t>& tokens,
                                          const std::vector<uint32_t>& layers) {
  std::vector<size_t> layer_at, block_at;
  const std::vector<uint32_t> distinct_layers = Distinct(layers, &layer_at);
  const std::vector<uint32_t> distinct_blocks = Distinct(blocks, &block_at);
  std::lock_guard<std::mutex> lock(stager->mu());
  ScopedDevice scope(stager->device());
  SHOTDB_RETURN_IF_ERROR(scope.status());
  gpu::BlockPageCache& cache = stager->cache();

  // Page bytes this load needs at most (every page a miss).
  uint64_t need = 0;
  const uint64_t per_token = static_cast<uint64_t>(task.model.kv_heads) * task.model.head_dim *
                             DTypeSize(PageDType(task.model.dtype));
  std::vector<bool> counted(distinct_blocks.size(), false);
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (counted[block_at[i]]) continue;
    counted[block_at[i]] = true;
    need += 2 * PageBytes(per_token * tokens[i]);
  }
  need *= distinct_layers.size();

  // The cache reuses an evicted page's memory for copies on the Stager's stream. An unpinned page
  // may still be read by work another stream queued before its last array went (torch frees an
  // external tensor at once): when this load may evict, let the device finish that work first.
  const gpu::BlockPageCache::Stats before = cache.stats();
  if (before.pages > before.pinned_pages && before.bytes_in_use + need > before.budget_bytes) {
    SHOTDB_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  }

  Result<gpu::StagedBatch> batch =
      stager->stager().StageLayers(snapshot, task.name, distinct_blocks, distinct_layers, &cache);
  if (!batch.ok()) {
    const Status& s = batch.status();
    if (s.IsFailedPrecondition()) {
      const gpu::BlockPageCache::Stats now = cache.stats();
      return Status::FailedPrecondition(
          s.message() + " (cuda:" + std::to_string(stager->device()) + " page cache: budget " +
          std::to_string(now.budget_bytes) + " bytes, " + std::to_string(now.bytes_in_use) +
          " in use by " + std::to_string(now.pinned_pages) +
          " pages that live KV handles pin; this load needs up to " + std::to_string(need) +
          ": drop KV handles, load fewer blocks or layers at a time, or open the store with a "
          "larger cuda_cache_gb)");
    }
    return s;
  }
  // The last layer's event covers every copy of the load (one stream), and pages that hit were
  // filled by earlier copies on the same stream.
  if (!batch->layers.empty()) SHOTDB_RETURN_IF_ERROR(batch->layers.back().ready.Synchronize());
  return std::unique_ptr<DeviceKv>(
      new StagedKv(stager, std::move(batch).value(), std::move(layer_at), std::move(block_at)));
}

std::vector<std::pair<std::string, double>> DeviceStats(const DeviceStager& stager) {
  std::lock_guard<std::mutex> lock(stager.mu());
  const gpu::BlockPageCache::Stats c = stager.cache().stats();
  const gpu::Stager::Stats s = stager.stager().stats();
  return {{"device", stager.device()},
          {"budget_bytes", static_cast<double>(c.budget_bytes)},
          {"bytes_in_use", static_cast<double>(c.bytes_in_use)},
          {"pages", static_cast<double>(c.pages)},
          {"pinned_pages", static_cast<double>(c.pinned_pages)},
          {"hits", static_cast<double>(c.hits)},
          {"misses", static_cast<double>(c.misses)},
          {"evictions", static_cast<double>(c.evictions)},
          {"exhausted", static_cast<double>(c.exhausted)},
          {"bytes_copied", static_cast<double>(s.bytes_copied)},
          {"bytes_from_map", static_cast<double>(s.bytes_from_map)},
          {"map_register_ms", s.map_register_ms},
          {"slabs_flushed", static_cast<double>(s.slabs_flushed)}};
}

std::string DeviceMapStatus(const DeviceStager& stager) {
  std::lock_guard<std::mutex> lock(stager.mu());
  const Status& s = stager.stager().map_status();
  return s.ok() ? std::string() : s.ToString();
}

size_t DeviceClear(const DeviceStager& stager) {
  std::lock_guard<std::mutex> lock(stager.mu());
  ScopedDevice scope(stager.device());
  cudaDeviceSynchronize();  // as before an eviction (StageKv): other streams' reads are done
  return stager.cache().Clear();
}

}  // namespace shotdb::python
