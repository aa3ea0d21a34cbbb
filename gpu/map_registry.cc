#include "gpu/map_registry.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <utility>

#include "gpu/cuda_util.h"

namespace shotdb {
namespace gpu {

namespace {

class CudaHostRegistrar final : public HostRegistrar {
 public:
  Status Register(const void* p, size_t bytes) override {
    if (!checked_) {
      int device = 0, supported = 0;
      SHOTDB_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
      SHOTDB_CUDA_RETURN_IF_ERROR(
          cudaDeviceGetAttribute(&supported, cudaDevAttrHostRegisterReadOnlySupported, device));
      supported_ = supported != 0;
      checked_ = true;
    }
    if (!supported_) {
      return Status::NotSupported(
          "cudaHostRegister: this device cannot register read-only host memory "
          "(cudaDevAttrHostRegisterReadOnlySupported = 0)");
    }
    // The map is PROT_READ: registering it for device writes would fail (or break the mapping).
    const cudaError_t err = cudaHostRegister(const_cast<void*>(p), bytes,
                                             cudaHostRegisterReadOnly | cudaHostRegisterPortable);
    if (err == cudaSuccess) return Status::OK();
    cudaGetLastError();  // a failed registration is not sticky: keep it from later calls
    if (err == cudaErrorNotSupported) {
      return Status::NotSupported("cudaHostRegister(read-only) of the store map: " +
                                  std::string(cudaGetErrorString(err)));
    }
    return CudaStatus(err, "cudaHostRegister", "CudaHostRegistrar::Register");
  }
  void Unregister(const void* p) override { cudaHostUnregister(const_cast<void*>(p)); }

 private:
  bool checked_ = false, supported_ = false;
};

}  // namespace

std::unique_ptr<HostRegistrar> NewCudaHostRegistrar() {
  return std::make_unique<CudaHostRegistrar>();
}

MapRegistry::MapRegistry(std::unique_ptr<HostRegistrar> registrar)
    : registrar_(std::move(registrar)) {}

MapRegistry::~MapRegistry() { UnregisterAll(); }

void MapRegistry::UnregisterAll() {
  for (const Region& r : regions_) registrar_->Unregister(r.begin);
  regions_.clear();
  covered_ = 0;
}

Status MapRegistry::Cover(const uint8_t* base, size_t bytes, size_t reserved) {
  if (base != base_ || reserved != reserved_) {
    UnregisterAll();
    base_ = base;
    reserved_ = reserved;
  }
  if (bytes <= covered_) return Status::OK();
  SHOTDB_RETURN_IF_ERROR(registrar_->Register(base + covered_, bytes - covered_));
  regions_.push_back(Region{base + covered_, bytes - covered_});
  covered_ = bytes;
  return Status::OK();
}

bool MapRegistry::Contains(const void* p, size_t n) const {
  // Regions are contiguous and ordered by address: find the last one starting at or before p.
  const uintptr_t b = reinterpret_cast<uintptr_t>(p);
  auto it = std::upper_bound(regions_.begin(), regions_.end(), b, [](uintptr_t x, const Region& r) {
    return x < reinterpret_cast<uintptr_t>(r.begin);
  });
  if (it == regions_.begin()) return false;
  --it;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(it->begin);
  return b + n <= begin + it->bytes;
}

}  // namespace gpu
}  // namespace shotdb
