#include "query/dbsa/kv_source.h"

#include <chrono>
#include <numeric>

#include "query/dbsa/kv_tensor.h"
#include "query/model/context_attention.h"

namespace shotdb {

namespace {

double MsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

class HostKvSource final : public KvSource {
 public:
  Result<QueryContext> Load(Snapshot* snapshot, const TaskInfo& task,
                            const std::vector<uint32_t>& blocks, const LlamaModel& model,
                            bool want_tensors, double* load_ms, double* gather_ms) override {
    auto start = std::chrono::steady_clock::now();
    const uint32_t layers = task.model.num_layers;
    // Per block, per layer K then V: views of the map (raw) or decoded copies (LZ4), verified.
    std::vector<std::vector<PayloadRef>> payloads;
    std::vector<int64_t> lengths;
    QueryContext context;
    std::vector<uint32_t> all_layers(layers);
    std::iota(all_layers.begin(), all_layers.end(), 0u);
    for (uint32_t b : blocks) {
      SHOTDB_ASSIGN_OR_RETURN(std::vector<PayloadRef> refs,
                              snapshot->GetBlockPayloads(task.name, b, all_layers));
      const uint32_t tokens = refs.empty() ? 0 : refs.front().header.meta.tokens;
      lengths.push_back(tokens);
      context.tokens += tokens;
      payloads.push_back(std::move(refs));
    }
    *load_ms = MsSince(start);
    start = std::chrono::steady_clock::now();
    context.kv = ConcatenateBlocks(
        layers, task.model.kv_heads, task.model.head_dim, lengths,
        torch::TensorOptions().dtype(model.dtype()).device(model.device()),
        [&](size_t i, uint32_t l, int kv) {
          return StoredKvTensor(task.model.dtype, payloads[i][2 * l + kv].data, task.model.kv_heads,
                                lengths[i], task.model.head_dim);
        });
    if (model.device().is_cuda()) torch::cuda::synchronize();  // the copies read `payloads`
    if (!want_tensors) SHOTDB_RETURN_IF_ERROR(ToAttentionForm(model, &context));
    *gather_ms = MsSince(start);
    return context;
  }

  Stats stats() const override { return {}; }
  void Clear() override {}
};

}  // namespace

Result<std::vector<QueryContext>> KvSource::LoadBatch(
    Snapshot* snapshot, const TaskInfo& task, const std::vector<std::vector<uint32_t>>& blocks,
    const LlamaModel& model, double* load_ms, double* gather_ms) {
  std::vector<QueryContext> contexts;
  *load_ms = *gather_ms = 0;
  for (const std::vector<uint32_t>& b : blocks) {
    double load = 0, gather = 0;
    SHOTDB_ASSIGN_OR_RETURN(QueryContext c, Load(snapshot, task, b, model,
                                                 /*want_tensors=*/false, &load, &gather));
    *load_ms += load;
    *gather_ms += gather;
    contexts.push_back(std::move(c));
  }
  return contexts;
}

Status ToAttentionForm(const LlamaModel& model, QueryContext* context) {
  const auto int64 = torch::TensorOptions().dtype(torch::kInt64).device(model.device());
  SHOTDB_ASSIGN_OR_RETURN(
      context->attention,
      TensorContextAttention::Create(model, std::move(context->kv),
                                     torch::arange(static_cast<int64_t>(context->tokens), int64),
                                     context->rotated));
  context->kv.clear();
  context->rotated = false;
  return Status::OK();
}

std::unique_ptr<KvSource> MakeHostKvSource() { return std::make_unique<HostKvSource>(); }

#ifndef SHOTDB_HAVE_GPU
bool DeviceKvSourceAvailable() { return false; }

Result<std::unique_ptr<KvSource>> MakeDeviceKvSource(size_t, int) {
  return Status::NotSupported("this build has no gpu/ (configure with CUDA to stage K/V)");
}
#endif

}  // namespace shotdb
