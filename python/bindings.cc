// The `shotdb._shotdb` extension: a thin nanobind layer over the engine API (engine/store.h,
// engine/export.h). It links no libtorch and imports no array framework; K/V leave as
// DLPack-capable arrays (torch.from_dlpack, numpy.from_dlpack). python/shotdb/__init__.py
// re-exports it; python/shotdb/_shotdb.pyi (generated) and docs/python.md are the manual.
//
// Errors: every engine Status becomes the exception class of python/shotdb/errors.py named by its
// code (NotFound -> NotFoundError, a KeyError; Corruption -> CorruptionError; ...), carrying the
// engine's message.
//
// Lifetimes: a KvHandle owns the read snapshot its arrays point into and a reference to the
// engine Store (for device="cuda": the pinned pages of the device cache, python/cuda_kv.h); every
// array keeps its KvHandle alive, so no array can outlive the memory it points to. After
// Store.close() handles refuse to make new arrays; those made before stay valid.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/analyzer.h"
#include "engine/export.h"
#include "engine/prompt_format.h"
#include "engine/store.h"
#include "format/dtype.h"
#include "format/kv_values.h"
#include "python/cuda_kv.h"
#include "python/status_error.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace shotdb::python {
namespace {

nb::dlpack::dtype DlpackDtype(DType t) {
  switch (t) {
    case DType::kF32:
      return {static_cast<uint8_t>(nb::dlpack::dtype_code::Float), 32, 1};
    case DType::kF16:
      return {static_cast<uint8_t>(nb::dlpack::dtype_code::Float), 16, 1};
    case DType::kBF16:
      return {static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat), 16, 1};
    case DType::kF64:
      return {static_cast<uint8_t>(nb::dlpack::dtype_code::Float), 64, 1};
    case DType::kF8E4M3:  // scaled: refused before any array is made or read (LoadKv,
    case DType::kI8:      // CreateTask, AppendBlock)
      break;
  }
  return {};
}

// ---- the engine Store, shared with the KvHandles made from it --------------------------------

// LMDB must not open one environment twice in a process (closing either copy's lock file would
// drop the other's locks), so every Store object of one directory shares one engine Store, kept
// alive by the Store objects and KvHandles that use it.
std::shared_ptr<Store> OpenShared(const std::string& path, const Store::Options& options) {
  static std::mutex mu;
  static std::map<std::string, std::weak_ptr<Store>> open;
  std::lock_guard<std::mutex> lock(mu);
  char resolved[PATH_MAX];
  const bool exists = ::realpath(path.c_str(), resolved) != nullptr;
  if (exists) {
    auto it = open.find(resolved);
    if (it != open.end()) {
      if (std::shared_ptr<Store> store = it->second.lock()) {
        if (!options.read_only && store->read_only()) {
          Raise(Status::FailedPrecondition(
              path +
              ": already open read-only in this process; close every Store of it (and "
              "drop their KV handles) before opening it for writing"));
        }
        return store;
      }
    }
  }
  std::shared_ptr<Store> store = Check(Store::Open(path, options));
  if (::realpath(path.c_str(), resolved) != nullptr) open[resolved] = store;
  return store;
}

// What a Store object and the KvHandles made from it share: whether it was closed.
struct StoreState {
  std::string path;
  bool readonly = false;
  std::atomic<bool> closed{false};
};

class PyStore {
 public:
  PyStore(const std::string& path, bool readonly, bool create, bool sync, double cuda_cache_gb)
      : state_(std::make_shared<StoreState>()) {
    if (!(cuda_cache_gb > 0) || cuda_cache_gb > 1e6) {
      Raise(Status::InvalidArgument("cuda_cache_gb must be > 0"));
    }
    cuda_cache_bytes_ = static_cast<size_t>(cuda_cache_gb * double(size_t(1) << 30));
    Store::Options options;
    options.read_only = readonly;
    options.create_if_missing = create;
    options.sync = sync;
    {
      nb::gil_scoped_release release;
      store_ = OpenShared(path, options);
    }
    state_->path = path;
    state_->readonly = readonly;
  }

  // The engine store for a read; for a write also checks that this object may write.
  const std::shared_ptr<Store>& Use(bool write = false) const {
    if (!store_) Raise(Status::FailedPrecondition(state_->path + ": the store is closed"));
    if (write && state_->readonly) {
      Raise(Status::IOError(state_->path + ": store is open read-only"));
    }
    return store_;
  }
  Store& store(bool write = false) const { return *Use(write); }
  const std::shared_ptr<StoreState>& state() const { return state_; }

  // Drops this object's use of the store. KvHandles made from it then refuse to make arrays;
  // arrays made before stay valid (they keep the snapshot and the engine store alive), and the
  // environment closes when the last of them goes.
  void Close() {
    state_->closed = true;
    store_.reset();
    std::lock_guard<std::mutex> lock(devices_mu_);
    devices_.clear();  // live handles keep theirs
  }
  bool closed() const { return !store_; }

#ifdef SHOTDB_PYTHON_CUDA
  // The Stager and page cache on `device` (shared by the directory's Store objects), created on
  // first use; this object keeps it, and so its cached pages, until close().
  std::shared_ptr<DeviceStager> Device(const std::shared_ptr<Store>& store, int device) {
    std::lock_guard<std::mutex> lock(devices_mu_);
    std::shared_ptr<DeviceStager>& slot = devices_[device];
    if (!slot) slot = Check(GetDeviceStager(store, device, cuda_cache_bytes_));
    return slot;
  }
  // The Stager on `device` if this object has one.
  std::shared_ptr<DeviceStager> DeviceIfAny(int device) {
    std::lock_guard<std::mutex> lock(devices_mu_);
    auto it = devices_.find(device);
    return it == devices_.end() ? nullptr : it->second;
  }
#endif

 private:
  std::shared_ptr<StoreState> state_;
  std::shared_ptr<Store> store_;
  size_t cuda_cache_bytes_ = 0;
  std::mutex devices_mu_;
  std::map<int, std::shared_ptr<DeviceStager>> devices_;
};

// ---- K/V handles ---------------------------------------------------------------------------

// The K and V of the requested blocks and layers, read (and checksum-verified) in one snapshot.
class KvHandle {
 public:
  // `device` is -1 for CPU payloads, else the CUDA device of `device_kv` (null when nothing was
  // requested).
  KvHandle(std::shared_ptr<StoreState> state, std::shared_ptr<Store> store,
           std::unique_ptr<Snapshot> snapshot, TaskInfo task, std::vector<uint32_t> blocks,
           std::vector<uint32_t> layers, std::vector<uint32_t> tokens,
           std::vector<PayloadRef> payloads, int device = -1,
           std::unique_ptr<DeviceKv> device_kv = nullptr, std::vector<float> values = {},
           std::vector<size_t> value_at = {})
      : state_(std::move(state)),
        store_(std::move(store)),
        snapshot_(std::move(snapshot)),
        task_(std::move(task)),
        blocks_(std::move(blocks)),
        layers_(std::move(layers)),
        tokens_(std::move(tokens)),
        payloads_(std::move(payloads)),
        device_(device),
        device_kv_(std::move(device_kv)),
        values_(std::move(values)),
        value_at_(std::move(value_at)) {}
  ~KvHandle() {
    device_kv_.reset();  // unpins the device pages
    payloads_.clear();
    snapshot_.reset();  // before the store reference goes
  }
  KvHandle(const KvHandle&) = delete;
  KvHandle& operator=(const KvHandle&) = delete;

  // Refuses to make new arrays once the Store object it came from was closed.
  void CheckOpen() const {
    if (state_->closed) {
      Raise(Status::FailedPrecondition(
          state_->path +
          ": the store this KV handle came from was closed; arrays made before "
          "stay valid, new ones are refused"));
    }
  }

  // payloads_ is layer-major: [layer][block][K, V].
  const PayloadRef& Payload(size_t layer, size_t block, int kind) const {
    return payloads_[(layer * blocks_.size() + block) * 2 + kind];
  }

  // Dequantised float32 values (scaled fp8 tasks on the CPU), in payloads_' order; else null.
  const float* Values(size_t layer, size_t block, int kind) const {
    if (values_.empty()) return nullptr;
    return values_.data() + value_at_[(layer * blocks_.size() + block) * 2 + kind];
  }
  // What the arrays hold: the stored dtype; for a scaled task (f8e4m3, i8) its dequantised values,
  // as f32 on the CPU and as the device cache's bf16 pages on CUDA (PageDType).
  DType array_dtype() const {
    if (device_kv_ != nullptr) return PageDType(task_.model.dtype);
    return values_.empty() ? task_.model.dtype : DType::kF32;
  }

  const TaskInfo& task() const { return task_; }
  const std::vector<uint32_t>& blocks() const { return blocks_; }
  const std::vector<uint32_t>& layers() const { return layers_; }
  const std::vector<uint32_t>& tokens() const { return tokens_; }
  // -1: CPU; else the CUDA device the arrays are on.
  int device() const { return device_; }
  const DeviceKv* device_kv() const { return device_kv_.get(); }

 private:
  std::shared_ptr<StoreState> state_;
  std::shared_ptr<Store> store_;  // the engine store outlives the snapshot
  std::unique_ptr<Snapshot> snapshot_;
  TaskInfo task_;
  std::vector<uint32_t> blocks_, layers_, tokens_;
  std::vector<PayloadRef> payloads_;
  int device_ = -1;
  std::unique_ptr<DeviceKv> device_kv_;
  std::vector<float> values_;     // fp8 tasks: every payload dequantised, back to back
  std::vector<size_t> value_at_;  // offset of each payload's values in values_
};

// array_api: returned as nanobind.nb_ndarray, which has __dlpack__, __dlpack_device__ and the
// buffer protocol, and needs no array framework.
using RoArray = nb::ndarray<nb::ro, nb::array_api>;

// One [kv_heads, tokens, head_dim] array over a payload; `owner` (the Python KvHandle) stays alive
// while the array (or anything made from it through DLPack) does.
RoArray MakeArray(const KvHandle& h, size_t layer, size_t block, int kind, nb::handle owner) {
  h.CheckOpen();
  const size_t shape[3] = {h.task().model.kv_heads, h.tokens()[block], h.task().model.head_dim};
  if (h.device_kv() != nullptr) {  // a staged page on the device
    return RoArray(h.device_kv()->data(layer, block, kind), 3, shape, owner, nullptr,
                   DlpackDtype(h.array_dtype()), nb::device::cuda::value, h.device());
  }
  if (const float* values = h.Values(layer, block, kind)) {  // dequantised fp8
    return RoArray(values, 3, shape, owner, nullptr, DlpackDtype(DType::kF32),
                   nb::device::cpu::value);
  }
  const PayloadRef& ref = h.Payload(layer, block, kind);
  return RoArray(ref.data, 3, shape, owner, nullptr, DlpackDtype(h.task().model.dtype),
                 nb::device::cpu::value);
}

#ifdef SHOTDB_PYTHON_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// "cpu" -> -1; "cuda" -> -2 (the current device); "cuda:N" -> N. InvalidArgument for anything
// else; NotSupported for a CUDA device in a build without CUDA.
int ParseDevice(const std::string& device) {
  if (device == "cpu") return -1;
  int index = -2;
  if (device.rfind("cuda:", 0) == 0) {
    const std::string n = device.substr(5);
    if (n.empty() || n.size() > 6 || n.find_first_not_of("0123456789") != std::string::npos) {
      index = -3;
    } else {
      index = std::stoi(n);
    }
  } else if (device != "cuda") {
    index = -3;
  }
  if (index == -3) {
    Raise(Status::InvalidArgument("device '" + device + "': expected 'cpu', 'cuda' or 'cuda:N'"));
  }
  if (!kWithCuda) {
    Raise(Status::NotSupported("load_kv(device='" + device +
                               "'): this shotdb package was built without CUDA; rebuild it with "
                               "SHOTDB_WITH_CUDA=ON (pip install . "
                               "--config-settings=cmake.define.SHOTDB_WITH_CUDA=ON, needs nvcc), "
                               "or move the CPU arrays with torch.from_dlpack(a).to('cuda')"));
  }
  return index;
}

std::unique_ptr<KvHandle> LoadKv(PyStore& py, const std::string& task_name,
                                 std::vector<uint32_t> blocks,
                                 std::optional<std::vector<uint32_t>> layers,
                                 const std::string& device) {
  int device_index = ParseDevice(device);
  std::shared_ptr<Store> store = py.Use();
  nb::gil_scoped_release release;
#ifdef SHOTDB_PYTHON_CUDA
  std::shared_ptr<DeviceStager> stager;
  if (device_index != -1) {
    if (CudaDeviceCount() == 0) {
      Raise(Status::NotSupported("load_kv(device='" + device +
                                 "'): no CUDA device is visible (cudaGetDeviceCount)"));
    }
    if (device_index == -2) device_index = Check(CudaCurrentDevice());
    stager = py.Device(store, device_index);
  }
#endif
  std::unique_ptr<Snapshot> snapshot = Check(store->BeginSnapshot());
  TaskInfo task = Check(snapshot->GetTask(task_name));
  const bool scaled = IsScaledDType(task.model.dtype);
  std::vector<uint32_t> layer_list;
  if (layers) {
    layer_list = *layers;
  } else {
    for (uint32_t l = 0; l < task.model.num_layers; ++l) layer_list.push_back(l);
  }
  std::vector<uint32_t> tokens;
  for (uint32_t b : blocks) {
    if (b >= task.num_blocks) {
      Raise(Status::NotFound("task " + task_name + " block " + std::to_string(b) +
                             ": no such block (the task has " + std::to_string(task.num_blocks) +
                             ")"));
    }
    tokens.push_back(Check(snapshot->GetBlock(task_name, b)).token_count);
  }
  for (uint32_t l : layer_list) {
    if (l >= task.model.num_layers) {
      Raise(Status::InvalidArgument("layer " + std::to_string(l) + ": the task has " +
                                    std::to_string(task.model.num_layers) + " layers"));
    }
  }
  // Layer-major, then block, then K and V; read block by block (one walk of a block's records).
  std::vector<PayloadRef> payloads;
  if (device_index == -1) {
    payloads.resize(2 * layer_list.size() * blocks.size());
    for (size_t bi = 0; bi < blocks.size(); ++bi) {
      std::vector<PayloadRef> refs =
          Check(snapshot->GetBlockPayloads(task_name, blocks[bi], layer_list));
      for (size_t li = 0; li < layer_list.size(); ++li) {
        for (size_t kv = 0; kv < 2; ++kv) {
          payloads[2 * (li * blocks.size() + bi) + kv] = std::move(refs[2 * li + kv]);
        }
      }
    }
  }
#ifdef SHOTDB_PYTHON_CUDA
  if (device_index != -1) {
    std::unique_ptr<DeviceKv> staged;
    if (!blocks.empty() && !layer_list.empty()) {
      staged = Check(StageKv(stager, snapshot.get(), task, blocks, tokens, layer_list));
    }
    snapshot.reset();  // the copies are done: the handle needs no snapshot
    return std::make_unique<KvHandle>(py.state(), std::move(store), nullptr, std::move(task),
                                      std::move(blocks), std::move(layer_list), std::move(tokens),
                                      std::vector<PayloadRef>(), device_index, std::move(staged));
  }
#endif
  if (scaled) {
    // Scaled payloads are codes plus their scales (docs/format.md), which no array dtype
    // holds: the handle owns their values, dequantised to float32 (KvToFloat, as Session and
    // shotdb show read them). The payloads were verified above; the snapshot is not needed.
    std::vector<float> values;
    std::vector<size_t> value_at;
    const uint32_t heads = task.model.kv_heads;
    for (size_t l = 0; l < layer_list.size(); ++l) {
      for (size_t b = 0; b < blocks.size(); ++b) {
        for (int kind = 0; kind < 2; ++kind) {
          const uint64_t per_head = uint64_t{tokens[b]} * task.model.head_dim;
          value_at.push_back(values.size());
          values.resize(values.size() + heads * per_head);
          KvToFloat(task.model.dtype, heads, tokens[b], task.model.head_dim,
                    payloads[(l * blocks.size() + b) * 2 + kind].data,
                    values.data() + value_at.back());
        }
      }
    }
    payloads.clear();
    snapshot.reset();
    return std::make_unique<KvHandle>(py.state(), std::move(store), nullptr, std::move(task),
                                      std::move(blocks), std::move(layer_list), std::move(tokens),
                                      std::vector<PayloadRef>(), -1, nullptr, std::move(values),
                                      std::move(value_at));
  }
  return std::make_unique<KvHandle>(py.state(), std::move(store), std::move(snapshot),
                                    std::move(task), std::move(blocks), std::move(layer_list),
                                    std::move(tokens), std::move(payloads));
}

// ---- writing ---------------------------------------------------------------------------------

using AnyArray = nb::ndarray<nb::c_contig, nb::device::cpu>;

// Checks one incoming K or V tensor against the task; returns its bytes.
const void* CheckTensor(const AnyArray& a, const TaskInfo& t, uint32_t layer, const char* kind,
                        uint32_t* tokens) {
  const std::string what = std::string(kind) + "[" + std::to_string(layer) + "]";
  const nb::dlpack::dtype want = DlpackDtype(t.model.dtype);
  const nb::dlpack::dtype raw_bits{static_cast<uint8_t>(nb::dlpack::dtype_code::UInt),
                                   static_cast<uint8_t>(8 * DTypeSize(t.model.dtype)), 1};
  if (a.dtype() != want && a.dtype() != raw_bits) {
    Raise(Status::InvalidArgument(what + ": dtype does not match the task's " +
                                  std::string(DTypeName(t.model.dtype)) +
                                  " (raw bits as unsigned integers of that width are accepted)"));
  }
  if (a.ndim() != 3 || a.shape(0) != t.model.kv_heads || a.shape(2) != t.model.head_dim ||
      a.shape(1) == 0) {
    std::string got = "[";
    for (size_t i = 0; i < a.ndim(); ++i) got += (i ? ", " : "") + std::to_string(a.shape(i));
    Raise(Status::InvalidArgument(what + ": shape " + got + "], expected [" +
                                  std::to_string(t.model.kv_heads) + ", tokens > 0, " +
                                  std::to_string(t.model.head_dim) + "]"));
  }
  if (*tokens == 0) *tokens = static_cast<uint32_t>(a.shape(1));
  if (a.shape(1) != *tokens) {
    Raise(Status::InvalidArgument(what + ": " + std::to_string(a.shape(1)) +
                                  " tokens, the block's first tensor has " +
                                  std::to_string(*tokens)));
  }
  return a.data();
}

uint32_t AppendBlock(PyStore& py, const std::string& task_name, const std::vector<AnyArray>& keys,
                     const std::vector<AnyArray>& values,
                     const std::vector<std::tuple<uint64_t, std::string, std::string>>& demos,
                     std::optional<std::string> text) {
  Store& store = py.store(/*write=*/true);
  TaskInfo t;
  {
    nb::gil_scoped_release release;
    auto snapshot = Check(store.BeginSnapshot());
    t = Check(snapshot->GetTask(task_name));
  }
  if (IsScaledDType(t.model.dtype)) {
    // Its records carry scales that plain arrays do not (their raw bytes would be read past the
    // array's end): only the pool encoder writes them.
    const std::string name(DTypeName(t.model.dtype));
    Raise(Status::NotSupported("task " + task_name + " stores " + name +
                               " K/V, which append_block cannot write (the pool encoder chooses "
                               "their scales: shotdb build --kv-dtype " +
                               name + ")"));
  }
  if (keys.size() != t.model.num_layers || values.size() != t.model.num_layers) {
    Raise(Status::InvalidArgument("expected " + std::to_string(t.model.num_layers) +
                                  " K and V tensors (one per layer), got " +
                                  std::to_string(keys.size()) + " and " +
                                  std::to_string(values.size())));
  }
  NewBlock block;
  block.model = t.model;
  block.info.index = static_cast<uint32_t>(t.num_blocks);
  block.info.position_offset = t.num_tokens;
  uint32_t tokens = 0;
  for (uint32_t l = 0; l < t.model.num_layers; ++l) {
    block.keys.push_back(CheckTensor(keys[l], t, l, "keys", &tokens));
    block.values.push_back(CheckTensor(values[l], t, l, "values", &tokens));
  }
  block.info.token_count = tokens;
  std::vector<std::pair<std::string, std::string>> pairs;
  for (const auto& [id, demo_text, label] : demos) {
    block.demos.push_back({id, demo_text, label});
    block.info.demo_ids.push_back(id);
    pairs.emplace_back(demo_text, label);
  }
  if (text) {
    block.info.text = *text;
  } else {
    const PromptFormat format = Check(PromptFormat::Create(t.prompt_template, t.separator));
    block.info.text = format.FormatBlock(pairs, block.info.index == 0);
  }
  nb::gil_scoped_release release;
  Check(store.AppendBlock(task_name, block));
  return block.info.index;
}

void CreateTask(PyStore& py, const std::string& name, const std::string& architecture,
                const std::string& dtype, const std::string& tokenizer_hash, uint32_t num_layers,
                uint32_t kv_heads, uint32_t head_dim, const std::vector<std::string>& labels,
                uint32_t demos_per_block, uint32_t window, uint32_t sink_blocks,
                const std::string& positions, const std::string& codec,
                const std::string& prompt_template, const std::string& separator,
                const std::string& bm25, std::optional<std::vector<std::string>> stopwords,
                const std::string& metadata_json) {
  TaskInfo t;
  t.name = name;
  t.model.architecture = architecture;
  const auto dt = ParseDType(dtype);
  // Scaled K/V (f8e4m3, i8) come only from the pool encoder (shotdb build --kv-dtype), which
  // picks the scales; put() takes arrays of plain elements.
  if (!dt || IsScaledDType(*dt)) {
    Raise(Status::InvalidArgument("dtype '" + dtype + "': expected f32, f16, bf16 or f64"));
  }
  t.model.dtype = *dt;
  t.model.tokenizer_hash = tokenizer_hash;
  t.model.num_layers = num_layers;
  t.model.kv_heads = kv_heads;
  t.model.head_dim = head_dim;
  t.labels = labels;
  t.blocks.demos_per_block = demos_per_block;
  t.blocks.window = window;
  t.blocks.sink_blocks = sink_blocks;
  const auto scheme = ParsePositionScheme(positions);
  if (!scheme) {
    Raise(Status::InvalidArgument("positions '" + positions +
                                  "': expected 'windowed' or 'sequential'"));
  }
  t.blocks.positions = *scheme;
  const auto c = ParseCodec(codec);
  if (!c) Raise(Status::InvalidArgument("codec '" + codec + "': expected raw, lz4 or shuffle-lz4"));
  t.codec = *c;
  t.prompt_template = prompt_template;
  t.separator = separator;
  if (bm25 == "retriv") {
    t.analyzer = AnalyzerOptions::Retriv(stopwords ? *stopwords : DefaultStopwords());
    t.bm25 = Bm25Params::Retriv();
  } else if (bm25 == "rank_bm25") {
    if (stopwords) Raise(Status::InvalidArgument("stopwords apply to bm25='retriv' only"));
  } else {
    Raise(Status::InvalidArgument("bm25 '" + bm25 + "': expected 'retriv' or 'rank_bm25'"));
  }
  t.metadata_json = metadata_json;
  nb::gil_scoped_release release;
  Check(py.store(/*write=*/true).CreateTask(t));
}

// ---- plain-data views of the engine's records ----------------------------------------------

nb::dict MakeDict(std::initializer_list<std::pair<const char*, nb::object>> items) {
  nb::dict d;
  for (const auto& [key, value] : items) d[key] = value;
  return d;
}

nb::dict TaskToDict(const TaskInfo& t) {
  nb::dict d;
  d["name"] = t.name;
  d["model"] = MakeDict({{"architecture", nb::cast(t.model.architecture)},
                         {"dtype", nb::cast(std::string(DTypeName(t.model.dtype)))},
                         {"tokenizer_hash", nb::cast(t.model.tokenizer_hash)},
                         {"num_layers", nb::cast(t.model.num_layers)},
                         {"kv_heads", nb::cast(t.model.kv_heads)},
                         {"head_dim", nb::cast(t.model.head_dim)}});
  d["demos_per_block"] = t.blocks.demos_per_block;
  d["window"] = t.blocks.window;
  d["sink_blocks"] = t.blocks.sink_blocks;
  d["positions"] = std::string(PositionSchemeName(t.blocks.positions));
  d["codec"] = std::string(CodecName(t.codec));
  d["prompt_template"] = t.prompt_template;
  d["separator"] = t.separator;
  d["labels"] = t.labels;
  d["bm25"] =
      std::string(t.analyzer.kind == AnalyzerOptions::Kind::kRetriv ? "retriv" : "rank_bm25");
  d["bm25_tokenizer"] = t.analyzer.tokenizer.Serialize();
  d["stopwords"] = t.analyzer.stopwords;
  d["bm25_params"] = MakeDict(
      {{"k1", nb::cast(t.bm25.k1)},
       {"b", nb::cast(t.bm25.b)},
       {"epsilon", nb::cast(t.bm25.epsilon)},
       {"idf", nb::cast(std::string(t.bm25.idf == Bm25Idf::kLucene ? "lucene" : "okapi"))}});
  d["metadata_json"] = t.metadata_json;
  d["num_blocks"] = t.num_blocks;
  d["num_demos"] = t.num_demos;
  d["num_tokens"] = t.num_tokens;
  d["payload_raw_bytes"] = t.payload_raw_bytes;
  d["payload_stored_bytes"] = t.payload_stored_bytes;
  d["version"] = t.version;
  d["created_unix"] = t.created_unix;
  return d;
}

nb::dict BlockToDict(const BlockInfo& b) {
  return MakeDict({{"index", nb::cast(b.index)},
                   {"position_offset", nb::cast(b.position_offset)},
                   {"tokens", nb::cast(b.token_count)},
                   {"demo_ids", nb::cast(b.demo_ids)},
                   {"text", nb::cast(b.text)}});
}

}  // namespace
}  // namespace shotdb::python

NB_MODULE(_shotdb, m) {
  using namespace shotdb;
  using namespace shotdb::python;
  m.doc() =
      "shotdb's engine: tasks, blocks, demonstrations and their K/V in an LMDB store, with its "
      "BM25 indexes. No model runtime, no array framework: K/V leave as DLPack-capable arrays.";

  RegisterStatusErrors();

  m.attr("WITH_CUDA") = kWithCuda;
  m.def(
      "cuda_device_count",
      []() {
#ifdef SHOTDB_PYTHON_CUDA
        nb::gil_scoped_release release;
        return CudaDeviceCount();
#else
        return 0;
#endif
      },
      "Visible CUDA devices for load_kv(device='cuda'); 0 when the package was built without "
      "CUDA (WITH_CUDA is False) or there is no device. Initialises the CUDA runtime on the first "
      "call (import does not).");

  nb::class_<KvHandle>(
      m, "KvHandle",
      "The K and V of some blocks and layers of a task, read in one snapshot of the store with "
      "their checksums verified. Arrays are [kv_heads, tokens, head_dim] in the task's dtype, "
      "zero-copy views of the store's read-only memory map for raw payloads (a decoded copy for "
      "compressed ones), or for device='cuda' the device pages they were staged into (shared "
      "with later loads of the same blocks through the store's device cache): never write to "
      "them. Each array keeps this handle, and the handle keeps the snapshot (or its pinned "
      "device pages) and the store, alive.")
      .def_prop_ro("task", [](const KvHandle& h) { return h.task().name; })
      .def_prop_ro("blocks", &KvHandle::blocks, "Block indexes, in the order requested.")
      .def_prop_ro("layers", &KvHandle::layers, "Layer numbers, in the order requested.")
      .def_prop_ro("tokens", &KvHandle::tokens, "Tokens of each block, in `blocks` order.")
      .def_prop_ro(
          "dtype", [](const KvHandle& h) { return DTypeName(h.array_dtype()); },
          "The arrays' dtype: the task's; for a task stored scaled (f8e4m3, i8), dequantised: "
          "f32 on the CPU, bf16 on CUDA.")
      .def_prop_ro(
          "device",
          [](const KvHandle& h) {
            return h.device() < 0 ? std::string("cpu") : "cuda:" + std::to_string(h.device());
          },
          "Where the arrays are: 'cpu' or 'cuda:N'.")
      .def(
          "key",
          [](nb::handle self, size_t layer, size_t block) {
            const KvHandle& h = nb::cast<const KvHandle&>(self);
            if (layer >= h.layers().size() || block >= h.blocks().size()) {
              throw nb::index_error("key(layer, block): positions into .layers and .blocks");
            }
            return MakeArray(h, layer, block, 0, self);
          },
          "layer"_a, "block"_a,
          "K of the `layer`-th requested layer and the `block`-th requested block (positions "
          "into .layers and .blocks, not layer numbers or block indexes).")
      .def(
          "value",
          [](nb::handle self, size_t layer, size_t block) {
            const KvHandle& h = nb::cast<const KvHandle&>(self);
            if (layer >= h.layers().size() || block >= h.blocks().size()) {
              throw nb::index_error("value(layer, block): positions into .layers and .blocks");
            }
            return MakeArray(h, layer, block, 1, self);
          },
          "layer"_a, "block"_a, "V, as key().")
      .def(
          "layer",
          [](nb::handle self, size_t layer) {
            const KvHandle& h = nb::cast<const KvHandle&>(self);
            if (layer >= h.layers().size()) throw nb::index_error("layer position out of range");
            std::vector<std::pair<RoArray, RoArray>> out;
            for (size_t b = 0; b < h.blocks().size(); ++b) {
              out.emplace_back(MakeArray(h, layer, b, 0, self), MakeArray(h, layer, b, 1, self));
            }
            return out;
          },
          "layer"_a, "(K, V) of every requested block for the `layer`-th requested layer.")
      .def("__len__", [](const KvHandle& h) { return h.layers().size(); });

  nb::class_<PyStore>(
      m, "Store",
      "A shotdb store directory (one LMDB environment). Thread-safe: methods may be called from "
      "several threads at once (each read runs in its own snapshot; writes queue). The engine's "
      "guarantees hold: a block is appended all or nothing, readers never see part of one, damage "
      "is reported (CorruptionError), never returned (docs/storage.md).")
      .def(nb::init<const std::string&, bool, bool, bool, double>(), "path"_a, "readonly"_a = false,
           "create"_a = true, "sync"_a = true, "cuda_cache_gb"_a = 4.0,
           "Opens the store at `path` (a directory), creating it unless readonly or create=False. "
           "sync=False skips the fsync at each commit. cuda_cache_gb: the budget of the device "
           "page cache that load_kv(device='cuda') stages into (per device; shared by the Store "
           "objects of the directory, sized by the first that stages onto the device).")
      .def("close", &PyStore::Close,
           "Closes this Store object: later calls on it, and new arrays from its KV handles, raise "
           "FailedPreconditionError. Arrays made before stay valid; the environment closes when "
           "the last of them, and the last Store object of the directory, is gone.")
      .def_prop_ro("closed", &PyStore::closed)
      .def_prop_ro("path", [](const PyStore& s) { return s.state()->path; })
      .def(
          "tasks",
          [](const PyStore& s) {
            std::vector<TaskInfo> tasks;
            {
              nb::gil_scoped_release release;
              tasks = Check(Check(s.store().BeginSnapshot())->ListTasks());
            }
            nb::list out;
            for (const TaskInfo& t : tasks) out.append(TaskToDict(t));
            return out;
          },
          "Every task as a dict (as task()), ordered by name.")
      .def(
          "task",
          [](const PyStore& s, const std::string& name) {
            TaskInfo t;
            {
              nb::gil_scoped_release release;
              t = Check(Check(s.store().BeginSnapshot())->GetTask(name));
            }
            return TaskToDict(t);
          },
          "name"_a,
          "The task record: model fingerprint, block config (demos_per_block, window, "
          "sink_blocks, positions), codec, prompt template, labels, BM25 options, counts and "
          "sizes. NotFoundError (a KeyError) for an unknown task.")
      .def(
          "blocks",
          [](const PyStore& s, const std::string& name) {
            std::vector<BlockInfo> blocks;
            {
              nb::gil_scoped_release release;
              auto snap = Check(s.store().BeginSnapshot());
              const TaskInfo t = Check(snap->GetTask(name));
              for (uint64_t b = 0; b < t.num_blocks; ++b) {
                blocks.push_back(Check(snap->GetBlock(name, static_cast<uint32_t>(b))));
              }
            }
            nb::list out;
            for (const BlockInfo& b : blocks) out.append(BlockToDict(b));
            return out;
          },
          "name"_a, "Every block's metadata: index, position_offset, tokens, demo_ids, text.")
      .def(
          "demonstration",
          [](const PyStore& s, const std::string& task, uint64_t id) {
            Demonstration d;
            {
              nb::gil_scoped_release release;
              d = Check(Check(s.store().BeginSnapshot())->GetDemonstration(task, id));
            }
            return std::make_tuple(d.id, d.text, d.label);
          },
          "task"_a, "id"_a, "(id, text, label) of a demonstration by its id.")
      .def(
          "search",
          [](const PyStore& s, const std::string& task, const std::string& query, size_t k,
             bool demos) {
            std::vector<ScoredDoc> hits;
            {
              nb::gil_scoped_release release;
              auto snap = Check(s.store().BeginSnapshot());
              hits = demos ? Check(snap->SearchDemos(task, query, k))
                           : Check(snap->Search(task, query, k));
            }
            std::vector<std::pair<uint32_t, double>> out;
            for (const ScoredDoc& h : hits) out.emplace_back(h.doc, h.score);
            return out;
          },
          "task"_a, "query"_a, "k"_a = 5, "demos"_a = false,
          "The k best blocks for `query` under the task's BM25, as (block, score), best first "
          "(ties by index). demos=True ranks single demonstrations, as (number in pool order, "
          "score); demonstration_at() maps a number to the demonstration.")
      .def(
          "demonstration_at",
          [](const PyStore& s, const std::string& task, uint32_t number) {
            Demonstration d;
            {
              nb::gil_scoped_release release;
              d = Check(Check(s.store().BeginSnapshot())->DemoAt(task, number));
            }
            return std::make_tuple(d.id, d.text, d.label);
          },
          "task"_a, "number"_a, "(id, text, label) of the demonstration numbered `number`.")
      .def(
          "verify",
          [](const PyStore& s, const std::string& task) {
            VerifyReport report;
            Status status;
            {
              nb::gil_scoped_release release;
              status = s.store().Verify(task, &report);
            }
            if (!status.ok() && !status.IsCorruption()) Raise(status);
            return MakeDict({{"ok", nb::cast(status.ok())},
                             {"tasks", nb::cast(report.tasks_checked)},
                             {"blocks", nb::cast(report.blocks_checked)},
                             {"records", nb::cast(report.records_checked)},
                             {"raw_bytes", nb::cast(report.raw_bytes_checked)},
                             {"problems", nb::cast(report.problems)}});
          },
          "task"_a = "",
          "Recomputes every checksum and checks the structure of one task (default: all). "
          "Returns {ok, tasks, blocks, records, raw_bytes, problems}; problems name task, block, "
          "layer and K/V.")
      .def("load_kv", &LoadKv, "task"_a, "blocks"_a, "layers"_a = nb::none(), "device"_a = "cpu",
           "The K and V of `blocks` (block indexes) for `layers` (default: all), checked against "
           "their checksums, as a KvHandle. A damaged record raises CorruptionError and returns "
           "nothing. device='cuda' or 'cuda:N' stages them into the store's device page cache "
           "(gpu::Stager, straight from the memory map for raw payloads) and returns when the "
           "copies are done; the arrays point into the cached pages, which stay pinned while the "
           "handle or any array lives (FailedPreconditionError when live handles pin the whole "
           "cuda_cache_gb budget). A task stored in a scaled dtype (f8e4m3, i8) gives its "
           "dequantised values: float32 arrays on the CPU; on CUDA bfloat16 arrays (the pages "
           "the device unpacks them into, which DBSA's kernels read: the CPU's values rounded to "
           "bfloat16). NotSupportedError for CUDA in a build without it (SHOTDB_WITH_CUDA) or "
           "without a device; InvalidArgumentError for another device.")
      .def(
          "_cuda_stats",
          [](PyStore& s, const std::string& device) {
            nb::dict d;
#ifdef SHOTDB_PYTHON_CUDA
            int index = ParseDevice(device);
            if (index == -1) Raise(Status::InvalidArgument("_cuda_stats: a CUDA device"));
            if (index == -2) index = Check(CudaCurrentDevice());
            if (std::shared_ptr<DeviceStager> stager = s.DeviceIfAny(index)) {
              for (const auto& [key, value] : DeviceStats(*stager)) d[key.c_str()] = value;
              d["map_status"] = DeviceMapStatus(*stager);
            }
#else
            (void)s;
            ParseDevice(device);
#endif
            return d;
          },
          "device"_a = "cuda",
          "Internal: counters of this object's device page cache and Stager on `device` "
          "(empty before its first load_kv there).")
      .def(
          "_cuda_clear",
          [](PyStore& s, const std::string& device) {
            size_t freed = 0;
#ifdef SHOTDB_PYTHON_CUDA
            int index = ParseDevice(device);
            if (index == -1) Raise(Status::InvalidArgument("_cuda_clear: a CUDA device"));
            if (index == -2) index = Check(CudaCurrentDevice());
            if (std::shared_ptr<DeviceStager> stager = s.DeviceIfAny(index)) {
              freed = DeviceClear(*stager);
            }
#else
            (void)s;
            ParseDevice(device);
#endif
            return freed;
          },
          "device"_a = "cuda",
          "Internal (benchmarks): drops the unpinned pages of the device page cache; returns how "
          "many.")
      .def(
          "create_task", &CreateTask, "name"_a, "architecture"_a, "dtype"_a, "tokenizer_hash"_a,
          "num_layers"_a, "kv_heads"_a, "head_dim"_a, "labels"_a, "demos_per_block"_a = 5,
          "window"_a = 2, "sink_blocks"_a = 1, "positions"_a = "windowed", "codec"_a = "raw",
          "prompt_template"_a = std::string(PromptFormat::kDefaultTemplate),
          "separator"_a = std::string(PromptFormat::kDefaultSeparator), "bm25"_a = "retriv",
          "stopwords"_a = nb::none(), "metadata_json"_a = "{}",
          "Creates an empty task with the options of `shotdb build`. The fingerprint (architecture "
          "with a weights digest, dtype, tokenizer hash, layers, kv_heads, head_dim) is what "
          "append_block checks every block against.")
      .def("append_block", &AppendBlock, "task"_a, "keys"_a, "values"_a, "demos"_a,
           "text"_a = nb::none(),
           "Appends one block, atomically, after the task's last: keys and values are one "
           "C-contiguous CPU array per layer, [kv_heads, tokens, head_dim] in the task's dtype "
           "(or unsigned integers of its width holding the raw bits), pre-RoPE; demos are "
           "(id, text, label) tuples with ids new to the task. text defaults to the demos "
           "formatted with the task's template. Returns the block index. Nothing is stored on "
           "any error. An f8e4m3 or i8 task is refused (NotSupportedError): its scales come from "
           "the pool encoder.")
      .def(
          "delete_task",
          [](PyStore& s, const std::string& name) {
            Store& store = s.store(/*write=*/true);
            nb::gil_scoped_release release;
            Check(store.DeleteTask(name));
          },
          "name"_a, "Deletes a task and everything of it.")
      .def(
          "export_task",
          [](PyStore& s, const std::string& task, const std::string& path) {
            nb::gil_scoped_release release;
            Check(ExportTask(s.store(), task, path));
          },
          "task"_a, "path"_a, "Writes the task to one portable, checksummed file.")
      .def(
          "import_task",
          [](PyStore& s, const std::string& path) {
            std::string name;
            Store& store = s.store(/*write=*/true);
            nb::gil_scoped_release release;
            Check(ImportTask(&store, path, &name));
            return name;
          },
          "path"_a, "Adds the task of an export file; returns its name.")
      .def(
          "_engine",
          [](const PyStore& s) {
            // For shotdb._runtime (Session): a shared reference to the engine store, so that one
            // directory stays opened once per process.
            auto* ref = new std::shared_ptr<Store>(s.Use());
            return nb::capsule(ref, "shotdb.Store", [](void* p) noexcept {
              delete static_cast<std::shared_ptr<Store>*>(p);
            });
          },
          "Internal: the engine store, for shotdb.Session.")
      .def("__enter__", [](nb::handle self) { return self; })
      .def("__exit__", [](PyStore& s, nb::args) { s.Close(); });

  // The prompt format (engine/prompt_format.h) of a task's template and separator, for callers
  // that encode or query outside the C++ runtime (shotdb.hf). InvalidArgumentError for a template
  // without exactly one {text} before one {label}.
  m.def(
      "format_block",
      [](const std::string& tmpl, const std::string& separator,
         const std::vector<std::pair<std::string, std::string>>& demos, bool first_block) {
        return Check(PromptFormat::Create(tmpl, separator)).FormatBlock(demos, first_block);
      },
      "template"_a, "separator"_a, "demos"_a, "first_block"_a,
      "The text of a block holding `demos` ((text, label) pairs), as append_block stores it.");
  m.def(
      "format_query",
      [](const std::string& tmpl, const std::string& separator, const std::string& text) {
        return Check(PromptFormat::Create(tmpl, separator)).FormatQuery(text);
      },
      "template"_a, "separator"_a, "text"_a,
      "The query prompt placed after the selected blocks (as `shotdb query` builds it).");
  m.def(
      "label_continuation",
      [](const std::string& tmpl, const std::string& separator, const std::string& label) {
        return Check(PromptFormat::Create(tmpl, separator)).LabelContinuation(label);
      },
      "template"_a, "separator"_a, "label"_a,
      "What the model must generate for `label` right after format_query's text.");
}
