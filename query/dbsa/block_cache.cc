#include "query/dbsa/block_cache.h"

#include <cstring>

#include "query/dbsa/kv_tensor.h"

namespace shotdb {

void BlockCache::Clear() {
  entries_.clear();
  lru_.clear();
  stats_.bytes_resident = 0;
}

Result<std::shared_ptr<const BlockCache::BlockKV>> BlockCache::Get(Snapshot* snapshot,
                                                                   const TaskInfo& task,
                                                                   uint32_t block) {
  const Key key{task.name, task.created_unix, block};
  auto it = entries_.find(key);
  if (it != entries_.end()) {
    ++stats_.hits;
    lru_.splice(lru_.begin(), lru_, it->second.lru);
    return it->second.kv;
  }
  ++stats_.misses;
  size_t bytes = 0;
  SHOTDB_ASSIGN_OR_RETURN(std::shared_ptr<const BlockKV> kv, Load(snapshot, task, block, &bytes));
  stats_.bytes_loaded += bytes;
  if (bytes > capacity_) return kv;
  while (stats_.bytes_resident + bytes > capacity_ && !lru_.empty()) {
    auto victim = entries_.find(lru_.back());
    stats_.bytes_resident -= victim->second.bytes;
    entries_.erase(victim);
    lru_.pop_back();
    ++stats_.evictions;
  }
  lru_.push_front(key);
  entries_[key] = Entry{kv, bytes, lru_.begin()};
  stats_.bytes_resident += bytes;
  return kv;
}

Result<std::shared_ptr<const BlockCache::BlockKV>> BlockCache::Load(Snapshot* snapshot,
                                                                    const TaskInfo& task,
                                                                    uint32_t block, size_t* bytes) {
  SHOTDB_ASSIGN_OR_RETURN(BlockInfo info, snapshot->GetBlock(task.name, block));
  const uint32_t layers = task.model.num_layers;
  const std::vector<int64_t> shape{task.model.kv_heads, info.token_count, task.model.head_dim};
  const auto stored = torch::TensorOptions().dtype(TorchType(task.model.dtype));
  const size_t tensor_bytes = static_cast<size_t>(task.model.kv_heads) * info.token_count *
                              task.model.head_dim * DTypeSize(task.model.dtype);
  *bytes = 2 * layers * tensor_bytes;

  auto kv = std::make_shared<BlockKV>(layers);
  if (!device_.is_cuda()) {
    for (uint32_t l = 0; l < layers; ++l) {
      for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
        torch::Tensor t = torch::empty(shape, stored);
        SHOTDB_RETURN_IF_ERROR(
            snapshot->DecodePayloadInto(task.name, block, l, kind, t.data_ptr(), t.nbytes()));
        ((kind == TensorKind::kKey) ? (*kv)[l].k : (*kv)[l].v) = t.to(device_);
      }
    }
    return std::shared_ptr<const BlockKV>(kv);
  }
  // CUDA: decode every layer into one pinned buffer, then upload with asynchronous copies. The
  // buffer is reused by the next miss, so wait for the uploads before returning.
  if (!staging_.defined() || static_cast<size_t>(staging_.nbytes()) < *bytes) {
    staging_ = torch::empty({static_cast<int64_t>(*bytes)},
                            torch::TensorOptions().dtype(torch::kUInt8).pinned_memory(true));
  }
  auto* base = static_cast<uint8_t*>(staging_.data_ptr());
  size_t offset = 0;
  for (uint32_t l = 0; l < layers; ++l) {
    for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
      SHOTDB_RETURN_IF_ERROR(
          snapshot->DecodePayloadInto(task.name, block, l, kind, base + offset, tensor_bytes));
      torch::Tensor host = torch::from_blob(base + offset, shape, stored);
      ((kind == TensorKind::kKey) ? (*kv)[l].k : (*kv)[l].v) =
          host.to(device_, /*non_blocking=*/true);
      offset += tensor_bytes;
    }
  }
  torch::cuda::synchronize();
  return std::shared_ptr<const BlockKV>(kv);
}

}  // namespace shotdb
