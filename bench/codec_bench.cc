// Block record encode/decode throughput per codec on K/V-like bf16 tensors, against a plain
// memcpy of the same bytes measured in the same benchmark (counter vs_memcpy = codec GB/s divided
// by memcpy GB/s), plus the compression ratios of lz4 and shuffle-lz4 on the same tensor.
//
// Encode = EncodeBlockRecord + WriteTo into a preallocated buffer (what a store write does).
// Decode = ParseBlockRecord + DecodeBlockRecord (both checksums verified; what a read does).
//
// The data imitates a pre-RoPE K cache: Gaussian per head_dim channel with log-uniform scales over
// two orders of magnitude, channel means, and a few outlier channels 20x larger. V gets milder
// scales and no outliers.
#include <benchmark/benchmark.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "format/block_record.h"

namespace shotdb {
namespace {

struct Shape {
  const char* name;
  uint32_t kv_heads, tokens, head_dim;
};
// SmolLM2-135M (the default model) and Llama-3.1-8B, one block of ~2k tokens (k = 50 demos).
const Shape kShapes[] = {{"smollm2", 3, 2048, 64}, {"llama8b", 8, 2048, 128}};

BlockRecordMeta MetaFor(const Shape& s, TensorKind kind) {
  return BlockRecordMeta{DType::kBF16, kind, 0, s.kv_heads, s.tokens, s.head_dim};
}

std::vector<uint8_t> MakeKvLike(const Shape& s, TensorKind kind) {
  std::mt19937 rng(kind == TensorKind::kKey ? 1 : 2);
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const bool is_key = kind == TensorKind::kKey;
  std::vector<float> scale(s.head_dim), mean(s.head_dim);
  for (uint32_t c = 0; c < s.head_dim; ++c) {
    scale[c] = std::pow(10.0f, is_key ? 2.0f * uni(rng) - 1.0f : 0.5f * uni(rng) - 0.25f);
    mean[c] = 0.5f * scale[c] * normal(rng);
  }
  if (is_key) {
    for (uint32_t c : {3u, 17u, s.head_dim / 2 + 5, s.head_dim - 2}) scale[c] *= 20.0f;
  }
  const size_t n = size_t{s.kv_heads} * s.tokens * s.head_dim;
  std::vector<float> f(n);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t c = static_cast<uint32_t>(i % s.head_dim);
    f[i] = mean[c] + scale[c] * normal(rng);
  }
  std::vector<uint8_t> out(n * 2);
  ConvertFromFloat(DType::kBF16, f.data(), out.data(), n);
  return out;
}

const std::vector<uint8_t>& Data(int shape, TensorKind kind) {
  static std::map<std::pair<int, int>, std::vector<uint8_t>> cache;
  auto key = std::make_pair(shape, static_cast<int>(kind));
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, MakeKvLike(kShapes[shape], kind)).first;
  return it->second;
}

double RatioOf(Codec codec, int shape, TensorKind kind) {
  const std::vector<uint8_t>& raw = Data(shape, kind);
  Result<EncodedBlockRecord> rec =
      EncodeBlockRecord(MetaFor(kShapes[shape], kind), codec, raw.data(), raw.size());
  return rec.ok() ? static_cast<double>(raw.size()) / rec->header().stored_size : 0.0;
}

// memcpy GB/s of `bytes` bytes, timed over at least 50 ms, right after the codec loop.
double MemcpyGBps(const std::vector<uint8_t>& src) {
  std::vector<uint8_t> dst(src.size());
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  size_t reps = 0;
  double secs = 0;
  do {
    std::memcpy(dst.data(), src.data(), src.size());
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
    ++reps;
    secs = std::chrono::duration<double>(Clock::now() - start).count();
  } while (secs < 0.05);
  return static_cast<double>(reps) * src.size() / secs / 1e9;
}

void SetCounters(benchmark::State& state, const std::vector<uint8_t>& raw, double loop_secs,
                 int shape, TensorKind kind, Codec codec) {
  const double gbps = static_cast<double>(state.iterations()) * raw.size() / loop_secs / 1e9;
  const double memcpy_gbps = MemcpyGBps(raw);
  state.counters["GBps"] = gbps;
  state.counters["memcpy_GBps"] = memcpy_gbps;
  state.counters["vs_memcpy"] = gbps / memcpy_gbps;
  state.counters["ratio"] = RatioOf(codec, shape, kind);
  state.counters["ratio_lz4"] = RatioOf(Codec::kLz4, shape, kind);
  state.counters["ratio_shuffle_lz4"] = RatioOf(Codec::kShuffleLz4, shape, kind);
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * raw.size()));
  state.SetLabel(std::string(CodecName(codec)) + " " + std::string(TensorKindName(kind)) + " " +
                 kShapes[shape].name);
}

// Args: codec, kind (0 K, 1 V), shape index.
void BM_Encode(benchmark::State& state) {
  const auto codec = static_cast<Codec>(state.range(0));
  const auto kind = static_cast<TensorKind>(state.range(1));
  const int shape = static_cast<int>(state.range(2));
  const std::vector<uint8_t>& raw = Data(shape, kind);
  const BlockRecordMeta meta = MetaFor(kShapes[shape], kind);
  std::vector<uint8_t> out(raw.size() * 2 + kBlockRecordHeaderSize);
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    Result<EncodedBlockRecord> rec = EncodeBlockRecord(meta, codec, raw.data(), raw.size());
    if (!rec.ok()) {
      state.SkipWithError(rec.status().ToString().c_str());
      return;
    }
    rec->WriteTo(out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  SetCounters(state, raw, secs, shape, kind, codec);
}

void BM_Decode(benchmark::State& state) {
  const auto codec = static_cast<Codec>(state.range(0));
  const auto kind = static_cast<TensorKind>(state.range(1));
  const int shape = static_cast<int>(state.range(2));
  const std::vector<uint8_t>& raw = Data(shape, kind);
  Result<EncodedBlockRecord> rec =
      EncodeBlockRecord(MetaFor(kShapes[shape], kind), codec, raw.data(), raw.size());
  if (!rec.ok()) {
    state.SkipWithError(rec.status().ToString().c_str());
    return;
  }
  std::vector<uint8_t> stored(rec->size());
  rec->WriteTo(stored.data());
  std::vector<uint8_t> dst(raw.size());
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    Result<BlockRecordView> view = ParseBlockRecord(stored.data(), stored.size(), "bench");
    Status s =
        view.ok() ? DecodeBlockRecord(*view, dst.data(), dst.size(), "bench") : view.status();
    if (!s.ok()) {
      state.SkipWithError(s.ToString().c_str());
      return;
    }
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  SetCounters(state, raw, secs, shape, kind, codec);
  if (std::memcmp(dst.data(), raw.data(), raw.size()) != 0) state.SkipWithError("decode mismatch");
}

void AllArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"codec", "kind", "shape"});
  for (int shape = 0; shape < 2; ++shape) {
    for (int kind = 0; kind < 2; ++kind) {
      for (int codec = 0; codec < 3; ++codec) b->Args({codec, kind, shape});
    }
  }
}

BENCHMARK(BM_Encode)->Apply(AllArgs)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Decode)->Apply(AllArgs)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace shotdb

BENCHMARK_MAIN();
