// Helpers shared by the gpu/ kernel tests (test code only): random 16-bit inputs with their exact
// values, and copies between host vectors and device buffers. The tests call them only after
// checking that a device exists.
#ifndef SHOTDB_GPU_TEST_UTIL_H_
#define SHOTDB_GPU_TEST_UTIL_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <random>
#include <vector>

#include "format/dtype.h"
#include "gpu/cuda_util.h"
#include "gpu/stream.h"
#include "util/status.h"

namespace shotdb {
namespace gpu {
namespace testing {

// Unit roundoff of `dtype` (bf16 or f16): the relative error of one rounding to it.
inline double Roundoff(DType dtype) { return dtype == DType::kBF16 ? 1.0 / 256 : 1.0 / 2048; }

// n values uniform in [-range, range], rounded to `dtype` (bf16 or f16): their bits, and their
// exact values for the float64 references.
struct Host16 {
  std::vector<uint16_t> bits;
  std::vector<double> values;
};
inline Host16 Random16(DType dtype, size_t n, float range, std::mt19937* rng) {
  std::uniform_real_distribution<float> u(-range, range);
  std::vector<float> f(n);
  for (float& x : f) x = u(*rng);
  Host16 h;
  h.bits.resize(n);
  ConvertFromFloat(dtype, f.data(), h.bits.data(), n);
  ConvertToFloat(dtype, h.bits.data(), f.data(), n);
  h.values.assign(f.begin(), f.end());
  return h;
}

// A device buffer holding `host`.
template <typename T>
Result<DeviceBuffer> ToDevice(const std::vector<T>& host) {
  SHOTDB_ASSIGN_OR_RETURN(DeviceBuffer b, DeviceBuffer::Allocate(host.size() * sizeof(T)));
  SHOTDB_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(b.get(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return b;
}

// n values of T from device memory at `src` (after the device has synchronised).
template <typename T>
Result<std::vector<T>> FromDevice(const void* src, size_t n) {
  std::vector<T> host(n);
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaMemcpy(host.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

// n 16-bit values of `dtype` at `src`, as doubles.
inline Result<std::vector<double>> Download16(DType dtype, const void* src, size_t n) {
  SHOTDB_ASSIGN_OR_RETURN(std::vector<uint16_t> bits, FromDevice<uint16_t>(src, n));
  std::vector<float> f(n);
  ConvertToFloat(dtype, bits.data(), f.data(), n);
  return std::vector<double>(f.begin(), f.end());
}

}  // namespace testing
}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_TEST_UTIL_H_
