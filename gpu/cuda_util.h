// CUDA error checking as Status values, and a device query.
//
// Every CUDA runtime call in gpu/ goes through SHOTDB_CUDA_RETURN_IF_ERROR (or CudaStatus), so a
// failure reaches the caller as an IOError naming the call, the source location and the CUDA
// error string instead of aborting. Host-only: includes cuda_runtime_api.h, never a kernel header.
#ifndef SHOTDB_GPU_CUDA_UTIL_H_
#define SHOTDB_GPU_CUDA_UTIL_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>

#include "util/status.h"

namespace shotdb {
namespace gpu {

// OK for cudaSuccess; otherwise IOError "<call> failed at <where>: <cudaGetErrorName>: <string>".
// Does not clear sticky errors: after an illegal address every later call fails too.
Status CudaStatus(cudaError_t err, const char* call, const char* where);

// Number of visible CUDA devices; 0 (not an error) when there is no driver or no device, so that
// GPU tests can skip cleanly on machines without a GPU.
int CudaDeviceCount();

// What gpu/ needs to know about a device to size launches and buffers.
struct DeviceInfo {
  int device = 0;
  std::string name;
  int compute_major = 0;
  int compute_minor = 0;
  int multiprocessors = 0;
  size_t global_memory_bytes = 0;
  size_t l2_cache_bytes = 0;
  size_t shared_memory_per_block_optin = 0;  // usable after cudaFuncSetAttribute
};

// Reads the properties of `device`. IOError if the device does not exist or the driver fails.
Result<DeviceInfo> QueryDevice(int device);

}  // namespace gpu
}  // namespace shotdb

#define SHOTDB_CUDA_STRINGIFY_INNER_(x) #x
#define SHOTDB_CUDA_STRINGIFY_(x) SHOTDB_CUDA_STRINGIFY_INNER_(x)

// Evaluates a CUDA runtime call and returns its failure as a Status from the enclosing function.
#define SHOTDB_CUDA_RETURN_IF_ERROR(call)                                              \
  do {                                                                                 \
    cudaError_t shotdb_cuda_err_ = (call);                                             \
    if (shotdb_cuda_err_ != cudaSuccess) {                                             \
      return ::shotdb::gpu::CudaStatus(shotdb_cuda_err_, #call,                        \
                                       __FILE__ ":" SHOTDB_CUDA_STRINGIFY_(__LINE__)); \
    }                                                                                  \
  } while (0)

#endif  // SHOTDB_GPU_CUDA_UTIL_H_
