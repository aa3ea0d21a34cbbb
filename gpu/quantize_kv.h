// K/V quantised on the device into stored payloads: the inverse of unpack_kv.h, for pool builds
// on a GPU.
//
// A pool build stores each block's K and V of every layer as records; for the scaled dtypes
// (format/kv_values.h) the payload is scales then codes. LaunchQuantizeKv computes those payloads
// from the forward's K/V where they lie in device memory, so that only the codes cross PCIe and
// no host thread touches the values (docs/results.md, run X: on the host, an int8 Llama-3.1-8B
// pool's conversion took ~50 ms a block):
//
//   src: [kv_heads, tokens, head_dim] values of `src_dtype` (bf16, f16 or f32)
//   dst: the raw payload KvFromFloat(stored, ...) writes for the same values converted to float32,
//        byte for byte (scales chosen the same way, every division and rounding the same):
//     kF8E4M3: per head scale = amax / 448 (1 for a head of zeros), code = e4m3(x / scale), round
//              to nearest even, saturating;
//     kI8:     per head, group of 128 tokens and channel a bfloat16 scale = amax / 127 rounded up
//              (1 for zeros), code = x / scale rounded to nearest even, in [-127, 127].
//
// KvFromFloat refuses a tensor with a value that is not finite (no scale represents it); here such
// a job's word in `not_finite` becomes 1 (else 0) and its payload is unspecified: the caller checks
// the words and reports (e.g. by running KvFromFloat on the host for its message).
//
// Plain C++ header (the kernels live in quantize_kv.cu). Asynchronous on `stream`; argument
// errors are returned before any CUDA call. Thread-safe.
#ifndef SHOTDB_GPU_QUANTIZE_KV_H_
#define SHOTDB_GPU_QUANTIZE_KV_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "format/dtype.h"
#include "util/status.h"

namespace shotdb {
namespace gpu {

constexpr uint32_t kMaxQuantizeJobs = 1024;  // records per launch (a kernel parameter table)

// One record: `src` its values in device memory (aligned to their size), `dst` where its payload
// (KvRawBytes(stored, kv_heads, tokens, head_dim) bytes, not overlapping src) goes, 4-byte aligned.
struct QuantizeKvJob {
  const void* src = nullptr;
  void* dst = nullptr;
  uint32_t tokens = 0;
};

struct QuantizeKvArgs {
  DType src_dtype = DType::kBF16;  // kBF16, kF16 or kF32
  DType stored = DType::kI8;       // kF8E4M3 or kI8
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;
  std::vector<QuantizeKvJob> jobs;
  // Device memory, one 32-bit word per job: 1 if the job's values are not all finite, else 0.
  uint32_t* not_finite = nullptr;
};

// Enqueues the quantisation of every job (none: nothing). InvalidArgument for a dtype that is not
// one of the above, zero heads or head_dim, a job with null or misaligned pointers or 0 tokens, a
// null `not_finite` with jobs; IOError if a launch fails.
Status LaunchQuantizeKv(const QuantizeKvArgs& args, cudaStream_t stream);

}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_QUANTIZE_KV_H_
