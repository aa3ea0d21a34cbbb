#include "gpu/cuda_util.h"

namespace shotdb {
namespace gpu {

Status CudaStatus(cudaError_t err, const char* call, const char* where) {
  if (err == cudaSuccess) return Status::OK();
  return Status::IOError(std::string(call) + " failed at " + where + ": " + cudaGetErrorName(err) +
                         ": " + cudaGetErrorString(err));
}

int CudaDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    // cudaGetDeviceCount leaves a non-sticky error behind when there is no driver; clear it so
    // that it does not surface in an unrelated later cudaGetLastError.
    cudaGetLastError();
    return 0;
  }
  return count;
}

Result<DeviceInfo> QueryDevice(int device) {
  cudaDeviceProp prop;
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  DeviceInfo info;
  info.device = device;
  info.name = prop.name;
  info.compute_major = prop.major;
  info.compute_minor = prop.minor;
  info.multiprocessors = prop.multiProcessorCount;
  info.global_memory_bytes = prop.totalGlobalMem;
  info.l2_cache_bytes = static_cast<size_t>(prop.l2CacheSize);
  info.shared_memory_per_block_optin = prop.sharedMemPerBlockOptin;
  return info;
}

}  // namespace gpu
}  // namespace shotdb
