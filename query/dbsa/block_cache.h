// BlockCache: whole blocks' K/V resident on the model's device, so that a hot DBSA query reads no
// K/V from the store at all.
//
// Entries are keyed by (task name, task creation time, block index): a task's blocks never change
// once committed (appends add new indices), and a task deleted and re-created under the same name
// has another creation time. Eviction is least-recently-used by bytes. Misses are read from the
// store snapshot (zero-copy for raw payloads, verified), copied into one pinned host buffer per
// block and uploaded with asynchronous copies; on the CPU the tensors are simply kept in memory.
//
// Not thread-safe: one cache per session.
#ifndef SHOTDB_QUERY_DBSA_BLOCK_CACHE_H_
#define SHOTDB_QUERY_DBSA_BLOCK_CACHE_H_

#include <torch/torch.h>

#include <list>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "engine/store.h"
#include "query/model/llama.h"

namespace shotdb {

class BlockCache {
 public:
  using BlockKV = std::vector<LayerKV>;  // per layer, [kv_heads, tokens, head_dim], stored dtype

  struct Stats {
    uint64_t hits = 0, misses = 0, evictions = 0;
    uint64_t bytes_loaded = 0;    // uploaded on misses
    uint64_t bytes_resident = 0;  // now held
  };

  BlockCache(size_t capacity_bytes, torch::Device device)
      : capacity_(capacity_bytes), device_(device) {}

  // The block's K/V on the device, loading it on a miss. A block larger than the capacity is
  // returned but not kept. Corruption/NotFound from the store are passed on.
  Result<std::shared_ptr<const BlockKV>> Get(Snapshot* snapshot, const TaskInfo& task,
                                             uint32_t block);

  const Stats& stats() const { return stats_; }
  void Clear();

 private:
  using Key = std::tuple<std::string, int64_t, uint32_t>;
  struct Entry {
    std::shared_ptr<const BlockKV> kv;
    size_t bytes;
    std::list<Key>::iterator lru;
  };
  Result<std::shared_ptr<const BlockKV>> Load(Snapshot* snapshot, const TaskInfo& task,
                                              uint32_t block, size_t* bytes);

  size_t capacity_;
  torch::Device device_;
  std::map<Key, Entry> entries_;
  std::list<Key> lru_;     // front = most recent
  torch::Tensor staging_;  // pinned host bytes, reused across misses (CUDA only)
  Stats stats_;
};

}  // namespace shotdb

#endif  // SHOTDB_QUERY_DBSA_BLOCK_CACHE_H_
