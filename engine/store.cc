#include "engine/store.h"

#include <errno.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>

#include <cstdio>
#include <cstring>
#include <ctime>
#include <set>

#include "engine/analyzer.h"
#include "engine/lmdb_check.h"
#include "engine/prompt_format.h"

namespace shotdb {
namespace {

using lmdb::AppendBE32;
using lmdb::AppendBE64;
using lmdb::Val;
using lmdb::View;

constexpr size_t kMaxTaskNameBytes = 255;
// Doublings of the map on MDB_MAP_FULL before giving up (2^40 times the initial size).
constexpr int kMaxMapGrowths = 40;
// Attempts to adopt a map size grown by another process before giving up.
constexpr int kMaxResizeRetries = 8;

constexpr char kMetaFormatVersion[] = "format_version";
constexpr char kMetaNextTaskId[] = "next_task_id";

std::string TaskKey(uint32_t task_id) {
  std::string key;
  AppendBE32(&key, task_id);
  return key;
}
std::string BlockKey(uint32_t task_id, uint32_t block) {
  std::string key = TaskKey(task_id);
  AppendBE32(&key, block);
  return key;
}
std::string DemoKey(uint32_t task_id, uint64_t demo) {
  std::string key = TaskKey(task_id);
  AppendBE64(&key, demo);
  return key;
}
std::string PayloadKey(uint32_t task_id, uint32_t block, uint32_t layer, TensorKind kind) {
  std::string key = BlockKey(task_id, block);
  AppendBE32(&key, layer);
  key.push_back(static_cast<char>(kind));
  return key;
}

std::string DemoDocKey(uint32_t task_id, uint32_t doc) {
  std::string key = TaskKey(task_id);
  AppendBE32(&key, doc);
  return key;
}

std::string U32Value(uint32_t v) {
  lmdb::ByteWriter w;
  w.U32(v);
  return w.Take();
}

std::string RecordName(const std::string& task, uint32_t block, uint32_t layer, TensorKind kind) {
  return "task " + task + " block " + std::to_string(block) + " layer " + std::to_string(layer) +
         " " + std::string(TensorKindName(kind));
}

// The value stored under `key` in `dbi`: checked against its seal (lmdb::Seal) in a format-3 store
// (`checked`), as stored in a format-1 or -2 one. NotFound when absent, Corruption when damaged.
Result<std::string_view> GetValue(MDB_txn* txn, MDB_dbi dbi, std::string_view key, bool checked,
                                  const std::string& what) {
  MDB_val k = Val(key.data(), key.size()), v;
  int rc = mdb_get(txn, dbi, &k, &v);
  if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, what);
  if (!checked) return View(v);
  return lmdb::Unseal(key, View(v), what);
}

// Stores `value` under `key`, sealed (every store written by this build is format 3).
Status PutValue(lmdb::WriteTxn* txn, MDB_dbi dbi, std::string_view key, std::string_view value,
                unsigned flags, const std::string& what) {
  const std::string sealed = lmdb::Seal(key, value);
  MDB_val k = Val(key.data(), key.size()), v = Val(sealed);
  return txn->Check(mdb_put(txn->txn, dbi, &k, &v, flags), what);
}

Result<uint32_t> DecodeU32(std::string_view value, const std::string& what) {
  lmdb::ByteReader r(value, what);
  uint32_t out = 0;
  r.U32(&out);
  SHOTDB_RETURN_IF_ERROR(r.Finish());
  return out;
}

// A u32 of the meta DB; NotFound when absent.
Result<uint32_t> GetMetaU32(MDB_txn* txn, MDB_dbi meta, const char* name, bool checked) {
  SHOTDB_ASSIGN_OR_RETURN(std::string_view value,
                          GetValue(txn, meta, name, checked, std::string("meta ") + name));
  return DecodeU32(value, std::string("meta ") + name);
}

// The store format version: a plain u32 in formats 1 and 2, sealed from format 3 on.
Result<uint32_t> GetFormatVersion(MDB_txn* txn, MDB_dbi meta) {
  MDB_val k = Val(kMetaFormatVersion, std::strlen(kMetaFormatVersion)), v;
  int rc = mdb_get(txn, meta, &k, &v);
  if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, "meta format_version");
  if (v.mv_size == 4) return DecodeU32(View(v), "meta format_version");
  return GetMetaU32(txn, meta, kMetaFormatVersion, /*checked=*/true);
}

// A task id: the value of task_names.
Result<uint32_t> DecodeTaskId(std::string_view value, const std::string& name) {
  if (value.size() != 4) return Status::Corruption("task " + name + ": task id is not 4 bytes");
  return lmdb::LoadBE32(value.data());
}

// The id task_names holds for `name`: NotFound ("task NAME: no such task") when absent,
// Corruption when the record is damaged.
Result<uint32_t> LookupTaskId(MDB_txn* txn, MDB_dbi task_names, const std::string& name,
                              bool checked) {
  Result<std::string_view> value = GetValue(txn, task_names, name, checked, "task " + name);
  if (value.status().IsNotFound()) return Status::NotFound("task " + name + ": no such task");
  if (!value.ok()) return value.status();
  return DecodeTaskId(*value, name);
}

// Checks a record's header against its key and its task. The header itself was already checked
// (ParseBlockRecord); this catches a record that is intact but in the wrong place.
Status CheckRecordMatches(const BlockRecordView& view, const TaskInfo& task, uint32_t layer,
                          TensorKind kind, uint32_t tokens, const std::string& what) {
  const BlockRecordMeta& m = view.header.meta;
  if (m.layer != layer || m.kind != kind || m.dtype != task.model.dtype ||
      m.kv_heads != task.model.kv_heads || m.head_dim != task.model.head_dim ||
      m.tokens != tokens || view.header.codec != task.codec) {
    return Status::Corruption(
        what + ": record header says layer " + std::to_string(m.layer) + " " +
        std::string(TensorKindName(m.kind)) + " " + std::string(DTypeName(m.dtype)) + " [" +
        std::to_string(m.kv_heads) + ", " + std::to_string(m.tokens) + ", " +
        std::to_string(m.head_dim) + "] " + std::string(CodecName(view.header.codec)) +
        ", expected layer " + std::to_string(layer) + " " + std::string(TensorKindName(kind)) +
        " " + std::string(DTypeName(task.model.dtype)) + " [" +
        std::to_string(task.model.kv_heads) + ", " + std::to_string(tokens) + ", " +
        std::to_string(task.model.head_dim) + "] " + std::string(CodecName(task.codec)));
  }
  return Status::OK();
}

}  // namespace

// ---- Snapshot ---------------------------------------------------------------------------------

Snapshot::~Snapshot() {
  mdb_txn_abort(txn_);
  store_->EndTxn();
}

Result<uint32_t> Snapshot::TaskId(const std::string& name) {
  return LookupTaskId(txn_, store_->dbs_.task_names, name, store_->checked());
}

Result<TaskInfo> Snapshot::TaskById(uint32_t id, const std::string& name) {
  const std::string what = "task " + name + " record";
  Result<std::string_view> value =
      GetValue(txn_, store_->dbs_.tasks, TaskKey(id), store_->checked(), what);
  if (value.status().IsNotFound()) {
    return Status::Corruption("task " + name + ": its name maps to id " + std::to_string(id) +
                              ", which has no task record");
  }
  if (!value.ok()) return value.status();
  SHOTDB_ASSIGN_OR_RETURN(TaskInfo task, DecodeTaskInfo(*value, what));
  if (task.name != name) return Status::Corruption(what + ": holds task '" + task.name + "'");
  return task;
}

Result<TaskInfo> Snapshot::GetTask(const std::string& name) {
  SHOTDB_ASSIGN_OR_RETURN(uint32_t id, TaskId(name));
  return TaskById(id, name);
}

Result<std::vector<TaskInfo>> Snapshot::ListTasks() {
  std::vector<TaskInfo> tasks;
  lmdb::Cursor c;
  int rc = c.Open(txn_, store_->dbs_.task_names);
  if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, "task_names cursor");
  MDB_val k, v;
  for (rc = mdb_cursor_get(c.get(), &k, &v, MDB_FIRST); rc == MDB_SUCCESS;
       rc = mdb_cursor_get(c.get(), &k, &v, MDB_NEXT)) {
    std::string name(View(k));
    std::string_view value = View(v);
    if (store_->checked()) {
      SHOTDB_ASSIGN_OR_RETURN(value, lmdb::Unseal(name, value, "task " + name));
    }
    SHOTDB_ASSIGN_OR_RETURN(uint32_t id, DecodeTaskId(value, name));
    SHOTDB_ASSIGN_OR_RETURN(TaskInfo task, TaskById(id, name));
    tasks.push_back(std::move(task));
  }
  if (rc != MDB_NOTFOUND) return lmdb::ToStatus(rc, "task_names scan");
  return tasks;
}

Result<BlockInfo> Snapshot::GetBlock(const std::string& task, uint32_t index) {
  SHOTDB_ASSIGN_OR_RETURN(uint32_t id, TaskId(task));
  std::string what = "task " + task + " block " + std::to_string(index);
  SHOTDB_ASSIGN_OR_RETURN(
      std::string_view value,
      GetValue(txn_, store_->dbs_.blocks, BlockKey(id, index), store_->checked(), what));
  SHOTDB_ASSIGN_OR_RETURN(BlockInfo block, DecodeBlockInfo(value, what));
  if (block.index != index) {
    return Status::Corruption(what + ": stored index is " + std::to_string(block.index));
  }
  return block;
}

Result<Demonstration> Snapshot::GetDemonstration(const std::string& task, uint64_t id) {
  SHOTDB_ASSIGN_OR_RETURN(uint32_t task_id, TaskId(task));
  std::string what = "task " + task + " demonstration " + std::to_string(id);
  SHOTDB_ASSIGN_OR_RETURN(
      std::string_view value,
      GetValue(txn_, store_->dbs_.demos, DemoKey(task_id, id), store_->checked(), what));
  SHOTDB_ASSIGN_OR_RETURN(Demonstration demo, DecodeDemonstration(value, what));
  if (demo.id != id) return Status::Corruption(what + ": stored id is " + std::to_string(demo.id));
  return demo;
}

Result<BlockRecordView> Snapshot::GetRecord(const std::string& task, uint32_t block, uint32_t layer,
                                            TensorKind kind) {
  SHOTDB_ASSIGN_OR_RETURN(uint32_t id, TaskId(task));
  std::string key = PayloadKey(id, block, layer, kind);
  std::string what = RecordName(task, block, layer, kind);
  MDB_val k = Val(key), v;
  int rc = mdb_get(txn_, store_->dbs_.payloads, &k, &v);
  if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, what);
  return ParseBlockRecord(v.mv_data, v.mv_size, what);
}

Result<std::vector<BlockRecordView>> Snapshot::GetBlockRecords(
    const std::string& task, uint32_t block, const std::vector<uint32_t>& layers) {
  SHOTDB_ASSIGN_OR_RETURN(uint32_t id, TaskId(task));
  lmdb::Cursor c;
  int rc = c.Open(txn_, store_->dbs_.payloads);
  if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, "task " + task + ": payload cursor");
  std::vector<BlockRecordView> out;
  out.reserve(2 * layers.size());
  std::string key = PayloadKey(id, block, 0, TensorKind::kKey);
  bool positioned = false;  // the cursor is on the previous record
  for (uint32_t layer : layers) {
    for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
      key.resize(key.size() - 5);
      AppendBE32(&key, layer);
      key.push_back(static_cast<char>(kind));
      MDB_val k, v;
      // The next key is usually the wanted one (ascending layers, K then V): one step, else a
      // lookup.
      rc = positioned ? mdb_cursor_get(c.get(), &k, &v, MDB_NEXT) : MDB_NOTFOUND;
      if (rc != MDB_SUCCESS || lmdb::View(k) != key) {
        k = Val(key);
        rc = mdb_cursor_get(c.get(), &k, &v, MDB_SET_KEY);
      }
      positioned = rc == MDB_SUCCESS;
      if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, RecordName(task, block, layer, kind));
      Result<BlockRecordView> view = ParseBlockRecord(v.mv_data, v.mv_size, {});
      if (!view.ok()) {  // again, for the message with the record's name
        return ParseBlockRecord(v.mv_data, v.mv_size, RecordName(task, block, layer, kind))
            .status();
      }
      out.push_back(*view);
    }
  }
  return out;
}

namespace {

// The start of the mapping of `path` at file offset 0 in this process, from /proc/self/maps
// (matched by device and inode, so any path spelling works).
Result<const uint8_t*> FindFileMapping(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    return Status::IOError(path + ": stat: " + std::strerror(errno));
  }
  std::FILE* maps = std::fopen("/proc/self/maps", "r");
  if (maps == nullptr) {
    return Status::NotSupported("/proc/self/maps is not readable, so the map of " + path +
                                " cannot be found: " + std::strerror(errno));
  }
  const uint8_t* found = nullptr;
  char line[4096];
  while (found == nullptr && std::fgets(line, sizeof(line), maps) != nullptr) {
    unsigned long long begin, end, offset, inode;
    unsigned dev_major, dev_minor;
    if (std::sscanf(line, "%llx-%llx %*s %llx %x:%x %llu", &begin, &end, &offset, &dev_major,
                    &dev_minor, &inode) == 6 &&
        offset == 0 && inode == st.st_ino && dev_major == major(st.st_dev) &&
        dev_minor == minor(st.st_dev)) {
      found = reinterpret_cast<const uint8_t*>(static_cast<uintptr_t>(begin));
    }
  }
  std::fclose(maps);
  if (found == nullptr) {
    return Status::NotSupported(path + ": no mapping of it in /proc/self/maps");
  }
  return found;
}

}  // namespace

Result<Snapshot::MappedRange> Snapshot::Mapped() const {
  MDB_envinfo info;
  MDB_stat env_stat;
  mdb_env_info(store_->env_, &info);
  mdb_env_stat(store_->env_, &env_stat);
  MappedRange range;
  range.bytes = (static_cast<size_t>(info.me_last_pgno) + 1) * env_stat.ms_psize;
  range.reserved = info.me_mapsize;
  // mdb_env_info's me_mapaddr is only set for MDB_FIXEDMAP environments.
  std::lock_guard<std::mutex> lock(store_->txn_mu_);
  if (store_->map_base_size_ != info.me_mapsize) {
    SHOTDB_ASSIGN_OR_RETURN(store_->map_base_, FindFileMapping(store_->dir_ + "/data.mdb"));
    store_->map_base_size_ = info.me_mapsize;
  }
  range.base = store_->map_base_;
  return range;
}

namespace {

// A record's payload as GetPayload returns it: the header checked against the task, the bytes
// verified or decoded. `what` names the record in errors.
Result<PayloadRef> ToPayloadRef(const BlockRecordView& view, const TaskInfo& info, uint32_t layer,
                                TensorKind kind, uint32_t tokens, const std::string& what,
                                bool verify_checksum) {
  SHOTDB_RETURN_IF_ERROR(CheckRecordMatches(view, info, layer, kind, tokens, what));
  PayloadRef ref;
  ref.header = view.header;
  ref.size = view.header.raw_size;
  // LMDB places small values at 2-byte-aligned offsets only (large ones start a page), so a raw
  // payload is handed out in place only when it is aligned for its element type.
  const bool aligned =
      reinterpret_cast<uintptr_t>(view.payload) % DTypeSize(view.header.meta.dtype) == 0;
  if (view.header.codec == Codec::kRaw && aligned) {
    if (verify_checksum) SHOTDB_RETURN_IF_ERROR(VerifyBlockRecord(view, what));
    ref.data = view.payload;
  } else {
    ref.owned.resize(ref.size);
    SHOTDB_RETURN_IF_ERROR(DecodeBlockRecord(view, ref.owned.data(), ref.size, what));
    ref.data = ref.owned.data();
  }
  return ref;
}

}  // namespace

Result<PayloadRef> Snapshot::GetPayload(const std::string& task, uint32_t block, uint32_t layer,
                                        TensorKind kind, bool verify_checksum) {
  SHOTDB_ASSIGN_OR_RETURN(TaskInfo info, GetTask(task));
  SHOTDB_ASSIGN_OR_RETURN(BlockInfo binfo, GetBlock(task, block));
  SHOTDB_ASSIGN_OR_RETURN(BlockRecordView view, GetRecord(task, block, layer, kind));
  return ToPayloadRef(view, info, layer, kind, binfo.token_count,
                      RecordName(task, block, layer, kind), verify_checksum);
}

Result<std::vector<PayloadRef>> Snapshot::GetBlockPayloads(const std::string& task, uint32_t block,
                                                           const std::vector<uint32_t>& layers,
                                                           bool verify_checksum) {
  SHOTDB_ASSIGN_OR_RETURN(TaskInfo info, GetTask(task));
  SHOTDB_ASSIGN_OR_RETURN(BlockInfo binfo, GetBlock(task, block));
  SHOTDB_ASSIGN_OR_RETURN(std::vector<BlockRecordView> views, GetBlockRecords(task, block, layers));
  std::vector<PayloadRef> out;
  out.reserve(views.size());
  for (size_t i = 0; i < views.size(); ++i) {
    const uint32_t layer = layers[i / 2];
    const TensorKind kind = i % 2 == 0 ? TensorKind::kKey : TensorKind::kValue;
    Result<PayloadRef> ref =
        ToPayloadRef(views[i], info, layer, kind, binfo.token_count, {}, verify_checksum);
    if (!ref.ok()) {  // again, for the message with the record's name
      return ToPayloadRef(views[i], info, layer, kind, binfo.token_count,
                          RecordName(task, block, layer, kind), verify_checksum)
          .status();
    }
    out.push_back(std::move(ref).value());
  }
  return out;
}

Status Snapshot::DecodePayloadInto(const std::string& task, uint32_t block, uint32_t layer,
                                   TensorKind kind, void* dst, size_t size) {
  SHOTDB_ASSIGN_OR_RETURN(TaskInfo info, GetTask(task));
  SHOTDB_ASSIGN_OR_RETURN(BlockInfo binfo, GetBlock(task, block));
  SHOTDB_ASSIGN_OR_RETURN(BlockRecordView view, GetRecord(task, block, layer, kind));
  std::string what = RecordName(task, block, layer, kind);
  SHOTDB_RETURN_IF_ERROR(CheckRecordMatches(view, info, layer, kind, binfo.token_count, what));
  if (size != view.header.raw_size) {
    return Status::InvalidArgument(what + ": destination holds " + std::to_string(size) +
                                   " bytes, the tensor has " +
                                   std::to_string(view.header.raw_size));
  }
  return DecodeBlockRecord(view, dst, size, what);
}

Result<std::vector<ScoredDoc>> Snapshot::Search(const std::string& task, std::string_view query,
                                                size_t k) {
  SHOTDB_ASSIGN_OR_RETURN(uint32_t id, TaskId(task));
  SHOTDB_ASSIGN_OR_RETURN(TaskInfo info, TaskById(id, task));
  if (info.num_blocks > UINT32_MAX) {
    return Status::Corruption("task " + task + ": block count " + std::to_string(info.num_blocks) +
                              " exceeds 32 bits");
  }
  SHOTDB_ASSIGN_OR_RETURN(Analyzer analyzer, Analyzer::Create(info.analyzer));
  Bm25LmdbIndex index(store_->dbs_.bm25, store_->checked());
  return index.Search(txn_, id, static_cast<uint32_t>(info.num_blocks), analyzer.Terms(query), k,
                      info.bm25);
}

Result<std::vector<ScoredDoc>> Snapshot::SearchDemos(const std::string& task,
                                                     std::string_view query, size_t k) {
  if (store_->format_version_ < 2) {
    return Status::NotSupported("task " + task + ": a format-" +
                                std::to_string(store_->format_version_) +
                                " store has no per-demonstration index; export the task and "
                                "import it into a new store to add one");
  }
  SHOTDB_ASSIGN_OR_RETURN(uint32_t id, TaskId(task));
  SHOTDB_ASSIGN_OR_RETURN(TaskInfo info, TaskById(id, task));
  if (info.num_demos > UINT32_MAX) {
    return Status::Corruption("task " + task + ": demonstration count " +
                              std::to_string(info.num_demos) + " exceeds 32 bits");
  }
  SHOTDB_ASSIGN_OR_RETURN(Analyzer analyzer, Analyzer::Create(info.analyzer));
  Bm25LmdbIndex index(store_->dbs_.demo_bm25, store_->checked());
  return index.Search(txn_, id, static_cast<uint32_t>(info.num_demos), analyzer.Terms(query), k,
                      info.bm25);
}

Result<Demonstration> Snapshot::DemoAt(const std::string& task, uint32_t doc) {
  const std::string what = "task " + task + " demonstration #" + std::to_string(doc);
  if (store_->format_version_ < 2) {
    return Status::NotSupported(what + ": a format-1 store does not number demonstrations");
  }
  SHOTDB_ASSIGN_OR_RETURN(uint32_t task_id, TaskId(task));
  SHOTDB_ASSIGN_OR_RETURN(
      std::string_view value,
      GetValue(txn_, store_->dbs_.demo_docs, DemoDocKey(task_id, doc), store_->checked(), what));
  lmdb::ByteReader r(value, what);
  uint64_t demo_id = 0;
  r.U64(&demo_id);
  SHOTDB_RETURN_IF_ERROR(r.Finish());
  return GetDemonstration(task, demo_id);
}

// ---- Store ------------------------------------------------------------------------------------

Result<std::unique_ptr<Store>> Store::Open(const std::string& dir, const Options& options) {
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0) {
    if (errno != ENOENT) return Status::IOError(dir + ": stat: " + std::strerror(errno));
    if (options.read_only || !options.create_if_missing) {
      return Status::NotFound(dir + ": no store directory");
    }
    if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
      return Status::IOError(dir + ": mkdir: " + std::strerror(errno));
    }
  } else if (!S_ISDIR(st.st_mode)) {
    return Status::InvalidArgument(dir + ": not a directory");
  }
  std::string data_file = dir + "/data.mdb";
  if ((options.read_only || !options.create_if_missing) && ::stat(data_file.c_str(), &st) != 0) {
    return Status::NotFound(dir + ": no store (data.mdb missing)");
  }

  MDB_env* env = nullptr;
  int rc = mdb_env_create(&env);
  if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, dir + ": mdb_env_create");
  unsigned flags = MDB_NOTLS;
  if (options.read_only) flags |= MDB_RDONLY;
  if (!options.sync) flags |= MDB_NOSYNC;
  if ((rc = mdb_env_set_maxdbs(env, 16)) != MDB_SUCCESS ||
      (rc = mdb_env_set_maxreaders(env, 1024)) != MDB_SUCCESS ||
      (rc = mdb_env_set_mapsize(env, options.map_size)) != MDB_SUCCESS ||
      (rc = mdb_env_open(env, dir.c_str(), flags, 0644)) != MDB_SUCCESS) {
    mdb_env_close(env);
    return lmdb::ToStatus(rc, dir + ": open LMDB environment");
  }
  // Free the reader slots of processes that died holding a snapshot (e.g. killed readers), so that
  // they neither pin old pages nor exhaust the reader table.
  int dead = 0;
  mdb_reader_check(env, &dead);
  if (options.check_structure) {
    // Readers need the trees only; a writer also relies on the overflow runs' headers.
    Result<lmdb::StructureStats> structure = lmdb::CheckLmdbStructure(
        env, options.read_only ? lmdb::StructureCheck::kTrees : lmdb::StructureCheck::kFull);
    if (!structure.ok()) {
      mdb_env_close(env);
      return structure.status();
    }
  }
  std::unique_ptr<Store> store(new Store(dir, options, env));
  SHOTDB_RETURN_IF_ERROR(store->OpenDbs());
  return store;
}

Store::~Store() { mdb_env_close(env_); }

void Store::EndTxn() const {
  std::lock_guard<std::mutex> lock(txn_mu_);
  --open_txns_;
}

Status Store::OpenDbs() {
  struct Named {
    const char* name;
    unsigned flags;
    MDB_dbi* dbi;
    uint32_t since;  // the format version that added it
  };
  const Named named[] = {
      {"meta", 0, &dbs_.meta, 1},
      {"task_names", 0, &dbs_.task_names, 1},
      {"tasks", 0, &dbs_.tasks, 1},
      {"blocks", 0, &dbs_.blocks, 1},
      {"demos", 0, &dbs_.demos, 1},
      {"payloads", 0, &dbs_.payloads, 1},
      {"postings", MDB_DUPSORT | MDB_DUPFIXED, &dbs_.bm25.postings, 1},
      {"doc_lengths", 0, &dbs_.bm25.doc_lengths, 1},
      {"bm25_stats", 0, &dbs_.bm25.stats, 1},
      {"demo_postings", MDB_DUPSORT | MDB_DUPFIXED, &dbs_.demo_bm25.postings, 2},
      {"demo_doc_lengths", 0, &dbs_.demo_bm25.doc_lengths, 2},
      {"demo_bm25_stats", 0, &dbs_.demo_bm25.stats, 2},
      {"demo_docs", 0, &dbs_.demo_docs, 2},
  };
  // Whether the file is a shotdb store at all: a store's first transaction creates "meta".
  auto probe = [&](MDB_txn* txn, bool creating) -> Status {
    MDB_dbi meta_probe;
    int rc = mdb_dbi_open(txn, "meta", 0, &meta_probe);
    if (rc == MDB_NOTFOUND) {
      MDB_dbi main;
      MDB_stat ms;
      if ((rc = mdb_dbi_open(txn, nullptr, 0, &main)) != MDB_SUCCESS ||
          (rc = mdb_stat(txn, main, &ms)) != MDB_SUCCESS) {
        return lmdb::ToStatus(rc, dir_ + ": main database");
      }
      if (ms.ms_entries != 0 || !creating) {
        return Status::InvalidArgument(dir_ + ": not a shotdb store (no 'meta' database)");
      }
      return Status::OK();
    }
    return rc == MDB_SUCCESS ? Status::OK() : lmdb::ToStatus(rc, dir_ + ": open database 'meta'");
  };
  // Opens every database of format `version` (a missing one means another LMDB file).
  auto open_all = [&](MDB_txn* txn, unsigned extra, uint32_t version) -> Status {
    for (const Named& n : named) {
      if (n.since > version) continue;
      int rc = mdb_dbi_open(txn, n.name, n.flags | extra, n.dbi);
      if (rc == MDB_INCOMPATIBLE || rc == MDB_NOTFOUND) {
        return Status::InvalidArgument(dir_ + ": not a shotdb store (database '" + n.name +
                                       "' missing or of another kind)");
      }
      if (rc != MDB_SUCCESS) {
        return lmdb::ToStatus(rc, dir_ + ": open database '" + std::string(n.name) + "'");
      }
    }
    return Status::OK();
  };
  auto check_version = [&](uint32_t version, bool read_only) -> Status {
    const bool older = version == 1 || version == 2;
    if (version == kStoreFormatVersion || (older && read_only)) return Status::OK();
    if (older) {
      return Status::NotSupported(
          dir_ + ": store format version " + std::to_string(version) +
          " (written by an older shotdb, without record checksums) can only be opened "
          "read-only by this build, which writes version " +
          std::to_string(kStoreFormatVersion) + ". Export each task (`shotdb --store " + dir_ +
          " export TASK FILE`, which reads it) and import it into a new store "
          "(`shotdb --store NEW import FILE`); the import adds the checksums" +
          (version == 1 ? " and the demonstration index." : "."));
    }
    return Status::NotSupported(dir_ + ": store format version " + std::to_string(version) +
                                ", this build reads versions 1 and 2 (read-only) and " +
                                std::to_string(kStoreFormatVersion));
  };

  if (options_.read_only) {
    MDB_txn* txn = nullptr;
    int rc = mdb_txn_begin(env_, nullptr, MDB_RDONLY, &txn);
    if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, dir_ + ": begin read transaction");
    Status s = probe(txn, false);
    if (s.ok()) s = open_all(txn, 0, 1);  // meta first, to read the version
    Result<uint32_t> version = s.ok() ? GetFormatVersion(txn, dbs_.meta) : Result<uint32_t>(s);
    if (!version.ok()) s = version.status().WithContext(dir_);
    if (s.ok()) s = check_version(*version, true);
    if (s.ok()) s = open_all(txn, 0, *version);
    if (!s.ok()) {
      mdb_txn_abort(txn);
      return s;
    }
    format_version_ = *version;
    // Committing keeps the database handles open for later transactions.
    rc = mdb_txn_commit(txn);
    return rc == MDB_SUCCESS ? Status::OK() : lmdb::ToStatus(rc, dir_ + ": open databases");
  }
  // A refused version aborts the transaction, so nothing (not even a database) is created.
  return Write([&](lmdb::WriteTxn* txn) -> Status {
    SHOTDB_RETURN_IF_ERROR(probe(txn->txn, true));
    SHOTDB_RETURN_IF_ERROR(open_all(txn->txn, MDB_CREATE, kStoreFormatVersion));
    Result<uint32_t> version = GetFormatVersion(txn->txn, dbs_.meta);
    if (version.status().IsNotFound()) {
      return PutValue(txn, dbs_.meta, kMetaFormatVersion, U32Value(kStoreFormatVersion), 0,
                      dir_ + ": write meta");
    }
    if (!version.ok()) return version.status().WithContext(dir_);
    return check_version(*version, false);
  });
}

Status Store::Write(const std::function<Status(lmdb::WriteTxn*)>& body) {
  if (options_.read_only) return Status::IOError(dir_ + ": store is open read-only");
  std::lock_guard<std::mutex> writer(write_mu_);
  {
    std::lock_guard<std::mutex> lock(txn_mu_);
    ++open_txns_;
  }
  struct EndGuard {
    const Store* store;
    ~EndGuard() { store->EndTxn(); }
  } end_guard{this};

  int resizes = 0;
  for (int growths = 0;;) {
    lmdb::WriteTxn txn;
    int rc = mdb_txn_begin(env_, nullptr, 0, &txn.txn);
    if (rc == MDB_MAP_RESIZED && resizes++ < kMaxResizeRetries) {
      // Another process grew the map: adopt its size. Allowed only while this process has no
      // transaction besides this (not yet begun) one.
      std::lock_guard<std::mutex> lock(txn_mu_);
      if (open_txns_ != 1) {
        return Status::IOError(dir_ + ": the map was grown by another process and " +
                               std::to_string(open_txns_ - 1) +
                               " snapshots are open in this process; close them and retry");
      }
      rc = mdb_env_set_mapsize(env_, 0);
      if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, dir_ + ": adopt grown map size");
      continue;
    }
    if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, dir_ + ": begin write transaction");

    Status s = body(&txn);
    if (s.ok()) {
      rc = mdb_txn_commit(txn.txn);  // frees the transaction whatever the outcome
      if (rc == MDB_SUCCESS) return Status::OK();
      s = txn.Check(rc, dir_ + ": commit");
      // LMDB reports a short write (a full disk) as EIO: say how much room is left.
      struct statvfs fs;
      if ((rc == EIO || rc == ENOSPC) && ::statvfs(dir_.c_str(), &fs) == 0) {
        const uint64_t free_bytes = static_cast<uint64_t>(fs.f_bavail) * fs.f_frsize;
        s = Status::IOError(s.message() + " (the filesystem holding the store has " +
                            std::to_string(free_bytes) +
                            " bytes free: is it full?); nothing of this write was stored");
      }
    } else {
      mdb_txn_abort(txn.txn);
    }
    if (!txn.map_full) return s;
    if (growths++ >= kMaxMapGrowths) return s;

    MDB_envinfo info;
    mdb_env_info(env_, &info);
    if (options_.max_map_size > 0 && info.me_mapsize * 2 > options_.max_map_size) {
      return Status::IOError(dir_ + ": map full at " + std::to_string(info.me_mapsize) +
                             " bytes, and growing it would pass max_map_size (" +
                             std::to_string(options_.max_map_size) +
                             " bytes); nothing of this write was stored");
    }
    std::lock_guard<std::mutex> lock(txn_mu_);
    if (open_txns_ != 1) {
      return Status::IOError(dir_ + ": map full at " + std::to_string(info.me_mapsize) +
                             " bytes and " + std::to_string(open_txns_ - 1) +
                             " snapshots are open in this process, so it cannot grow; close "
                             "them and retry");
    }
    rc = mdb_env_set_mapsize(env_, info.me_mapsize * 2);
    if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, dir_ + ": grow map");
  }
}

Status Store::CreateTask(const TaskInfo& task) {
  const std::string what = "task " + task.name;
  if (task.name.empty() || task.name.size() > kMaxTaskNameBytes) {
    return Status::InvalidArgument(what + ": name must have 1.." +
                                   std::to_string(kMaxTaskNameBytes) + " bytes, got " +
                                   std::to_string(task.name.size()));
  }
  const ModelFingerprint& m = task.model;
  if (m.num_layers == 0 || m.kv_heads == 0 || m.head_dim == 0) {
    return Status::InvalidArgument(what + ": model " + m.ToString() +
                                   " must have non-zero layers, kv_heads and head_dim");
  }
  if (!IsValidDType(static_cast<uint8_t>(m.dtype))) {
    return Status::InvalidArgument(what + ": model dtype " +
                                   std::to_string(static_cast<int>(m.dtype)) + " is not a DType");
  }
  if (!IsValidCodec(static_cast<uint8_t>(task.codec))) {
    return Status::InvalidArgument(
        what + ": codec " + std::to_string(static_cast<int>(task.codec)) + " is not a Codec");
  }
  if (Result<PromptFormat> f = PromptFormat::Create(task.prompt_template, task.separator);
      !f.ok()) {
    return f.status().WithContext(what);
  }
  if (Result<Analyzer> a = Analyzer::Create(task.analyzer); !a.ok()) {
    return a.status().WithContext(what);
  }
  if (task.blocks.demos_per_block == 0 || task.blocks.sink_blocks == 0) {
    return Status::InvalidArgument(what + ": demos per block and sink blocks must be at least 1");
  }
  TaskInfo stored = task;
  stored.num_blocks = stored.num_demos = stored.num_tokens = 0;
  stored.payload_raw_bytes = stored.payload_stored_bytes = stored.version = 0;
  stored.created_unix = static_cast<int64_t>(std::time(nullptr));
  const std::string value = EncodeTaskInfo(stored);

  return Write([&](lmdb::WriteTxn* txn) -> Status {
    Result<uint32_t> next = GetMetaU32(txn->txn, dbs_.meta, kMetaNextTaskId, checked());
    if (!next.ok() && !next.status().IsNotFound()) return next.status();
    uint32_t id = next.ok() ? *next : 1;
    if (id == UINT32_MAX) return Status::IOError(dir_ + ": task ids exhausted");

    MDB_val nk = Val(task.name), existing;
    if (mdb_get(txn->txn, dbs_.task_names, &nk, &existing) == MDB_SUCCESS) {
      return Status::AlreadyExists(what + ": a task of this name exists");
    }
    const std::string id_value = TaskKey(id);
    SHOTDB_RETURN_IF_ERROR(
        PutValue(txn, dbs_.task_names, task.name, id_value, MDB_NOOVERWRITE, what + ": put name"));
    SHOTDB_RETURN_IF_ERROR(
        PutValue(txn, dbs_.tasks, id_value, value, MDB_NOOVERWRITE, what + ": put task record"));
    return PutValue(txn, dbs_.meta, kMetaNextTaskId, U32Value(id + 1), 0,
                    what + ": put next task id");
  });
}

Status Store::DeleteTask(const std::string& name) {
  const std::string what = "task " + name;
  return Write([&](lmdb::WriteTxn* txn) -> Status {
    SHOTDB_ASSIGN_OR_RETURN(const uint32_t id,
                            LookupTaskId(txn->txn, dbs_.task_names, name, checked()));
    MDB_val nk = Val(name);
    SHOTDB_RETURN_IF_ERROR(
        txn->Check(mdb_del(txn->txn, dbs_.task_names, &nk, nullptr), what + ": delete name"));
    const std::string prefix = TaskKey(id);
    for (MDB_dbi dbi : {dbs_.tasks, dbs_.blocks, dbs_.demos, dbs_.payloads, dbs_.demo_docs}) {
      SHOTDB_RETURN_IF_ERROR(lmdb::DeletePrefix(txn, dbi, prefix, what + ": delete"));
    }
    SHOTDB_RETURN_IF_ERROR(Bm25LmdbIndex(dbs_.demo_bm25, checked()).DeleteTask(txn, id));
    return Bm25LmdbIndex(dbs_.bm25, checked()).DeleteTask(txn, id);
  });
}

Status Store::AppendBlock(const std::string& task, const NewBlock& block) {
  const BlockInfo& info = block.info;
  const std::string what = "task " + task + " block " + std::to_string(info.index);
  if (info.token_count == 0) return Status::InvalidArgument(what + ": token_count is 0");
  if (info.demo_ids.size() != block.demos.size()) {
    return Status::InvalidArgument(what + ": " + std::to_string(info.demo_ids.size()) +
                                   " demo ids for " + std::to_string(block.demos.size()) +
                                   " demonstrations");
  }
  for (size_t i = 0; i < block.demos.size(); ++i) {
    if (block.demos[i].id != info.demo_ids[i]) {
      return Status::InvalidArgument(what + ": demonstration " + std::to_string(i) + " has id " +
                                     std::to_string(block.demos[i].id) + ", demo_ids lists " +
                                     std::to_string(info.demo_ids[i]));
    }
  }

  return Write([&](lmdb::WriteTxn* txn) -> Status {
    SHOTDB_ASSIGN_OR_RETURN(const uint32_t id,
                            LookupTaskId(txn->txn, dbs_.task_names, task, checked()));
    const std::string task_key = TaskKey(id);
    SHOTDB_ASSIGN_OR_RETURN(std::string_view task_value,
                            GetValue(txn->txn, dbs_.tasks, task_key, checked(), what));
    SHOTDB_ASSIGN_OR_RETURN(TaskInfo t, DecodeTaskInfo(task_value, "task " + task + " record"));
    int rc = MDB_SUCCESS;

    if (block.model != t.model) {
      return Status::FailedPrecondition(what + ": K/V produced by model " + block.model.ToString() +
                                        ", the task stores " + t.model.ToString());
    }
    if (block.keys.size() != t.model.num_layers || block.values.size() != t.model.num_layers) {
      return Status::FailedPrecondition(what + ": expected " + std::to_string(t.model.num_layers) +
                                        " K and V tensors, got " +
                                        std::to_string(block.keys.size()) + " K and " +
                                        std::to_string(block.values.size()) + " V");
    }
    if (info.index != t.num_blocks) {
      return Status::InvalidArgument(what + ": appended as block " + std::to_string(info.index) +
                                     ", expected the next index " + std::to_string(t.num_blocks));
    }
    if (info.index > 0) {
      SHOTDB_ASSIGN_OR_RETURN(
          std::string_view prev_value,
          GetValue(txn->txn, dbs_.blocks, BlockKey(id, info.index - 1), checked(), what));
      SHOTDB_ASSIGN_OR_RETURN(BlockInfo prev, DecodeBlockInfo(prev_value, what + " predecessor"));
      if (info.position_offset < prev.position_offset + prev.token_count) {
        return Status::InvalidArgument(what + ": position_offset " +
                                       std::to_string(info.position_offset) +
                                       " overlaps the previous block, which ends at " +
                                       std::to_string(prev.position_offset + prev.token_count));
      }
    }

    SHOTDB_RETURN_IF_ERROR(PutValue(txn, dbs_.blocks, BlockKey(id, info.index),
                                    EncodeBlockInfo(info), MDB_NOOVERWRITE,
                                    what + ": put block info"));

    for (const Demonstration& demo : block.demos) {
      const std::string demo_key = DemoKey(id, demo.id);
      MDB_val dk = Val(demo_key), existing;
      if (mdb_get(txn->txn, dbs_.demos, &dk, &existing) == MDB_SUCCESS) {
        return Status::InvalidArgument(what + ": demonstration id " + std::to_string(demo.id) +
                                       " is already stored in the task");
      }
      SHOTDB_RETURN_IF_ERROR(PutValue(txn, dbs_.demos, demo_key, EncodeDemonstration(demo),
                                      MDB_NOOVERWRITE, what + ": put demonstration"));
    }

    const BlockRecordMeta base{t.model.dtype,    TensorKind::kKey, 0,
                               t.model.kv_heads, info.token_count, t.model.head_dim};
    const std::optional<uint64_t> raw_size = BlockRecordRawSize(base);
    if (!raw_size) return Status::InvalidArgument(what + ": tensor size overflows 64 bits");
    uint64_t raw_bytes = 0, stored_bytes = 0;
    for (uint32_t layer = 0; layer < t.model.num_layers; ++layer) {
      for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
        const void* src = kind == TensorKind::kKey ? block.keys[layer] : block.values[layer];
        const std::string rname = RecordName(task, info.index, layer, kind);
        if (src == nullptr) return Status::InvalidArgument(rname + ": tensor pointer is null");
        BlockRecordMeta meta = base;
        meta.kind = kind;
        meta.layer = layer;
        Result<EncodedBlockRecord> rec = EncodeBlockRecord(meta, t.codec, src, *raw_size);
        if (!rec.ok()) return rec.status().WithContext(rname);
        // MDB_RESERVE: LMDB allocates the value and the record is encoded straight into the map.
        std::string payload_key = PayloadKey(id, info.index, layer, kind);
        MDB_val pk = Val(payload_key), pv = Val(nullptr, rec->size());
        rc = mdb_put(txn->txn, dbs_.payloads, &pk, &pv, MDB_RESERVE | MDB_NOOVERWRITE);
        if (rc == MDB_KEYEXIST) {
          return Status::Corruption(rname + ": a payload record exists beyond the last block");
        }
        SHOTDB_RETURN_IF_ERROR(txn->Check(rc, rname + ": put payload"));
        rec->WriteTo(pv.mv_data);
        raw_bytes += *raw_size;
        stored_bytes += rec->size();
      }
    }

    SHOTDB_ASSIGN_OR_RETURN(Analyzer analyzer, Analyzer::Create(t.analyzer));
    SHOTDB_ASSIGN_OR_RETURN(PromptFormat format,
                            PromptFormat::Create(t.prompt_template, t.separator));
    SHOTDB_RETURN_IF_ERROR(Bm25LmdbIndex(dbs_.bm25, checked())
                               .AddDocument(txn, id, info.index, analyzer.Terms(info.text)));
    // Each demonstration, as the model sees it, is also a document of the demonstration index.
    if (t.num_demos + block.demos.size() > UINT32_MAX) {
      return Status::InvalidArgument(what + ": a task holds at most 2^32-1 demonstrations");
    }
    for (size_t i = 0; i < block.demos.size(); ++i) {
      const Demonstration& demo = block.demos[i];
      const uint32_t doc = static_cast<uint32_t>(t.num_demos + i);
      SHOTDB_RETURN_IF_ERROR(
          Bm25LmdbIndex(dbs_.demo_bm25, checked())
              .AddDocument(txn, id, doc, analyzer.Terms(format.FormatDemo(demo.text, demo.label))));
      lmdb::ByteWriter w;
      w.U64(demo.id);
      SHOTDB_RETURN_IF_ERROR(PutValue(txn, dbs_.demo_docs, DemoDocKey(id, doc), w.Take(),
                                      MDB_NOOVERWRITE, what + ": put demonstration number"));
    }

    t.num_blocks += 1;
    t.num_demos += block.demos.size();
    t.num_tokens += info.token_count;
    t.payload_raw_bytes += raw_bytes;
    t.payload_stored_bytes += stored_bytes;
    t.version += 1;
    return PutValue(txn, dbs_.tasks, task_key, EncodeTaskInfo(t), 0, what + ": update task");
  });
}

Result<std::unique_ptr<Snapshot>> Store::BeginSnapshot() const {
  std::lock_guard<std::mutex> lock(txn_mu_);
  MDB_txn* txn = nullptr;
  int rc = mdb_txn_begin(env_, nullptr, MDB_RDONLY, &txn);
  if (rc == MDB_MAP_RESIZED && open_txns_ == 0) {
    // Another process grew the map beyond ours; with no transaction open here we may adopt it.
    rc = mdb_env_set_mapsize(env_, 0);
    if (rc == MDB_SUCCESS) rc = mdb_txn_begin(env_, nullptr, MDB_RDONLY, &txn);
  }
  if (rc == MDB_MAP_RESIZED) {
    return Status::IOError(dir_ + ": the map was grown by another process and " +
                           std::to_string(open_txns_) +
                           " transactions are open in this process; end them and retry");
  }
  if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, dir_ + ": begin snapshot");
  ++open_txns_;
  return std::unique_ptr<Snapshot>(new Snapshot(this, txn));
}

Status Store::CheckNoOrphans(Snapshot& snap, const std::vector<TaskInfo>& tasks) const {
  // Every record's key starts with its task's id: each must belong to a listed task. Walks every
  // key (not the values), one per key with duplicates.
  MDB_txn* txn = snap.txn_;
  std::set<uint32_t> ids;
  uint64_t blocks = 0, demos = 0, payloads = 0;
  for (const TaskInfo& t : tasks) {
    Result<uint32_t> id = snap.TaskId(t.name);
    if (!id.ok()) return id.status();
    ids.insert(*id);
    blocks += t.num_blocks;
    demos += t.num_demos;
    payloads += 2 * static_cast<uint64_t>(t.model.num_layers) * t.num_blocks;
  }
  struct Db {
    const char* name;
    MDB_dbi dbi;
    int64_t expected_entries;  // -1: not known from the task records (postings, statistics)
  };
  std::vector<Db> dbs = {
      {"tasks", dbs_.tasks, static_cast<int64_t>(tasks.size())},
      {"task_names", dbs_.task_names, static_cast<int64_t>(tasks.size())},
      {"blocks", dbs_.blocks, static_cast<int64_t>(blocks)},
      {"demos", dbs_.demos, static_cast<int64_t>(demos)},
      {"payloads", dbs_.payloads, static_cast<int64_t>(payloads)},
      {"postings", dbs_.bm25.postings, -1},
      {"doc_lengths", dbs_.bm25.doc_lengths, static_cast<int64_t>(blocks)},
      {"bm25_stats", dbs_.bm25.stats, -1},
  };
  if (format_version_ >= 2) {
    dbs.push_back({"demo_postings", dbs_.demo_bm25.postings, -1});
    dbs.push_back({"demo_doc_lengths", dbs_.demo_bm25.doc_lengths, static_cast<int64_t>(demos)});
    dbs.push_back({"demo_bm25_stats", dbs_.demo_bm25.stats, -1});
    dbs.push_back({"demo_docs", dbs_.demo_docs, static_cast<int64_t>(demos)});
  }
  for (const Db& db : dbs) {
    const std::string what = dir_ + ": database " + db.name;
    MDB_stat ms;
    int rc = mdb_stat(txn, db.dbi, &ms);
    if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, what + ": stat");
    if (db.expected_entries >= 0 && ms.ms_entries != static_cast<uint64_t>(db.expected_entries)) {
      return Status::Corruption(what + " holds " + std::to_string(ms.ms_entries) +
                                " records; the tasks account for " +
                                std::to_string(db.expected_entries));
    }
    if (std::strcmp(db.name, "task_names") == 0) continue;  // keyed by name; the values are ids
    MDB_cursor* cursor = nullptr;
    rc = mdb_cursor_open(txn, db.dbi, &cursor);
    if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, what + ": cursor");
    MDB_val k, v;
    Status status;
    for (rc = mdb_cursor_get(cursor, &k, &v, MDB_FIRST); rc == MDB_SUCCESS;
         rc = mdb_cursor_get(cursor, &k, &v, MDB_NEXT_NODUP)) {
      const uint32_t id = k.mv_size < 4 ? 0 : lmdb::LoadBE32(k.mv_data);
      if (k.mv_size < 4 || ids.count(id) == 0) {
        status = Status::Corruption(what + " holds a record of task id " + std::to_string(id) +
                                    (k.mv_size < 4 ? " (a key too short)" : "") +
                                    ", which no listed task has (an orphan)");
        break;
      }
    }
    mdb_cursor_close(cursor);
    if (!status.ok()) return status;
    if (rc != MDB_SUCCESS && rc != MDB_NOTFOUND) return lmdb::ToStatus(rc, what + ": walk");
  }
  return Status::OK();
}

Status Store::Verify(const std::string& task, VerifyReport* report,
                     const VerifyProgress& progress) const {
  VerifyReport local;
  VerifyReport& r = report != nullptr ? *report : local;
  r = VerifyReport{};
  auto problem = [&r](const Status& s) {
    if (r.problems.size() < VerifyReport::kMaxProblems) r.problems.push_back(s.message());
  };

  // First the file's structure: on a damaged page, reading on through LMDB could crash.
  Result<lmdb::StructureStats> structure = lmdb::CheckLmdbStructure(env_);
  if (!structure.ok()) {
    problem(structure.status());
    return structure.status();
  }
  r.pages_checked = structure->pages;

  SHOTDB_ASSIGN_OR_RETURN(std::unique_ptr<Snapshot> snap, BeginSnapshot());
  std::vector<TaskInfo> tasks;
  if (task.empty()) {
    SHOTDB_ASSIGN_OR_RETURN(tasks, snap->ListTasks());
  } else {
    SHOTDB_ASSIGN_OR_RETURN(TaskInfo one, snap->GetTask(task));
    tasks.push_back(std::move(one));
  }
  uint64_t total = 0;
  for (const TaskInfo& t : tasks) total += t.num_blocks * 2 * t.model.num_layers;

  Bm25LmdbIndex index(dbs_.bm25, checked());
  for (const TaskInfo& t : tasks) {
    const std::string what = "task " + t.name;
    ++r.tasks_checked;
    uint64_t demos = 0, tokens = 0, raw = 0, stored = 0;
    bool all_parsed = true;  // the byte counters can only be compared if every header was read
    for (uint64_t b = 0; b < t.num_blocks; ++b) {
      const uint32_t bi = static_cast<uint32_t>(b);
      Result<BlockInfo> block = snap->GetBlock(t.name, bi);
      ++r.blocks_checked;
      uint32_t tokens_of_block = 0;
      if (!block.ok()) {
        problem(block.status());
      } else {
        tokens_of_block = block->token_count;
        demos += block->demo_ids.size();
        tokens += block->token_count;
        for (uint64_t demo_id : block->demo_ids) {
          Result<Demonstration> demo = snap->GetDemonstration(t.name, demo_id);
          if (!demo.ok()) problem(demo.status());
        }
      }
      for (uint32_t layer = 0; layer < t.model.num_layers; ++layer) {
        for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
          const std::string rname = RecordName(t.name, bi, layer, kind);
          Result<BlockRecordView> view = snap->GetRecord(t.name, bi, layer, kind);
          ++r.records_checked;
          if (!view.ok()) {
            problem(view.status());
            all_parsed = false;
            continue;
          }
          raw += view->header.raw_size;
          stored += kBlockRecordHeaderSize + view->payload_size;
          Status s = block.ok() ? CheckRecordMatches(*view, t, layer, kind, tokens_of_block, rname)
                                : Status::OK();
          if (s.ok()) s = VerifyBlockRecord(*view, rname);
          if (!s.ok()) {
            problem(s);
          } else {
            r.raw_bytes_checked += view->header.raw_size;
          }
        }
      }
      if (progress) progress(r.records_checked, total);
    }
    // Nothing may exist beyond the last counted block.
    if (snap->GetBlock(t.name, static_cast<uint32_t>(t.num_blocks)).ok()) {
      problem(Status::Corruption(what + ": block " + std::to_string(t.num_blocks) +
                                 " exists beyond num_blocks"));
    }
    if (demos != t.num_demos || tokens != t.num_tokens ||
        (all_parsed && (raw != t.payload_raw_bytes || stored != t.payload_stored_bytes))) {
      problem(Status::Corruption(
          what + ": counters say " + std::to_string(t.num_demos) + " demos, " +
          std::to_string(t.num_tokens) + " tokens, " + std::to_string(t.payload_raw_bytes) +
          " raw / " + std::to_string(t.payload_stored_bytes) + " stored bytes; records hold " +
          std::to_string(demos) + ", " + std::to_string(tokens) + ", " + std::to_string(raw) +
          " / " + std::to_string(stored)));
    }
    Result<uint32_t> id = snap->TaskId(t.name);
    if (!id.ok()) {
      problem(id.status());
    } else {
      Status s = index.Verify(snap->txn_, *id, static_cast<uint32_t>(t.num_blocks));
      if (!s.ok()) problem(s.WithContext(what + " block index"));
      if (format_version_ >= 2) {
        s = Bm25LmdbIndex(dbs_.demo_bm25, checked())
                .Verify(snap->txn_, *id, static_cast<uint32_t>(t.num_demos));
        if (!s.ok()) problem(s.WithContext(what + " demonstration index"));
        // Every demonstration number maps to a stored demonstration, none beyond num_demos.
        for (uint64_t d = 0; d <= t.num_demos && d <= UINT32_MAX; ++d) {
          Result<Demonstration> demo = snap->DemoAt(t.name, static_cast<uint32_t>(d));
          if (d < t.num_demos && !demo.ok()) {
            problem(demo.status());
          } else if (d == t.num_demos && !demo.status().IsNotFound()) {
            problem(Status::Corruption(what + ": demonstration #" + std::to_string(d) +
                                       " exists beyond num_demos"));
          }
        }
      }
    }
  }
  if (task.empty()) {
    Status s = CheckNoOrphans(*snap, tasks);
    if (!s.ok()) problem(s);
  }
  if (r.problems.empty()) return Status::OK();
  std::string msg = r.problems.front();
  if (r.problems.size() > 1) msg += " (and " + std::to_string(r.problems.size() - 1) + " more)";
  return Status::Corruption(msg);
}

Result<StoreStats> Store::Stats() const {
  StoreStats stats;
  SHOTDB_ASSIGN_OR_RETURN(std::unique_ptr<Snapshot> snap, BeginSnapshot());
  SHOTDB_ASSIGN_OR_RETURN(std::vector<TaskInfo> tasks, snap->ListTasks());
  for (const TaskInfo& t : tasks) {
    TaskStats ts;
    ts.name = t.name;
    ts.codec = t.codec;
    ts.blocks = t.num_blocks;
    ts.demos = t.num_demos;
    ts.tokens = t.num_tokens;
    ts.payload_raw_bytes = t.payload_raw_bytes;
    ts.payload_stored_bytes = t.payload_stored_bytes;
    ts.compression_ratio = t.payload_stored_bytes == 0
                               ? 0.0
                               : static_cast<double>(t.payload_raw_bytes) /
                                     static_cast<double>(t.payload_stored_bytes);
    stats.tasks.push_back(std::move(ts));
  }
  const std::pair<const char*, MDB_dbi> dbs[] = {
      {"meta", dbs_.meta},
      {"task_names", dbs_.task_names},
      {"tasks", dbs_.tasks},
      {"blocks", dbs_.blocks},
      {"demos", dbs_.demos},
      {"payloads", dbs_.payloads},
      {"postings", dbs_.bm25.postings},
      {"doc_lengths", dbs_.bm25.doc_lengths},
      {"bm25_stats", dbs_.bm25.stats},
      {"demo_postings", dbs_.demo_bm25.postings},
      {"demo_doc_lengths", dbs_.demo_bm25.doc_lengths},
      {"demo_bm25_stats", dbs_.demo_bm25.stats},
      {"demo_docs", dbs_.demo_docs},
  };
  for (const auto& [name, dbi] : dbs) {
    if (format_version_ < 2 && std::strncmp(name, "demo_", 5) == 0) continue;
    MDB_stat ms;
    int rc = mdb_stat(snap->txn_, dbi, &ms);
    if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, dir_ + ": stat of database " + name);
    stats.dbs.push_back(DbStats{name, ms.ms_entries, ms.ms_depth, ms.ms_branch_pages,
                                ms.ms_leaf_pages, ms.ms_overflow_pages});
  }
  MDB_envinfo info;
  MDB_stat env_stat;
  mdb_env_info(env_, &info);
  mdb_env_stat(env_, &env_stat);
  stats.page_size = env_stat.ms_psize;
  stats.map_size = info.me_mapsize;
  stats.last_page = info.me_last_pgno;
  stats.used_bytes = (static_cast<uint64_t>(info.me_last_pgno) + 1) * env_stat.ms_psize;
  struct stat st;
  std::string data_file = dir_ + "/data.mdb";
  if (::stat(data_file.c_str(), &st) != 0) {
    return Status::IOError(data_file + ": stat: " + std::strerror(errno));
  }
  stats.file_size = static_cast<uint64_t>(st.st_size);
  return stats;
}

Status Store::Compact(const std::string& dest_dir) const {
  if (::mkdir(dest_dir.c_str(), 0755) != 0 && errno != EEXIST) {
    return Status::IOError(dest_dir + ": mkdir: " + std::strerror(errno));
  }
  struct stat st;
  std::string dest_file = dest_dir + "/data.mdb";
  if (::stat(dest_file.c_str(), &st) == 0) {
    return Status::AlreadyExists(dest_dir + ": already holds a store (data.mdb)");
  }
  // The copy runs its own read transaction: count it so the map is not resized under it.
  {
    std::lock_guard<std::mutex> lock(txn_mu_);
    ++open_txns_;
  }
  int rc = mdb_env_copy2(env_, dest_dir.c_str(), MDB_CP_COMPACT);
  EndTxn();
  if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, dir_ + ": compact into " + dest_dir);
  return Status::OK();
}

}  // namespace shotdb
