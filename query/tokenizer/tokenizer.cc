#include "query/tokenizer/tokenizer.h"

#include <sys/stat.h>

#include <fstream>

#include "format/gguf.h"
#include "query/tokenizer/bpe_tokenizer.h"
#include "query/tokenizer/spm_model_file.h"
#include "query/tokenizer/spm_tokenizer.h"

namespace shotdb {

namespace {

bool IsDirectory(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool Exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

std::string Dirname(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

template <typename T>
Result<std::unique_ptr<Tokenizer>> Upcast(Result<std::unique_ptr<T>> r) {
  if (!r.ok()) return r.status();
  return std::unique_ptr<Tokenizer>(std::move(r).value());
}

// Reads the tokenizer.ggml.* keys of one GGUF file; errors name the file and the key.
class GgufKeys {
 public:
  GgufKeys(const GgufFile& gguf, const std::string& path) : gguf_(gguf), path_(path) {}

  // The value of `key` read by `get` (a GgufFile getter), converted to T; Corruption when absent.
  template <typename T, typename Getter>
  Result<T> Required(const std::string& key, Getter get) const {
    if (gguf_.Find(key) == nullptr) return Status::Corruption(path_ + ": missing key " + key);
    return Read<T>(key, get);
  }
  // As Required, but `fallback` when the key is absent.
  template <typename T, typename Getter>
  Result<T> Optional(const std::string& key, T fallback, Getter get) const {
    if (gguf_.Find(key) == nullptr) return fallback;
    return Read<T>(key, get);
  }

 private:
  template <typename T, typename Getter>
  Result<T> Read(const std::string& key, Getter get) const {
    auto v = get(gguf_, key);
    if (!v.ok()) return v.status().WithContext(path_ + ": " + key);
    return T(std::move(v).value());
  }
  const GgufFile& gguf_;
  const std::string& path_;
};

const auto kString = [](const GgufFile& g, const std::string& k) { return g.GetString(k); };
const auto kUInt = [](const GgufFile& g, const std::string& k) { return g.GetUInt(k); };
const auto kBool = [](const GgufFile& g, const std::string& k) { return g.GetBool(k); };
const auto kStrings = [](const GgufFile& g, const std::string& k) { return g.GetStringArray(k); };
const auto kInts = [](const GgufFile& g, const std::string& k) { return g.GetIntArray(k); };
const auto kFloats = [](const GgufFile& g, const std::string& k) { return g.GetFloatArray(k); };

Result<std::unique_ptr<Tokenizer>> LoadGgufTokenizer(const std::string& path) {
  SHOTDB_ASSIGN_OR_RETURN(GgufFile gguf, GgufFile::Open(path));
  const GgufKeys keys(gguf, path);
  SHOTDB_ASSIGN_OR_RETURN(std::string model,
                          keys.Required<std::string>("tokenizer.ggml.model", kString));
  if (model != "gpt2" && model != "llama") {
    return Status::NotSupported(path + ": tokenizer.ggml.model \"" + model +
                                "\" (supported: gpt2, llama)");
  }
  using Strings = std::vector<std::string>;
  SHOTDB_ASSIGN_OR_RETURN(Strings tokens,
                          keys.Required<Strings>("tokenizer.ggml.tokens", kStrings));
  const size_t n = tokens.size();
  SHOTDB_ASSIGN_OR_RETURN(int32_t bos,
                          keys.Optional<int32_t>("tokenizer.ggml.bos_token_id", -1, kUInt));
  SHOTDB_ASSIGN_OR_RETURN(int32_t eos,
                          keys.Optional<int32_t>("tokenizer.ggml.eos_token_id", -1, kUInt));
  SHOTDB_ASSIGN_OR_RETURN(int32_t unk,
                          keys.Optional<int32_t>("tokenizer.ggml.unknown_token_id", -1, kUInt));
  // Token types are optional in the format; without them every token is ordinary text.
  std::vector<int32_t> types(n, static_cast<int32_t>(SpmTokenType::kNormal));
  if (gguf.Find("tokenizer.ggml.token_type") != nullptr) {
    SHOTDB_ASSIGN_OR_RETURN(
        auto t, keys.Required<std::vector<int64_t>>("tokenizer.ggml.token_type", kInts));
    if (t.size() != n) {
      return Status::Corruption(path + ": tokenizer.ggml.token_type has " +
                                std::to_string(t.size()) + " entries for " + std::to_string(n) +
                                " tokens");
    }
    for (size_t i = 0; i < n; ++i) types[i] = static_cast<int32_t>(t[i]);
  }

  if (model == "gpt2") {
    BpeVocab v;
    v.tokens = std::move(tokens);
    SHOTDB_ASSIGN_OR_RETURN(std::string pre,
                            keys.Optional<std::string>("tokenizer.ggml.pre", "default", kString));
    Result<Strings> regexes = PreTokenizerForGgufPre(pre);
    if (!regexes.ok()) return regexes.status().WithContext(path);
    v.pre_tokenizer_regexes = std::move(regexes).value();
    SHOTDB_ASSIGN_OR_RETURN(Strings merges,
                            keys.Required<Strings>("tokenizer.ggml.merges", kStrings));
    for (size_t i = 0; i < merges.size(); ++i) {
      const std::string& m = merges[i];
      size_t sp = m.find(' ');
      if (sp == std::string::npos || sp == 0 || sp + 1 == m.size()) {
        return Status::Corruption(path + ": tokenizer.ggml.merges[" + std::to_string(i) + "] \"" +
                                  m + "\" is not two tokens separated by a space");
      }
      v.merges.emplace_back(m.substr(0, sp), m.substr(sp + 1));
    }
    // CONTROL tokens are the special tokens; USER_DEFINED ones are added tokens that are always
    // matched (llama.cpp's rule; HF marks the same tokens special / non-special).
    for (size_t i = 0; i < n; ++i) {
      const auto type = static_cast<SpmTokenType>(types[i]);
      if (type == SpmTokenType::kControl || type == SpmTokenType::kUserDefined) {
        v.added_tokens.push_back(
            {static_cast<int32_t>(i), v.tokens[i], type == SpmTokenType::kControl});
      }
    }
    v.bos_id = bos;
    v.eos_id = eos;
    v.unk_id = unk;
    SHOTDB_ASSIGN_OR_RETURN(v.add_bos,
                            keys.Optional<bool>("tokenizer.ggml.add_bos_token", false, kBool));
    return Upcast(BpeTokenizer::Create(std::move(v), path));
  }

  SpmVocab v;
  v.pieces = std::move(tokens);
  SHOTDB_ASSIGN_OR_RETURN(std::vector<double> scores,
                          keys.Required<std::vector<double>>("tokenizer.ggml.scores", kFloats));
  v.scores.assign(scores.begin(), scores.end());  // stored as float32 in GGUF
  for (int32_t t : types) v.types.push_back(static_cast<SpmTokenType>(t));
  v.bos_id = bos;
  v.eos_id = eos;
  v.unk_id = unk;
  SHOTDB_ASSIGN_OR_RETURN(v.add_bos,
                          keys.Optional<bool>("tokenizer.ggml.add_bos_token", true, kBool));
  SHOTDB_ASSIGN_OR_RETURN(v.add_space_prefix,
                          keys.Optional<bool>("tokenizer.ggml.add_space_prefix", true, kBool));
  return Upcast(SpmVocabTokenizer::Create(std::move(v), path));
}

Result<std::unique_ptr<Tokenizer>> LoadSpmModelFile(const std::string& path) {
  SHOTDB_ASSIGN_OR_RETURN(SpmVocab vocab, ReadSentencePieceModel(path));
  return Upcast(SpmVocabTokenizer::Create(std::move(vocab), path));
}

}  // namespace

Result<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& path) {
  if (IsDirectory(path)) {
    if (Exists(path + "/tokenizer.json")) {
      return Upcast(
          BpeTokenizer::FromHfJson(path + "/tokenizer.json", path + "/tokenizer_config.json"));
    }
    if (Exists(path + "/tokenizer.model")) return LoadSpmModelFile(path + "/tokenizer.model");
    return Status::NotFound(path + ": directory holds neither tokenizer.json nor tokenizer.model");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return Exists(path) ? Status::IOError(path + ": cannot open for reading")
                        : Status::NotFound(path + ": no such file");
  }
  char buf[256];
  in.read(buf, sizeof(buf));
  const std::string head(buf, static_cast<size_t>(in.gcount()));
  if (head.compare(0, 4, "GGUF") == 0) return LoadGgufTokenizer(path);
  // A JSON document starts with '{' (after optional whitespace); a SentencePiece model is a
  // protobuf whose first byte is a field tag (0x0A for ModelProto.pieces).
  size_t first = head.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && head[first] == '{') {
    return Upcast(BpeTokenizer::FromHfJson(path, Dirname(path) + "/tokenizer_config.json"));
  }
  return LoadSpmModelFile(path);
}

}  // namespace shotdb
