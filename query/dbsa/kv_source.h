// KvSource: where a DBSA query's context K/V comes from. DbsaSession reads stored K/V through this
// interface only; one source per session.
//
// Given the selected blocks (in placement order), a source returns the query's context, C tokens
// whose K/V are the blocks' stored pre-RoPE K/V concatenated, K placed with RoPE at positions
// 0..C-1, in one of two forms:
//   - attention: a ContextAttention (query/model/llama.h) that attends to the blocks where they
//     lie, with RoPE applied on the fly; the model never sees the context as tensors;
//   - tensors: per layer [kv_heads, C, head_dim] K and V in the model's dtype and device, K either
//     already rotated to 0..C-1 (`rotated`) or pre-RoPE.
// Both sources give the attention form unless asked for tensors; callers that need tensors
// (free-text generation, which appends to a K/V cache) ask for them.
//
// Implementations:
//   - MakeHostKvSource: reads the blocks from the snapshot on every query (zero-copy views into
//     the memory map for raw payloads, decoded for LZ4; checksums verified) and concatenates them
//     in the model's dtype on the model's device. No cache of its own: on the CPU the store's map
//     is already in memory (the OS page cache), and a copy into the model's layout is needed
//     either way. Tensors have K pre-RoPE; the attention form is a TensorContextAttention
//     (query/model/context_attention.h) over them.
//   - MakeDeviceKvSource (builds with gpu/, CUDA models): gpu::Stager stages the blocks' pages
//     into a gpu::BlockPageCache kept between queries (a hot query copies nothing from the host).
//     When the model's dtype is the stored one and the kernels take it (bf16, f16; head_dim 64 or
//     128; at most 8 query heads per K/V head) the query gets the attention form:
//     gpu::LaunchPagedAttention reads the cached pages in place, layer l waiting only for layer
//     l's copies (a cold query's later layers still travel while earlier ones compute). The
//     staging itself runs on a thread of its own: Load returns once the first layer group is
//     staged, and layer l's attention waits on the host until layer l is (the host's pinning and
//     a cold query's reading of later groups overlap the forward). QueryContext::release hands
//     the pages back while the GPU still runs the forward, in stream order. Otherwise
//     (and for tensors) the pages are gathered and rotated by gpu::LaunchGatherRope when the dtype
//     matches, else concatenated and converted by libtorch (K pre-RoPE); the attention form is
//     then a TensorContextAttention over those tensors.
//
// A returned context reads the snapshot's map (direct copies of cold blocks, host tensors that
// are views; the device source's staging thread): keep the snapshot open, and use it for nothing
// else, while the context lives. Destroy contexts before their source.
// Not thread-safe: one source per session.
#ifndef SHOTDB_QUERY_DBSA_KV_SOURCE_H_
#define SHOTDB_QUERY_DBSA_KV_SOURCE_H_

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <vector>

#include "engine/store.h"
#include "query/model/llama.h"

namespace shotdb {

struct QueryContext {
  uint64_t tokens = 0;  // C
  // The attention form (non-null), or else the tensors.
  std::unique_ptr<ContextAttention> attention;
  std::vector<LayerKV> kv;
  bool rotated = false;  // kv's K has RoPE at 0..C-1 applied
  // Checks of the context's K/V still running when Load returned (the device source verifies the
  // records' checksums on the host while the copies and the forward run). Waits for them: OK, or
  // Corruption naming the record. Empty when there is nothing to wait for. A result computed from
  // the context may be returned only after this returned OK.
  std::function<Status()> verified;
  // Optional (empty when there is nothing to hand back early). Call it once every Attend on this
  // context has been enqueued and none will follow: a device context then hands its pages back to
  // its cache at once, in stream order (whatever later reuses their memory is ordered, on the
  // device, after the attention enqueued so far), so that the release overlaps the GPU's forward
  // instead of following it. Without the call the pages go back when the context is destroyed.
  std::function<void()> release;
};

class KvSource {
 public:
  struct Stats {
    uint64_t hits = 0, misses = 0, evictions = 0;  // cache pages (a block's K and V of one layer)
    uint64_t bytes_loaded = 0;                     // copied from the host to the device
    uint64_t copies = 0;                           // host -> device copy calls doing it
    uint64_t bytes_resident = 0;                   // held by the cache now
    // Device sources: host milliseconds spent staging (gpu::Stager::StageLayers), of which
    // pinning the pages in the cache; of what the attention form's Load waits for, the staging
    // thread's start and then StageLayers until its first layer. 0 for the host source.
    double stage_ms = 0, pin_ms = 0;
    double thread_start_ms = 0, first_layer_ms = 0;
  };

  virtual ~KvSource() = default;

  // The context of `blocks` of `task` for `model` (see above); `want_tensors` asks for the tensor
  // form. `load_ms` receives the time until every block is read (host) or every copy is enqueued
  // (device; the checksums are verified meanwhile, see QueryContext::verified; for the attention
  // form only until the first layer is published: its pins where its pages all hit, else the first
  // layer group's copies; the rest is staged while the forward runs),
  // `gather_ms` the rest (concatenation or gather; 0 for the attention form, whose copies are
  // waited for by the attention itself). Errors from the store (NotFound, Corruption naming the
  // record), libtorch or CUDA; for the device attention form, those of later layer groups come
  // from ContextAttention::Attend and QueryContext::verified instead.
  virtual Result<QueryContext> Load(Snapshot* snapshot, const TaskInfo& task,
                                    const std::vector<uint32_t>& blocks, const LlamaModel& model,
                                    bool want_tensors, double* load_ms, double* gather_ms) = 0;
  // The contexts of several queries (blocks[q] in that order for query q) in the attention form,
  // for one batched forward (DecodeLabelBatch). The device source stages the union of the blocks
  // once and gives each query a view of its pages; by default (the host source, and the device
  // source where the kernels do not apply) each query is loaded on its own. `load_ms`/`gather_ms`
  // as Load's, for the whole batch. Errors as Load's.
  virtual Result<std::vector<QueryContext>> LoadBatch(
      Snapshot* snapshot, const TaskInfo& task, const std::vector<std::vector<uint32_t>>& blocks,
      const LlamaModel& model, double* load_ms, double* gather_ms);
  virtual Stats stats() const = 0;
  // Drops cached blocks (nothing for the host source).
  virtual void Clear() = 0;
};

// Turns a context in the tensor form into the attention form (a TensorContextAttention over the
// same K/V; the tensors move into it). Errors from RotateKeys.
Status ToAttentionForm(const LlamaModel& model, QueryContext* context);

std::unique_ptr<KvSource> MakeHostKvSource();

// True when this build has gpu/ (MakeDeviceKvSource exists).
bool DeviceKvSourceAvailable();
// A device source on CUDA device `device_index` whose page cache keeps up to `cache_bytes`.
// NotSupported without gpu/; IOError from CUDA (no device, out of memory).
Result<std::unique_ptr<KvSource>> MakeDeviceKvSource(size_t cache_bytes, int device_index);

}  // namespace shotdb

#endif  // SHOTDB_QUERY_DBSA_KV_SOURCE_H_
