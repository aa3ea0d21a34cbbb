// Scaled fp8 K/V payloads (format/kv_values.h) dequantised into 16-bit pages on the device.
//
// A task stored with --kv-dtype f8e4m3 moves half of bf16's bytes from disk and over PCIe. The
// Stager copies each record's raw payload (kv_heads float32 scales, then the e4m3 codes) into a
// landing buffer on the device and LaunchDequantizeKv writes the page the kernels read:
//
//   dst[h][t][d] = round_to_dtype(e4m3(code[h][t][d]) * scale[h])     (float32 multiply)
//
// which equals KvToFloat followed by ConvertFromFloat on the host, bit for bit. One launch covers
// many records (up to kMaxDequantizeJobs; more are split over launches).
//
// Plain C++ header (the kernel lives in dequantize_kv.cu). Asynchronous on `stream`; argument
// errors are returned before any CUDA call. Thread-safe.
#ifndef SHOTDB_GPU_DEQUANTIZE_KV_H_
#define SHOTDB_GPU_DEQUANTIZE_KV_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "format/dtype.h"
#include "util/status.h"

namespace shotdb {
namespace gpu {

constexpr uint32_t kMaxDequantizeJobs = 1024;  // records per launch (a kernel parameter table)

// One record: `src` is its raw payload in device memory (4-byte aligned), `dst` the page of
// [kv_heads, tokens, head_dim] 16-bit values it becomes (8-byte aligned, not overlapping src).
struct DequantizeKvJob {
  const void* src = nullptr;
  void* dst = nullptr;
  uint32_t tokens = 0;
};

struct DequantizeKvArgs {
  DType dtype = DType::kBF16;  // of the pages: kBF16 or kF16
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;  // a multiple of 4
  std::vector<DequantizeKvJob> jobs;
};

// Enqueues the dequantisation of every job (none: nothing). InvalidArgument for an unsupported
// dtype, zero heads, a head_dim that is 0 or not a multiple of 4, a job with null or misaligned
// pointers or 0 tokens; IOError if a launch fails.
Status LaunchDequantizeKv(const DequantizeKvArgs& args, cudaStream_t stream);

}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_DEQUANTIZE_KV_H_
