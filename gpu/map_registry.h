// MapRegistry: the store's memory map page-locked for CUDA, so records are copied to the device
// straight from the map (one DMA) instead of through a pinned bounce buffer (a CPU copy, then a
// DMA).
//
// Why: staging through pinned slabs is bound by the threads' copy from the map into the slabs;
// measured at 0.70x of a pinned cudaMemcpyAsync on the H100 (docs/results.md). A registered
// range is DMA'd from at PCIe speed and costs no CPU copy.
//
// The map is a read-only MAP_SHARED file mapping, so it is registered with
// cudaHostRegisterReadOnly, which needs cudaDevAttrHostRegisterReadOnlySupported; where the device
// lacks it, Cover returns NotSupported and the Stager keeps using its slabs. Registering pins
// the file's page-cache pages (reading them from disk first if needed), so it costs time once per
// range: Stager reports it (Stats::map_register_ms). The pages stay coherent with later writes to
// the file (LMDB writes with pwrite into the same page-cache pages), and a registered range is
// only read by the copies of records that a live Snapshot can see.
//
// The store file grows as blocks are appended: Cover registers only the part of the range not yet
// covered, as a new registration. A range at another address or with another reserved size (a
// map LMDB moved while growing, or another store's map) replaces the previous registrations.
//
// The CUDA calls go through a HostRegistrar so that the bookkeeping can be tested without a GPU.
// Thread-safety: not thread-safe (the Stager calls it from its caller's thread).
#ifndef SHOTDB_GPU_MAP_REGISTRY_H_
#define SHOTDB_GPU_MAP_REGISTRY_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "util/status.h"

namespace shotdb {
namespace gpu {

// Registers host memory with the device. Implementations need not be thread-safe.
class HostRegistrar {
 public:
  virtual ~HostRegistrar() = default;
  // Page-locks [p, p + bytes) (page aligned) for read-only DMA. NotSupported if the device cannot
  // register read-only memory; IOError for other failures.
  virtual Status Register(const void* p, size_t bytes) = 0;
  // Undoes a successful Register(p, ...).
  virtual void Unregister(const void* p) = 0;
};

// cudaHostRegister(..., cudaHostRegisterReadOnly | cudaHostRegisterPortable) on the current device.
std::unique_ptr<HostRegistrar> NewCudaHostRegistrar();

class MapRegistry {
 public:
  explicit MapRegistry(std::unique_ptr<HostRegistrar> registrar);
  ~MapRegistry();  // unregisters everything
  MapRegistry(const MapRegistry&) = delete;
  MapRegistry& operator=(const MapRegistry&) = delete;

  // Makes [base, base + bytes) of the mapping that reserves `reserved` bytes at `base` DMA-able
  // (see the header comment). Returns OK, or the registrar's error (NotSupported, IOError), after
  // which nothing new is covered.
  Status Cover(const uint8_t* base, size_t bytes, size_t reserved);

  // True if [p, p + n) lies inside a single registration (a copy may not span two).
  bool Contains(const void* p, size_t n) const;

  size_t registered_bytes() const { return covered_; }
  size_t registrations() const { return regions_.size(); }

 private:
  struct Region {
    const uint8_t* begin;
    size_t bytes;
  };
  void UnregisterAll();

  std::unique_ptr<HostRegistrar> registrar_;
  const uint8_t* base_ = nullptr;
  size_t reserved_ = 0;
  size_t covered_ = 0;  // [base_, base_ + covered_) is registered, in regions_
  std::vector<Region> regions_;
};

}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_MAP_REGISTRY_H_
