// StagedKvSource: DBSA's block K/V on a CUDA device through gpu/ (built only with CUDA).
//
// The selected blocks' stored K/V for every layer go store -> pinned slabs -> device pages by
// gpu::Stager (parallel reads with checksum verification, asynchronous copies), and stay in a
// gpu::BlockPageCache between queries; they are then concatenated per layer into the context
// tensors the model takes. It replaces BlockCache on CUDA for tasks stored as bf16 or f16, the
// dtypes the gpu/ kernels take: BlockCache reads and uploads on one thread through one pinned
// buffer, which measured about 3 GB/s, while the stager measured 30-38 GB/s (docs/results.md).
//
// Not thread-safe: one per DbsaSession.
#ifndef SHOTDB_QUERY_DBSA_STAGED_KV_SOURCE_H_
#define SHOTDB_QUERY_DBSA_STAGED_KV_SOURCE_H_

#include <torch/torch.h>

#include <memory>
#include <vector>

#include "engine/store.h"
#include "query/dbsa/block_cache.h"
#include "query/model/llama.h"

namespace shotdb {

class StagedKvSource {
 public:
  virtual ~StagedKvSource() = default;

  // The K/V of `blocks` (in that order) concatenated per layer into [kv_heads, tokens, head_dim]
  // tensors with `options` (the model's dtype and CUDA device). Waits until the tensors are
  // complete. `load_ms` receives the staging time (store to device pages), `gather_ms` the
  // concatenation. Errors from the store (NotFound, Corruption naming the record) or CUDA.
  virtual Result<std::vector<LayerKV>> Gather(Snapshot* snapshot, const TaskInfo& task,
                                              const std::vector<uint32_t>& blocks,
                                              const torch::TensorOptions& options, double* load_ms,
                                              double* gather_ms) = 0;
  // Page-cache statistics in BlockCache's terms (hits and misses count pages, i.e. block-layers).
  virtual BlockCache::Stats stats() const = 0;
  virtual void Clear() = 0;
};

// True for a task dtype the staged path takes (bf16, f16).
bool StagedKvSourceSupports(DType dtype);

// A source on CUDA device `device_index` keeping up to `cache_bytes` of pages.
// IOError from CUDA (no device, out of memory).
Result<std::unique_ptr<StagedKvSource>> MakeStagedKvSource(size_t cache_bytes, int device_index);

}  // namespace shotdb

#endif  // SHOTDB_QUERY_DBSA_STAGED_KV_SOURCE_H_
