// Store: the persistent home of shotdb's tasks, demonstration blocks, their per-layer K/V payloads
// and the BM25 index over the block texts, in one LMDB environment per store directory.
// docs/storage.md describes the layout and the guarantees in more detail.
//
// Guarantees, in plain terms:
//   - Atomic appends. Everything of one block (its K and V for every layer, its BlockInfo, its
//     demonstrations, its BM25 postings, the corpus statistics and the task counters) is written in
//     ONE LMDB write transaction. The commit makes it visible; a crash (process kill, power loss
//     with sync on) at any moment before the commit returns leaves no trace of the block, and after
//     the commit returns the block is durable (sync on) and visible to every new snapshot.
//   - Two BM25 indexes per task, updated in the block's transaction: one over block texts
//     (Search, DBSA's block selection) and one over single demonstrations, each formatted with the
//     task's template (SearchDemos, the example-level RetICL baseline), both with the task's
//     analyzer and BM25 parameters. Demonstration documents are numbered 0, 1, 2, ... in pool
//     order (block by block, in each block's order).
//   - One writer, many readers, in one process and across processes (LMDB's lock file). Writes are
//     serialized; readers never block the writer nor each other, and never see a partial block.
//   - Snapshots. A Snapshot is a consistent read view fixed when it begins: blocks appended later
//     are invisible to it. Payload bytes of Codec::kRaw records are returned zero-copy from the
//     memory map and stay valid while the Snapshot lives.
//   - Damage is reported, never returned. Every payload record carries an xxh3 of its raw bytes and
//     of its header; GetPayload (by default), DecodePayloadInto and Verify check them and return
//     Corruption naming the task, block, layer and K/V.
//   - A long-lived snapshot pins the pages it sees: space freed by later deletes is reused only
//     after it ends. Deleted space is reused, but the file never shrinks; Compact() writes a
//     compacted copy.
//
// Thread-safety: Store is thread-safe (all methods may be called concurrently; writers queue). A
// Snapshot is NOT: use one Snapshot from one thread at a time (different Snapshots in different
// threads are fine). The Store must outlive its Snapshots. A Store must not be used in a child
// process after fork(): open a new one there (LMDB's rule).
#ifndef SHOTDB_ENGINE_STORE_H_
#define SHOTDB_ENGINE_STORE_H_

#include <lmdb.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "engine/bm25.h"
#include "engine/bm25_index.h"
#include "engine/task.h"
#include "format/block_record.h"
#include "util/status.h"

namespace shotdb {

// The on-disk layout version of a store (meta DB key "format_version"). Version 2 added the
// per-demonstration BM25 index and the task record's position scheme, analyzer and idf; version 3
// seals every record with a checksum (lmdb::Seal) and adds a check word to every posting. Open
// refuses other versions, except that version-1 and version-2 stores open read-only (every read
// works, unchecked; version 1 has no SearchDemos), so that their tasks can be exported and
// imported into a version-3 store.
constexpr uint32_t kStoreFormatVersion = 3;

struct NewBlock {
  // The model that produced keys/values; must equal the task's fingerprint.
  ModelFingerprint model;
  // info.index must equal the task's num_blocks (appends are dense and in order);
  // info.demo_ids must list the ids of `demos`, in the same order.
  BlockInfo info;
  std::vector<Demonstration> demos;
  // One pointer per layer (model.num_layers each): raw [kv_heads, info.token_count, head_dim]
  // tensors in model.dtype, row-major, before RoPE. Only read during AppendBlock.
  std::vector<const void*> keys, values;
};

// One payload tensor as read from a Snapshot. Move-only: `data` may point into `owned`.
struct PayloadRef {
  BlockRecordHeader header;
  // header.raw_size raw bytes, always aligned for the element type: for Codec::kRaw zero-copy
  // into the memory map (valid while the Snapshot lives) when the record sits at an aligned
  // address, which LMDB guarantees for records larger than half a page; else decoded or copied
  // into `owned`.
  const void* data = nullptr;
  size_t size = 0;
  std::vector<uint8_t> owned;

  PayloadRef() = default;
  PayloadRef(PayloadRef&&) = default;
  PayloadRef& operator=(PayloadRef&&) = default;
  PayloadRef(const PayloadRef&) = delete;
  PayloadRef& operator=(const PayloadRef&) = delete;
};

struct VerifyReport {
  uint64_t tasks_checked = 0;
  uint64_t blocks_checked = 0;
  uint64_t records_checked = 0;    // payload records whose checksums were recomputed
  uint64_t raw_bytes_checked = 0;  // their decoded size
  uint64_t pages_checked = 0;      // LMDB pages whose structure was checked (whole file)
  // One line per problem found ("task nlu block 3 layer 7 K: ..."), at most kMaxProblems.
  std::vector<std::string> problems;
  static constexpr size_t kMaxProblems = 1000;
};
// Called after each block with the payload records checked so far and the total to check.
using VerifyProgress = std::function<void(uint64_t records_done, uint64_t records_total)>;

struct TaskStats {
  std::string name;
  Codec codec = Codec::kRaw;
  uint64_t blocks = 0, demos = 0, tokens = 0;
  uint64_t payload_raw_bytes = 0;     // decoded K/V bytes
  uint64_t payload_stored_bytes = 0;  // record bytes as stored (headers included)
  double compression_ratio = 0;       // raw / stored (0 for an empty task)
};
struct DbStats {  // mdb_stat of one named database
  std::string name;
  uint64_t entries = 0, depth = 0, branch_pages = 0, leaf_pages = 0, overflow_pages = 0;
};
struct StoreStats {
  std::vector<TaskStats> tasks;  // by name
  std::vector<DbStats> dbs;
  uint32_t page_size = 0;
  uint64_t map_size = 0;    // current address space reserved for the map
  uint64_t last_page = 0;   // highest page number in use
  uint64_t used_bytes = 0;  // (last_page + 1) * page_size: the file's live high-water mark
  uint64_t file_size = 0;   // size of data.mdb
};

class Store;

// A consistent read view of the store (one LMDB read transaction). Obtained from
// Store::BeginSnapshot; ends when destroyed. Not thread-safe (see above).
// Every method returns NotFound naming the object when the task, block, demonstration or record
// does not exist in this view, and Corruption when stored bytes fail a check.
class Snapshot {
 public:
  ~Snapshot();
  Snapshot(const Snapshot&) = delete;
  Snapshot& operator=(const Snapshot&) = delete;

  Result<TaskInfo> GetTask(const std::string& name);
  // All tasks, ordered by name.
  Result<std::vector<TaskInfo>> ListTasks();
  Result<BlockInfo> GetBlock(const std::string& task, uint32_t index);
  Result<Demonstration> GetDemonstration(const std::string& task, uint64_t id);

  // The stored record of one layer's K or V, its header checked (not its payload); the view points
  // into the map and is valid while this Snapshot lives.
  Result<BlockRecordView> GetRecord(const std::string& task, uint32_t block, uint32_t layer,
                                    TensorKind kind);
  // The K and V records of several layers of one block, as GetRecord returns them (headers
  // checked, payloads not): out[2 * i] is layers[i]'s K and out[2 * i + 1] its V. One task lookup
  // and one cursor walking the block's records, which are adjacent keys: for the layers of a block
  // in ascending order this costs a step per record instead of a lookup from the tree's root (and
  // builds no record names unless one fails). Layers in any order, repeats allowed.
  Result<std::vector<BlockRecordView>> GetBlockRecords(const std::string& task, uint32_t block,
                                                       const std::vector<uint32_t>& layers);
  // The raw tensor. With verify_checksum the raw bytes' xxh3 is recomputed (for compressed codecs
  // decoding always verifies it). Also checks that the header's layer, kind, dtype and shape agree
  // with the key and the task. Returns Corruption if not, never damaged bytes.
  Result<PayloadRef> GetPayload(const std::string& task, uint32_t block, uint32_t layer,
                                TensorKind kind, bool verify_checksum = true);
  // GetPayload of the K and V of several layers of one block: out[2 * i] is layers[i]'s K and
  // out[2 * i + 1] its V, with the same checks and the same errors. One task and one block lookup
  // and one cursor walk (GetBlockRecords) for all of them, where GetPayload repeats the three for
  // every record (~4 us a record; a CPU DBSA query over 20 blocks of a 30-layer model reads 1,200).
  Result<std::vector<PayloadRef>> GetBlockPayloads(const std::string& task, uint32_t block,
                                                   const std::vector<uint32_t>& layers,
                                                   bool verify_checksum = true);
  // Decodes (and verifies) the tensor into `dst`, which must hold exactly its raw size (else
  // InvalidArgument). On Corruption the contents of dst are unspecified.
  Status DecodePayloadInto(const std::string& task, uint32_t block, uint32_t layer, TensorKind kind,
                           void* dst, size_t size);

  // The k best blocks of the task for `query` under BM25 (the task's analyzer and parameters), as
  // Bm25TopK: ScoredDoc::doc is the block index; ordered by score descending, then by index
  // ascending; min(k, num_blocks) entries.
  Result<std::vector<ScoredDoc>> Search(const std::string& task, std::string_view query, size_t k);

  // The same over the task's single demonstrations: ScoredDoc::doc is the demonstration's number
  // in pool order (DemoAt maps it to the demonstration); min(k, num_demos) entries. NotSupported
  // in a format-1 store (it has no such index).
  Result<std::vector<ScoredDoc>> SearchDemos(const std::string& task, std::string_view query,
                                             size_t k);
  // The demonstration numbered `doc` in pool order (0 <= doc < num_demos).
  Result<Demonstration> DemoAt(const std::string& task, uint32_t doc);

  // The part of the memory map that holds this view's records: [base, base + bytes), page aligned
  // (bytes = the file's live high-water mark, StoreStats::used_bytes). Every GetRecord view and
  // zero-copy payload lies inside. For registering the map with a DMA engine (gpu::Stager copies
  // raw records straight from it). Stable while this Snapshot lives: LMDB moves the map only when
  // it grows, which Store does only while no Snapshot of this process is open.
  // LMDB does not tell where it mapped the file, so the mapping is looked up in /proc/self/maps
  // (once per map size); NotSupported if it cannot be found there (no procfs).
  struct MappedRange {
    const uint8_t* base = nullptr;
    size_t bytes = 0;
    size_t reserved = 0;  // address space reserved at base (Options::map_size, or grown)
  };
  Result<MappedRange> Mapped() const;

 private:
  friend class Store;
  Snapshot(const Store* store, MDB_txn* txn) : store_(store), txn_(txn) {}
  Result<uint32_t> TaskId(const std::string& name);
  Result<TaskInfo> TaskById(uint32_t id, const std::string& name);

  const Store* store_;
  MDB_txn* txn_;
};

class Store {
 public:
  struct Options {
    bool read_only = false;
    bool create_if_missing = true;
    // Address space reserved for the map; the file grows only as pages are written. A write that
    // outgrows it doubles it (when this process has no open Snapshot) and retries.
    size_t map_size = size_t(1) << 40;
    // The most the map may grow to (0: no limit). A write that would need more fails with IOError
    // ("map full ... max_map_size ...") and stores nothing; everything committed stays readable,
    // and a Store opened with a larger limit continues.
    size_t max_map_size = 0;
    // fsync at every commit. Without it a process crash still loses nothing committed, but an OS
    // crash or power loss may lose recent commits or damage the file (LMDB's MDB_NOSYNC).
    bool sync = true;
    // Check the LMDB file's structure before first use (engine/lmdb_check.h): LMDB trusts its
    // pages, and a damaged one can crash a reader; checked, Open returns Corruption instead.
    // Reads every branch and leaf page, and for a writer (not read_only) also the first page of
    // each large value, whose header LMDB's writers rely on; never the payload bytes
    // (docs/storage.md has its cost). Damage that appears after Open is not covered: run Verify,
    // which always checks fully.
    bool check_structure = true;
  };

  // Opens (or, with create_if_missing and not read_only, creates) the store in directory `dir`.
  // Returns the store, or NotFound if it does not exist and may not be created; NotSupported for
  // another store format version; InvalidArgument if `dir` holds an LMDB file that is not a
  // shotdb store; Corruption if the file is damaged (the structure check, or LMDB); IOError for OS
  // failures.
  static Result<std::unique_ptr<Store>> Open(const std::string& dir, const Options& options);
  // (A version-1 store opened without read_only is refused with NotSupported, naming the way out.)
  static Result<std::unique_ptr<Store>> Open(const std::string& dir) { return Open(dir, {}); }
  ~Store();
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // Creates an empty task. The store-maintained fields of `task` are ignored. Returns OK;
  // AlreadyExists if the name is taken; InvalidArgument for an empty name or one over 255 bytes, a
  // zero layer/head/head_dim count, an unknown dtype/codec, a prompt template PromptFormat
  // rejects, analyzer options Analyzer rejects, or a block config with zero demos per block or
  // sink blocks; IOError if read-only or LMDB fails.
  Status CreateTask(const TaskInfo& task);

  // Removes the task and everything of it (blocks, demonstrations, payloads, index) in one
  // transaction. Other tasks are untouched; a later task of the same name gets a new id. Returns OK
  // or NotFound. Space is reused by later writes; the file does not shrink (see Compact).
  Status DeleteTask(const std::string& name);

  // Appends one block to the task, atomically (see the header comment). Returns OK, or:
  //   NotFound           no such task;
  //   FailedPrecondition block.model differs from the task's fingerprint, or keys/values do not
  //                      hold one tensor per layer (the message says expected vs got);
  //   InvalidArgument    info.index != num_blocks, token_count == 0, a null tensor pointer,
  //                      demo_ids not matching demos, a demo id already in the task, or a
  //                      position_offset before the end of the previous block;
  //   IOError            read-only store, map full with Snapshots open in this process (close
  //                      them and retry), map full at Options::max_map_size, the disk full, or
  //                      another LMDB / OS failure.
  // On any error nothing of the block is stored.
  Status AppendBlock(const std::string& task, const NewBlock& block);

  // Begins a consistent read view. Returns IOError if LMDB refuses (e.g. too many readers, or the
  // map was grown by another process while this process holds other Snapshots).
  Result<std::unique_ptr<Snapshot>> BeginSnapshot() const;

  // Checks the LMDB file's structure (engine/lmdb_check.h; on damage nothing else is read), then
  // checks the task (empty name: every task) in one snapshot: every payload checksum, every
  // record checksum and posting check word (format 3); each block 0..num_blocks-1 present with
  // its demonstrations and both tensors of every layer, headers matching the task, counters
  // matching the records, BM25 statistics matching the documents; for the whole store (empty
  // name), also that every key of every database belongs to a listed task and each database's
  // record count is what the tasks account for (no orphans). Fills *report (may be null) and
  // calls `progress` (may be empty). Returns OK if nothing is wrong, Corruption with the first
  // problem otherwise, NotFound for an unknown task.
  Status Verify(const std::string& task, VerifyReport* report,
                const VerifyProgress& progress = {}) const;

  // Sizes per task and LMDB page usage.
  Result<StoreStats> Stats() const;

  // Writes a compacted copy of the store (free pages omitted, a consistent snapshot) into
  // `dest_dir`, which is created if missing and must not already hold a store (AlreadyExists).
  Status Compact(const std::string& dest_dir) const;

  const std::string& dir() const { return dir_; }
  bool read_only() const { return options_.read_only; }
  // Whether every record carries a checksum (store format 3; older stores are read as they are).
  bool checked() const { return format_version_ >= 3; }
  uint32_t format_version() const { return format_version_; }

 private:
  friend class Snapshot;
  struct Dbs {
    MDB_dbi meta, task_names, tasks, blocks, demos, payloads;
    Bm25LmdbIndex::Dbs bm25;       // over block texts
    Bm25LmdbIndex::Dbs demo_bm25;  // over single demonstrations (format 2)
    MDB_dbi demo_docs;             // task | doc number (BE32) -> demonstration id (format 2)
  };
  Store(std::string dir, Options options, MDB_env* env)
      : dir_(std::move(dir)), options_(options), env_(env) {}
  Status OpenDbs();
  // Runs `body` in a write transaction and commits it; on MDB_MAP_FULL grows the map and runs it
  // again. `body` must only touch the transaction (it may run more than once).
  Status Write(const std::function<Status(lmdb::WriteTxn*)>& body);
  // Transaction accounting: the map may only be resized while this process has no transaction.
  void EndTxn() const;
  // Verify's whole-store part: every database's record count equals what the tasks account for
  // (where the task records determine it), and every key belongs to a listed task.
  Status CheckNoOrphans(Snapshot& snap, const std::vector<TaskInfo>& tasks) const;

  std::string dir_;
  Options options_;
  MDB_env* env_;
  Dbs dbs_{};
  uint32_t format_version_ = kStoreFormatVersion;  // of the opened store (1 and 2 only read-only)
  mutable std::mutex write_mu_;                    // one writer at a time in this process
  mutable std::mutex txn_mu_;  // guards open_txns_, map resizing and the two below
  mutable int open_txns_ = 0;
  mutable const uint8_t* map_base_ = nullptr;  // where data.mdb is mapped, for map size
  mutable size_t map_base_size_ = 0;           // the map size it was found for (0: not yet)
};

}  // namespace shotdb

#endif  // SHOTDB_ENGINE_STORE_H_
