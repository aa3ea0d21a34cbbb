#include "engine/export.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>

#include "engine/lmdb_util.h"

// Layout (all integers little-endian; docs/storage.md):
//   magic[8] | u32 version | u32 0
//   u32 n | n bytes: the task record (EncodeTaskInfo)
//   u64 num_blocks
//   per block: u32 n | BlockInfo bytes; u32 num_demos; per demo: u32 n | Demonstration bytes;
//              per layer, K then V: u64 n | n bytes of the stored block record
//   u64 xxh3-64 of every byte above
namespace shotdb {
namespace {

constexpr size_t kHeaderSize = 16;
constexpr size_t kTrailerSize = 8;

// Buffered writer of the export file that hashes everything it writes.
class HashingWriter {
 public:
  explicit HashingWriter(std::string path) : path_(std::move(path)) {
    state_ = XXH3_createState();
    XXH3_64bits_reset(state_);
  }
  ~HashingWriter() {
    XXH3_freeState(state_);
    if (file_ != nullptr) std::fclose(file_);
  }
  Status Open() {
    file_ = std::fopen(path_.c_str(), "wb");
    if (file_ == nullptr) return Status::IOError(path_ + ": open: " + std::strerror(errno));
    return Status::OK();
  }
  void Write(const void* data, size_t n) {
    if (n == 0 || !ok_) return;
    XXH3_64bits_update(state_, data, n);
    if (std::fwrite(data, 1, n, file_) != n) ok_ = false;
  }
  void U32(uint32_t v) {
    uint8_t b[4];
    for (int i = 0; i < 4; ++i) b[i] = static_cast<uint8_t>(v >> (8 * i));
    Write(b, 4);
  }
  void U64(uint64_t v) {
    uint8_t b[8];
    for (int i = 0; i < 8; ++i) b[i] = static_cast<uint8_t>(v >> (8 * i));
    Write(b, 8);
  }
  void Bytes32(const std::string& s) {
    U32(static_cast<uint32_t>(s.size()));
    Write(s.data(), s.size());
  }
  // Appends the hash (not hashed itself), flushes, fsyncs and closes.
  Status Finish() {
    uint64_t digest = XXH3_64bits_digest(state_);
    uint8_t b[8];
    for (int i = 0; i < 8; ++i) b[i] = static_cast<uint8_t>(digest >> (8 * i));
    if (ok_ && std::fwrite(b, 1, 8, file_) != 8) ok_ = false;
    if (ok_ && std::fflush(file_) != 0) ok_ = false;
    if (ok_ && ::fsync(fileno(file_)) != 0) ok_ = false;
    int err = errno;
    if (std::fclose(file_) != 0) ok_ = false;
    file_ = nullptr;
    if (!ok_) return Status::IOError(path_ + ": write: " + std::strerror(err));
    return Status::OK();
  }

 private:
  std::string path_;
  std::FILE* file_ = nullptr;
  XXH3_state_t* state_ = nullptr;
  bool ok_ = true;
};

// A read-only memory map of a whole file.
class MappedFile {
 public:
  ~MappedFile() {
    if (data_ != nullptr) ::munmap(data_, size_);
  }
  Status Open(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      return errno == ENOENT ? Status::NotFound(path + ": no such file")
                             : Status::IOError(path + ": open: " + std::strerror(errno));
    }
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      return Status::IOError(path + ": stat: " + std::strerror(errno));
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        return Status::IOError(path + ": mmap: " + std::strerror(errno));
      }
      data_ = p;
    }
    ::close(fd);
    return Status::OK();
  }
  const uint8_t* data() const { return static_cast<const uint8_t*>(data_); }
  size_t size() const { return size_; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

// Bounds-checked reader over the mapped file; a read past the end latches a Corruption.
class FileReader {
 public:
  FileReader(const uint8_t* data, size_t size, std::string path)
      : data_(data), size_(size), path_(std::move(path)) {}
  bool U32(uint32_t* v) {
    const uint8_t* p;
    if (!Take(4, &p)) return false;
    *v = 0;
    for (int i = 3; i >= 0; --i) *v = (*v << 8) | p[i];
    return true;
  }
  bool U64(uint64_t* v) {
    const uint8_t* p;
    if (!Take(8, &p)) return false;
    *v = 0;
    for (int i = 7; i >= 0; --i) *v = (*v << 8) | p[i];
    return true;
  }
  bool Bytes32(std::string_view* out) {
    uint32_t n;
    const uint8_t* p;
    if (!U32(&n) || !Take(n, &p)) return false;
    *out = std::string_view(reinterpret_cast<const char*>(p), n);
    return true;
  }
  bool Bytes64(const uint8_t** p, size_t* n) {
    uint64_t len;
    if (!U64(&len) || !Take(len, p)) return false;
    *n = static_cast<size_t>(len);
    return true;
  }
  // Moves to `pos` (<= size), e.g. back to an offset this reader passed before.
  void Seek(size_t pos) { pos_ = pos; }
  const Status& status() const { return status_; }
  size_t pos() const { return pos_; }
  bool at_end() const { return pos_ == size_; }

 private:
  bool Take(uint64_t n, const uint8_t** p) {
    if (!status_.ok()) return false;
    if (size_ - pos_ < n) {
      status_ = Status::Corruption(path_ + ": truncated: " + std::to_string(n) +
                                   " bytes needed at offset " + std::to_string(pos_) + ", " +
                                   std::to_string(size_ - pos_) + " left");
      return false;
    }
    *p = data_ + pos_;
    pos_ += n;
    return true;
  }
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  std::string path_;
  Status status_;
};

// One block as parsed from the file: pointers into the map.
struct ParsedBlock {
  BlockInfo info;
  std::vector<Demonstration> demos;
  std::vector<BlockRecordView> records;  // layer-major, K then V
};

// Parses the next block and checks it fully against the task (structure, headers, checksums).
Result<ParsedBlock> ParseBlock(FileReader* r, const TaskInfo& task, uint64_t expected_index,
                               const std::string& path) {
  const std::string what = path + ": block " + std::to_string(expected_index);
  ParsedBlock block;
  std::string_view bytes;
  uint32_t num_demos = 0;
  if (!r->Bytes32(&bytes)) return r->status();
  SHOTDB_ASSIGN_OR_RETURN(block.info, DecodeBlockInfo(bytes, what));
  if (block.info.index != expected_index) {
    return Status::Corruption(what + ": has index " + std::to_string(block.info.index));
  }
  if (!r->U32(&num_demos)) return r->status();
  for (uint32_t i = 0; i < num_demos; ++i) {
    if (!r->Bytes32(&bytes)) return r->status();
    SHOTDB_ASSIGN_OR_RETURN(Demonstration demo, DecodeDemonstration(bytes, what + " demo"));
    block.demos.push_back(std::move(demo));
  }
  for (uint32_t layer = 0; layer < task.model.num_layers; ++layer) {
    for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
      const std::string rname =
          what + " layer " + std::to_string(layer) + " " + std::string(TensorKindName(kind));
      const uint8_t* p;
      size_t n;
      if (!r->Bytes64(&p, &n)) return r->status();
      SHOTDB_ASSIGN_OR_RETURN(BlockRecordView view, ParseBlockRecord(p, n, rname));
      const BlockRecordMeta& m = view.header.meta;
      if (m.layer != layer || m.kind != kind || m.dtype != task.model.dtype ||
          m.kv_heads != task.model.kv_heads || m.head_dim != task.model.head_dim ||
          m.tokens != block.info.token_count || view.header.codec != task.codec) {
        return Status::Corruption(rname + ": record header does not match the task " +
                                  task.model.ToString() + " and the block's " +
                                  std::to_string(block.info.token_count) + " tokens");
      }
      SHOTDB_RETURN_IF_ERROR(VerifyBlockRecord(view, rname));
      block.records.push_back(view);
    }
  }
  return block;
}

}  // namespace

Status ExportTask(const Store& store, const std::string& task, const std::string& path) {
  SHOTDB_ASSIGN_OR_RETURN(std::unique_ptr<Snapshot> snap, store.BeginSnapshot());
  SHOTDB_ASSIGN_OR_RETURN(TaskInfo info, snap->GetTask(task));
  const std::string tmp = path + ".tmp";
  Status s = [&]() -> Status {
    HashingWriter w(tmp);
    SHOTDB_RETURN_IF_ERROR(w.Open());
    w.Write(kExportMagic, sizeof kExportMagic);
    w.U32(kExportFormatVersion);
    w.U32(0);
    w.Bytes32(EncodeTaskInfo(info));
    w.U64(info.num_blocks);
    for (uint64_t b = 0; b < info.num_blocks; ++b) {
      const uint32_t bi = static_cast<uint32_t>(b);
      SHOTDB_ASSIGN_OR_RETURN(BlockInfo block, snap->GetBlock(task, bi));
      w.Bytes32(EncodeBlockInfo(block));
      w.U32(static_cast<uint32_t>(block.demo_ids.size()));
      for (uint64_t id : block.demo_ids) {
        SHOTDB_ASSIGN_OR_RETURN(Demonstration demo, snap->GetDemonstration(task, id));
        w.Bytes32(EncodeDemonstration(demo));
      }
      for (uint32_t layer = 0; layer < info.model.num_layers; ++layer) {
        for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
          SHOTDB_ASSIGN_OR_RETURN(BlockRecordView view, snap->GetRecord(task, bi, layer, kind));
          SHOTDB_RETURN_IF_ERROR(VerifyBlockRecord(
              view, "task " + task + " block " + std::to_string(b) + " layer " +
                        std::to_string(layer) + " " + std::string(TensorKindName(kind))));
          // The record is contiguous in the map: its header directly precedes the payload.
          const uint8_t* record = view.payload - kBlockRecordHeaderSize;
          w.U64(kBlockRecordHeaderSize + view.payload_size);
          w.Write(record, kBlockRecordHeaderSize + view.payload_size);
        }
      }
    }
    return w.Finish();
  }();
  if (!s.ok()) {
    std::remove(tmp.c_str());
    return s;
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    Status err = Status::IOError(path + ": rename from " + tmp + ": " + std::strerror(errno));
    std::remove(tmp.c_str());
    return err;
  }
  return Status::OK();
}

Status ImportTask(Store* store, const std::string& path, std::string* task_name) {
  MappedFile file;
  SHOTDB_RETURN_IF_ERROR(file.Open(path));
  if (file.size() < kHeaderSize + kTrailerSize ||
      std::memcmp(file.data(), kExportMagic, sizeof kExportMagic) != 0) {
    return Status::Corruption(path + ": not a shotdb export file (magic or size)");
  }
  const size_t body = file.size() - kTrailerSize;
  uint64_t stored_hash = 0;
  for (int i = 7; i >= 0; --i) stored_hash = (stored_hash << 8) | file.data()[body + i];
  if (XXH3_64bits(file.data(), body) != stored_hash) {
    return Status::Corruption(path + ": whole-file xxh3 mismatch (the file is damaged)");
  }

  FileReader r(file.data(), body, path);
  uint32_t version = 0, reserved = 0;
  std::string_view task_bytes;
  uint64_t num_blocks = 0;
  uint64_t magic;
  r.U64(&magic);
  r.U32(&version);
  r.U32(&reserved);
  if (r.status().ok() && (version < 1 || version > kExportFormatVersion)) {
    return Status::NotSupported(path + ": export format version " + std::to_string(version) +
                                ", this build reads 1 to " + std::to_string(kExportFormatVersion));
  }
  r.Bytes32(&task_bytes);
  r.U64(&num_blocks);
  SHOTDB_RETURN_IF_ERROR(r.status());
  SHOTDB_ASSIGN_OR_RETURN(TaskInfo task, DecodeTaskInfo(task_bytes, path + ": task record"));
  const size_t blocks_start = r.pos();

  // Pass 1: validate everything.
  for (uint64_t b = 0; b < num_blocks; ++b) {
    SHOTDB_RETURN_IF_ERROR(ParseBlock(&r, task, b, path).status());
  }
  if (!r.at_end()) {
    return Status::Corruption(path + ": " + std::to_string(body - r.pos()) +
                              " unexpected bytes after the last block");
  }

  // Pass 2: create the task and append its blocks.
  SHOTDB_RETURN_IF_ERROR(store->CreateTask(task));
  if (task_name != nullptr) *task_name = task.name;
  FileReader r2(file.data(), body, path);
  r2.Seek(blocks_start);
  Status s;
  std::vector<std::vector<uint8_t>> decoded;
  for (uint64_t b = 0; b < num_blocks && s.ok(); ++b) {
    Result<ParsedBlock> block = ParseBlock(&r2, task, b, path);
    if (!block.ok()) {
      s = block.status();
      break;
    }
    NewBlock nb;
    nb.model = task.model;
    nb.info = block->info;
    nb.demos = block->demos;
    decoded.resize(block->records.size());
    for (size_t i = 0; i < block->records.size() && s.ok(); ++i) {
      const BlockRecordView& view = block->records[i];
      const void* raw = view.payload;
      if (view.header.codec != Codec::kRaw) {
        decoded[i].resize(view.header.raw_size);
        s = DecodeBlockRecord(view, decoded[i].data(), decoded[i].size(), path);
        raw = decoded[i].data();
      }
      (i % 2 == 0 ? nb.keys : nb.values).push_back(raw);
    }
    if (s.ok()) s = store->AppendBlock(task.name, nb);
  }
  if (!s.ok()) {
    Status cleanup = store->DeleteTask(task.name);
    if (!cleanup.ok())
      s = s.WithContext("import aborted, and deleting the partial task failed (" +
                        cleanup.ToString() + ")");
    return s;
  }
  return Status::OK();
}

}  // namespace shotdb
