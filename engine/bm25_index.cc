#include "engine/bm25_index.h"

#include <xxhash.h>

#include <map>
#include <unordered_map>

namespace shotdb {
namespace {

using lmdb::AppendBE32;
using lmdb::Val;

constexpr size_t kPostingSize = 12;   // BE32 doc, BE32 tf, BE32 check word (format 3)
constexpr size_t kPostingSizeV1 = 8;  // BE32 doc, BE32 tf (formats 1 and 2)

// Whether the checked posting at `p` (kPostingSize bytes) matches its check word, for a term key
// whose lmdb::PostingSeed is `seed`.
bool PostingIntact(const uint8_t* p, uint64_t seed) {
  return lmdb::LoadBE32(p + 8) ==
         lmdb::PostingCheck(seed, lmdb::LoadBE32(p), lmdb::LoadBE32(p + 4));
}

std::string TaskKey(uint32_t task_id) {
  std::string key;
  AppendBE32(&key, task_id);
  return key;
}

std::string DocKey(uint32_t task_id, uint32_t doc) {
  std::string key = TaskKey(task_id);
  AppendBE32(&key, doc);
  return key;
}

std::string EncodeStats(const Bm25CorpusStats& s) {
  lmdb::ByteWriter w;
  w.U64(s.num_docs);
  w.U64(s.total_doc_length);
  w.U32(static_cast<uint32_t>(s.df_histogram.size()));
  for (const auto& [df, count] : s.df_histogram) {
    w.U32(df);
    w.U64(count);
  }
  return w.Take();
}

Result<Bm25CorpusStats> DecodeStats(std::string_view bytes, const std::string& what) {
  lmdb::ByteReader r(bytes, what);
  Bm25CorpusStats s;
  uint32_t n = 0;
  r.U64(&s.num_docs);
  r.U64(&s.total_doc_length);
  r.U32(&n);
  for (uint32_t i = 0; i < n && !r.failed(); ++i) {
    uint32_t df = 0;
    uint64_t count = 0;
    if (r.U32(&df) && r.U64(&count)) s.df_histogram[df] = count;
  }
  SHOTDB_RETURN_IF_ERROR(r.Finish());
  return s;
}

}  // namespace

size_t Bm25LmdbIndex::posting_size() const { return checked_ ? kPostingSize : kPostingSizeV1; }

Result<uint32_t> Bm25LmdbIndex::DecodeLength(std::string_view key, std::string_view stored,
                                             const std::string& what) const {
  std::string_view value = stored;
  if (checked_) {
    SHOTDB_ASSIGN_OR_RETURN(value, lmdb::Unseal(key, stored, what));
  }
  if (value.size() != 4) return Status::Corruption(what + ": a document length is malformed");
  const auto* p = reinterpret_cast<const uint8_t*>(value.data());
  return static_cast<uint32_t>(p[0] | (p[1] << 8) | (p[2] << 16)) |
         (static_cast<uint32_t>(p[3]) << 24);
}

std::string Bm25LmdbIndex::TermKey(uint32_t task_id, std::string_view term) {
  std::string key = TaskKey(task_id);
  if (term.size() <= kMaxTermKeyBytes) {
    key.append(term.data(), term.size());
    return key;
  }
  key.append(term.data(), kLongTermPrefixBytes);
  key.push_back('\0');
  lmdb::AppendBE64(&key, XXH3_64bits(term.data(), term.size()));
  return key;
}

Result<Bm25CorpusStats> Bm25LmdbIndex::LoadStats(MDB_txn* txn, uint32_t task_id) const {
  std::string key = TaskKey(task_id);
  MDB_val k = Val(key), v;
  int rc = mdb_get(txn, dbs_.stats, &k, &v);
  if (rc == MDB_NOTFOUND) return Bm25CorpusStats{};
  if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, "bm25_stats get");
  const std::string what = "bm25_stats of task id " + std::to_string(task_id);
  std::string_view value = lmdb::View(v);
  if (checked_) {
    SHOTDB_ASSIGN_OR_RETURN(value, lmdb::Unseal(key, value, what));
  }
  return DecodeStats(value, what);
}

Status Bm25LmdbIndex::AddDocument(lmdb::WriteTxn* txn, uint32_t task_id, uint32_t doc,
                                  const std::vector<std::string>& tokens) const {
  SHOTDB_ASSIGN_OR_RETURN(Bm25CorpusStats stats, LoadStats(txn->txn, task_id));
  if (doc != stats.num_docs) {
    return Status::InvalidArgument("bm25 index of task id " + std::to_string(task_id) +
                                   ": document " + std::to_string(doc) + " appended, expected " +
                                   std::to_string(stats.num_docs));
  }
  // Term frequencies by term key (two long terms with one key count as one term, consistently
  // at index and query time). std::map: a deterministic insertion order.
  std::map<std::string, uint32_t> tf;
  for (const std::string& token : tokens) ++tf[TermKey(task_id, token)];

  lmdb::Cursor c;
  SHOTDB_RETURN_IF_ERROR(txn->Check(c.Open(txn->txn, dbs_.postings), "postings cursor"));
  std::vector<uint32_t> dfs_before;
  dfs_before.reserve(tf.size());
  for (const auto& [term_key, count] : tf) {
    MDB_val k = Val(term_key), v;
    int rc = mdb_cursor_get(c.get(), &k, &v, MDB_SET);
    size_t df = 0;
    if (rc == MDB_SUCCESS) {
      SHOTDB_RETURN_IF_ERROR(txn->Check(mdb_cursor_count(c.get(), &df), "postings count"));
    } else if (rc != MDB_NOTFOUND) {
      return txn->Check(rc, "postings get");
    }
    dfs_before.push_back(static_cast<uint32_t>(df));
    uint8_t posting[kPostingSize];
    const uint32_t check = lmdb::PostingCheck(term_key, doc, count);
    for (int i = 0; i < 4; ++i) {
      posting[i] = static_cast<uint8_t>(doc >> (24 - 8 * i));
      posting[4 + i] = static_cast<uint8_t>(count >> (24 - 8 * i));
      posting[8 + i] = static_cast<uint8_t>(check >> (24 - 8 * i));
    }
    MDB_val pv = Val(posting, kPostingSize);
    k = Val(term_key);
    SHOTDB_RETURN_IF_ERROR(txn->Check(mdb_cursor_put(c.get(), &k, &pv, 0), "postings put"));
  }
  SHOTDB_RETURN_IF_ERROR(stats.AddDocument(static_cast<uint32_t>(tokens.size()), dfs_before)
                             .WithContext("bm25 index of task id " + std::to_string(task_id)));

  std::string doc_key = DocKey(task_id, doc);
  lmdb::ByteWriter len;
  len.U32(static_cast<uint32_t>(tokens.size()));
  const std::string len_value = lmdb::Seal(doc_key, len.Take());
  MDB_val dk = Val(doc_key), dv = Val(len_value);
  SHOTDB_RETURN_IF_ERROR(
      txn->Check(mdb_put(txn->txn, dbs_.doc_lengths, &dk, &dv, 0), "doc_lengths put"));

  std::string stats_key = TaskKey(task_id);
  const std::string stats_value = lmdb::Seal(stats_key, EncodeStats(stats));
  MDB_val sk = Val(stats_key), sv = Val(stats_value);
  return txn->Check(mdb_put(txn->txn, dbs_.stats, &sk, &sv, 0), "bm25_stats put");
}

Status Bm25LmdbIndex::CheckNeighbours(MDB_cursor* c, const std::string& key,
                                      const std::string& token, const std::string& what) const {
  // A term that is not in the index, or whose key was damaged: a damaged key that still sorts
  // in its place lies right before or right after the place of the term it was. Its postings
  // carry check words made from the original key, so one posting of each neighbour (in any task's
  // range: the damage may have hit the task id) tells them apart.
  MDB_val k = Val(key), v;
  int rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
  auto check = [&](const char* side) -> Status {
    if (v.mv_size != kPostingSize) {
      return Status::Corruption(what + ": the key " + side + " term '" + token +
                                "' holds a posting of " + std::to_string(v.mv_size) + " bytes");
    }
    if (!PostingIntact(static_cast<const uint8_t*>(v.mv_data), lmdb::PostingSeed(lmdb::View(k)))) {
      return Status::Corruption(what + ": the postings " + side + " term '" + token +
                                "' fail their check (a damaged term key?)");
    }
    return Status::OK();
  };
  if (rc == MDB_SUCCESS) {
    SHOTDB_RETURN_IF_ERROR(check("after"));
    rc = mdb_cursor_get(c, &k, &v, MDB_PREV_NODUP);
  } else if (rc == MDB_NOTFOUND) {
    rc = mdb_cursor_get(c, &k, &v, MDB_LAST);
  }
  if (rc == MDB_SUCCESS) return check("before");
  if (rc != MDB_NOTFOUND) return lmdb::ToStatus(rc, what + ": postings read");
  return Status::OK();
}

Result<std::vector<ScoredDoc>> Bm25LmdbIndex::Search(MDB_txn* txn, uint32_t task_id,
                                                     uint32_t num_docs,
                                                     const std::vector<std::string>& query_tokens,
                                                     size_t k, const Bm25Params& params) const {
  const std::string what = "bm25 index of task id " + std::to_string(task_id);
  SHOTDB_ASSIGN_OR_RETURN(Bm25CorpusStats stats, LoadStats(txn, task_id));
  if (stats.num_docs != num_docs) {
    return Status::Corruption(what + ": statistics count " + std::to_string(stats.num_docs) +
                              " documents, the task has " + std::to_string(num_docs) + " blocks");
  }
  Bm25Scorer scorer(stats, params);

  lmdb::Cursor c;
  int rc = c.Open(txn, dbs_.postings);
  if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, what + ": postings cursor");
  std::unordered_map<std::string, QueryTerm> by_key;  // each distinct term read once
  std::vector<QueryTerm> terms;
  terms.reserve(query_tokens.size());
  for (const std::string& token : query_tokens) {
    std::string key = TermKey(task_id, token);
    auto it = by_key.find(key);
    if (it == by_key.end()) {
      QueryTerm term;
      MDB_val kv = Val(key), v;
      rc = mdb_cursor_get(c.get(), &kv, &v, MDB_SET);
      const size_t size = posting_size();
      if (rc == MDB_SUCCESS && v.mv_size != size) {
        // MDB_SET returns one duplicate: its size is the list's item size (a damaged size field
        // in the list's page would make MDB_GET_MULTIPLE split the items differently).
        return Status::Corruption(what + ": the postings of term '" + token + "' are " +
                                  std::to_string(v.mv_size) + "-byte items");
      }
      if (rc == MDB_SUCCESS) {
        // DUPFIXED: MDB_GET_MULTIPLE / MDB_NEXT_MULTIPLE return a page's worth of dups at once.
        rc = mdb_cursor_get(c.get(), &kv, &v, MDB_GET_MULTIPLE);
        const uint64_t seed = lmdb::PostingSeed(key);
        while (rc == MDB_SUCCESS) {
          if (v.mv_size % size != 0) {
            return Status::Corruption(what + ": posting list of a term has a " +
                                      std::to_string(v.mv_size) + "-byte page, expected " +
                                      std::to_string(size) + "n");
          }
          const auto* p = static_cast<const uint8_t*>(v.mv_data);
          for (size_t i = 0; i < v.mv_size; i += size) {
            Posting posting{lmdb::LoadBE32(p + i), lmdb::LoadBE32(p + i + 4)};
            if (checked_ && !PostingIntact(p + i, seed)) {
              return Status::Corruption(what + ": a posting of term '" + token +
                                        "' fails its check");
            }
            if (posting.doc >= num_docs || posting.tf == 0) {
              return Status::Corruption(what + ": posting (doc " + std::to_string(posting.doc) +
                                        ", tf " + std::to_string(posting.tf) +
                                        ") out of range for " + std::to_string(num_docs) +
                                        " documents");
            }
            term.postings.push_back(posting);
          }
          rc = mdb_cursor_get(c.get(), &kv, &v, MDB_NEXT_MULTIPLE);
        }
      }
      if (rc != MDB_SUCCESS && rc != MDB_NOTFOUND) {
        return lmdb::ToStatus(rc, what + ": postings read");
      }
      if (term.postings.empty() && checked_) {
        SHOTDB_RETURN_IF_ERROR(CheckNeighbours(c.get(), key, token, what));
      }
      term.df = static_cast<uint32_t>(term.postings.size());
      it = by_key.emplace(std::move(key), std::move(term)).first;
    }
    terms.push_back(it->second);
  }

  Status length_error;
  std::string doc_key = DocKey(task_id, 0);  // its document number is rewritten for each lookup
  auto doc_length = [&](uint32_t doc) -> uint32_t {
    for (int i = 0; i < 4; ++i) doc_key[4 + i] = static_cast<char>(doc >> (24 - 8 * i));
    MDB_val dk = Val(doc_key), dv;
    int get_rc = mdb_get(txn, dbs_.doc_lengths, &dk, &dv);
    Result<uint32_t> length =
        get_rc == MDB_SUCCESS
            ? DecodeLength(doc_key, lmdb::View(dv), what)
            : Result<uint32_t>(Status::Corruption(what + ": length of document " +
                                                  std::to_string(doc) + " is missing"));
    if (!length.ok()) {
      if (length_error.ok()) length_error = length.status();
      return 0;
    }
    return *length;
  };
  std::vector<ScoredDoc> top = Bm25TopK(scorer, terms, num_docs, doc_length, k);
  SHOTDB_RETURN_IF_ERROR(length_error);
  return top;
}

Status Bm25LmdbIndex::Verify(MDB_txn* txn, uint32_t task_id, uint32_t num_docs) const {
  const std::string what = "bm25 index of task id " + std::to_string(task_id);
  SHOTDB_ASSIGN_OR_RETURN(Bm25CorpusStats stats, LoadStats(txn, task_id));
  if (stats.num_docs != num_docs) {
    return Status::Corruption(what + ": statistics count " + std::to_string(stats.num_docs) +
                              " documents, expected " + std::to_string(num_docs));
  }
  const std::string prefix = TaskKey(task_id);
  lmdb::Cursor c;
  int rc = c.Open(txn, dbs_.doc_lengths);
  if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, what + ": doc_lengths cursor");
  MDB_val k = Val(prefix), v;
  uint64_t total = 0, count = 0;
  rc = mdb_cursor_get(c.get(), &k, &v, MDB_SET_RANGE);
  while (rc == MDB_SUCCESS && lmdb::View(k).substr(0, 4) == prefix) {
    if (k.mv_size != 8 || lmdb::LoadBE32(static_cast<char*>(k.mv_data) + 4) != count) {
      return Status::Corruption(what + ": document length entry " + std::to_string(count) +
                                " is malformed or out of order");
    }
    SHOTDB_ASSIGN_OR_RETURN(uint32_t length, DecodeLength(lmdb::View(k), lmdb::View(v), what));
    total += length;
    ++count;
    rc = mdb_cursor_get(c.get(), &k, &v, MDB_NEXT);
  }
  if (rc != MDB_SUCCESS && rc != MDB_NOTFOUND) return lmdb::ToStatus(rc, what);
  if (count != num_docs || total != stats.total_doc_length) {
    return Status::Corruption(
        what + ": " + std::to_string(count) + " document lengths summing to " +
        std::to_string(total) + ", statistics say " + std::to_string(num_docs) +
        " documents of total length " + std::to_string(stats.total_doc_length));
  }
  // Every posting: its check word, its range, and the dfs against the statistics' histogram.
  lmdb::Cursor p;
  rc = p.Open(txn, dbs_.postings);
  if (rc != MDB_SUCCESS) return lmdb::ToStatus(rc, what + ": postings cursor");
  const size_t size = posting_size();
  std::map<uint32_t, uint64_t> histogram;
  k = Val(prefix);
  rc = mdb_cursor_get(p.get(), &k, &v, MDB_SET_RANGE);
  while (rc == MDB_SUCCESS && lmdb::View(k).substr(0, 4) == prefix) {
    const std::string term_key(lmdb::View(k));
    const uint64_t seed = lmdb::PostingSeed(term_key);
    uint32_t df = 0;
    for (; rc == MDB_SUCCESS; rc = mdb_cursor_get(p.get(), &k, &v, MDB_NEXT_DUP)) {
      if (v.mv_size != size) {
        return Status::Corruption(what + ": a posting of " + std::to_string(v.mv_size) +
                                  " bytes, expected " + std::to_string(size));
      }
      const auto* b = static_cast<const uint8_t*>(v.mv_data);
      const uint32_t doc = lmdb::LoadBE32(b), tf = lmdb::LoadBE32(b + 4);
      if ((checked_ && !PostingIntact(b, seed)) || doc >= num_docs || tf == 0) {
        return Status::Corruption(what + ": posting (doc " + std::to_string(doc) + ", tf " +
                                  std::to_string(tf) + ") of a term fails its check");
      }
      ++df;
    }
    if (rc != MDB_NOTFOUND) return lmdb::ToStatus(rc, what + ": postings read");
    ++histogram[df];
    rc = mdb_cursor_get(p.get(), &k, &v, MDB_NEXT_NODUP);
  }
  if (rc != MDB_SUCCESS && rc != MDB_NOTFOUND) return lmdb::ToStatus(rc, what + ": postings");
  if (histogram != stats.df_histogram) {
    return Status::Corruption(what +
                              ": the postings' document frequencies disagree with the "
                              "statistics");
  }
  return Status::OK();
}

Status Bm25LmdbIndex::DeleteTask(lmdb::WriteTxn* txn, uint32_t task_id) const {
  std::string prefix = TaskKey(task_id);
  SHOTDB_RETURN_IF_ERROR(lmdb::DeletePrefix(txn, dbs_.postings, prefix, "postings delete"));
  SHOTDB_RETURN_IF_ERROR(lmdb::DeletePrefix(txn, dbs_.doc_lengths, prefix, "doc_lengths delete"));
  return lmdb::DeletePrefix(txn, dbs_.stats, prefix, "bm25_stats delete");
}

}  // namespace shotdb
