// Store write/read throughput per codec for one model-sized block shape, next to a plain memcpy and
// a plain file write (+fsync) / read of the same bytes measured in the same run.
//
//   store_bench [--dir DIR] [--blocks N] [--layers L] [--kv_heads H] [--tokens T] [--head_dim D]
//               [--nosync]
// Defaults: 4 blocks of Llama-3.1-8B shape (32 layers x K,V x 8 kv_heads x 750 tokens x 128 dims,
// bf16: 98 MB a block). The data is "real-looking" bf16: per-channel scales spanning two orders of
// magnitude and a few outlier channels in K, like pre-RoPE keys; every record differs. The last
// columns are the host cost of finding one record: rec_us by a lookup each (GetRecord), walk_us
// block by block with one cursor (GetBlockRecords, what gpu::Stager does).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "engine/store.h"
#include "format/dtype.h"

namespace {

using shotdb::Codec;
using shotdb::TensorKind;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

uint64_t Next(uint64_t* s) {
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

// One [kv_heads, tokens, head_dim] bf16 tensor.
std::vector<uint16_t> RealLookingTensor(uint32_t heads, uint32_t tokens, uint32_t dim,
                                        uint64_t seed, bool key) {
  std::vector<uint16_t> out(static_cast<size_t>(heads) * tokens * dim);
  std::vector<float> scale(static_cast<size_t>(heads) * dim);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (float& c : scale) {
    c = 0.05f * std::pow(10.0f, static_cast<float>(Next(&s) % 1000) / 500.0f);  // 0.05 .. 5
    if (key && Next(&s) % 32 == 0) c *= 8.0f;                                   // outliers
  }
  size_t i = 0;
  for (uint32_t h = 0; h < heads; ++h) {
    for (uint32_t t = 0; t < tokens; ++t) {
      for (uint32_t d = 0; d < dim; ++d, ++i) {
        const uint64_t r = Next(&s);
        float u = 0;
        for (int j = 0; j < 4; ++j) u += static_cast<float>((r >> (16 * j)) & 0xFFFF) / 65536.0f;
        out[i] = shotdb::FloatToBFloat16((u - 2.0f) * 1.7f * scale[h * dim + d]);
      }
    }
  }
  return out;
}

struct Args {
  std::string dir = "/tmp/shotdb_store_bench";
  uint32_t blocks = 4, layers = 32, kv_heads = 8, tokens = 750, head_dim = 128;
  bool sync = true;
};

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", k.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (k == "--dir")
      a.dir = next();
    else if (k == "--blocks")
      a.blocks = static_cast<uint32_t>(std::atoi(next()));
    else if (k == "--layers")
      a.layers = static_cast<uint32_t>(std::atoi(next()));
    else if (k == "--kv_heads")
      a.kv_heads = static_cast<uint32_t>(std::atoi(next()));
    else if (k == "--tokens")
      a.tokens = static_cast<uint32_t>(std::atoi(next()));
    else if (k == "--head_dim")
      a.head_dim = static_cast<uint32_t>(std::atoi(next()));
    else if (k == "--nosync")
      a.sync = false;
    else {
      std::fprintf(stderr, "unknown argument %s\n", k.c_str());
      return 2;
    }
  }
  std::filesystem::remove_all(a.dir);
  std::filesystem::create_directories(a.dir);

  // Distinct tensors for every layer and kind; blocks reuse them (records compress independently).
  std::vector<std::vector<uint16_t>> tensors;
  for (uint32_t l = 0; l < a.layers; ++l) {
    for (int kind = 0; kind < 2; ++kind) {
      tensors.push_back(
          RealLookingTensor(a.kv_heads, a.tokens, a.head_dim, l * 2 + kind, kind == 0));
    }
  }
  const size_t record_bytes = tensors[0].size() * 2;
  const size_t block_bytes = record_bytes * tensors.size();
  const double total_gb = static_cast<double>(block_bytes) * a.blocks / 1e9;
  std::printf(
      "shape: %u layers x K,V x [%u, %u, %u] bf16 = %.1f MB a block, %u blocks (%.2f GB), "
      "sync=%d\n",
      a.layers, a.kv_heads, a.tokens, a.head_dim, block_bytes / 1e6, a.blocks, total_gb, a.sync);

  // Baseline 1: memcpy of the same bytes into a pre-faulted buffer.
  std::vector<uint8_t> dst(block_bytes, 1);
  auto t0 = Clock::now();
  for (uint32_t b = 0; b < a.blocks; ++b) {
    size_t off = 0;
    for (const auto& t : tensors) {
      std::memcpy(dst.data() + off, t.data(), record_bytes);
      off += record_bytes;
    }
  }
  const double memcpy_gbs = total_gb / Seconds(t0, Clock::now());

  // Baseline 2: one plain file, write() every record then fsync; read() it back.
  const std::string plain = a.dir + "/plain.bin";
  int fd = ::open(plain.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
  t0 = Clock::now();
  for (uint32_t b = 0; b < a.blocks; ++b) {
    for (const auto& t : tensors) {
      if (::write(fd, t.data(), record_bytes) != static_cast<ssize_t>(record_bytes)) return 1;
    }
    if (a.sync) ::fsync(fd);
  }
  const double file_write_gbs = total_gb / Seconds(t0, Clock::now());
  ::close(fd);
  fd = ::open(plain.c_str(), O_RDONLY);
  t0 = Clock::now();
  for (uint32_t b = 0; b < a.blocks; ++b) {
    size_t off = 0;
    for (size_t r = 0; r < tensors.size(); ++r, off += record_bytes) {
      if (::read(fd, dst.data() + off, record_bytes) != static_cast<ssize_t>(record_bytes)) {
        return 1;
      }
    }
  }
  const double file_read_gbs = total_gb / Seconds(t0, Clock::now());
  ::close(fd);
  std::filesystem::remove(plain);
  std::printf(
      "baseline memcpy %.2f GB/s | file write+fsync %.2f GB/s | file read (page cache) "
      "%.2f GB/s\n\n",
      memcpy_gbs, file_write_gbs, file_read_gbs);

  std::printf("%-12s %9s %9s %10s %10s %10s %9s %9s %8s %10s %10s %8s %8s\n", "codec", "write",
              "w/file", "append_ms", "zc_read", "zc_noverif", "decode", "d/memcpy", "ratio",
              "payload_MB", "file_MB", "rec_us", "walk_us");
  for (Codec codec : {Codec::kRaw, Codec::kLz4, Codec::kShuffleLz4}) {
    const std::string dir = a.dir + "/" + std::string(shotdb::CodecName(codec));
    shotdb::Store::Options options;
    options.sync = a.sync;
    auto store = shotdb::Store::Open(dir, options);
    if (!store.ok()) {
      std::fprintf(stderr, "%s\n", store.status().ToString().c_str());
      return 1;
    }
    shotdb::TaskInfo task;
    task.name = "bench";
    task.model = {"llama", shotdb::DType::kBF16, "bench", a.layers, a.kv_heads, a.head_dim};
    task.codec = codec;
    task.prompt_template = "{text} => {label}";
    task.labels = {"a", "b"};
    if (auto s = (*store)->CreateTask(task); !s.ok()) {
      std::fprintf(stderr, "%s\n", s.ToString().c_str());
      return 1;
    }

    std::vector<double> append_ms;
    t0 = Clock::now();
    for (uint32_t b = 0; b < a.blocks; ++b) {
      shotdb::NewBlock nb;
      nb.model = task.model;
      nb.info.index = b;
      nb.info.position_offset = uint64_t{b} * a.tokens;
      nb.info.token_count = a.tokens;
      nb.info.text = "block " + std::to_string(b) + " set an alarm play some jazz";
      for (uint32_t l = 0; l < a.layers; ++l) {
        nb.keys.push_back(tensors[2 * l].data());
        nb.values.push_back(tensors[2 * l + 1].data());
      }
      auto a0 = Clock::now();
      shotdb::Status s = (*store)->AppendBlock("bench", nb);
      append_ms.push_back(Seconds(a0, Clock::now()) * 1e3);
      if (!s.ok()) {
        std::fprintf(stderr, "%s\n", s.ToString().c_str());
        return 1;
      }
    }
    const double write_gbs = total_gb / Seconds(t0, Clock::now());
    std::sort(append_ms.begin(), append_ms.end());

    auto snap = (*store)->BeginSnapshot();
    if (!snap.ok()) {
      std::fprintf(stderr, "%s\n", snap.status().ToString().c_str());
      return 1;
    }
    // Zero-copy (raw) or decoded (lz4) GetPayload, checksum verified; then without verification.
    double zc_gbs[2];
    for (int verify = 1; verify >= 0; --verify) {
      t0 = Clock::now();
      uint64_t sink = 0;
      for (uint32_t b = 0; b < a.blocks; ++b) {
        for (uint32_t l = 0; l < a.layers; ++l) {
          for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
            auto p = (*snap)->GetPayload("bench", b, l, kind, verify == 1);
            if (!p.ok()) {
              std::fprintf(stderr, "%s\n", p.status().ToString().c_str());
              return 1;
            }
            // Touch every page so that the zero-copy path really reads the bytes.
            const auto* bytes = static_cast<const uint8_t*>(p->data);
            for (size_t i = 0; i < p->size; i += 4096) sink += bytes[i];
          }
        }
      }
      zc_gbs[1 - verify] = total_gb / Seconds(t0, Clock::now());
      if (sink == 42) std::printf(" ");
    }
    // Record lookups alone (GetRecord: key lookup and header check, no payload access), layer by
    // layer over the blocks as gpu::Stager stages them: the host cost every staged record pays.
    t0 = Clock::now();
    for (uint32_t l = 0; l < a.layers; ++l) {
      for (uint32_t b = 0; b < a.blocks; ++b) {
        for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
          auto r = (*snap)->GetRecord("bench", b, l, kind);
          if (!r.ok()) {
            std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
            return 1;
          }
        }
      }
    }
    const double lookup_us =
        Seconds(t0, Clock::now()) * 1e6 / (2.0 * a.blocks * static_cast<double>(a.layers));
    // The same records read block by block with one cursor walk each (GetBlockRecords), as the
    // Stager reads them now.
    std::vector<uint32_t> all_layers(a.layers);
    for (uint32_t l = 0; l < a.layers; ++l) all_layers[l] = l;
    t0 = Clock::now();
    for (uint32_t b = 0; b < a.blocks; ++b) {
      auto r = (*snap)->GetBlockRecords("bench", b, all_layers);
      if (!r.ok()) {
        std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
        return 1;
      }
    }
    const double walk_us =
        Seconds(t0, Clock::now()) * 1e6 / (2.0 * a.blocks * static_cast<double>(a.layers));
    // Decode (verified) into a caller buffer: what a GPU staging copy would do.
    t0 = Clock::now();
    for (uint32_t b = 0; b < a.blocks; ++b) {
      size_t off = 0;
      for (uint32_t l = 0; l < a.layers; ++l) {
        for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
          shotdb::Status s =
              (*snap)->DecodePayloadInto("bench", b, l, kind, dst.data() + off, record_bytes);
          if (!s.ok()) {
            std::fprintf(stderr, "%s\n", s.ToString().c_str());
            return 1;
          }
          off += record_bytes;
        }
      }
    }
    const double decode_gbs = total_gb / Seconds(t0, Clock::now());
    snap->reset();
    auto stats = (*store)->Stats();
    if (!stats.ok()) {
      std::fprintf(stderr, "%s\n", stats.status().ToString().c_str());
      return 1;
    }
    const shotdb::TaskStats& ts = stats->tasks[0];
    std::printf(
        "%-12s %7.2f/s %8.2fx %5.0f/%4.0f %8.2f/s %8.2f/s %7.2f/s %8.2fx %8.3f %10.1f %10.1f "
        "%8.2f %8.2f\n",
        std::string(shotdb::CodecName(codec)).c_str(), write_gbs, write_gbs / file_write_gbs,
        append_ms[append_ms.size() / 2], append_ms.back(), zc_gbs[0], zc_gbs[1], decode_gbs,
        decode_gbs / memcpy_gbs, ts.compression_ratio, ts.payload_stored_bytes / 1e6,
        stats->file_size / 1e6, lookup_us, walk_us);
    store->reset();
    std::filesystem::remove_all(dir);
  }
  std::printf(
      "\nwrite, zc_read (GetPayload, verified), zc_noverif, decode (DecodePayloadInto, "
      "verified) in GB/s of raw bytes;\nw/file = store write / plain file write+fsync; "
      "d/memcpy = decode / memcpy; append_ms = median/max AppendBlock latency;\n"
      "ratio = raw / stored payload bytes; file_MB = data.mdb size;\n"
      "rec_us = microseconds per GetRecord (lookup and header check only), layer by layer;\n"
      "walk_us = the same per record read block by block with one cursor (GetBlockRecords).\n");
  std::filesystem::remove_all(a.dir);
  return 0;
}
