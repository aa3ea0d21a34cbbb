#include "query/dbsa/pool_encoder.h"

#include <ATen/Parallel.h>
#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <optional>
#include <set>
#include <system_error>
#include <thread>

#include "format/kv_values.h"
#include "query/dbsa/kv_tensor.h"

#ifdef SHOTDB_HAVE_GPU
#include <cuda_runtime_api.h>

#include "gpu/cuda_util.h"
#include "gpu/quantize_kv.h"
#include "gpu/unpack_kv.h"
#endif

namespace shotdb {

namespace {

uint64_t DemonstrationId(const LabeledText& demo, uint64_t occurrence) {
  std::string key = demo.label;
  key.push_back('\0');
  key += demo.text;
  key.push_back('\0');
  key += std::to_string(occurrence);
  return XXH3_64bits(key.data(), key.size());
}

torch::Tensor Positions(uint64_t start, int64_t count, torch::Device device) {
  return torch::arange(static_cast<int64_t>(start), static_cast<int64_t>(start) + count,
                       torch::TensorOptions().dtype(torch::kInt64).device(device));
}

// Memory that is reused from block to block: the first `numel` elements of `*flat` (grown, by at
// least a quarter, when too small, or made anew for other `options`) as `shape`. Host buffers are
// pinned (HostOptions) when the model is on a CUDA device, so that the copies to and from them
// need no staging. Fresh host buffers for every block (~25 MB for a Llama-3.1-8B int8 block) cost
// more than the conversion itself on the GPU machine: 16 threads touching new pages at once
// (docs/results.md, run X).
torch::Tensor Reused(torch::Tensor* flat, at::IntArrayRef shape,
                     const torch::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const bool same =
      flat->defined() && flat->dtype() == options.dtype() && flat->device() == options.device();
  if (!same || flat->numel() < numel) {
    const int64_t grown = same ? std::max(numel, flat->numel() + flat->numel() / 4) : numel;
    *flat = torch::empty({grown}, options);
  }
  return flat->narrow(0, 0, numel).view(shape);
}

torch::TensorOptions HostOptions(torch::ScalarType type, bool pinned) {
  return torch::TensorOptions().dtype(type).pinned_memory(pinned);
}

// Host buffers of one record on its way to the store, reused from block to block (Reused): the
// forward's K or V, the payload, the stored values.
struct RecordScratch {
  torch::Tensor wide, raw, values;
};

// Runs fn(0) .. fn(n - 1) on up to `threads` threads, this one included, and returns when all
// are done. Not at::parallel_for: with the GPU machine's libtorch (the PyTorch 2.11 wheel) that ran
// the quantisation of a block's 64 records on one core, 25-30 ms a block against 2.6-3.4 ms on 16
// std::threads (docs/results.md, run X).
void ForEachOnThreads(uint32_t n, int threads, const std::function<void(uint32_t)>& fn) {
  std::atomic<uint32_t> next{0};
  auto work = [&] {
    for (uint32_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  };
  std::vector<std::thread> helpers;
  for (int t = 1; t < threads && static_cast<uint32_t>(t) < n; ++t) {
    try {
      helpers.emplace_back(work);
    } catch (const std::system_error&) {
      break;  // no more threads: the ones running (and this one) take the rest
    }
  }
  work();
  for (std::thread& t : helpers) t.join();
}

// A block's K/V (`kv`: per layer, [kv_heads, tokens, head_dim] from the forward on `device`)
// converted on the host: the payloads in `stored` (`payloads`, record i = layer i / 2, K for even
// i; in `scratch`, valid until its next use) and the values as stored back on `device` in
// `model_dtype` (`as_stored`). Device -> host on this thread; fp8/int8 quantisation and its
// read-back (scalar loops) on all cores, a record each. A value that is not finite in a scaled
// dtype fails with KvFromFloat's message under record_name(i).
Status ConvertOnHost(const std::vector<LayerKV>& kv, DType stored,
                     const std::vector<int64_t>& shape, uint64_t raw_bytes, torch::Device device,
                     torch::ScalarType model_dtype, std::vector<RecordScratch>* scratch,
                     std::vector<const void*>* payloads, std::vector<LayerKV>* as_stored,
                     const std::function<std::string(uint32_t)>& record_name) {
  const bool scaled = IsScaledDType(stored);
  const uint32_t records = static_cast<uint32_t>(2 * kv.size());
  const uint32_t kv_heads = static_cast<uint32_t>(shape[0]),
                 tokens = static_cast<uint32_t>(shape[1]),
                 head_dim = static_cast<uint32_t>(shape[2]);
  scratch->resize(records);
  // Per record: the forward's K or V on the host (float32 for a scaled dtype, else the stored
  // dtype), the payload (scaled: codes and scales; else `wide` itself) and the stored values.
  std::vector<torch::Tensor> wide(records), payload(records), values(records);
  for (uint32_t i = 0; i < records; ++i) {
    RecordScratch& r = (*scratch)[i];
    wide[i] = Reused(&r.wide, shape,
                     HostOptions(scaled ? torch::kFloat32 : TorchType(stored), device.is_cuda()));
    wide[i].copy_(i % 2 == 0 ? kv[i / 2].k : kv[i / 2].v);
    payload[i] = scaled ? Reused(&r.raw, {static_cast<int64_t>(raw_bytes)},
                                 HostOptions(torch::kByte, device.is_cuda()))
                        : wide[i];
    values[i] =
        scaled ? Reused(&r.values, shape, HostOptions(torch::kFloat32, device.is_cuda())) : wide[i];
  }
  if (scaled) {
    std::vector<Status> quantised(records);
    ForEachOnThreads(records, at::get_num_threads(), [&](uint32_t i) {
      const Status q = KvFromFloat(stored, kv_heads, tokens, head_dim, wide[i].data_ptr<float>(),
                                   payload[i].data_ptr());
      if (!q.ok()) {
        quantised[i] = q.WithContext(record_name(i));
        return;
      }
      KvToFloat(stored, kv_heads, tokens, head_dim, payload[i].data_ptr(),
                values[i].data_ptr<float>());
    });
    for (const Status& q : quantised) SHOTDB_RETURN_IF_ERROR(q);
  }
  payloads->clear();
  for (uint32_t i = 0; i < records; ++i) {
    payloads->push_back(payload[i].data_ptr());
    // Synchronous copies: the buffers are the next block's.
    torch::Tensor& dst = i % 2 == 0 ? (*as_stored)[i / 2].k : (*as_stored)[i / 2].v;
    dst = values[i].to(device, model_dtype, false, /*copy=*/true);
  }
  return Status::OK();
}

#ifdef SHOTDB_HAVE_GPU
// The default (legacy) stream, where libtorch's kernels run (shotdb sets no current stream).
const cudaStream_t kTorchStream = nullptr;

// Buffers of ConvertOnDevice, reused from block to block: the payloads and not-finite words of a
// block's records on the device, and the same bytes pinned on the host.
struct DeviceScratch {
  torch::Tensor device, host;
};

// A block's K/V (`kv`: per layer, [kv_heads, tokens, head_dim] in the model's 16-bit dtype on the
// GPU) quantised to the scaled dtype `stored` on the device (gpu/quantize_kv.h): the payloads come
// to pinned host memory (`payloads`, record i = layer i / 2, K for even i; valid until the next
// call) and the values as stored, the payloads dequantised (gpu/unpack_kv.h), stay on the device
// in the model's dtype (`as_stored`). The bytes and values are the host path's (KvFromFloat, then
// KvToFloat rounded to the model's dtype): gpu/'s tests check both kernels against those
// functions. A record with a value that is not finite fails as on the host, with KvFromFloat's
// message (computed on the host for that record) under record_name(i).
Status ConvertOnDevice(const std::vector<LayerKV>& kv, DType stored,
                       const std::vector<int64_t>& shape, uint64_t raw_bytes,
                       DeviceScratch* scratch, std::vector<const void*>* payloads,
                       std::vector<LayerKV>* as_stored,
                       const std::function<std::string(uint32_t)>& record_name) {
  const uint32_t records = static_cast<uint32_t>(2 * kv.size());
  const uint32_t kv_heads = static_cast<uint32_t>(shape[0]),
                 tokens = static_cast<uint32_t>(shape[1]),
                 head_dim = static_cast<uint32_t>(shape[2]);
  const DType values = kv[0].k.scalar_type() == torch::kBFloat16 ? DType::kBF16 : DType::kF16;
  const int64_t stride = static_cast<int64_t>((raw_bytes + 15) / 16 * 16);
  const int64_t bytes = records * stride + 4 * int64_t{records};  // payloads, then the words
  torch::Tensor dev = Reused(&scratch->device, {bytes},
                             torch::TensorOptions().dtype(torch::kByte).device(kv[0].k.device()));
  torch::Tensor host = Reused(&scratch->host, {bytes}, HostOptions(torch::kByte, /*pinned=*/true));
  uint8_t* const d = dev.data_ptr<uint8_t>();
  const uint8_t* const h = host.data_ptr<uint8_t>();

  gpu::QuantizeKvArgs q;
  q.src_dtype = values;
  q.stored = stored;
  q.kv_heads = kv_heads;
  q.head_dim = head_dim;
  q.not_finite = reinterpret_cast<uint32_t*>(d + records * stride);
  gpu::UnpackKvArgs u;
  u.stored = stored;
  u.dtype = values;
  u.kv_heads = kv_heads;
  u.head_dim = head_dim;
  for (uint32_t i = 0; i < records; ++i) {
    const torch::Tensor& src = i % 2 == 0 ? kv[i / 2].k : kv[i / 2].v;  // contiguous
    torch::Tensor out = torch::empty(shape, src.options());
    q.jobs.push_back({src.data_ptr(), d + i * stride, tokens});
    u.jobs.push_back({d + i * stride, out.data_ptr(), tokens});
    (i % 2 == 0 ? (*as_stored)[i / 2].k : (*as_stored)[i / 2].v) = std::move(out);
  }
  SHOTDB_RETURN_IF_ERROR(gpu::LaunchQuantizeKv(q, kTorchStream));
  SHOTDB_RETURN_IF_ERROR(gpu::LaunchUnpackKv(u, kTorchStream));
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host.data_ptr(), d, static_cast<size_t>(bytes),
                                              cudaMemcpyDeviceToHost, kTorchStream));
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(kTorchStream));
  for (uint32_t i = 0; i < records; ++i) {
    uint32_t bad = 0;
    std::memcpy(&bad, h + records * stride + 4 * i, sizeof bad);
    if (bad == 0) continue;
    // The host's message names the first value that is not finite.
    const torch::Tensor f =
        (i % 2 == 0 ? kv[i / 2].k : kv[i / 2].v).to(torch::kCPU, torch::kFloat32).contiguous();
    std::vector<uint8_t> raw(raw_bytes);
    Status s = KvFromFloat(stored, kv_heads, tokens, head_dim, f.data_ptr<float>(), raw.data());
    if (s.ok()) s = Status::IOError("the device found a value that is not finite, the host none");
    return s.WithContext(record_name(i));
  }
  payloads->clear();
  for (uint32_t i = 0; i < records; ++i) payloads->push_back(h + i * stride);
  return Status::OK();
}

// ConvertOnDevice's results against ConvertOnHost's for the same K/V: "" when the payloads and
// the values as stored are equal, else the first difference, named.
std::string DeviceDifference(uint64_t raw_bytes, const std::vector<const void*>& payloads,
                             const std::vector<LayerKV>& as_stored,
                             const std::vector<const void*>& host_payloads,
                             const std::vector<LayerKV>& host_stored,
                             const std::function<std::string(uint32_t)>& record_name) {
  for (uint32_t i = 0; i < payloads.size(); ++i) {
    const auto* got = static_cast<const uint8_t*>(payloads[i]);
    const auto* want = static_cast<const uint8_t*>(host_payloads[i]);
    for (uint64_t b = 0; b < raw_bytes; ++b) {
      if (got[b] != want[b]) {
        return record_name(i) + " payload byte " + std::to_string(b) + ": device " +
               std::to_string(got[b]) + ", host " + std::to_string(want[b]);
      }
    }
    const LayerKV& dev = as_stored[i / 2];
    const LayerKV& host = host_stored[i / 2];
    if (!(i % 2 == 0 ? dev.k.equal(host.k) : dev.v.equal(host.v))) {
      return record_name(i) + ": the values as stored differ from the host's";
    }
  }
  return "";
}
#endif  // SHOTDB_HAVE_GPU
}  // namespace

ModelFingerprint MakeFingerprint(const PoolModel& m, DType kv_dtype) {
  return MakeFingerprint(m.model->config(), *m.tokenizer, m.weights_digest, kv_dtype);
}

ModelFingerprint MakeFingerprint(const ModelConfig& c, const Tokenizer& tokenizer,
                                 const std::string& weights_digest, DType kv_dtype) {
  ModelFingerprint f;
  f.architecture = c.architecture + "@" + weights_digest;
  f.dtype = kv_dtype;
  f.tokenizer_hash = tokenizer.Fingerprint();
  f.num_layers = static_cast<uint32_t>(c.num_layers);
  f.kv_heads = static_cast<uint32_t>(c.num_kv_heads);
  f.head_dim = static_cast<uint32_t>(c.head_dim);
  return f;
}

Result<std::vector<int32_t>> TokenizeBlock(const Tokenizer& tokenizer, const std::string& text,
                                           uint32_t block_index) {
  const bool bos = block_index == 0 && tokenizer.add_bos_default() && tokenizer.bos_id() >= 0;
  SHOTDB_ASSIGN_OR_RETURN(std::vector<int32_t> ids,
                          tokenizer.Encode(text, bos, /*parse_special=*/false));
  if (ids.empty()) {
    return Status::InvalidArgument("block " + std::to_string(block_index) + " has no tokens");
  }
  return ids;
}

std::vector<std::vector<Demonstration>> PlanBlocks(const std::vector<LabeledText>& demos,
                                                   uint32_t demos_per_block, uint64_t seed) {
  std::vector<Demonstration> all;
  std::map<std::pair<std::string, std::string>, uint64_t> occurrences;
  for (const LabeledText& d : demos) {
    all.push_back({DemonstrationId(d, occurrences[{d.label, d.text}]++), d.text, d.label});
  }
  std::vector<std::vector<Demonstration>> groups;
  for (const auto& members : GroupIntoBlocks(all.size(), demos_per_block, seed)) {
    std::vector<Demonstration> group;
    for (size_t m : members) group.push_back(all[m]);
    groups.push_back(std::move(group));
  }
  return groups;
}

Status PoolEncoder::AddDemonstrations(const std::string& task_name, const PoolTaskOptions& options,
                                      const std::vector<LabeledText>& demos, uint64_t seed,
                                      const EncodeProgressFn& progress) {
  // The task as it is, or as it will be created; nothing is written until every row checked out.
  TaskInfo task;
  bool exists = false;
  {
    SHOTDB_ASSIGN_OR_RETURN(auto snapshot, store_->BeginSnapshot());
    auto existing = snapshot->GetTask(task_name);
    if (existing.ok()) {
      task = *existing;
      exists = true;
      const ModelFingerprint ours = MakeFingerprint(model_, task.model.dtype);
      if (ours != task.model) {
        return Status::FailedPrecondition("task '" + task_name + "' was encoded with model " +
                                          task.model.ToString() + ", not " + ours.ToString());
      }
    } else if (existing.status().IsNotFound()) {
      task.name = task_name;
      task.model = MakeFingerprint(model_, options.kv_dtype);
      task.blocks = options.blocks;
      task.codec = options.codec;
      task.prompt_template = options.demo_template;
      task.separator = options.separator;
      task.analyzer = options.analyzer;
      task.bm25 = options.bm25;
      task.labels = options.labels;
      if (task.labels.empty()) {
        std::set<std::string> distinct;
        for (const auto& d : demos) distinct.insert(d.label);
        task.labels.assign(distinct.begin(), distinct.end());
      }
      task.metadata_json = "{\"weights_digest\":\"" + model_.weights_digest + "\"}";
    } else {
      return existing.status();
    }
  }
  if (task.blocks.demos_per_block == 0) {
    return Status::InvalidArgument("demonstrations per block must be at least 1");
  }
  SHOTDB_ASSIGN_OR_RETURN(PromptFormat format,
                          PromptFormat::Create(task.prompt_template, task.separator));

  // Every row before anything is written: its label is the task's, its text and label encode
  // (valid UTF-8), and no block could exceed the model's context.
  const std::set<std::string> labels(task.labels.begin(), task.labels.end());
  std::vector<size_t> demo_tokens(demos.size());
  for (size_t i = 0; i < demos.size(); ++i) {
    const LabeledText& d = demos[i];
    const std::string where = "demonstration " + std::to_string(i + 1);
    if (!labels.count(d.label)) {
      return Status::InvalidArgument(where + ": label '" + d.label + "' is not one of task '" +
                                     task_name + "''s labels");
    }
    auto ids = model_.tokenizer->Encode(format.separator() + format.FormatDemo(d.text, d.label),
                                        /*add_bos=*/false, /*parse_special=*/false);
    if (!ids.ok()) return ids.status().WithContext(where);
    demo_tokens[i] = ids->size();
  }
  const int64_t window = model_.model->config().max_position_embeddings;
  if (window > 0 && !demos.empty()) {
    // The longest possible block: the k longest demonstrations.
    std::vector<size_t> sorted = demo_tokens;
    std::sort(sorted.rbegin(), sorted.rend());
    size_t longest = 0;
    for (size_t i = 0; i < sorted.size() && i < task.blocks.demos_per_block; ++i) {
      longest += sorted[i];
    }
    if (longest > static_cast<size_t>(window)) {
      return Status::InvalidArgument("blocks of " + std::to_string(task.blocks.demos_per_block) +
                                     " demonstrations can reach " + std::to_string(longest) +
                                     " tokens, beyond the model's " + std::to_string(window) +
                                     " positions; use fewer demonstrations per block");
    }
  }

  // The grouping of the whole input is fixed by the seed and the input alone, so a run that
  // resumes an interrupted one encodes exactly the blocks it would have: groups whose
  // demonstrations are all stored are skipped, the others encoded in plan order (a group only
  // partly stored, possible when the input overlaps an earlier build's, keeps its new members).
  std::vector<std::vector<Demonstration>> groups;
  {
    SHOTDB_ASSIGN_OR_RETURN(auto snapshot, store_->BeginSnapshot());
    for (auto& group : PlanBlocks(demos, task.blocks.demos_per_block, seed)) {
      std::vector<Demonstration> fresh;
      for (Demonstration& d : group) {
        if (exists) {
          auto stored = snapshot->GetDemonstration(task_name, d.id);
          if (stored.ok()) continue;  // committed by an earlier (perhaps interrupted) run
          if (!stored.status().IsNotFound()) return stored.status();
        }
        fresh.push_back(std::move(d));
      }
      if (!fresh.empty()) groups.push_back(std::move(fresh));
    }
  }
  if (!exists) SHOTDB_RETURN_IF_ERROR(store_->CreateTask(task));
  return EncodeBlocks(task_name, groups, progress);
}

Result<PoolEncoder::BlockKV> PoolEncoder::ContextBlock(Snapshot* snapshot, const TaskInfo& task,
                                                       uint32_t index) {
  auto cached = window_.find(index);
  if (cached != window_.end()) return cached->second;
  SHOTDB_ASSIGN_OR_RETURN(BlockInfo info, snapshot->GetBlock(task.name, index));
  const LlamaModel& model = *model_.model;
  BlockKV kv(task.model.num_layers);
  for (uint32_t layer = 0; layer < task.model.num_layers; ++layer) {
    for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
      // Raw payload bytes in a float64-aligned buffer, whatever the dtype.
      const uint64_t bytes =
          *KvRawBytes(task.model.dtype, task.model.kv_heads, info.token_count, task.model.head_dim);
      torch::Tensor raw = torch::empty({static_cast<int64_t>((bytes + 7) / 8)}, torch::kFloat64);
      SHOTDB_RETURN_IF_ERROR(
          snapshot->DecodePayloadInto(task.name, index, layer, kind, raw.data_ptr(), bytes));
      (kind == TensorKind::kKey ? kv[layer].k : kv[layer].v) =
          StoredKvTensor(task.model.dtype, raw.data_ptr(), task.model.kv_heads, info.token_count,
                         task.model.head_dim)
              .to(model.device(), model.dtype(), /*non_blocking=*/false, /*copy=*/true);
    }
  }
  window_[index] = kv;
  return kv;
}

Status PoolEncoder::EncodeBlocks(const std::string& task_name,
                                 const std::vector<std::vector<Demonstration>>& groups,
                                 const EncodeProgressFn& progress) {
  if (window_task_ != task_name) {
    window_.clear();
    window_task_ = task_name;
  }
  const LlamaModel& model = *model_.model;
  const torch::Device device = model.device();
  const auto start = std::chrono::steady_clock::now();
  EncodeProgress report;
  report.blocks_total = groups.size();
  std::vector<RecordScratch> scratch;  // one per record of a block; freed when the call returns
#ifdef SHOTDB_HAVE_GPU
  DeviceScratch device_scratch;  // likewise
#endif

  for (const auto& group : groups) {
    SHOTDB_ASSIGN_OR_RETURN(auto snapshot, store_->BeginSnapshot());
    SHOTDB_ASSIGN_OR_RETURN(TaskInfo task, snapshot->GetTask(task_name));
    SHOTDB_ASSIGN_OR_RETURN(PromptFormat format,
                            PromptFormat::Create(task.prompt_template, task.separator));
    const uint32_t index = static_cast<uint32_t>(task.num_blocks);

    std::vector<std::pair<std::string, std::string>> pairs;
    NewBlock block;
    for (const auto& d : group) {
      pairs.emplace_back(d.text, d.label);
      block.info.demo_ids.push_back(d.id);
    }
    block.demos = group;
    block.model = task.model;
    block.info.index = index;
    block.info.position_offset = task.num_tokens;
    block.info.text = format.FormatBlock(pairs, index == 0);
    SHOTDB_ASSIGN_OR_RETURN(std::vector<int32_t> ids,
                            TokenizeBlock(*model_.tokenizer, block.info.text, index));
    block.info.token_count = static_cast<uint32_t>(ids.size());

    // Context: the sink blocks and the previous `window` blocks, in block order, at the positions
    // of the task's scheme.
    const std::vector<uint32_t> context_blocks = ContextBlocks(task.blocks, index);
    std::vector<BlockInfo> infos;
    for (uint32_t c : context_blocks) {
      SHOTDB_ASSIGN_OR_RETURN(BlockInfo info, snapshot->GetBlock(task_name, c));
      infos.push_back(std::move(info));
    }
    std::vector<const BlockInfo*> info_ptrs;
    for (const BlockInfo& info : infos) info_ptrs.push_back(&info);
    const EncodingPositions at = PositionsForEncoding(task.blocks.positions, info_ptrs, block.info);
    std::vector<LayerKV> context(task.model.num_layers);
    std::vector<torch::Tensor> context_positions;
    if (!context_blocks.empty()) {
      std::vector<std::vector<torch::Tensor>> ks(task.model.num_layers), vs(task.model.num_layers);
      for (size_t i = 0; i < context_blocks.size(); ++i) {
        SHOTDB_ASSIGN_OR_RETURN(BlockKV kv, ContextBlock(snapshot.get(), task, context_blocks[i]));
        context_positions.push_back(Positions(at.context[i], infos[i].token_count, device));
        for (uint32_t l = 0; l < task.model.num_layers; ++l) {
          ks[l].push_back(kv[l].k);
          vs[l].push_back(kv[l].v);
        }
      }
      for (uint32_t l = 0; l < task.model.num_layers; ++l) {
        context[l] = {torch::cat(ks[l], 1), torch::cat(vs[l], 1)};
      }
    }
    snapshot.reset();  // the forward pass below needs no read transaction

    ForwardRequest request;
    request.tokens = torch::tensor(std::vector<int64_t>(ids.begin(), ids.end()),
                                   torch::TensorOptions().dtype(torch::kInt64))
                         .to(device);
    request.positions = Positions(at.block, request.tokens.size(0), device);
    report.max_position = std::max(report.max_position, at.end);
    if (!context_positions.empty()) {
      request.context = &context;
      request.context_positions = torch::cat(context_positions);
    }
    request.return_kv = true;
    auto since = std::chrono::steady_clock::now();
    // Seconds since `since`, which moves on to now.
    auto lap = [&since] {
      const auto now = std::chrono::steady_clock::now();
      const double s = std::chrono::duration<double>(now - since).count();
      since = now;
      return s;
    };
    SHOTDB_ASSIGN_OR_RETURN(ForwardResult result, model.Forward(request));
    // The copies below would wait for the forward anyway; waiting here times it apart.
    if (device.is_cuda()) torch::cuda::synchronize(device.has_index() ? device.index() : -1);
    report.forward_seconds += lap();

    // The stored payloads, and what later blocks attend to: the values as stored (rounded to the
    // stored dtype), exactly what a query reads back. Scaled dtypes of a 16-bit model on a GPU are
    // quantised there (ConvertOnDevice); otherwise on the host (ConvertOnHost).
    const DType stored = task.model.dtype;
    const std::vector<int64_t> shape = {task.model.kv_heads, block.info.token_count,
                                        task.model.head_dim};
    const std::optional<uint64_t> raw_bytes =
        KvRawBytes(stored, task.model.kv_heads, block.info.token_count, task.model.head_dim);
    if (!raw_bytes) return Status::InvalidArgument("block " + std::to_string(index) + " too large");
    auto record_name = [&](uint32_t i) {
      return "task '" + task_name + "' block " + std::to_string(index) + " layer " +
             std::to_string(i / 2) + (i % 2 ? " V" : " K");
    };
    auto on_host = [&](std::vector<const void*>* payloads, BlockKV* values) {
      return ConvertOnHost(result.kv, stored, shape, *raw_bytes, device, model.dtype(), &scratch,
                           payloads, values, record_name);
    };
    BlockKV as_stored(task.model.num_layers);
    std::vector<const void*> payloads;
    bool converted = false;
#ifdef SHOTDB_HAVE_GPU
    // The unpacking kernel reads scaled payloads 4 channels at a time.
    const bool on_device = IsScaledDType(stored) && device.is_cuda() &&
                           task.model.head_dim % 4 == 0 &&
                           (model.dtype() == torch::kBFloat16 || model.dtype() == torch::kHalf);
    if (on_device && report.device_mismatch.empty()) {
      SHOTDB_RETURN_IF_ERROR(ConvertOnDevice(result.kv, stored, shape, *raw_bytes, &device_scratch,
                                             &payloads, &as_stored, record_name));
      converted = true;
      // The kernels are checked where they run: now and then against the host's conversion,
      // whose results are stored where the two differ.
      if (report.blocks_on_device % kDeviceCheckInterval == 0) {
        std::vector<const void*> host_payloads;
        BlockKV host_stored(task.model.num_layers);
        SHOTDB_RETURN_IF_ERROR(on_host(&host_payloads, &host_stored));
        report.device_mismatch = DeviceDifference(*raw_bytes, payloads, as_stored, host_payloads,
                                                  host_stored, record_name);
        if (!report.device_mismatch.empty()) {
          payloads = std::move(host_payloads);
          as_stored = std::move(host_stored);
        }
      }
      if (report.device_mismatch.empty()) ++report.blocks_on_device;
    }
#endif
    if (!converted) SHOTDB_RETURN_IF_ERROR(on_host(&payloads, &as_stored));
    for (uint32_t l = 0; l < task.model.num_layers; ++l) {
      block.keys.push_back(payloads[2 * l]);
      block.values.push_back(payloads[2 * l + 1]);
    }
    report.convert_seconds += lap();
    SHOTDB_RETURN_IF_ERROR(
        store_->AppendBlock(task_name, block)
            .WithContext("task '" + task_name + "' block " + std::to_string(index)));
    report.append_seconds += lap();

    window_[index] = std::move(as_stored);
    for (auto it = window_.begin(); it != window_.end();) {
      const bool sink = it->first < task.blocks.sink_blocks;
      const bool recent = it->first + task.blocks.window >= index + 1;
      it = sink || recent ? std::next(it) : window_.erase(it);
    }

    ++report.blocks_done;
    report.tokens_done += ids.size();
    report.seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (progress) progress(report);
  }
  return Status::OK();
}

}  // namespace shotdb
