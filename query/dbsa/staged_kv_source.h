// StagedKvSource: DBSA's block K/V on a CUDA device through gpu/ (built only with CUDA).
//
// The selected blocks' stored K/V for every layer go store -> device pages by gpu::Stager (DMA
// straight from the registered map, or through pinned slabs; checksums verified), and stay in a
// gpu::BlockPageCache between queries. As each layer's pages arrive, gpu::LaunchGatherRope copies
// them into the contiguous context tensors the model takes, rotating K to the new positions in the
// same pass, so the model gets K with RoPE applied (LlamaModel::Forward's context_rotated) and the
// H2D copies of layer l + 1 overlap the gather of layer l. Where the model's dtype differs from
// the stored one (the kernel does not convert), libtorch concatenates and converts instead and K
// stays pre-RoPE. It replaces BlockCache on CUDA for tasks stored as bf16 or f16, the dtypes the
// gpu/ kernels take: BlockCache reads and uploads on one thread through one pinned buffer, which
// measured about 3 GB/s (docs/results.md).
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

// The selected blocks' K/V per layer, as the model takes them.
struct StagedContext {
  std::vector<LayerKV> kv;  // [kv_heads, tokens, head_dim] per layer
  // True: K has RoPE applied at positions 0..tokens-1 (the gather kernel did it); false: K is
  // pre-RoPE.
  bool rotated = false;
};

class StagedKvSource {
 public:
  virtual ~StagedKvSource() = default;

  // The K/V of `blocks` (in that order) concatenated per layer with `options` (the model's dtype
  // and CUDA device), K rotated with the RoPE of `config` where the kernel can (see above). Waits
  // until the tensors are complete. `load_ms` receives the time until every copy is enqueued and
  // every checksum verified, `gather_ms` the rest (mostly the last layers' copies and gathers).
  // Errors from the store (NotFound, Corruption naming the record) or CUDA.
  virtual Result<StagedContext> Gather(Snapshot* snapshot, const TaskInfo& task,
                                       const std::vector<uint32_t>& blocks,
                                       const ModelConfig& config,
                                       const torch::TensorOptions& options, double* load_ms,
                                       double* gather_ms) = 0;
  // Page-cache statistics in BlockCache's terms (hits and misses count pages, i.e. block-layers;
  // bytes_loaded counts host-to-device bytes).
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
