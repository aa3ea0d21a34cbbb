// Stored K/V payloads that landed in device memory, unpacked into the 16-bit pages the kernels
// read.
//
// The Stager copies records from the store into a landing buffer on the device, many records per
// copy (they lie next to each other in the store's map), and one LaunchUnpackKv per batch of
// records moves each payload to its page:
//
//   stored == dtype (any dtype): the payload is the page, copied as it is;
//   stored == kF8E4M3 (scaled fp8, format/kv_values.h: kv_heads float32 scales, then the codes):
//     dst[h][t][d] = round_to_dtype(e4m3(code[h][t][d]) * scale[h])     (float32 multiply)
//   stored == kI8 (scaled int8: bfloat16 scales per head, group of 128 tokens and channel, then
//   the int8 codes):
//     dst[h][t][d] = round_to_dtype(code[h][t][d] * scale[h][t / 128][d])  (exact in float32)
//   each equal to KvToFloat followed by ConvertFromFloat on the host, bit for bit.
//
// One launch covers many records (up to kMaxUnpackJobs; more are split over launches).
//
// Plain C++ header (the kernel lives in unpack_kv.cu). Asynchronous on `stream`; argument
// errors are returned before any CUDA call. Thread-safe.
#ifndef SHOTDB_GPU_UNPACK_KV_H_
#define SHOTDB_GPU_UNPACK_KV_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "format/dtype.h"
#include "util/status.h"

namespace shotdb {
namespace gpu {

constexpr uint32_t kMaxUnpackJobs = 1024;  // records per launch (a kernel parameter table)

// One record: `src` is its raw payload in device memory (scaled: 4-byte aligned; a copy: 8-byte),
// `dst` the page of [kv_heads, tokens, head_dim] values it becomes (8-byte aligned, not
// overlapping src).
struct UnpackKvJob {
  const void* src = nullptr;
  void* dst = nullptr;
  uint32_t tokens = 0;
};

struct UnpackKvArgs {
  DType stored = DType::kF8E4M3;  // of the payloads: kF8E4M3, kI8, or the pages' dtype (a copy)
  DType dtype = DType::kBF16;     // of the pages: kBF16 or kF16 for scaled payloads
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;  // scaled: a multiple of 4
  std::vector<UnpackKvJob> jobs;
};

// Enqueues the unpacking of every job (none: nothing). InvalidArgument for an unsupported pair
// of dtypes, zero heads, a head_dim that is 0 (or, for a scaled dtype, not a multiple of 4), a job
// with null or misaligned pointers or 0 tokens; IOError if a launch fails.
Status LaunchUnpackKv(const UnpackKvArgs& args, cudaStream_t stream);

}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_UNPACK_KV_H_
