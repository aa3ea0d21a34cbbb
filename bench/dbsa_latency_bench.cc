// The paper's latency table: per-query latency and setup time of DBSA, RetICL (re-encoding the
// retrieved context per query) and FixedICL (one cached prefix), as ratios to RetICL measured in
// the same run, for pools of given sizes, on a model of Llama-3.1-8B's shape with random bf16
// weights created on the device (the real checkpoint is not needed for timing).
//
//   dbsa_latency_bench [--pools 30000,90000] [--layers 32] [--queries 8] [--device cuda]
//                      [--batches 1,4,16,64 (empty: none)] [--kv-dtype bf16|f8e4m3|i8]
//                      [--store DIR] [--json FILE] [--cuda-profile-query 0|1] [--cli-env 0|1]
//
// --kv-dtype f8e4m3 or i8 stores the pool as scaled fp8 or int8 (format/kv_values.h): about half
// the bytes on disk and over PCIe, dequantised to bf16 pages as they land (gpu/unpack_kv.h).
//
// Next to every DBSA time it prints the memory floor: the bytes one forward must read (every
// weight matrix once, plus the context's K/V; cold, the K/V also cross PCIe at best overlapped)
// divided by the device-memory and pinned host-to-device bandwidths measured at the start of the
// run, and the ratio of the measured time to it. BM25 and tokenization are not in the floor.
// Batches (--batches) also get a compute floor: their forward's FLOPs (counted low: projections,
// MLP, context attention, one row of lm_head) at the bf16 matmul rate measured at the start, and
// the FLOP rate they reached; their floor is the larger of the two.
//
// Texts are synthetic (random words from a 4,000-word vocabulary, 50 labels) and tokenized one
// token per word, so a pool of N tokens holds about N / 19 demonstrations (the task defaults:
// k = 5, j = 2, one sink block; blocks of ~95 tokens; 30% of the blocks per query). DBSA is timed
// cold (device block cache emptied before each query: K/V read from the store and uploaded) and hot
// (every selected block already on the device). After the timed queries of a pool, one more query
// per method runs in a separate session with SessionOptions::profile (device synchronisations at
// every part boundary) to split its time into attention / MLP / sampling; those numbers are printed
// apart and never enter the timed medians.
//
// --cli-env 1 runs the bench in the process environment `shotdb build` and `shotdb query` run in
// (tools/shotdb_main.cc): libgomp's passive wait policy (util/openmp_env.h: the bench re-executes
// itself once with OMP_WAIT_POLICY=PASSIVE unless the variable is set) and freed heap memory kept
// (util/heap_env.h). The default, 0, is the environment runs up to X measured in.
//
// --cuda-profile-query 1 runs one more hot DBSA query per pool between cudaProfilerStart and
// cudaProfilerStop, so that `ncu --profile-from-start off` (or any CUDA profiler that honours the
// range) sees that query's kernels only: the per-kernel split of a hot query without the profiled
// session's synchronisations.
#include <torch/torch.h>
#ifdef SHOTDB_HAVE_GPU
#include <cuda_profiler_api.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "format/kv_values.h"
#include "query/dbsa/dbsa.h"
#include "query/dbsa/pool_encoder.h"
#include "query/model/llama.h"
#include "query/tokenizer/tokenizer.h"
#include "util/file_util.h"
#include "util/heap_env.h"
#include "util/openmp_env.h"

namespace shotdb {
namespace {

// One token per whitespace-separated word (and per punctuation character), id = hash % vocab.
class WordTokenizer : public Tokenizer {
 public:
  explicit WordTokenizer(size_t vocab) : vocab_(vocab) {}
  Result<std::vector<int32_t>> Encode(std::string_view text, bool, bool) const override {
    std::vector<int32_t> ids;
    std::string word;
    auto flush = [&] {
      if (!word.empty())
        ids.push_back(static_cast<int32_t>(std::hash<std::string>()(word) % vocab_));
      word.clear();
    };
    for (char c : text) {
      if (c == ' ' || c == '\n') {
        flush();
      } else if (c == ':' || c == '=') {
        flush();
        word = std::string(1, c);
        flush();
      } else {
        word += c;
      }
    }
    flush();
    return ids;
  }
  std::string Decode(const std::vector<int32_t>&) const override { return ""; }
  std::string TokenText(int32_t) const override { return ""; }
  size_t vocab_size() const override { return vocab_; }
  int32_t bos_id() const override { return -1; }
  int32_t eos_id() const override { return -1; }
  bool add_bos_default() const override { return false; }
  std::string Fingerprint() const override { return "bench-words-v1"; }

 private:
  size_t vocab_;
};

ModelConfig Llama31_8B(int64_t layers) {
  ModelConfig c;
  c.architecture = "llama";
  c.num_layers = layers;
  c.hidden_size = 4096;
  c.num_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.intermediate_size = 14336;
  c.vocab_size = 128256;
  c.rope_theta = 500000;
  c.rms_norm_eps = 1e-5;
  c.rope_scaling.type = RopeScaling::Type::kLlama3;
  c.rope_scaling.factor = 8;
  c.rope_scaling.low_freq_factor = 1;
  c.rope_scaling.high_freq_factor = 4;
  c.rope_scaling.original_max_position_embeddings = 8192;
  c.max_position_embeddings = 131072;
  return c;
}

std::string Words(std::mt19937& rng, int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s += (i ? " w" : "w") + std::to_string(rng() % 4000);
  return s;
}

// Measured in the run: device-memory bandwidth (a 2 GiB device-to-device copy, read + write
// bytes) and pinned host-to-device bandwidth (1 GiB), GB/s, and the dense matrix-multiply rate in
// bf16 (8192 x 8192 x 8192 torch::mm, float32 accumulation: what cuBLAS reaches), TFLOP/s; best
// of 5 each.
struct DeviceRates {
  double device_gbs = 0, h2d_gbs = 0, matmul_tflops = 0;
};
DeviceRates MeasureRates(torch::Device device) {
  DeviceRates bw;
  if (!device.is_cuda()) return bw;
  auto best_gbs = [](double bytes, const std::function<void()>& fn) {
    double best = 0;
    for (int i = 0; i < 6; ++i) {
      torch::cuda::synchronize();
      const auto t0 = std::chrono::steady_clock::now();
      fn();
      torch::cuda::synchronize();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (i > 0) best = std::max(best, bytes / s / 1e9);  // the first is a warm-up
    }
    return best;
  };
  const int64_t n = int64_t(1) << 30;  // bf16 elements: 2 GiB
  auto opts = torch::TensorOptions().dtype(torch::kBFloat16).device(device);
  torch::Tensor a = torch::empty({n}, opts), b = torch::empty({n}, opts);
  bw.device_gbs = best_gbs(2.0 * 2 * n, [&] { b.copy_(a); });
  torch::Tensor host =
      torch::empty({n / 2}, torch::TensorOptions().dtype(torch::kBFloat16).pinned_memory(true));
  torch::Tensor dev = torch::empty({n / 2}, opts);
  bw.h2d_gbs = best_gbs(2.0 * (n / 2), [&] { dev.copy_(host, /*non_blocking=*/true); });
  const int64_t m = 8192;
  torch::Tensor x = torch::randn({m, m}, opts), y = torch::randn({m, m}, opts);
  torch::Tensor z = torch::empty({m, m}, opts);
  // best_gbs's "bytes" as FLOPs, in units of 1e3, so that its GB/s reads as TFLOP/s.
  bw.matmul_tflops = best_gbs(2.0 * m * m * m / 1e3, [&] { torch::mm_out(z, x, y); });
  return bw;
}

// FLOPs of one forward over `rows` new tokens attending to `context` tokens (and to each other),
// counted low: every layer's projections and MLP (2 per weight and row), scores and weighted
// values over the context (2 * 2 * head_dim per query head, row and context token), and the
// lm_head for one row (label scoring needs at least the last prompt row's logits).
double ForwardFlops(const ModelConfig& c, double rows, double context) {
  const double h = static_cast<double>(c.hidden_size), d = static_cast<double>(c.head_dim);
  const double qd = static_cast<double>(c.num_heads) * d,
               kvd = static_cast<double>(c.num_kv_heads) * d;
  const double per_layer =
      h * qd + 2 * h * kvd + qd * h + 3 * h * static_cast<double>(c.intermediate_size);
  const double layers = static_cast<double>(c.num_layers);
  return 2 * rows * per_layer * layers + 4 * layers * qd * rows * context +
         2 * h * static_cast<double>(c.vocab_size);
}

// Bytes of weights a forward reads (every matrix once; the embedding only by row, not counted).
double WeightBytes(const ModelConfig& c, size_t element_bytes) {
  double n = 0;
  for (const auto& [name, shape] : ExpectedWeightShapes(c)) {
    if (name == "model.embed_tokens.weight") continue;
    double numel = 1;
    for (int64_t d : shape) numel *= static_cast<double>(d);
    n += numel;
  }
  return n * static_cast<double>(element_bytes);
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

int Run(int argc, char** argv) {
  std::vector<int64_t> pools = {30000, 90000};
  int64_t layers = 32;
  int queries = 8;
  std::string device_name = "cuda";
  std::string store_root = "/tmp/shotdb_latency_bench";
  std::string json_path;
  std::vector<int> batches = {1, 4, 16, 64};
  DType kv_dtype = DType::kBF16;
  bool cuda_profile_query = false;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--pools") {
      pools.clear();
      std::stringstream ss(v);
      for (std::string p; std::getline(ss, p, ',');) pools.push_back(std::stoll(p));
    } else if (a == "--layers") {
      layers = std::stoll(v);
    } else if (a == "--queries") {
      queries = std::stoi(v);
    } else if (a == "--device") {
      device_name = v;
    } else if (a == "--store") {
      store_root = v;
    } else if (a == "--batches") {
      batches.clear();
      std::stringstream ss(v);
      for (std::string p; std::getline(ss, p, ',');) {
        if (!p.empty()) batches.push_back(std::stoi(p));
      }
    } else if (a == "--kv-dtype") {
      const std::optional<DType> d = ParseDType(v);
      if (!d || (*d != DType::kBF16 && !IsScaledDType(*d))) {
        std::fprintf(stderr, "--kv-dtype %s: expected bf16, f8e4m3 or i8\n", v.c_str());
        return 2;
      }
      kv_dtype = *d;
    } else if (a == "--json") {
      json_path = v;
    } else if (a == "--cuda-profile-query") {
      cuda_profile_query = v == "1";
    } else if (a == "--cli-env") {
      if (v == "1") {
        ReexecWithPassiveOpenMpWait(argv);  // returns once the variable is set
        KeepFreedHeapMemory();
      }
    } else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  const char* omp_wait = std::getenv("OMP_WAIT_POLICY");
  std::printf("process environment: OMP_WAIT_POLICY=%s\n",
              omp_wait != nullptr ? omp_wait : "(unset)");
  const torch::Device device(device_name);
  const auto dtype = device.is_cuda() ? torch::kBFloat16 : torch::kFloat32;
  torch::manual_seed(0);

  // Random weights of the target shape, made on the device.
  ModelWeights weights;
  weights.config = Llama31_8B(layers);
  {
    torch::NoGradGuard no_grad;
    for (const auto& [name, shape] : ExpectedWeightShapes(weights.config)) {
      const bool norm = name.find("norm") != std::string::npos;
      auto opts = torch::TensorOptions().dtype(dtype).device(device);
      weights.tensors[name] = norm ? torch::ones(shape, opts) : torch::randn(shape, opts) * 0.02;
    }
  }
  auto model = LlamaModel::FromWeights(std::move(weights));
  if (!model.ok()) {
    std::fprintf(stderr, "model: %s\n", model.status().ToString().c_str());
    return 1;
  }
  WordTokenizer tokenizer(static_cast<size_t>((*model)->config().vocab_size));
  const PoolModel pool{model->get(), &tokenizer, "random-llama31-8b-shape"};
  std::vector<std::string> labels;
  for (int l = 0; l < 50; ++l) labels.push_back("label" + std::to_string(l));

  const DeviceRates bw = MeasureRates(device);
  const double weight_bytes = WeightBytes((*model)->config(), device.is_cuda() ? 2 : 4);
  if (device.is_cuda()) {
    std::printf(
        "measured: device memory %.0f GB/s (copy), pinned host->device %.1f GB/s, bf16 matmul "
        "%.0f TFLOP/s\n",
        bw.device_gbs, bw.h2d_gbs, bw.matmul_tflops);
  }

  nlohmann::json report = nlohmann::json::array();
  const BlockConfig blocks;  // the task defaults: k = 5, j = 2, one sink block
  std::printf("device %s, Llama-3.1-8B shape (%lld layers), %s K/V, k=%u j=%u, 30%% of blocks\n",
              device_name.c_str(), static_cast<long long>(layers),
              std::string(DTypeName(kv_dtype)).c_str(), blocks.demos_per_block, blocks.window);
  for (int64_t pool_tokens : pools) {
    const std::string dir = store_root + "/pool" + std::to_string(pool_tokens);
    Status fresh = RemoveAll(dir);
    if (fresh.ok()) fresh = CreateDirectories(store_root);
    if (!fresh.ok()) {
      std::fprintf(stderr, "store directory: %s\n", fresh.ToString().c_str());
      return 1;
    }
    Store::Options store_options;
    store_options.sync = false;  // a benchmark pool; durability is measured in store_bench
    auto store = Store::Open(dir, store_options);
    if (!store.ok()) {
      std::fprintf(stderr, "store: %s\n", store.status().ToString().c_str());
      return 1;
    }
    std::mt19937 rng(static_cast<uint32_t>(pool_tokens));
    std::vector<LabeledText> demos;
    // Each demonstration is 12 words + "utterance : intent : label" + the "==" separator: 18
    // tokens.
    for (int64_t t = 0; t < pool_tokens; t += 18)
      demos.push_back({Words(rng, 12), labels[rng() % 50]});
    PoolTaskOptions task_options;
    task_options.labels = labels;
    task_options.kv_dtype = kv_dtype;
    task_options.blocks = blocks;
    PoolEncoder encoder(store->get(), pool);
    EncodeProgress built;
    auto t0 = std::chrono::steady_clock::now();
    Status s = encoder.AddDemonstrations("bench", task_options, demos, 1,
                                         [&built](const EncodeProgress& p) { built = p; });
    if (device.is_cuda()) torch::cuda::synchronize();
    const double dbsa_setup =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!s.ok()) {
      std::fprintf(stderr, "build: %s\n", s.ToString().c_str());
      return 1;
    }
    std::printf(
        "pool build (DBSA setup): %.1f s: forward %.1f s, K/V to %s %.1f s, store appends %.1f s, "
        "the rest %.1f s\n",
        dbsa_setup, built.forward_seconds, std::string(DTypeName(kv_dtype)).c_str(),
        built.convert_seconds, built.append_seconds,
        dbsa_setup - built.forward_seconds - built.convert_seconds - built.append_seconds);
    if (IsScaledDType(kv_dtype)) {
      std::printf("pool build: K/V quantised on the GPU for %llu of %llu blocks%s%s\n",
                  static_cast<unsigned long long>(built.blocks_on_device),
                  static_cast<unsigned long long>(built.blocks_done),
                  built.device_mismatch.empty() ? "" : "; differed from the host: ",
                  built.device_mismatch.c_str());
    }
    SessionOptions so;
    so.cache_bytes = size_t(16) << 30;  // the 90k pool takes 11.5 GB; the model 16 GB
    auto session = DbsaSession::Open(store->get(), "bench", pool, so);
    if (!session.ok()) {
      std::fprintf(stderr, "session: %s\n", session.status().ToString().c_str());
      return 1;
    }
    std::vector<std::string> texts;
    for (int q = 0; q < queries; ++q) texts.push_back(Words(rng, 12));

    struct Row {
      std::string name;
      std::vector<double> ms;
      Timing sum;
      double setup = 0;
      uint64_t ctx = 0;
    };
    // Warm-up (FixedICL: its setup), then `n` timed queries (n = 0: all of `texts`).
    auto measure = [&](DbsaSession* sess, const std::string& name, Method method, bool cold,
                       size_t n) -> Result<Row> {
      Row row{name, {}, {}, 0, 0};
      AnswerOptions o;
      o.method = method;
      SHOTDB_RETURN_IF_ERROR(sess->Ask(texts[0], o).status());
      if (method == Method::kDbsa && !cold) {
        for (const auto& t : texts) SHOTDB_RETURN_IF_ERROR(sess->Ask(t, o).status());
      }
      const size_t count = n == 0 ? texts.size() : std::min(n, texts.size());
      for (size_t i = 0; i < count; ++i) {
        if (cold) sess->ClearCache();
        SHOTDB_ASSIGN_OR_RETURN(Answer a, sess->Ask(texts[i], o));
        row.ms.push_back(a.timing.total);
        row.ctx = a.context_tokens;
        const Timing& t = a.timing;
        row.sum.select += t.select / count;
        row.sum.load += t.load / count;
        row.sum.gather += t.gather / count;
        row.sum.encode += t.encode / count;
        row.sum.decode += t.decode / count;
        row.sum.attention += t.attention / count;
        row.sum.mlp += t.mlp / count;
        row.sum.sampling += t.sampling / count;
        row.sum.qkv += t.qkv / count;
        row.sum.attention_core += t.attention_core / count;
        row.sum.total += t.total / count;
      }
      return row;
    };
    const std::vector<std::tuple<const char*, Method, bool>> methods = {
        {"RetICL", Method::kRetIcl, false},
        {"FixedICL", Method::kFixedIcl, false},
        {"DBSA cold", Method::kDbsa, true},
        {"DBSA hot", Method::kDbsa, false}};
    std::vector<Row> rows;
    for (auto [name, method, cold] : methods) {
      auto row = measure(session->get(), name, method, cold, 0);
      if (!row.ok()) {
        std::fprintf(stderr, "%s: %s\n", name, row.status().ToString().c_str());
        return 1;
      }
      rows.push_back(*row);
    }
    // What a hot query's staging costs the host: 8 more hot queries between two snapshots of the
    // source's staging counters. The device source stages on a thread of its own while the
    // forward runs; the `load` column is only what the query waits for before its forward starts
    // (until the first layer is published).
    double hot_stage_ms = 0, hot_pin_ms = 0, hot_thread_ms = 0, hot_first_ms = 0;
    if (device.is_cuda()) {  // the host source stages nothing
      const auto before = (*session)->cache_stats();
      AnswerOptions o;
      for (const auto& t : texts) {
        if (!(*session)->Ask(t, o).ok()) break;
      }
      const auto after = (*session)->cache_stats();
      hot_stage_ms = (after.stage_ms - before.stage_ms) / static_cast<double>(texts.size());
      hot_pin_ms = (after.pin_ms - before.pin_ms) / static_cast<double>(texts.size());
      hot_thread_ms =
          (after.thread_start_ms - before.thread_start_ms) / static_cast<double>(texts.size());
      hot_first_ms =
          (after.first_layer_ms - before.first_layer_ms) / static_cast<double>(texts.size());
    }
    rows[1].setup = (*session)->fixed_prefix_seconds();
    rows[2].setup = rows[3].setup = dbsa_setup;
    const double reticl = Median(rows[0].ms);
    auto snap = (*store)->BeginSnapshot();
    const TaskInfo info = *(*snap)->GetTask("bench");
    std::printf("\npool %lld tokens (%llu blocks, %llu demos); context per query ~%llu tokens\n",
                static_cast<long long>(info.num_tokens),
                static_cast<unsigned long long>(info.num_blocks),
                static_cast<unsigned long long>(info.num_demos),
                static_cast<unsigned long long>(rows[3].ctx));
    // The memory floor of a DBSA query: one forward reads every weight matrix and the context's
    // K/V once (hot: from device memory); cold, the K/V also cross PCIe, which at best overlaps
    // the forward.
    // Pages hold 16-bit K/V whatever the stored dtype (fp8 and int8 are dequantised as they
    // land), so the hot floor reads 2 bytes an element; PCIe carries the stored bytes (fp8: 1,
    // plus a float32 scale per head and record, under 0.1% here; int8: 1, plus a bfloat16 scale
    // per head, channel and 128 tokens, about 1 / 95 of the codes for blocks of ~95 tokens).
    const auto& mc = (*model)->config();
    const double kv_elements =
        2.0 * mc.num_layers * mc.num_kv_heads * mc.head_dim * static_cast<double>(rows[3].ctx);
    const double kv_bytes = kv_elements * 2.0;
    // The scales: those of a record of the pool's mean block length, for every record.
    const double block_tokens =
        static_cast<double>(info.num_tokens) / static_cast<double>(info.num_blocks);
    const double records = 2.0 * mc.num_layers * static_cast<double>(rows[3].ctx) / block_tokens;
    const double pcie_bytes =
        kv_elements * static_cast<double>(DTypeSize(kv_dtype)) +
        records * static_cast<double>(KvScaleBytes(kv_dtype, static_cast<uint32_t>(mc.num_kv_heads),
                                                   static_cast<uint32_t>(std::lround(block_tokens)),
                                                   static_cast<uint32_t>(mc.head_dim)));
    const double hot_floor =
        bw.device_gbs > 0 ? (weight_bytes + kv_bytes) / bw.device_gbs / 1e6 : 0;
    const double cold_floor =
        bw.h2d_gbs > 0 ? std::max(hot_floor, pcie_bytes / bw.h2d_gbs / 1e6) : 0;
    std::printf(
        "memory floor: %.2f GB weights + %.2f GB context K/V (%.2f GB over PCIe): hot %.2f ms, "
        "cold %.2f ms\n",
        weight_bytes / 1e9, kv_bytes / 1e9, pcie_bytes / 1e9, hot_floor, cold_floor);
    std::printf("%-10s %10s %12s %10s %9s | %8s %8s %8s %9s %9s\n", "method", "setup s", "query ms",
                "vs RetICL", "vs floor", "bm25", "load", "gather", "encode", "decode");
    const size_t method_rows_at = report.size();  // the methods' rows; batch rows follow
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      const double med = Median(r.ms);
      const double floor_ms = i == 2 ? cold_floor : i == 3 ? hot_floor : 0;
      char vs_floor[32] = "-";
      if (floor_ms > 0) std::snprintf(vs_floor, sizeof vs_floor, "%.2fx", med / floor_ms);
      std::printf("%-10s %10.2f %12.2f %9.4fx %9s | %8.2f %8.2f %8.2f %9.2f %9.2f\n",
                  r.name.c_str(), r.setup, med, med / reticl, vs_floor, r.sum.select, r.sum.load,
                  r.sum.gather, r.sum.encode, r.sum.decode);
      report.push_back({{"pool_tokens", info.num_tokens},
                        {"kv_dtype", std::string(DTypeName(kv_dtype))},
                        {"floor_ms", floor_ms},
                        {"ratio_vs_floor", floor_ms > 0 ? med / floor_ms : 0.0},
                        {"device_gbs", bw.device_gbs},
                        {"h2d_gbs", bw.h2d_gbs},
                        {"method", r.name},
                        {"setup_s", r.setup},
                        {"query_ms_median", med},
                        {"ratio_vs_reticl", med / reticl},
                        {"context_tokens", r.ctx},
                        {"split_ms",
                         {{"bm25", r.sum.select},
                          {"load", r.sum.load},
                          {"gather", r.sum.gather},
                          {"encode", r.sum.encode},
                          {"decode", r.sum.decode},
                          {"total", r.sum.total}}}});
      if (i >= 2) {  // DBSA's setup is the pool build
        report.back()["setup_split_s"] = {{"forward", built.forward_seconds},
                                          {"convert", built.convert_seconds},
                                          {"append", built.append_seconds}};
      }
      if (i == 3 && hot_stage_ms > 0) {
        report.back()["hot_load_host_ms"] = {{"staging", hot_stage_ms},
                                             {"pinning", hot_pin_ms},
                                             {"thread_start", hot_thread_ms},
                                             {"to_first_layer", hot_first_ms}};
      }
    }
    // Throughput of hot DBSA queries answered in batches (AskBatch: the union of the batch's
    // blocks staged once, one forward for all), against batch 1 in the same run. Two floors of a
    // batch: memory, the weights once plus every query's context K/V (each query reads its own
    // blocks), over the copy bandwidth; compute, its forward's FLOPs (ForwardFlops of each query's
    // prompt rows and context) at the measured bf16 matmul rate. The floor is the larger.
    if (!batches.empty()) {
      std::vector<std::string> batch_texts;
      for (int q = 0; q < 64; ++q) batch_texts.push_back(Words(rng, 12));
      AnswerOptions o;
      auto warm = (*session)->AskBatch(batch_texts, o);  // every block of the batches cached
      if (!warm.ok()) {
        std::fprintf(stderr, "batch warm-up: %s\n", warm.status().ToString().c_str());
        return 1;
      }
      std::printf("batched hot DBSA queries (64 queries per batch size, 2 rounds, best round)\n");
      std::printf("%6s %12s %12s %12s %12s %12s %10s %10s\n", "batch", "ms/batch", "queries/s",
                  "vs batch 1", "memory ms", "compute ms", "vs floor", "TFLOP/s");
      double qps1 = 0;
      for (int b : batches) {
        double best = 1e30, flops = 0;  // flops: of every query of the 64, from round 0's answers
        for (int round = 0; round < 2; ++round) {
          const auto t0 = std::chrono::steady_clock::now();
          for (size_t first = 0; first + b <= batch_texts.size(); first += b) {
            std::vector<std::string> part(batch_texts.begin() + first,
                                          batch_texts.begin() + first + b);
            auto r = (*session)->AskBatch(part, o);
            if (!r.ok()) {
              std::fprintf(stderr, "batch %d: %s\n", b, r.status().ToString().c_str());
              return 1;
            }
            for (const Answer& a : *r) {
              if (round == 0) {
                flops += ForwardFlops(mc, static_cast<double>(a.prompt_tokens),
                                      static_cast<double>(a.context_tokens));
              }
            }
          }
          best = std::min(
              best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                        .count());
        }
        const double per_batch = best / (batch_texts.size() / b);
        const double qps = 1000.0 * b / per_batch;
        if (qps1 == 0) qps1 = qps;  // the first batch size (1 by default) is the baseline
        const double memory_ms =
            bw.device_gbs > 0 ? (weight_bytes + b * kv_bytes) / bw.device_gbs / 1e6 : 0;
        const double batch_flops = flops / static_cast<double>(batch_texts.size()) * b;
        const double compute_ms =
            bw.matmul_tflops > 0 ? batch_flops / (bw.matmul_tflops * 1e12) * 1e3 : 0;
        const double floor_ms = std::max(memory_ms, compute_ms);
        const double tflops = batch_flops / (per_batch * 1e-3) / 1e12;
        std::printf("%6d %12.2f %12.1f %11.2fx %12.2f %12.2f %9.2fx %10.1f\n", b, per_batch, qps,
                    qps / qps1, memory_ms, compute_ms, floor_ms > 0 ? per_batch / floor_ms : 0.0,
                    tflops);
        report.push_back({{"pool_tokens", info.num_tokens},
                          {"method", "DBSA hot batch"},
                          {"batch", b},
                          {"ms_per_batch", per_batch},
                          {"queries_per_s", qps},
                          {"ratio_vs_batch1", qps / qps1},
                          {"memory_floor_ms", memory_ms},
                          {"compute_floor_ms", compute_ms},
                          {"floor_ms", floor_ms},
                          {"tflops", tflops},
                          {"matmul_tflops", bw.matmul_tflops}});
      }
    }
#ifdef SHOTDB_HAVE_GPU
    if (cuda_profile_query && device.is_cuda()) {
      AnswerOptions o;
      torch::cuda::synchronize();
      cudaProfilerStart();
      auto a = (*session)->Ask(texts[1 % texts.size()], o);
      torch::cuda::synchronize();
      cudaProfilerStop();
      if (!a.ok()) {
        std::fprintf(stderr, "profiled hot query: %s\n", a.status().ToString().c_str());
        return 1;
      }
      std::printf("cuda-profiled hot query: %.2f ms (load %.2f, decode %.2f)\n", a->timing.total,
                  a->timing.load, a->timing.decode);
    }
#else
    (void)cuda_profile_query;
#endif
    if (hot_stage_ms > 0) {
      std::printf(
          "hot staging, host: %.2f ms a query (of which pinning pages %.2f ms), on the staging "
          "thread while the forward runs; the query waited %.2f ms for it (load): the thread's "
          "start %.2f ms, then staging until the first layer %.2f ms\n",
          hot_stage_ms, hot_pin_ms, rows[3].sum.load, hot_thread_ms, hot_first_ms);
    }
    const auto cs = (*session)->cache_stats();
    std::printf(
        "device cache: %llu hits, %llu misses, %.2f GB resident; %.2f GB loaded in %llu copies\n",
        static_cast<unsigned long long>(cs.hits), static_cast<unsigned long long>(cs.misses),
        cs.bytes_resident / 1e9, cs.bytes_loaded / 1e9, static_cast<unsigned long long>(cs.copies));
    session->reset();

    // The split of one query per method, in a fresh profiled session (same cache size; the timed
    // session is closed first so that the two caches are never resident together).
    so.profile = true;
    auto profiled = DbsaSession::Open(store->get(), "bench", pool, so);
    if (!profiled.ok()) {
      std::fprintf(stderr, "profiled session: %s\n", profiled.status().ToString().c_str());
      return 1;
    }
    std::printf(
        "profiled (1 query each, device-synchronised; not part of the timings above), ms\n");
    std::printf("%-10s %8s %8s %8s %9s %8s %8s %8s %9s %9s %9s\n", "method", "bm25", "load",
                "gather", "attention", "(qkv", "core)", "mlp", "sampling", "encode", "total");
    for (size_t i = 0; i < methods.size(); ++i) {
      const auto& [name, method, cold] = methods[i];
      auto row = measure(profiled->get(), name, method, cold, 1);
      if (!row.ok()) {
        std::fprintf(stderr, "%s (profiled): %s\n", name, row.status().ToString().c_str());
        return 1;
      }
      const Timing& t = row->sum;
      std::printf("%-10s %8.2f %8.2f %8.2f %9.2f %8.2f %8.2f %8.2f %9.2f %9.2f %9.2f\n", name,
                  t.select, t.load, t.gather, t.attention, t.qkv, t.attention_core, t.mlp,
                  t.sampling, t.encode, t.total);
      report[method_rows_at + i]["profile_ms"] = {
          {"bm25", t.select},   {"load", t.load},
          {"gather", t.gather}, {"attention", t.attention},
          {"qkv", t.qkv},       {"attention_core", t.attention_core},
          {"mlp", t.mlp},       {"sampling", t.sampling},
          {"encode", t.encode}, {"total", t.total}};
    }
    profiled->reset();
    (void)RemoveAll(dir);  // best effort: a leftover benchmark pool is harmless
  }
  if (!json_path.empty()) std::ofstream(json_path) << report.dump(2) << "\n";
  return 0;
}

}  // namespace
}  // namespace shotdb

int main(int argc, char** argv) { return shotdb::Run(argc, argv); }
