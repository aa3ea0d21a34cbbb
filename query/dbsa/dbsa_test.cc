// Exactness of the DBSA pipeline against dense float64 references, on the tiny random Llama
// (tests/fixtures/model/tiny_llama, weights from HF transformers):
//  (1) block-by-block encoding == one dense forward over the whole pool with the explicit
//      block-sparse mask, for sequential positions; for windowed positions the dense sequence
//      also holds a copy of the sink block(s) in front of every block's window (see there);
//  (2) appending blocks == building the same blocks in one run, for both schemes;
//  (3) with every block selected in encoding order, DBSA's label scores == a dense forward of
//      pool + query + label where the query attends to everything;
//  (4) the context budget, and RetICL over single demonstrations, against references built from
//      a Bm25MemoryIndex and a dense forward of the chosen text.
#include "query/dbsa/dbsa.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "engine/bm25.h"
#include "engine/store_test_util.h"
#include "format/block_record.h"
#include "format/kv_values.h"
#include "query/dbsa/demo_file.h"
#include "query/dbsa/pool_encoder.h"
#include "util/file_util.h"

namespace shotdb {
namespace {

// One token per byte: enough vocabulary for the 256-token tiny model, and independent of any
// trained tokenizer.
class ByteTokenizer : public Tokenizer {
 public:
  Result<std::vector<int32_t>> Encode(std::string_view text, bool, bool) const override {
    std::vector<int32_t> ids;
    for (unsigned char c : text) ids.push_back(c);
    return ids;
  }
  std::string Decode(const std::vector<int32_t>& ids) const override {
    return std::string(ids.begin(), ids.end());
  }
  std::string TokenText(int32_t id) const override { return std::string(1, char(id)); }
  size_t vocab_size() const override { return 256; }
  int32_t bos_id() const override { return -1; }
  int32_t eos_id() const override { return -1; }
  bool add_bos_default() const override { return false; }
  std::string Fingerprint() const override { return "bytes-v1"; }
};

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/shotdb_dbsa_test_XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { EXPECT_TRUE(RemoveAll(path_).ok()); }
  std::string Sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

const std::vector<std::string> kLabels = {"red", "green", "blue"};

std::vector<std::vector<Demonstration>> MakeGroups(size_t blocks, size_t per_block) {
  std::mt19937 rng(42);
  const std::vector<std::string> words = {"apple", "sky", "grass", "fire", "sea", "leaf", "rose"};
  std::vector<std::vector<Demonstration>> groups(blocks);
  uint64_t id = 0;
  for (auto& g : groups) {
    for (size_t i = 0; i < per_block; ++i) {
      std::string text = words[rng() % words.size()] + " " + words[rng() % words.size()];
      g.push_back({id++, text, kLabels[rng() % kLabels.size()]});
    }
  }
  return groups;
}

class DbsaExactnessTest : public ::testing::Test {
 protected:
  // The tiny model on the GPU, computing in `dtype` (the CUDA tests).
  static Result<std::unique_ptr<LlamaModel>> TinyCudaModel(torch::Dtype dtype) {
    LoadOptions options;
    options.device = torch::Device("cuda");
    options.dtype = dtype;
    return LlamaModel::Load(std::string(SHOTDB_SOURCE_DIR) + "/tests/fixtures/model/tiny_llama",
                            options);
  }

  void SetUp() override {
    LoadOptions options;
    options.dtype = torch::kFloat64;
    auto model = LlamaModel::Load(
        std::string(SHOTDB_SOURCE_DIR) + "/tests/fixtures/model/tiny_llama", options);
    ASSERT_TRUE(model.ok()) << model.status().ToString();
    model_ = std::move(*model);
    pool_ = {model_.get(), &tokenizer_, "tiny-llama-fixture"};
  }

  // A store at `dir` with task "t" of the fixture's model (or `pool`'s) and labels.
  std::unique_ptr<Store> MakeTask(const std::string& dir, DType kv_dtype, const BlockConfig& cfg,
                                  const PoolModel* pool = nullptr) {
    auto store = Store::Open(dir);
    EXPECT_TRUE(store.ok()) << store.status().ToString();
    TaskInfo task;
    task.name = "t";
    task.model = MakeFingerprint(pool != nullptr ? *pool : pool_, kv_dtype);
    task.blocks = cfg;
    task.prompt_template = std::string(PromptFormat::kDefaultTemplate);
    task.separator = std::string(PromptFormat::kDefaultSeparator);
    task.labels = kLabels;
    EXPECT_TRUE((*store)->CreateTask(task).ok());
    return std::move(*store);
  }

  // Stored K or V of one block and layer as a float64 tensor.
  torch::Tensor Stored(Store* store, uint32_t block, uint32_t layer, TensorKind kind) {
    auto snap = store->BeginSnapshot();
    EXPECT_TRUE(snap.ok());
    auto info = (*snap)->GetBlock("t", block);
    EXPECT_TRUE(info.ok());
    auto payload = (*snap)->GetPayload("t", block, layer, kind);
    EXPECT_TRUE(payload.ok()) << payload.status().ToString();
    const auto& c = model_->config();
    return torch::from_blob(const_cast<void*>(payload->data),
                            {c.num_kv_heads, static_cast<int64_t>(info->token_count), c.head_dim},
                            torch::TensorOptions().dtype(torch::kFloat64))
        .clone();
  }

  // Token ids of every block of the pool in order, and the block each token belongs to.
  void PoolTokens(Store* store, uint32_t blocks, std::vector<int64_t>* ids,
                  std::vector<uint32_t>* owner) {
    auto snap = store->BeginSnapshot();
    ASSERT_TRUE(snap.ok());
    for (uint32_t b = 0; b < blocks; ++b) {
      auto info = (*snap)->GetBlock("t", b);
      ASSERT_TRUE(info.ok());
      auto t = TokenizeBlock(tokenizer_, info->text, b);
      ASSERT_TRUE(t.ok());
      ASSERT_EQ(t->size(), info->token_count);
      for (int32_t id : *t) {
        ids->push_back(id);
        owner->push_back(b);
      }
    }
  }

  static double MaxRelError(const torch::Tensor& a, const torch::Tensor& b) {
    return ((a - b).abs().max() / b.abs().max()).item<double>();
  }

  ByteTokenizer tokenizer_;
  std::unique_ptr<LlamaModel> model_;
  PoolModel pool_;
  TempDir dir_;
};

// Exactness tests compare whole pools larger than the tiny model's 256 positions: no budget.
SessionOptions Unbounded() {
  SessionOptions o;
  o.max_context = int64_t{1} << 40;
  return o;
}

// The block-sparse rule written out directly: key block kb is visible to query block qb.
bool Visible(uint32_t qb, uint32_t kb, const BlockConfig& cfg) {
  if (kb == qb) return true;
  if (kb > qb) return false;
  return kb < cfg.sink_blocks || kb + cfg.window >= qb;
}

TEST_F(DbsaExactnessTest, BlockByBlockEncodingEqualsDenseMaskedForward) {
  BlockConfig cfg;
  cfg.demos_per_block = 3;
  cfg.window = 2;
  cfg.positions = PositionScheme::kSequential;
  auto store = MakeTask(dir_.Sub("a"), DType::kF64, cfg);
  const auto groups = MakeGroups(6, 3);
  PoolEncoder encoder(store.get(), pool_);
  ASSERT_TRUE(encoder.EncodeBlocks("t", groups).ok());

  std::vector<int64_t> ids;
  std::vector<uint32_t> owner;
  PoolTokens(store.get(), 6, &ids, &owner);
  const int64_t n = static_cast<int64_t>(ids.size());
  auto mask = torch::zeros({n, n}, torch::kBool);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      if (Visible(owner[i], owner[j], cfg)) mask[i][j] = true;
    }
  }
  ForwardRequest dense;
  dense.tokens = torch::tensor(ids, torch::kInt64);
  dense.positions = torch::arange(n, torch::kInt64);
  dense.mask = mask;
  dense.return_kv = true;
  auto result = model_->Forward(dense);
  ASSERT_TRUE(result.ok()) << result.status().ToString();

  int64_t offset = 0;
  for (uint32_t b = 0; b < 6; ++b) {
    const torch::Tensor first = Stored(store.get(), b, 0, TensorKind::kKey);
    const int64_t len = first.size(1);
    for (uint32_t l = 0; l < model_->config().num_layers; ++l) {
      const auto k = Stored(store.get(), b, l, TensorKind::kKey);
      const auto v = Stored(store.get(), b, l, TensorKind::kValue);
      EXPECT_LT(MaxRelError(k, result->kv[l].k.narrow(1, offset, len)), 1e-6) << "block " << b;
      EXPECT_LT(MaxRelError(v, result->kv[l].v.narrow(1, offset, len)), 1e-6) << "block " << b;
    }
    offset += len;
  }
  EXPECT_EQ(offset, n);

  // The mask matters: a dense causal forward (no sparsity) differs in the later blocks.
  ForwardRequest causal = dense;
  causal.mask = torch::Tensor();
  auto full = model_->Forward(causal);
  ASSERT_TRUE(full.ok());
  const auto last = Stored(store.get(), 5, 1, TensorKind::kValue);
  EXPECT_GT(MaxRelError(last, full->kv[1].v.narrow(1, n - last.size(1), last.size(1))), 1e-6);
}

// Windowed positions: block b sees the sink block(s) from position 0, then its previous `window`
// blocks, then itself. The reference is ONE dense float64 forward whose sequence holds every block
// once at its sequential position and, for every block whose window does not start right after the
// sink blocks, a private copy of the sink tokens placed just before that window. A copy attends
// only within itself (as the sink blocks were encoded), so its K/V equal the sink's; the block's
// rows attend to its copy, its window and itself. RoPE depends only on relative positions, so each
// (query, key) pair then sits at the distance the windowed scheme gives it, and the stored K/V
// must equal the dense rows of the original blocks.
TEST_F(DbsaExactnessTest, WindowedEncodingEqualsDenseForwardWithSinkCopies) {
  for (const auto& [sinks, window] :
       std::vector<std::pair<uint32_t, uint32_t>>{{1, 1}, {1, 2}, {2, 1}}) {
    SCOPED_TRACE("sinks " + std::to_string(sinks) + " window " + std::to_string(window));
    BlockConfig cfg;
    cfg.demos_per_block = 2;
    cfg.window = window;
    cfg.sink_blocks = sinks;
    cfg.positions = PositionScheme::kWindowed;
    constexpr uint32_t kBlocks = 7;
    auto store =
        MakeTask(dir_.Sub("w" + std::to_string(sinks) + std::to_string(window)), DType::kF64, cfg);
    EncodeProgress last;
    ASSERT_TRUE(
        PoolEncoder(store.get(), pool_)
            .EncodeBlocks("t", MakeGroups(kBlocks, 2), [&](const EncodeProgress& p) { last = p; })
            .ok());
    // Where the time went: the forwards took some of it, and the parts add up to no more.
    EXPECT_GT(last.forward_seconds, 0);
    EXPECT_GE(last.convert_seconds, 0);
    EXPECT_GE(last.append_seconds, 0);
    EXPECT_LE(last.forward_seconds + last.convert_seconds + last.append_seconds, last.seconds);
    std::vector<int64_t> ids;
    std::vector<uint32_t> owner;
    PoolTokens(store.get(), kBlocks, &ids, &owner);
    std::vector<int64_t> start(kBlocks + 1, 0);  // sequential offsets of the blocks
    for (uint32_t o : owner) ++start[o + 1];
    for (uint32_t b = 0; b < kBlocks; ++b) start[b + 1] += start[b];
    const int64_t sink_len = start[sinks];

    // Each block is encoded at positions below the tokens of its sink blocks + window + itself.
    uint64_t widest = 0;
    for (uint32_t b = 0; b < kBlocks; ++b) {
      std::set<uint32_t> seen;
      for (uint32_t c = 0; c < b; ++c) {
        if (c < sinks || c + window >= b) seen.insert(c);
      }
      uint64_t tokens = start[b + 1] - start[b];
      for (uint32_t c : seen) tokens += start[c + 1] - start[c];
      widest = std::max(widest, tokens);
    }
    EXPECT_EQ(last.max_position, widest);

    // tokens: the originals, then the copies; group: -1 for originals, else the block owning the
    // copy; pos: RoPE position.
    std::vector<int64_t> tokens = ids, pos(ids.size()), group(ids.size(), -1);
    std::vector<uint32_t> block = owner;
    for (size_t i = 0; i < ids.size(); ++i) pos[i] = static_cast<int64_t>(i);
    std::vector<int64_t> copy_of(kBlocks, -1);  // first token of block b's sink copy
    for (uint32_t b = 0; b < kBlocks; ++b) {
      if (b < window || b - window <= sinks) continue;  // its window follows the sink directly
      copy_of[b] = static_cast<int64_t>(tokens.size());
      for (int64_t t = 0; t < sink_len; ++t) {
        tokens.push_back(ids[t]);
        pos.push_back(start[b - window] - sink_len + t);
        group.push_back(b);
        block.push_back(owner[t]);
      }
    }
    const int64_t n = static_cast<int64_t>(tokens.size());
    auto mask = torch::zeros({n, n}, torch::kBool);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t qb = block[i], kb = block[j];
        bool see = false;
        if (group[i] >= 0 || qb < sinks) {
          // A sink token (original or copy) sees the sink tokens of its own group causally.
          see = group[j] == group[i] && kb <= qb && (kb < qb || pos[j] <= pos[i]);
        } else if (group[j] == -1 && kb >= sinks) {
          see = (kb == qb && j <= i) || (kb < qb && kb + window >= qb);
        } else {
          // Sink keys: the block's own copy, or the originals when it has none.
          see = group[j] == (copy_of[qb] >= 0 ? int64_t{qb} : -1);
        }
        mask[i][j] = see;
      }
    }
    ForwardRequest dense;
    dense.tokens = torch::tensor(tokens, torch::kInt64);
    dense.positions = torch::tensor(pos, torch::kInt64);
    dense.mask = mask;
    dense.return_kv = true;
    auto result = model_->Forward(dense);
    ASSERT_TRUE(result.ok()) << result.status().ToString();
    for (uint32_t b = 0; b < kBlocks; ++b) {
      const int64_t len = start[b + 1] - start[b];
      for (uint32_t l = 0; l < model_->config().num_layers; ++l) {
        const auto k = Stored(store.get(), b, l, TensorKind::kKey);
        const auto v = Stored(store.get(), b, l, TensorKind::kValue);
        EXPECT_LT(MaxRelError(k, result->kv[l].k.narrow(1, start[b], len)), 1e-9) << "block " << b;
        EXPECT_LT(MaxRelError(v, result->kv[l].v.narrow(1, start[b], len)), 1e-9) << "block " << b;
        if (copy_of[b] >= 0) {  // the copy holds exactly the sink's K/V
          EXPECT_LT(MaxRelError(result->kv[l].v.narrow(1, copy_of[b], sink_len),
                                result->kv[l].v.narrow(1, 0, sink_len)),
                    1e-9);
        }
      }
    }

    // The scheme matters: the same blocks encoded with sequential positions differ where a
    // block's window does not follow the sink.
    BlockConfig seq = cfg;
    seq.positions = PositionScheme::kSequential;
    auto sequential =
        MakeTask(dir_.Sub("s" + std::to_string(sinks) + std::to_string(window)), DType::kF64, seq);
    ASSERT_TRUE(
        PoolEncoder(sequential.get(), pool_).EncodeBlocks("t", MakeGroups(kBlocks, 2)).ok());
    const uint32_t last_block = kBlocks - 1;
    EXPECT_GT(MaxRelError(Stored(store.get(), last_block, 1, TensorKind::kValue),
                          Stored(sequential.get(), last_block, 1, TensorKind::kValue)),
              1e-6);
    EXPECT_LT(MaxRelError(Stored(store.get(), 0, 1, TensorKind::kValue),
                          Stored(sequential.get(), 0, 1, TensorKind::kValue)),
              1e-12);
  }
}

TEST_F(DbsaExactnessTest, AppendEqualsFullBuild) {
  for (PositionScheme scheme : {PositionScheme::kSequential, PositionScheme::kWindowed}) {
    SCOPED_TRACE(std::string(PositionSchemeName(scheme)));
    BlockConfig cfg;
    cfg.demos_per_block = 4;
    cfg.window = 1;
    cfg.positions = scheme;
    const std::string tag(PositionSchemeName(scheme));
    const auto groups = MakeGroups(5, 4);
    auto whole = MakeTask(dir_.Sub("whole" + tag), DType::kF64, cfg);
    ASSERT_TRUE(PoolEncoder(whole.get(), pool_).EncodeBlocks("t", groups).ok());

    auto parts = MakeTask(dir_.Sub("parts" + tag), DType::kF64, cfg);
    const std::vector<std::vector<Demonstration>> first(groups.begin(), groups.begin() + 2);
    const std::vector<std::vector<Demonstration>> rest(groups.begin() + 2, groups.end());
    ASSERT_TRUE(PoolEncoder(parts.get(), pool_).EncodeBlocks("t", first).ok());
    // A fresh encoder (a later process) must read its context blocks back from the store.
    ASSERT_TRUE(PoolEncoder(parts.get(), pool_).EncodeBlocks("t", rest).ok());

    for (uint32_t b = 0; b < 5; ++b) {
      for (uint32_t l = 0; l < model_->config().num_layers; ++l) {
        for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
          auto a = Stored(whole.get(), b, l, kind);
          auto p = Stored(parts.get(), b, l, kind);
          EXPECT_LE((a - p).abs().max().item<double>(), 1e-12 * a.abs().max().item<double>())
              << "block " << b << " layer " << l;
        }
      }
    }
  }
}

TEST_F(DbsaExactnessTest, AllBlocksSelectedEqualsDenseForwardOfPoolAndQuery) {
  BlockConfig cfg;
  cfg.demos_per_block = 3;
  cfg.window = 1;
  cfg.positions = PositionScheme::kSequential;  // the dense reference places the pool sequentially
  auto store = MakeTask(dir_.Sub("q"), DType::kF64, cfg);
  ASSERT_TRUE(PoolEncoder(store.get(), pool_).EncodeBlocks("t", MakeGroups(5, 3)).ok());

  auto session = DbsaSession::Open(store.get(), "t", pool_, Unbounded());
  ASSERT_TRUE(session.ok()) << session.status().ToString();
  AnswerOptions options;
  options.selection.count = 5;
  const std::string query = "sky fire";
  auto answer = (*session)->Ask(query, options);
  ASSERT_TRUE(answer.ok()) << answer.status().ToString();
  ASSERT_EQ(answer->blocks, (std::vector<uint32_t>{0, 1, 2, 3, 4}));

  std::vector<int64_t> pool_ids;
  std::vector<uint32_t> owner;
  PoolTokens(store.get(), 5, &pool_ids, &owner);
  const int64_t n = static_cast<int64_t>(pool_ids.size());
  EXPECT_EQ(answer->context_tokens, static_cast<uint64_t>(n));
  auto format = PromptFormat::Create(std::string(PromptFormat::kDefaultTemplate),
                                     std::string(PromptFormat::kDefaultSeparator));
  ASSERT_TRUE(format.ok());
  const std::string prompt = format->FormatQuery(query);

  double best = -1e300;
  std::string best_label;
  for (size_t li = 0; li < kLabels.size(); ++li) {
    const std::string cont = format->LabelContinuation(kLabels[li]);
    std::vector<int64_t> ids = pool_ids;
    ids.insert(ids.end(), prompt.begin(), prompt.end());
    const int64_t label_start = static_cast<int64_t>(ids.size());
    ids.insert(ids.end(), cont.begin(), cont.end());
    const int64_t total = static_cast<int64_t>(ids.size());
    auto mask = torch::zeros({total, total}, torch::kBool);
    for (int64_t i = 0; i < total; ++i) {
      for (int64_t j = 0; j <= i; ++j) {
        // Pool tokens keep the block-sparse pattern; query and label tokens see everything.
        mask[i][j] = i >= n || Visible(owner[i], owner[j], cfg);
      }
    }
    ForwardRequest r;
    r.tokens = torch::tensor(ids, torch::kInt64);
    r.positions = torch::arange(total, torch::kInt64);
    r.mask = mask;
    r.all_logits = true;
    auto out = model_->Forward(r);
    ASSERT_TRUE(out.ok()) << out.status().ToString();
    auto logp = torch::log_softmax(out->logits.to(torch::kFloat64), -1);
    double sum = 0;
    for (int64_t t = label_start; t < total; ++t) sum += logp[t - 1][ids[t]].item<double>();
    ASSERT_LT(li, answer->label_scores.size());
    EXPECT_NEAR(answer->label_scores[li], sum, 1e-9 * std::abs(sum)) << kLabels[li];
    if (sum > best) {
      best = sum;
      best_label = kLabels[li];
    }
  }
  EXPECT_EQ(answer->label, best_label);
  EXPECT_NEAR(answer->score, best, 1e-9 * std::abs(best));
}

// Scaled K/V (--kv-dtype f8e4m3, i8). The encoder stores each block's K/V quantised with their
// scales (checked on block 0, whose forward has no context and so equals the float64 pool's
// exactly), and a query reads the stored values back: its label scores equal a forward whose
// context is the stored payloads decoded by KvToFloat (format/kv_values_test.cc checks that
// against ml_dtypes and numpy), placed at the pool's positions.
TEST_F(DbsaExactnessTest, ScaledPoolStoresQuantisedKvAndQueriesReadItBack) {
  for (DType stored : {DType::kF8E4M3, DType::kI8}) {
    const std::string name(DTypeName(stored));
    SCOPED_TRACE(name);
    BlockConfig cfg;
    cfg.demos_per_block = 3;
    cfg.window = 1;
    cfg.positions = PositionScheme::kSequential;
    const auto groups = MakeGroups(4, 3);
    auto f64 = MakeTask(dir_.Sub("f64" + name), DType::kF64, cfg);
    auto scaled = MakeTask(dir_.Sub(name), stored, cfg);
    ASSERT_TRUE(PoolEncoder(f64.get(), pool_).EncodeBlocks("t", groups).ok());
    ASSERT_TRUE(PoolEncoder(scaled.get(), pool_).EncodeBlocks("t", groups).ok());
    const auto& c = model_->config();
    const uint32_t heads = static_cast<uint32_t>(c.num_kv_heads);

    auto snap = scaled->BeginSnapshot();
    ASSERT_TRUE(snap.ok());
    // Block 0: the payload is exactly KvFromFloat of the float64 pool's values.
    for (uint32_t layer = 0; layer < c.num_layers; ++layer) {
      for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
        const torch::Tensor ref =
            Stored(f64.get(), 0, layer, kind).to(torch::kFloat32).contiguous();
        auto payload = (*snap)->GetPayload("t", 0, layer, kind);
        ASSERT_TRUE(payload.ok()) << payload.status().ToString();
        ASSERT_EQ(payload->header.meta.dtype, stored);
        std::vector<uint8_t> want(payload->header.raw_size);
        ASSERT_TRUE(KvFromFloat(stored, heads, static_cast<uint32_t>(ref.size(1)),
                                static_cast<uint32_t>(ref.size(2)), ref.data_ptr<float>(),
                                want.data())
                        .ok());
        ASSERT_EQ(0, std::memcmp(payload->data, want.data(), want.size())) << layer;
      }
    }

    // A query over all blocks, against a forward over the decoded stored K/V.
    std::vector<LayerKV> context(c.num_layers);
    int64_t n = 0;
    for (uint32_t layer = 0; layer < c.num_layers; ++layer) {
      std::vector<torch::Tensor> ks, vs;
      n = 0;
      for (uint32_t b = 0; b < 4; ++b) {
        auto info = (*snap)->GetBlock("t", b);
        ASSERT_TRUE(info.ok());
        for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
          auto payload = (*snap)->GetPayload("t", b, layer, kind);
          ASSERT_TRUE(payload.ok());
          torch::Tensor t =
              torch::empty({c.num_kv_heads, static_cast<int64_t>(info->token_count), c.head_dim});
          KvToFloat(stored, heads, info->token_count, static_cast<uint32_t>(c.head_dim),
                    payload->data, t.data_ptr<float>());
          (kind == TensorKind::kKey ? ks : vs).push_back(t.to(torch::kFloat64));
        }
        n += info->token_count;
      }
      context[layer] = {torch::cat(ks, 1), torch::cat(vs, 1)};
    }
    snap->reset();

    auto session = DbsaSession::Open(scaled.get(), "t", pool_, Unbounded());
    ASSERT_TRUE(session.ok()) << session.status().ToString();
    AnswerOptions options;
    options.selection.count = 4;
    const std::string query = "sea rose";
    auto answer = (*session)->Ask(query, options);
    ASSERT_TRUE(answer.ok()) << answer.status().ToString();
    ASSERT_EQ(answer->blocks, (std::vector<uint32_t>{0, 1, 2, 3}));
    auto format = PromptFormat::Create(std::string(PromptFormat::kDefaultTemplate),
                                       std::string(PromptFormat::kDefaultSeparator));
    ASSERT_TRUE(format.ok());
    const std::string prompt = format->FormatQuery(query);
    for (size_t li = 0; li < kLabels.size(); ++li) {
      const std::string cont = format->LabelContinuation(kLabels[li]);
      std::vector<int64_t> ids(prompt.begin(), prompt.end());
      const int64_t label_start = static_cast<int64_t>(ids.size());
      ids.insert(ids.end(), cont.begin(), cont.end());
      ForwardRequest r;
      r.tokens = torch::tensor(ids, torch::kInt64);
      r.positions = torch::arange(n, n + static_cast<int64_t>(ids.size()), torch::kInt64);
      r.context = &context;
      r.context_positions = torch::arange(n, torch::kInt64);
      r.all_logits = true;
      auto out = model_->Forward(r);
      ASSERT_TRUE(out.ok()) << out.status().ToString();
      auto logp = torch::log_softmax(out->logits.to(torch::kFloat64), -1);
      double sum = 0;
      for (int64_t t = label_start; t < static_cast<int64_t>(ids.size()); ++t) {
        sum += logp[t - 1][ids[t]].item<double>();
      }
      EXPECT_NEAR(answer->label_scores[li], sum, 1e-9 * std::abs(sum)) << kLabels[li];
    }
  }
}

TEST_F(DbsaExactnessTest, ScaledBuildOfNonFiniteKvFailsNamingTheRecordAndWritesNothing) {
  // A copy of the tiny model whose layer-0 k_proj has one NaN weight: channel 0 of every key of
  // layer 0 is NaN, which no fp8 or int8 scale represents.
  const std::string model_dir = dir_.Sub("nan_model");
  ASSERT_TRUE(CreateDirectories(model_dir).ok());
  const std::string fixture = std::string(SHOTDB_SOURCE_DIR) + "/tests/fixtures/model/tiny_llama";
  std::filesystem::copy_file(fixture + "/config.json", model_dir + "/config.json");
  std::string bytes;
  {
    std::ifstream in(fixture + "/model.safetensors", std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  ASSERT_GT(bytes.size(), 8u);
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);  // little-endian, as is this machine
  const auto header = nlohmann::json::parse(bytes.substr(8, header_len));
  const auto& k_proj = header.at("model.layers.0.self_attn.k_proj.weight");
  ASSERT_EQ(k_proj.at("dtype"), "F32");
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(&bytes[8 + header_len + k_proj.at("data_offsets")[0].get<size_t>()], &nan, 4);
  std::ofstream(model_dir + "/model.safetensors", std::ios::binary) << bytes;
  // On the CPU in float64 (the host's quantisation) and, with a GPU, in bfloat16 on it (the
  // device's, gpu/quantize_kv.h): the same error.
  std::vector<std::pair<torch::Device, torch::Dtype>> setups = {{torch::kCPU, torch::kFloat64}};
  if (torch::cuda::is_available()) setups.push_back({torch::Device("cuda"), torch::kBFloat16});
  for (const auto& [device, dtype] : setups) {
    LoadOptions options;
    options.device = device;
    options.dtype = dtype;
    auto model = LlamaModel::Load(model_dir, options);
    ASSERT_TRUE(model.ok()) << model.status().ToString();
    const PoolModel pool{model->get(), &tokenizer_, "tiny-llama-nan"};

    BlockConfig cfg;
    cfg.demos_per_block = 3;
    for (DType stored : {DType::kF8E4M3, DType::kI8}) {
      const std::string name = std::string(DTypeName(stored)) + "_" + device.str();
      SCOPED_TRACE(name);
      auto store = MakeTask(dir_.Sub("nan" + name), stored, cfg, &pool);
      const Status s = PoolEncoder(store.get(), pool).EncodeBlocks("t", MakeGroups(2, 3));
      EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
      EXPECT_NE(s.message().find("task 't' block 0 layer 0 K"), std::string::npos) << s.ToString();
      EXPECT_NE(s.message().find("channel 0 is "), std::string::npos) << s.ToString();
      EXPECT_NE(s.message().find("nan"), std::string::npos) << s.ToString();  // "nan" or "-nan"
      auto snap = store->BeginSnapshot();
      ASSERT_TRUE(snap.ok());
      EXPECT_EQ((*(*snap)->GetTask("t")).num_blocks, 0u);  // nothing of the failed block stored
    }
  }
}

TEST_F(DbsaExactnessTest, SelectionIsBlockZeroThenBm25TopInEncodingOrder) {
  BlockConfig cfg;
  cfg.demos_per_block = 2;
  auto store = MakeTask(dir_.Sub("s"), DType::kF32, cfg);
  // The tiny model runs in float64; the task stores float32 K/V (converted on write and read).
  const auto groups = MakeGroups(10, 2);
  ASSERT_TRUE(PoolEncoder(store.get(), pool_).EncodeBlocks("t", groups).ok());
  auto session = DbsaSession::Open(store.get(), "t", pool_, Unbounded());
  ASSERT_TRUE(session.ok());

  Bm25MemoryIndex reference;
  {
    auto snap = store->BeginSnapshot();
    ASSERT_TRUE(snap.ok());
    for (uint32_t b = 0; b < 10; ++b) {
      reference.Add(TokenizeText((*snap)->GetBlock("t", b)->text, TextTokenizerOptions{}));
    }
  }
  const std::string query = "rose leaf";
  for (bool ascending : {false, true}) {
    AnswerOptions options;
    options.selection.count = 4;
    options.selection.ascending_score = ascending;
    auto answer = (*session)->Ask(query, options);
    ASSERT_TRUE(answer.ok()) << answer.status().ToString();
    ASSERT_EQ(answer->blocks.size(), 4u);
    EXPECT_EQ(answer->blocks[0], 0u);
    std::vector<std::pair<double, uint32_t>> want;
    for (const auto& hit : reference.TopK(TokenizeText(query, TextTokenizerOptions{}), 4)) {
      if (hit.doc != 0 && want.size() < 3) want.push_back({hit.score, hit.doc});
    }
    if (ascending) {
      std::stable_sort(want.begin(), want.end(),
                       [](const auto& a, const auto& b) { return a.first < b.first; });
    } else {
      std::sort(want.begin(), want.end(),
                [](const auto& a, const auto& b) { return a.second < b.second; });
    }
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_EQ(answer->blocks[i + 1], want[i].second);
      EXPECT_NEAR(answer->block_scores[i + 1], want[i].first, 1e-12);
    }
  }
}

// Every method keeps context + prompt + longest label within the model's 256 positions, taking
// its blocks best-first while they fit; a limit that cannot hold the prompt or the sink is an
// error.
TEST_F(DbsaExactnessTest, BudgetBoundsEveryMethodsContext) {
  BlockConfig cfg;
  cfg.demos_per_block = 2;
  auto store = MakeTask(dir_.Sub("b"), DType::kF32, cfg);
  ASSERT_TRUE(PoolEncoder(store.get(), pool_).EncodeBlocks("t", MakeGroups(10, 2)).ok());
  auto session = DbsaSession::Open(store.get(), "t", pool_);
  ASSERT_TRUE(session.ok()) << session.status().ToString();
  ASSERT_EQ((*session)->max_context(), 256);
  auto format = PromptFormat::Create(std::string(PromptFormat::kDefaultTemplate),
                                     std::string(PromptFormat::kDefaultSeparator));
  size_t longest = 0;
  for (const auto& l : kLabels) longest = std::max(longest, format->LabelContinuation(l).size());
  std::vector<uint64_t> tokens;
  Bm25MemoryIndex reference;
  {
    auto snap = store->BeginSnapshot();
    for (uint32_t b = 0; b < 10; ++b) {
      auto info = (*snap)->GetBlock("t", b);
      tokens.push_back(info->token_count);
      reference.Add(TokenizeText(info->text, TextTokenizerOptions{}));
    }
  }
  for (const char* query : {"sky fire", "rose leaf", "apple"}) {
    SCOPED_TRACE(query);
    const uint64_t prompt = format->FormatQuery(query).size();  // one token a byte
    const uint64_t budget = 256 - prompt - longest;
    // DBSA: block 0, then the best-scoring blocks while they fit, in encoding order.
    std::vector<uint32_t> want = {0};
    uint64_t used = tokens[0];
    for (const ScoredDoc& hit : reference.TopK(TokenizeText(query, TextTokenizerOptions{}), 10)) {
      if (hit.doc == 0) continue;
      if (used + tokens[hit.doc] > budget) break;
      used += tokens[hit.doc];
      want.push_back(hit.doc);
    }
    std::sort(want.begin(), want.end());
    for (Method method :
         {Method::kDbsa, Method::kRetIcl, Method::kRetIclBlocks, Method::kFixedIcl}) {
      AnswerOptions options;
      options.method = method;
      options.selection.count = 10;
      auto a = (*session)->Ask(query, options);
      ASSERT_TRUE(a.ok()) << MethodName(method) << ": " << a.status().ToString();
      EXPECT_EQ(a->budget, budget);
      EXPECT_EQ(a->prompt_tokens, prompt);
      EXPECT_LE(a->context_tokens + prompt + longest, 256u) << MethodName(method);
      EXPECT_TRUE(a->budget_bound) << MethodName(method);
      if (method == Method::kDbsa || method == Method::kRetIclBlocks) {
        EXPECT_EQ(a->blocks, want) << MethodName(method);
        EXPECT_EQ(a->context_tokens, used);
      }
    }
    // A selection the budget does not limit says so.
    AnswerOptions two;
    two.selection.count = 2;
    auto a = (*session)->Ask(query, two);
    ASSERT_TRUE(a.ok());
    EXPECT_FALSE(a->budget_bound);
    EXPECT_EQ(a->blocks.size(), 2u);
  }
  // A limit below the sink block, or below prompt + label, is refused with the numbers.
  for (int64_t limit : {60, 30}) {
    SessionOptions o;
    o.max_context = limit;
    auto tight = DbsaSession::Open(store.get(), "t", pool_, o);
    ASSERT_TRUE(tight.ok());
    auto a = (*tight)->Ask("sky fire", AnswerOptions{});
    EXPECT_TRUE(a.status().IsInvalidArgument()) << a.status().ToString();
    EXPECT_NE(a.status().message().find(limit == 60 ? "sink" : "no room"), std::string::npos)
        << a.status().ToString();
  }
}

// RetICL as the paper defines it: BM25 over single demonstrations (each formatted with the
// template), the best ones while they fit the tokens of DBSA's context for the same query, placed
// in pool order (or ascending score), re-encoded with full attention. Checked against a
// Bm25MemoryIndex over the formatted demonstrations and a dense forward of the chosen text.
TEST_F(DbsaExactnessTest, RetIclTakesTheBestSingleDemonstrationsAtDbsaTokens) {
  BlockConfig cfg;
  cfg.demos_per_block = 3;
  auto store = MakeTask(dir_.Sub("r"), DType::kF64, cfg);
  ASSERT_TRUE(PoolEncoder(store.get(), pool_).EncodeBlocks("t", MakeGroups(8, 3)).ok());
  auto session = DbsaSession::Open(store.get(), "t", pool_, Unbounded());
  ASSERT_TRUE(session.ok());
  auto format = PromptFormat::Create(std::string(PromptFormat::kDefaultTemplate),
                                     std::string(PromptFormat::kDefaultSeparator));
  std::vector<std::string> demo_texts;  // formatted, in pool order
  Bm25MemoryIndex reference;
  {
    auto snap = store->BeginSnapshot();
    for (uint32_t b = 0; b < 8; ++b) {
      const auto info = (*snap)->GetBlock("t", b);
      ASSERT_TRUE(info.ok());
      for (uint64_t id : info->demo_ids) {
        auto d = (*snap)->GetDemonstration("t", id);
        demo_texts.push_back(format->FormatDemo(d->text, d->label));
        reference.Add(TokenizeText(demo_texts.back(), TextTokenizerOptions{}));
      }
    }
  }
  for (bool ascending : {false, true}) {
    for (const char* query : {"sky fire", "rose leaf", "grass"}) {
      SCOPED_TRACE(std::string(query) + (ascending ? " ascending" : ""));
      AnswerOptions options;
      options.selection.count = 3;
      options.selection.ascending_score = ascending;
      auto dbsa = (*session)->Ask(query, options);
      options.method = Method::kRetIcl;
      auto a = (*session)->Ask(query, options);
      ASSERT_TRUE(dbsa.ok() && a.ok()) << a.status().ToString();
      // Best-first while (separator + demonstration) bytes fit DBSA's context tokens.
      std::vector<ScoredDoc> picks;
      uint64_t estimate = 0;
      for (const ScoredDoc& hit :
           reference.TopK(TokenizeText(query, TextTokenizerOptions{}), demo_texts.size())) {
        const uint64_t len = format->separator().size() + demo_texts[hit.doc].size();
        if (estimate + len > dbsa->context_tokens) break;
        estimate += len;
        picks.push_back(hit);
      }
      ASSERT_FALSE(picks.empty());
      if (ascending) {
        std::stable_sort(picks.begin(), picks.end(),
                         [](const ScoredDoc& x, const ScoredDoc& y) { return x.score < y.score; });
      } else {
        std::sort(picks.begin(), picks.end(),
                  [](const ScoredDoc& x, const ScoredDoc& y) { return x.doc < y.doc; });
      }
      std::vector<uint32_t> want;
      std::string context;
      for (const ScoredDoc& p : picks) {
        want.push_back(p.doc);
        context += (context.empty() ? "" : format->separator()) + demo_texts[p.doc];
      }
      EXPECT_EQ(a->demos, want);
      EXPECT_TRUE(a->blocks.empty());
      EXPECT_EQ(a->context_tokens, context.size());
      EXPECT_LE(a->context_tokens, dbsa->context_tokens);

      // The label scores are those of a causal forward over context + prompt + label.
      const std::string prompt = format->FormatQuery(query);
      for (size_t li = 0; li < kLabels.size(); ++li) {
        const std::string text = context + prompt + format->LabelContinuation(kLabels[li]);
        std::vector<int64_t> ids(text.begin(), text.end());
        for (auto& id : ids) id &= 0xff;
        ForwardRequest r;
        r.tokens = torch::tensor(ids, torch::kInt64);
        r.positions = torch::arange(static_cast<int64_t>(ids.size()), torch::kInt64);
        r.all_logits = true;
        auto out = model_->Forward(r);
        ASSERT_TRUE(out.ok());
        auto logp = torch::log_softmax(out->logits.to(torch::kFloat64), -1);
        double sum = 0;
        const size_t label_start = context.size() + prompt.size();
        for (size_t t = label_start; t < ids.size(); ++t) sum += logp[t - 1][ids[t]].item<double>();
        EXPECT_NEAR(a->label_scores[li], sum, 1e-9 * std::abs(sum)) << kLabels[li];
      }
    }
  }
}

TEST_F(DbsaExactnessTest, AddDemonstrationsIsResumableAndChecksLabelsAndModel) {
  auto store = Store::Open(dir_.Sub("r"));
  ASSERT_TRUE(store.ok());
  PoolTaskOptions options;
  options.blocks.demos_per_block = 4;
  options.kv_dtype = DType::kF32;
  std::vector<LabeledText> demos;
  for (const auto& g : MakeGroups(3, 5)) {
    for (const auto& d : g) demos.push_back({d.text, d.label});
  }
  PoolEncoder encoder(store->get(), pool_);
  ASSERT_TRUE(encoder.AddDemonstrations("t", options, demos, 7).ok());
  auto task = [&] { return *(*(*store)->BeginSnapshot())->GetTask("t"); };
  EXPECT_EQ(task().num_demos, 15u);
  EXPECT_EQ(task().num_blocks, 4u);  // 4 + 4 + 4 + 3

  // Re-running with the same input (as after an interruption) adds nothing.
  ASSERT_TRUE(encoder.AddDemonstrations("t", options, demos, 7).ok());
  EXPECT_EQ(task().num_blocks, 4u);
  // New rows are appended as new blocks only.
  demos.push_back({"brand new text", "blue"});
  ASSERT_TRUE(encoder.AddDemonstrations("t", options, demos, 7).ok());
  EXPECT_EQ(task().num_demos, 16u);
  EXPECT_EQ(task().num_blocks, 5u);

  // A label outside the task's set, and a different model, are refused.
  std::vector<LabeledText> bad = {{"x", "purple"}};
  EXPECT_TRUE(encoder.AddDemonstrations("t", options, bad, 7).IsInvalidArgument());
  PoolModel other = pool_;
  other.weights_digest = "another-checkpoint";
  EXPECT_TRUE(PoolEncoder(store->get(), other)
                  .AddDemonstrations("t", options, demos, 7)
                  .IsFailedPrecondition());
  EXPECT_TRUE(DbsaSession::Open(store->get(), "t", other).status().IsFailedPrecondition());
}

// Every block of two stores, info and payload bytes, compared.
void ExpectSameBlocks(Store* a, Store* b, const std::string& task) {
  auto sa = a->BeginSnapshot();
  auto sb = b->BeginSnapshot();
  ASSERT_TRUE(sa.ok() && sb.ok());
  const TaskInfo ta = *(*sa)->GetTask(task), tb = *(*sb)->GetTask(task);
  ASSERT_EQ(ta.num_blocks, tb.num_blocks);
  EXPECT_EQ(ta.num_demos, tb.num_demos);
  for (uint32_t i = 0; i < ta.num_blocks; ++i) {
    EXPECT_EQ(*(*sa)->GetBlock(task, i), *(*sb)->GetBlock(task, i)) << "block " << i;
    for (uint32_t l = 0; l < ta.model.num_layers; ++l) {
      for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
        auto pa = (*sa)->GetPayload(task, i, l, kind);
        auto pb = (*sb)->GetPayload(task, i, l, kind);
        ASSERT_TRUE(pa.ok() && pb.ok());
        ASSERT_EQ(pa->size, pb->size);
        EXPECT_EQ(std::memcmp(pa->data, pb->data, pa->size), 0) << "block " << i << " layer " << l;
      }
    }
  }
}

// An interrupted build resumes to exactly the uninterrupted result: the grouping comes from the
// input and the seed alone, so the resumed run skips the committed blocks and encodes the rest as
// they would have been. (tools/cli_test.cc does the same with a real SIGKILL of `shotdb build`.)
TEST_F(DbsaExactnessTest, ResumedBuildEqualsUninterruptedBuild) {
  PoolTaskOptions options;
  options.blocks.demos_per_block = 3;
  options.blocks.window = 1;
  options.kv_dtype = DType::kF32;
  options.labels = kLabels;
  std::vector<LabeledText> demos;
  for (const auto& g : MakeGroups(4, 5)) {
    for (const auto& d : g) demos.push_back({d.text, d.label});
  }
  auto whole = Store::Open(dir_.Sub("whole"));
  auto resumed = Store::Open(dir_.Sub("resumed"));
  ASSERT_TRUE(whole.ok() && resumed.ok());
  ASSERT_TRUE(PoolEncoder(whole->get(), pool_).AddDemonstrations("t", options, demos, 9).ok());
  // The interrupted run: the task and the plan's first two blocks, as a killed build leaves them.
  const auto plan = PlanBlocks(demos, 3, 9);
  ASSERT_EQ(plan.size(), 7u);  // 20 demonstrations in blocks of 3
  ASSERT_TRUE(PoolEncoder(resumed->get(), pool_).AddDemonstrations("t", options, {}, 9).ok());
  ASSERT_TRUE(
      PoolEncoder(resumed->get(), pool_).EncodeBlocks("t", {plan.begin(), plan.begin() + 2}).ok());
  EncodeProgress last;
  ASSERT_TRUE(
      PoolEncoder(resumed->get(), pool_)
          .AddDemonstrations("t", options, demos, 9, [&](const EncodeProgress& p) { last = p; })
          .ok());
  EXPECT_EQ(last.blocks_done, 5u);  // only the missing blocks were encoded
  ExpectSameBlocks(whole->get(), resumed->get(), "t");
}

// Every row is checked before the task is created: a bad row leaves no trace.
TEST_F(DbsaExactnessTest, BadRowsAreRefusedBeforeAnythingIsWritten) {
  auto store = Store::Open(dir_.Sub("v"));
  ASSERT_TRUE(store.ok());
  PoolTaskOptions options;
  options.labels = kLabels;
  std::vector<LabeledText> demos = {{"sky", "red"}, {"sea", "blue"}, {"leaf", "purple"}};
  Status s = PoolEncoder(store->get(), pool_).AddDemonstrations("t", options, demos, 1);
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_NE(s.message().find("demonstration 3: label 'purple'"), std::string::npos) << s.ToString();
  // Blocks that could not fit the tiny model's 256 positions.
  options.blocks.demos_per_block = 50;
  std::vector<LabeledText> long_demos(60, {std::string(40, 'x'), "red"});
  s = PoolEncoder(store->get(), pool_).AddDemonstrations("t", options, long_demos, 1);
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_NE(s.message().find("beyond the model's 256 positions"), std::string::npos)
      << s.ToString();
  auto snap = (*store)->BeginSnapshot();
  ASSERT_TRUE(snap.ok());
  EXPECT_TRUE((*snap)->ListTasks()->empty());
}

TEST(DemoFileTest, RowsAreCheckedNamingFileRowAndColumn) {
  char tmpl[] = "/tmp/shotdb_demo_file_XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  const std::string csv = dir + "/d.csv";
  auto write = [&](const std::string& body) {
    FILE* f = std::fopen(csv.c_str(), "wb");
    std::fwrite(body.data(), 1, body.size(), f);
    std::fclose(f);
  };
  write("text,label\nwake me up,alarm\nplay \xff jazz,music\n");
  Status s = ReadLabeledTexts(csv, {}).status();
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_EQ(s.message(), csv + ": row 2, column 'text': not valid UTF-8 (byte 0xff at offset 5)");
  write("text,label\nwake me up,alarm\nrain,\n");
  s = ReadLabeledTexts(csv, {}).status();
  EXPECT_EQ(s.message(), csv + ": row 2, column 'label': empty") << s.ToString();
  write("text,label\n" + std::string(kMaxFieldBytes + 1, 'a') + ",alarm\n");
  s = ReadLabeledTexts(csv, {}).status();
  EXPECT_NE(s.message().find("row 1, column 'text': 65537 bytes"), std::string::npos)
      << s.ToString();
  write("text,label\nwake me up,alarm\ncaf\xc3\xa9 music,music\n");
  auto rows = ReadLabeledTexts(csv, {});
  ASSERT_TRUE(rows.ok()) << rows.status().ToString();
  EXPECT_EQ((*rows)[1].text, "caf\xc3\xa9 music");
  EXPECT_TRUE(RemoveAll(dir).ok());
}

TEST_F(DbsaExactnessTest, CacheOptionAndChunkedPrefillChangeNothing) {
  BlockConfig cfg;
  cfg.demos_per_block = 3;
  auto store = MakeTask(dir_.Sub("c"), DType::kF64, cfg);
  ASSERT_TRUE(PoolEncoder(store.get(), pool_).EncodeBlocks("t", MakeGroups(6, 3)).ok());
  SessionOptions plain = Unbounded();
  plain.prefill_chunk = 1 << 20;
  SessionOptions cached = Unbounded();
  cached.cache_bytes = 1 << 30;
  cached.prefill_chunk = 7;  // RetICL/FixedICL re-encode in chunks of 7 tokens
  auto a = DbsaSession::Open(store.get(), "t", pool_, plain);
  auto b = DbsaSession::Open(store.get(), "t", pool_, cached);
  ASSERT_TRUE(a.ok() && b.ok());
  for (Method method : {Method::kDbsa, Method::kRetIcl, Method::kRetIclBlocks, Method::kFixedIcl}) {
    for (const char* query : {"sky fire", "rose", "grass sea leaf"}) {
      AnswerOptions options;
      options.method = method;
      options.selection.count = 3;
      auto x = (*a)->Ask(query, options);
      auto y = (*b)->Ask(query, options);
      ASSERT_TRUE(x.ok() && y.ok()) << x.status().ToString() << y.status().ToString();
      EXPECT_EQ(x->blocks, y->blocks);
      EXPECT_EQ(x->demos, y->demos);
      ASSERT_EQ(x->label_scores.size(), y->label_scores.size());
      for (size_t i = 0; i < x->label_scores.size(); ++i) {
        EXPECT_NEAR(x->label_scores[i], y->label_scores[i], 1e-9 * std::abs(x->label_scores[i]))
            << MethodName(method) << " " << query;
      }
    }
  }
  // On the CPU both read through the host source, which keeps no cache (kv_source.h).
  const KvSource::Stats stats = (*b)->cache_stats();
  EXPECT_EQ(stats.hits + stats.misses + stats.bytes_resident, 0u);
}

// A batch answers each query as Ask alone does: the same blocks, labels and scores (float64 on the
// CPU: equal up to the rounding of the batched products), for queries whose selections overlap.
TEST_F(DbsaExactnessTest, AskBatchEqualsAskOneByOne) {
  BlockConfig cfg;
  cfg.demos_per_block = 3;
  auto store = MakeTask(dir_.Sub("batch"), DType::kF64, cfg);
  ASSERT_TRUE(PoolEncoder(store.get(), pool_).EncodeBlocks("t", MakeGroups(6, 3)).ok());
  auto session = DbsaSession::Open(store.get(), "t", pool_, Unbounded());
  ASSERT_TRUE(session.ok());
  const std::vector<std::string> queries = {"sky fire", "rose", "grass sea leaf", "apple",
                                            "sky fire"};
  AnswerOptions options;
  options.selection.count = 3;
  auto batch = (*session)->AskBatch(queries, options);
  ASSERT_TRUE(batch.ok()) << batch.status().ToString();
  ASSERT_EQ(batch->size(), queries.size());
  for (size_t q = 0; q < queries.size(); ++q) {
    auto one = (*session)->Ask(queries[q], options);
    ASSERT_TRUE(one.ok());
    const Answer& b = (*batch)[q];
    EXPECT_EQ(b.blocks, one->blocks) << queries[q];
    EXPECT_EQ(b.label, one->label) << queries[q];
    EXPECT_EQ(b.context_tokens, one->context_tokens);
    ASSERT_EQ(b.label_scores.size(), one->label_scores.size());
    for (size_t i = 0; i < b.label_scores.size(); ++i) {
      EXPECT_NEAR(b.label_scores[i], one->label_scores[i], 1e-9 * std::abs(one->label_scores[i]))
          << queries[q] << " label " << i;
    }
  }
  // Only DBSA label queries batch.
  options.free_text = true;
  EXPECT_TRUE((*session)->AskBatch(queries, options).status().IsInvalidArgument());
  options.free_text = false;
  options.method = Method::kRetIcl;
  EXPECT_TRUE((*session)->AskBatch(queries, options).status().IsInvalidArgument());
}

// GPU: a damaged K/V record never reaches an answer. The device source verifies the checksums of
// what it copies in the background, while the forward runs (Stager::Options::defer_verification);
// the session waits for that check and reports Corruption naming the record, every time (the bad
// page is not kept), as the CPU session reports it on the same store.
TEST_F(DbsaExactnessTest, CudaDamagedRecordIsReportedNotAnswered) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  BlockConfig cfg;
  cfg.demos_per_block = 3;
  const std::string path = dir_.Sub("damaged");
  AnswerOptions all;
  all.selection.count = 3;
  std::vector<uint8_t> payload;
  uint32_t damaged = 0;  // the first block the query selects
  {
    auto store = MakeTask(path, DType::kBF16, cfg);
    ASSERT_TRUE(PoolEncoder(store.get(), pool_).EncodeBlocks("t", MakeGroups(6, 3)).ok());
    auto session = DbsaSession::Open(store.get(), "t", pool_);
    ASSERT_TRUE(session.ok());
    auto intact = (*session)->Ask("sky fire", all);
    ASSERT_TRUE(intact.ok() && !intact->blocks.empty()) << intact.status().ToString();
    damaged = intact->blocks.front();
    auto snap = store->BeginSnapshot();
    ASSERT_TRUE(snap.ok());
    auto view = (*snap)->GetRecord("t", damaged, 1, TensorKind::kValue);
    ASSERT_TRUE(view.ok()) << view.status().ToString();
    payload.assign(view->payload, view->payload + view->payload_size);
  }
  const std::string name = "block " + std::to_string(damaged) + " layer 1 V";
  ASSERT_TRUE(testing_util::FlipInFile(path + "/data.mdb", payload, payload.size() / 2));
  auto store = Store::Open(path);
  ASSERT_TRUE(store.ok()) << store.status().ToString();

  auto model = TinyCudaModel(torch::kBFloat16);
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  const PoolModel gpu_pool{model->get(), &tokenizer_, pool_.weights_digest};
  SessionOptions cached;
  cached.cache_bytes = 1 << 26;
  auto gpu = DbsaSession::Open(store->get(), "t", gpu_pool, cached);
  auto cpu = DbsaSession::Open(store->get(), "t", pool_);
  ASSERT_TRUE(gpu.ok() && cpu.ok()) << gpu.status().ToString();
  for (int attempt = 0; attempt < 2; ++attempt) {
    for (DbsaSession* session : {gpu->get(), cpu->get()}) {
      auto answer = session->Ask("sky fire", all);
      ASSERT_FALSE(answer.ok()) << "attempt " << attempt
                                << (session == gpu->get() ? " GPU" : " CPU");
      EXPECT_TRUE(answer.status().IsCorruption()) << answer.status().ToString();
      EXPECT_NE(answer.status().message().find(name), std::string::npos)
          << answer.status().ToString();
    }
    auto batch = (*gpu)->AskBatch({"rose", "sky fire"}, all);
    EXPECT_TRUE(batch.status().IsCorruption()) << batch.status().ToString();
  }
}

// GPU: the device source stages on a thread of its own while the forward runs, layer group by
// layer group. A record whose header is damaged in the last layer (the tiny model's second group)
// fails staging after the forward has started on the first: the query reports the Corruption
// naming the record (not an answer, not a hang), every time, in Ask and AskBatch; an intact query
// on the same session then answers as the CPU does.
TEST_F(DbsaExactnessTest, CudaDamagedHeaderInALaterLayerIsReported) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  BlockConfig cfg;
  cfg.demos_per_block = 3;
  const std::string path = dir_.Sub("damaged_header");
  AnswerOptions one;  // the sink block and one more
  one.selection.count = 2;
  SessionOptions wide;  // room for two blocks (the tiny model's own context holds one)
  wide.max_context = 4096;
  std::vector<uint8_t> record;  // its header and the start of its payload
  uint32_t damaged = 0;
  std::string intact_query;
  {
    auto store = MakeTask(path, DType::kBF16, cfg);
    ASSERT_TRUE(PoolEncoder(store.get(), pool_).EncodeBlocks("t", MakeGroups(6, 3)).ok());
    auto session = DbsaSession::Open(store.get(), "t", pool_, wide);
    ASSERT_TRUE(session.ok());
    auto picked = (*session)->Ask("sky fire", one);
    ASSERT_TRUE(picked.ok()) << picked.status().ToString();
    // Not the sink block (0), which every query takes.
    ASSERT_EQ(picked->blocks.size(), 2u);
    damaged = picked->blocks[0] == 0 ? picked->blocks[1] : picked->blocks[0];
    for (const char* q : {"rose", "apple", "grass", "sea", "leaf"}) {
      auto other = (*session)->Ask(q, one);
      ASSERT_TRUE(other.ok()) << other.status().ToString();
      if (std::find(other->blocks.begin(), other->blocks.end(), damaged) == other->blocks.end()) {
        intact_query = q;
        break;
      }
    }
    ASSERT_FALSE(intact_query.empty()) << "every query selects block " << damaged;
    auto snap = store->BeginSnapshot();
    ASSERT_TRUE(snap.ok());
    auto view = (*snap)->GetRecord("t", damaged, 1, TensorKind::kKey);
    ASSERT_TRUE(view.ok()) << view.status().ToString();
    record.assign(view->payload - kBlockRecordHeaderSize, view->payload + 64);
  }
  const std::string name = "block " + std::to_string(damaged) + " layer 1 K";
  ASSERT_TRUE(testing_util::FlipInFile(path + "/data.mdb", record, 40));
  auto store = Store::Open(path);
  ASSERT_TRUE(store.ok()) << store.status().ToString();

  auto model = TinyCudaModel(torch::kBFloat16);
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  const PoolModel gpu_pool{model->get(), &tokenizer_, pool_.weights_digest};
  SessionOptions cached = wide;
  cached.cache_bytes = 1 << 26;
  auto gpu = DbsaSession::Open(store->get(), "t", gpu_pool, cached);
  auto cpu = DbsaSession::Open(store->get(), "t", pool_, wide);
  ASSERT_TRUE(gpu.ok() && cpu.ok()) << gpu.status().ToString();
  for (int attempt = 0; attempt < 2; ++attempt) {
    auto answer = (*gpu)->Ask("sky fire", one);
    ASSERT_FALSE(answer.ok()) << "attempt " << attempt;
    EXPECT_TRUE(answer.status().IsCorruption()) << answer.status().ToString();
    EXPECT_NE(answer.status().message().find(name), std::string::npos)
        << answer.status().ToString();
    auto batch = (*gpu)->AskBatch({intact_query, "sky fire"}, one);
    EXPECT_TRUE(batch.status().IsCorruption()) << batch.status().ToString();
  }
  auto on_gpu = (*gpu)->Ask(intact_query, one);
  auto on_cpu = (*cpu)->Ask(intact_query, one);
  ASSERT_TRUE(on_gpu.ok()) << on_gpu.status().ToString();
  ASSERT_TRUE(on_cpu.ok()) << on_cpu.status().ToString();
  EXPECT_EQ(on_gpu->blocks, on_cpu->blocks);
  EXPECT_EQ(on_gpu->label, on_cpu->label);
}

// GPU: a device context hands its pages back to the cache as soon as its forward is enqueued
// (QueryContext::release), ordered on the device after the attention that reads them. With a
// cache that holds one query's pages, every query evicts the last one's pages while its kernels
// may still be queued; the answers must equal, bit for bit, those of a cache that holds them all,
// in Ask and in AskBatch.
TEST_F(DbsaExactnessTest, CudaPagesReleasedInStreamOrderAreNotOverwrittenEarly) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  BlockConfig cfg;
  cfg.demos_per_block = 2;
  auto store = MakeTask(dir_.Sub("release"), DType::kBF16, cfg);
  ASSERT_TRUE(PoolEncoder(store.get(), pool_).EncodeBlocks("t", MakeGroups(12, 2)).ok());
  auto model = TinyCudaModel(torch::kBFloat16);
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  const PoolModel gpu_pool{model->get(), &tokenizer_, pool_.weights_digest};
  SessionOptions big;
  big.max_context = 4096;
  big.cache_bytes = 1 << 26;
  auto reference = DbsaSession::Open(store.get(), "t", gpu_pool, big);
  ASSERT_TRUE(reference.ok()) << reference.status().ToString();
  AnswerOptions four;
  four.selection.count = 4;
  const std::vector<std::string> queries = {"sky fire", "grass sea leaf", "apple rose"};
  std::vector<Answer> want;
  uint64_t most = 0;  // the most page bytes one query pins
  for (const std::string& q : queries) {
    (*reference)->ClearCache();
    auto a = (*reference)->Ask(q, four);
    ASSERT_TRUE(a.ok()) << a.status().ToString();
    most = std::max<uint64_t>(most, (*reference)->cache_stats().bytes_resident);
    want.push_back(*a);
  }
  ASSERT_NE(want[0].blocks, want[1].blocks);

  SessionOptions small = big;
  small.cache_bytes = most + most / 4;  // one query's pages, not two
  auto session = DbsaSession::Open(store.get(), "t", gpu_pool, small);
  ASSERT_TRUE(session.ok()) << session.status().ToString();
  for (int round = 0; round < 4; ++round) {
    for (size_t i = 0; i < queries.size(); ++i) {
      auto a = (*session)->Ask(queries[i], four);
      ASSERT_TRUE(a.ok()) << a.status().ToString();
      EXPECT_EQ(a->blocks, want[i].blocks);
      EXPECT_EQ(a->label_scores, want[i].label_scores) << "round " << round << " " << queries[i];
    }
  }
  EXPECT_GT((*session)->cache_stats().evictions, 0u);
  // A batch pins the union of its queries' blocks: a cache for the largest pair's union.
  std::vector<std::vector<Answer>> want_pairs;
  uint64_t most_pair = 0;
  for (size_t i = 0; i < queries.size(); ++i) {
    (*reference)->ClearCache();
    auto answers = (*reference)->AskBatch({queries[i], queries[(i + 1) % queries.size()]}, four);
    ASSERT_TRUE(answers.ok()) << answers.status().ToString();
    most_pair = std::max<uint64_t>(most_pair, (*reference)->cache_stats().bytes_resident);
    want_pairs.push_back(*answers);
  }
  SessionOptions pair = big;
  pair.cache_bytes = most_pair + most_pair / 10;
  auto batched = DbsaSession::Open(store.get(), "t", gpu_pool, pair);
  ASSERT_TRUE(batched.ok()) << batched.status().ToString();
  for (int round = 0; round < 3; ++round) {
    for (size_t i = 0; i < queries.size(); ++i) {
      const size_t j = (i + 1) % queries.size();
      auto answers = (*batched)->AskBatch({queries[i], queries[j]}, four);
      ASSERT_TRUE(answers.ok()) << answers.status().ToString();
      EXPECT_EQ((*answers)[0].blocks, want[i].blocks);
      EXPECT_EQ((*answers)[1].blocks, want[j].blocks);
      for (size_t k = 0; k < 2; ++k) {
        EXPECT_EQ((*answers)[k].label_scores, want_pairs[i][k].label_scores)
            << "round " << round << " pair " << i << " query " << k;
      }
    }
  }
  EXPECT_GT((*batched)->cache_stats().evictions, 0u);
}

// GPU: the same pipeline on CUDA tensors. A pool encoded on the GPU matches the CPU pool, and
// DBSA/RetICL/FixedICL answers on the GPU (float32 and bfloat16) pick the CPU's labels. Skips
// cleanly without a CUDA device (CI).
TEST_F(DbsaExactnessTest, CudaEncodeAndDecodeMatchCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  BlockConfig cfg;
  cfg.demos_per_block = 3;
  const auto groups = MakeGroups(6, 3);
  auto cpu_store = MakeTask(dir_.Sub("cpu"), DType::kF64, cfg);
  ASSERT_TRUE(PoolEncoder(cpu_store.get(), pool_).EncodeBlocks("t", groups).ok());

  for (torch::Dtype dtype : {torch::kFloat32, torch::kBFloat16}) {
    const bool bf16 = dtype == torch::kBFloat16;
    LoadOptions options;
    options.device = torch::Device("cuda");
    options.dtype = dtype;
    auto gpu_model = LlamaModel::Load(
        std::string(SHOTDB_SOURCE_DIR) + "/tests/fixtures/model/tiny_llama", options);
    ASSERT_TRUE(gpu_model.ok()) << gpu_model.status().ToString();
    const PoolModel gpu_pool{gpu_model->get(), &tokenizer_, pool_.weights_digest};

    // Encoding on the GPU: K/V equal the CPU float64 encoding within the compute dtype's precision.
    auto gpu_store = MakeTask(dir_.Sub(bf16 ? "gpu_bf16" : "gpu_f32"), DType::kF64, cfg);
    ASSERT_TRUE(PoolEncoder(gpu_store.get(), gpu_pool).EncodeBlocks("t", groups).ok());
    for (uint32_t block : {0u, 5u}) {
      for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
        const auto want = Stored(cpu_store.get(), block, 1, kind);
        const auto got = Stored(gpu_store.get(), block, 1, kind);
        EXPECT_LT(MaxRelError(got, want), bf16 ? 5e-2 : 1e-4) << "block " << block;
      }
    }

    // Decoding on the GPU over the CPU-built pool picks the CPU's labels.
    auto cpu_session = DbsaSession::Open(cpu_store.get(), "t", pool_);
    SessionOptions gpu_options;
    gpu_options.cache_bytes = 1 << 26;  // the model's 256-position budget applies to both
    auto gpu_session = DbsaSession::Open(cpu_store.get(), "t", gpu_pool, gpu_options);
    ASSERT_TRUE(cpu_session.ok() && gpu_session.ok()) << gpu_session.status().ToString();
    int agree = 0, total = 0;
    for (Method method :
         {Method::kDbsa, Method::kRetIcl, Method::kRetIclBlocks, Method::kFixedIcl}) {
      for (const char* query : {"sky fire", "rose", "grass sea leaf", "apple"}) {
        AnswerOptions answer;
        answer.method = method;
        answer.selection.count = 3;
        auto x = (*cpu_session)->Ask(query, answer);
        auto y = (*gpu_session)->Ask(query, answer);
        ASSERT_TRUE(x.ok() && y.ok()) << y.status().ToString();
        EXPECT_EQ(x->blocks, y->blocks);
        EXPECT_EQ(x->demos, y->demos);
        ++total;
        agree += x->label == y->label;
        if (!bf16) {
          EXPECT_EQ(x->label, y->label) << MethodName(method) << " " << query;
          for (size_t i = 0; i < x->label_scores.size(); ++i) {
            EXPECT_NEAR(x->label_scores[i], y->label_scores[i],
                        1e-4 * std::max(1.0, std::abs(x->label_scores[i])));
          }
        }
      }
    }
    // bfloat16 rounds K/V and activations to 8 bits of mantissa: near-ties between labels of the
    // untrained model may flip, but the decisions must overwhelmingly agree.
    EXPECT_GE(agree, bf16 ? total - 2 : total) << (bf16 ? "bf16" : "f32");
  }

  // A bf16-stored pool through the device cache (on CUDA builds with gpu/: gpu::Stager and its page
  // cache): the same label scores as the CPU reading the same bf16 K/V, cold and then hot.
  auto bf16_store = MakeTask(dir_.Sub("bf16"), DType::kBF16, cfg);
  ASSERT_TRUE(PoolEncoder(bf16_store.get(), pool_).EncodeBlocks("t", groups).ok());
  LoadOptions options;
  options.device = torch::Device("cuda");
  options.dtype = torch::kFloat32;
  auto gpu_model = LlamaModel::Load(
      std::string(SHOTDB_SOURCE_DIR) + "/tests/fixtures/model/tiny_llama", options);
  ASSERT_TRUE(gpu_model.ok());
  const PoolModel gpu_pool{gpu_model->get(), &tokenizer_, pool_.weights_digest};
  SessionOptions cached;
  cached.cache_bytes = 1 << 26;
  auto cpu_session = DbsaSession::Open(bf16_store.get(), "t", pool_);
  auto gpu_session = DbsaSession::Open(bf16_store.get(), "t", gpu_pool, cached);
  ASSERT_TRUE(cpu_session.ok() && gpu_session.ok()) << gpu_session.status().ToString();
  const std::vector<std::string> queries = {"sky fire", "rose", "grass sea leaf", "apple"};
  // Every query twice (cold, then hot) on `cpu` and `gpu`: the same blocks, label scores within
  // `tol` (relative, absolute below 1), and labels that differ in at most `flips` of the asks
  // (bf16 activations may flip near-ties of the untrained model). `before_cold(query)` runs
  // before each cold ask.
  auto expect_same_answers = [&](DbsaSession* cpu, DbsaSession* gpu, double tol, int flips,
                                 const std::function<void(const std::string&)>& before_cold) {
    int agree = 0, total = 0;
    for (int round = 0; round < 2; ++round) {
      for (const std::string& query : queries) {
        AnswerOptions answer;
        answer.selection.count = 3;
        if (round == 0 && before_cold) before_cold(query);
        auto x = cpu->Ask(query, answer);
        auto y = gpu->Ask(query, answer);
        ASSERT_TRUE(x.ok() && y.ok()) << y.status().ToString();
        EXPECT_EQ(x->blocks, y->blocks) << query;
        ++total;
        agree += x->label == y->label;
        for (size_t i = 0; i < x->label_scores.size(); ++i) {
          EXPECT_NEAR(x->label_scores[i], y->label_scores[i],
                      tol * std::max(1.0, std::abs(x->label_scores[i])))
              << query;
        }
      }
    }
    EXPECT_GE(agree, total - flips);
  };
  expect_same_answers(cpu_session->get(), gpu_session->get(), 1e-4, 0, {});
  EXPECT_GT((*gpu_session)->cache_stats().hits, 0u);

  // A bf16 model on the bf16 pool: on CUDA builds with gpu/ the device source gives the model the
  // attention form (gpu::LaunchPagedAttention over the cached pages; free text gets tensors
  // gathered by gpu::LaunchGatherRope). bf16 activations may flip near-ties of the untrained model,
  // but the decisions must agree, and the scores stay close to the CPU's float64 reading of the
  // same K/V.
  options.dtype = torch::kBFloat16;
  auto bf16_model = LlamaModel::Load(
      std::string(SHOTDB_SOURCE_DIR) + "/tests/fixtures/model/tiny_llama", options);
  ASSERT_TRUE(bf16_model.ok());
  const PoolModel bf16_pool{bf16_model->get(), &tokenizer_, pool_.weights_digest};
  auto bf16_session = DbsaSession::Open(bf16_store.get(), "t", bf16_pool, cached);
  ASSERT_TRUE(bf16_session.ok()) << bf16_session.status().ToString();
  expect_same_answers(cpu_session->get(), bf16_session->get(), 5e-2, 2, {});
  EXPECT_GT((*bf16_session)->cache_stats().hits, 0u);
  // A batch over the staged pages answers as the queries one by one on the same session.
  AnswerOptions batch_options;
  batch_options.selection.count = 3;
  auto batch = (*bf16_session)->AskBatch(queries, batch_options);
  ASSERT_TRUE(batch.ok()) << batch.status().ToString();
  for (size_t q = 0; q < queries.size(); ++q) {
    auto one = (*bf16_session)->Ask(queries[q], batch_options);
    ASSERT_TRUE(one.ok());
    EXPECT_EQ((*batch)[q].blocks, one->blocks);
    for (size_t i = 0; i < one->label_scores.size(); ++i) {
      EXPECT_NEAR((*batch)[q].label_scores[i], one->label_scores[i],
                  2e-2 * std::max(1.0, std::abs(one->label_scores[i])));
    }
  }
  AnswerOptions text;
  text.selection.count = 3;
  text.free_text = true;
  text.max_new_tokens = 4;
  auto generated = (*bf16_session)->Ask("sky fire", text);
  ASSERT_TRUE(generated.ok()) << generated.status().ToString();
  EXPECT_EQ(generated->blocks, (*cpu_session)->Ask("sky fire", text)->blocks);

  // Pools of the scaled dtypes (--kv-dtype f8e4m3, i8) on the GPU: the pages are dequantised to
  // bf16 as they land (gpu::LaunchUnpackKv), about half the bytes cross PCIe, and the bf16 model's
  // answers agree with the CPU's float64 reading of the same K/V, cold and then hot.
  for (DType stored : {DType::kF8E4M3, DType::kI8}) {
    const std::string name(DTypeName(stored));
    SCOPED_TRACE(name);
    auto scaled_store = MakeTask(dir_.Sub(name), stored, cfg);
    ASSERT_TRUE(PoolEncoder(scaled_store.get(), pool_).EncodeBlocks("t", groups).ok());
    auto scaled_cpu = DbsaSession::Open(scaled_store.get(), "t", pool_);
    auto scaled_gpu = DbsaSession::Open(scaled_store.get(), "t", bf16_pool, cached);
    auto bf16_fresh = DbsaSession::Open(bf16_store.get(), "t", bf16_pool, cached);
    ASSERT_TRUE(scaled_cpu.ok() && scaled_gpu.ok() && bf16_fresh.ok())
        << scaled_gpu.status().ToString();
    // The same queries on a fresh bf16 session, for the bytes it loads.
    expect_same_answers(scaled_cpu->get(), scaled_gpu->get(), 5e-2, 2,
                        [&](const std::string& query) {
                          AnswerOptions answer;
                          answer.selection.count = 3;
                          ASSERT_TRUE((*bf16_fresh)->Ask(query, answer).ok());
                        });
    EXPECT_GT((*scaled_gpu)->cache_stats().hits, 0u);
    const double bytes = static_cast<double>((*scaled_gpu)->cache_stats().bytes_loaded);
    const double bf16_bytes = static_cast<double>((*bf16_fresh)->cache_stats().bytes_loaded);
    if (bf16_bytes > 0) {  // 0 on builds without gpu/ (libtorch reads the host tensors)
      // Codes are half of bf16's bytes; int8's scales (a bfloat16 a channel and 128 tokens) add
      // ceil(tokens / 128) / tokens <= 1 / tokens + 1 / 128 of bf16's bytes for a block of
      // `tokens`, fp8's (a float32 a head) far less.
      uint32_t fewest = UINT32_MAX;
      auto snap = scaled_store->BeginSnapshot();
      ASSERT_TRUE(snap.ok());
      for (uint32_t b = 0; b < groups.size(); ++b) {
        auto info = (*snap)->GetBlock("t", b);
        ASSERT_TRUE(info.ok());
        fewest = std::min(fewest, info->token_count);
      }
      const double most = 0.5 + (stored == DType::kI8 ? 1.0 / fewest + 1.0 / kI8TokenGroup : 0.05);
      EXPECT_GT(bytes / bf16_bytes, 0.45) << bytes << " vs " << bf16_bytes;
      EXPECT_LT(bytes / bf16_bytes, most) << bytes << " vs " << bf16_bytes;
    }
  }
}

// A scaled pool built by a bf16 model on the GPU is quantised on the device (gpu/quantize_kv.h):
// its records hold exactly what the host's KvFromFloat makes of the forward's K/V.
// - Block 0 attends to itself only, so its forward is the same as in a bf16-stored build, whose
//   records are that forward's K/V as they are: quantised here on the host, they must equal the
//   device's payloads byte for byte.
// - Later blocks attend to the values as stored. A second build encodes one block per call, so
//   that every block is the first of its call and the encoder converts it on both the device and
//   the host and compares (EncodeProgress::device_mismatch); it reads its context blocks back from
//   the store instead of keeping them on the device. Both builds must agree byte for byte: the
//   device's stored values are the host's, and a build resumed block by block gives what one
//   call gives.
TEST_F(DbsaExactnessTest, CudaScaledBuildQuantisesOnTheDeviceAsTheHostDoes) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  BlockConfig cfg;
  cfg.demos_per_block = 3;
  const auto groups = MakeGroups(4, 3);
  auto model = TinyCudaModel(torch::kBFloat16);
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  const PoolModel gpu_pool{model->get(), &tokenizer_, pool_.weights_digest};
  auto bf16_store = MakeTask(dir_.Sub("dev_bf16"), DType::kBF16, cfg);
  ASSERT_TRUE(PoolEncoder(bf16_store.get(), gpu_pool).EncodeBlocks("t", groups).ok());
  const auto& c = model_->config();
  const uint32_t heads = static_cast<uint32_t>(c.num_kv_heads);
  const uint32_t head_dim = static_cast<uint32_t>(c.head_dim);
  for (DType stored : {DType::kF8E4M3, DType::kI8}) {
    const std::string name(DTypeName(stored));
    SCOPED_TRACE(name);
    auto store = MakeTask(dir_.Sub("dev_" + name), stored, cfg);
    EncodeProgress last;
    ASSERT_TRUE(PoolEncoder(store.get(), gpu_pool)
                    .EncodeBlocks("t", groups, [&last](const EncodeProgress& p) { last = p; })
                    .ok());
    // Every block went the device's way, and its check against the host (block 0) passed.
    EXPECT_EQ(last.blocks_on_device, groups.size());
    EXPECT_EQ(last.device_mismatch, "");
    auto by_block = MakeTask(dir_.Sub("dev_" + name + "_by_block"), stored, cfg);
    for (size_t g = 0; g < groups.size(); ++g) {
      SCOPED_TRACE("call for block " + std::to_string(g));
      EncodeProgress one;
      ASSERT_TRUE(PoolEncoder(by_block.get(), gpu_pool)
                      .EncodeBlocks("t", {groups[g]}, [&one](const EncodeProgress& p) { one = p; })
                      .ok());
      EXPECT_EQ(one.blocks_on_device, 1u);
      EXPECT_EQ(one.device_mismatch, "");
    }
    auto bf16_snap = bf16_store->BeginSnapshot();
    auto got_snap = store->BeginSnapshot();
    auto by_block_snap = by_block->BeginSnapshot();
    ASSERT_TRUE(bf16_snap.ok() && got_snap.ok() && by_block_snap.ok());
    for (uint32_t block = 0; block < groups.size(); ++block) {
      auto info = (*got_snap)->GetBlock("t", block);
      ASSERT_TRUE(info.ok());
      const uint32_t tokens = info->token_count;
      for (uint32_t layer = 0; layer < static_cast<uint32_t>(c.num_layers); ++layer) {
        for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
          SCOPED_TRACE("block " + std::to_string(block) + " layer " + std::to_string(layer) +
                       (kind == TensorKind::kKey ? " K" : " V"));
          auto got = (*got_snap)->GetPayload("t", block, layer, kind);
          auto again = (*by_block_snap)->GetPayload("t", block, layer, kind);
          ASSERT_TRUE(got.ok() && again.ok());
          ASSERT_EQ(got->size, again->size);
          EXPECT_EQ(std::memcmp(got->data, again->data, got->size), 0);
          if (block != 0) continue;
          auto forward = (*bf16_snap)->GetPayload("t", block, layer, kind);
          ASSERT_TRUE(forward.ok());
          std::vector<float> f(static_cast<size_t>(heads) * tokens * head_dim);
          ConvertToFloat(DType::kBF16, forward->data, f.data(), f.size());
          std::vector<uint8_t> want(*KvRawBytes(stored, heads, tokens, head_dim));
          ASSERT_TRUE(KvFromFloat(stored, heads, tokens, head_dim, f.data(), want.data()).ok());
          ASSERT_EQ(got->size, want.size());
          EXPECT_EQ(std::memcmp(got->data, want.data(), want.size()), 0);
        }
      }
    }
  }
}

TEST(GroupIntoBlocksTest, PartitionIsCompleteSeededAndSized) {
  const auto a = GroupIntoBlocks(103, 10, 5);
  ASSERT_EQ(a.size(), 11u);
  EXPECT_EQ(a.back().size(), 3u);
  std::set<size_t> seen;
  for (const auto& g : a) seen.insert(g.begin(), g.end());
  EXPECT_EQ(seen.size(), 103u);
  EXPECT_EQ(*seen.rbegin(), 102u);
  EXPECT_EQ(GroupIntoBlocks(103, 10, 5), a);
  EXPECT_NE(GroupIntoBlocks(103, 10, 6), a);
}

TEST(SelectionSizeTest, RatioCountAndClamping) {
  SelectionOptions o;
  EXPECT_EQ(SelectionSize(40, o), 12u);
  EXPECT_EQ(SelectionSize(1, o), 1u);
  o.count = 50;
  EXPECT_EQ(SelectionSize(40, o), 40u);
  o.count = 0;
  o.ratio = 0;
  EXPECT_EQ(SelectionSize(40, o), 1u);
}

}  // namespace
}  // namespace shotdb
