// Store.load_kv(device="cuda") for the `shotdb._shotdb` extension: K/V staged onto a device
// through gpu::Stager into a gpu::BlockPageCache, handed to Python as DLPack arrays that point into
// the cache's pages. Compiled (python/cuda_kv.cc) only when the package is built with CUDA
// (SHOTDB_WITH_CUDA=ON and nvcc found: SHOTDB_PYTHON_CUDA); this header includes no CUDA header, so
// bindings.cc compiles the same either way.
//
// One DeviceStager (a Stager and its page cache) per engine Store and device, shared by every
// Store object of the directory in the process: the Stager page-locks the store's memory map
// (cudaHostRegister), which can be done once per process, and one cache then serves them all.
// The Store objects hold it, so the cache outlives single loads; each DeviceKv holds it too, so
// pages stay pinned, and the Stager, cache and engine store alive, while any array of a load lives.
#ifndef SHOTDB_PYTHON_CUDA_KV_H_
#define SHOTDB_PYTHON_CUDA_KV_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine/store.h"
#include "format/dtype.h"
#include "util/status.h"

namespace shotdb::python {

// The dtype of the device pages (and so of the arrays) a task stored as `stored` is staged into:
// `stored` itself, or kScaledPageDType for a scaled dtype (f8e4m3, i8), which the Stager
// dequantises as the records land (gpu/unpack_kv.h: KvToFloat's values rounded, bit for bit).
constexpr DType kScaledPageDType = DType::kBF16;
inline DType PageDType(DType stored) { return IsScaledDType(stored) ? kScaledPageDType : stored; }

// Visible CUDA devices; 0 without a driver or device. Initialises the CUDA runtime (not a context).
int CudaDeviceCount();
// The calling thread's current device (what torch calls "cuda"); IOError from CUDA.
Result<int> CudaCurrentDevice();

class DeviceStager;

// The DeviceStager of `store` on `device`, created (stream, pinned pool, threads, a page cache of
// `cache_bytes`) if none is alive; an existing one keeps the budget it was created with.
// InvalidArgument for a device out of range, IOError from CUDA.
Result<std::shared_ptr<DeviceStager>> GetDeviceStager(const std::shared_ptr<Store>& store,
                                                      int device, size_t cache_bytes);

// The K and V of one load, on the device: pointers into pinned cache pages. Keeps its pages pinned
// and the DeviceStager alive.
class DeviceKv {
 public:
  virtual ~DeviceKv() = default;
  virtual int device() const = 0;
  // K (kind 0) or V (kind 1) of the layer-th requested layer and block-th requested block.
  virtual void* data(size_t layer, size_t block, int kind) const = 0;
};

// Stages `layers` of `blocks` of `task` (repeats allowed; `tokens` per block, in `blocks` order)
// from `snapshot` with every record's checksum verified, and waits until the copies are done, so
// the arrays are ready for any stream and the snapshot may end. Errors as gpu::Stager::StageLayers
// (Corruption for a damaged record; FailedPrecondition when live handles pin the whole cache,
// with a hint); nothing of a failed load stays cached or pinned.
Result<std::unique_ptr<DeviceKv>> StageKv(const std::shared_ptr<DeviceStager>& stager,
                                          Snapshot* snapshot, const TaskInfo& task,
                                          const std::vector<uint32_t>& blocks,
                                          const std::vector<uint32_t>& tokens,
                                          const std::vector<uint32_t>& layers);

// Counters of the page cache and the Stager (names as in their Stats), and why raw records are
// not copied straight from the map ("" while they are).
std::vector<std::pair<std::string, double>> DeviceStats(const DeviceStager& stager);
std::string DeviceMapStatus(const DeviceStager& stager);
// Frees the cache's unpinned pages (benchmarks: the next loads miss); returns how many.
size_t DeviceClear(const DeviceStager& stager);

}  // namespace shotdb::python

#endif  // SHOTDB_PYTHON_CUDA_KV_H_
