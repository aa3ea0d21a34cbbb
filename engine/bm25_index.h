// The persisted BM25 index of a store: posting lists, document lengths and corpus statistics kept
// in LMDB and updated inside the caller's write transaction, so that a block's postings become
// visible in the same commit as the block itself (docs/storage.md, "BM25 index").
//
// Layout (all keys start with the 4-byte big-endian task id, so a task is one key range per DB):
//   postings     task | term key  ->  dups of 12 bytes: big-endian doc id, big-endian tf, and
//                lmdb::PostingCheck(term key, doc, tf) (store formats 1 and 2: 8 bytes, no check)
//                (MDB_DUPSORT | MDB_DUPFIXED: the dups of a term sort by doc id, and appending a
//                document adds one dup per distinct term; mdb_cursor_count gives the df)
//   doc_lengths  task | doc (BE32) ->  u32 LE length in tokens, sealed (lmdb::Seal; format 3)
//   bm25_stats   task             ->  Bm25CorpusStats (N, total length, df histogram), sealed
// A term key is the term's bytes; a term longer than kMaxTermKeyBytes is stored as its first
// kLongTermPrefixBytes bytes, a NUL byte and the big-endian xxh3-64 of the whole term (LMDB keys
// are limited to 511 bytes). Queries map terms the same way, so long terms still match.
//
// This class is an internal part of Store: it holds only DB handles, is stateless and thread-safe;
// every call works inside the transaction it is given and inherits that transaction's rules.
#ifndef SHOTDB_ENGINE_BM25_INDEX_H_
#define SHOTDB_ENGINE_BM25_INDEX_H_

#include <lmdb.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/bm25.h"
#include "engine/lmdb_util.h"
#include "util/status.h"

namespace shotdb {

constexpr size_t kMaxTermKeyBytes = 255;
constexpr size_t kLongTermPrefixBytes = 240;

class Bm25LmdbIndex {
 public:
  struct Dbs {
    MDB_dbi postings = 0;
    MDB_dbi doc_lengths = 0;
    MDB_dbi stats = 0;
  };
  // `checked`: the store format-3 layout (sealed values, checked postings); false reads formats 1
  // and 2.
  Bm25LmdbIndex(Dbs dbs, bool checked) : dbs_(dbs), checked_(checked) {}

  // The key of `term` in the postings DB of task `task_id` (see the layout above).
  static std::string TermKey(uint32_t task_id, std::string_view term);

  // Adds document `doc` with the given tokens (duplicates counted) to task `task_id`'s index, in
  // the write transaction `txn`. `doc` must equal the current number of documents (documents are
  // dense and appended in order). Returns OK; InvalidArgument if doc is not the next id;
  // Corruption if the stored statistics disagree with the postings; IOError if LMDB fails (with
  // txn->map_full set when the map is full); after an error the transaction must be aborted.
  Status AddDocument(lmdb::WriteTxn* txn, uint32_t task_id, uint32_t doc,
                     const std::vector<std::string>& tokens) const;

  // The corpus statistics of the task (all zero for a task with no documents).
  Result<Bm25CorpusStats> LoadStats(MDB_txn* txn, uint32_t task_id) const;

  // The k best of the task's `num_docs` documents for the query tokens (duplicates count again),
  // exactly as Bm25TopK / Bm25MemoryIndex::TopK over the same documents: same scores bit for bit,
  // order by score descending then doc ascending. Returns Corruption if the stored index is
  // inconsistent (a posting beyond num_docs, a df above it, a missing document length).
  Result<std::vector<ScoredDoc>> Search(MDB_txn* txn, uint32_t task_id, uint32_t num_docs,
                                        const std::vector<std::string>& query_tokens, size_t k,
                                        const Bm25Params& params) const;

  // Checks the task's statistics against its documents: N == num_docs, total length == sum of the
  // stored document lengths, one length per document; and every posting of the task: its check
  // word, a doc below num_docs, tf >= 1, and that the dfs match the statistics' histogram.
  // Returns OK or Corruption.
  Status Verify(MDB_txn* txn, uint32_t task_id, uint32_t num_docs) const;

  // Removes every posting, length and the statistics of the task, in the write transaction.
  Status DeleteTask(lmdb::WriteTxn* txn, uint32_t task_id) const;

 private:
  // For a query term with no postings (checked_ only): Corruption if a neighbouring key's posting
  // fails its check word, i.e. the term's key was damaged but still sorts in its place.
  Status CheckNeighbours(MDB_cursor* c, const std::string& key, const std::string& token,
                         const std::string& what) const;
  // The size of a stored posting: 12 bytes with its check word (format 3), else 8.
  size_t posting_size() const;
  // A document's length from its stored doc_lengths value (unsealed when checked_).
  Result<uint32_t> DecodeLength(std::string_view key, std::string_view stored,
                                const std::string& what) const;

  Dbs dbs_;
  bool checked_;
};

}  // namespace shotdb

#endif  // SHOTDB_ENGINE_BM25_INDEX_H_
