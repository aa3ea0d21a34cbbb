// Export and import of one task as a single portable file (docs/storage.md, "Export files").
//
// The file holds the task record, then every block (its BlockInfo, its demonstrations and its
// payload records exactly as stored, codec included), and ends with the xxh3-64 of every byte
// before it. It does not depend on LMDB, the page size or the host: a task can move between
// stores and machines.
//
// Thread-safety: both functions are safe to call concurrently with any Store operation (export
// reads one snapshot; import appends through Store's writer).
#ifndef SHOTDB_ENGINE_EXPORT_H_
#define SHOTDB_ENGINE_EXPORT_H_

#include <string>

#include "engine/store.h"
#include "util/status.h"

namespace shotdb {

// The first 8 bytes of an export file, and the layout version written. Version 2 files carry
// the task record of store format 2 (position scheme, analyzer, idf); version 1 files (whose task
// record lacks them: sequential positions, the simple analyzer, Okapi idf) are still read, which
// is how a format-1 store's tasks move into a format-2 store.
constexpr char kExportMagic[8] = {'S', 'H', 'O', 'T', 'D', 'B', 'X', '\0'};
constexpr uint32_t kExportFormatVersion = 2;

// Writes task `task` of `store`, as seen by one snapshot, to `path` (written as `path`.tmp, fsynced
// and renamed, so `path` is either absent or complete). Every payload checksum is verified on the
// way. Returns OK; NotFound for an unknown task; Corruption if a stored record is damaged (nothing
// is left at `path`); IOError if the file cannot be written.
Status ExportTask(const Store& store, const std::string& task, const std::string& path);

// Reads an export file and adds its task to `store` under the task's own name, written to
// *task_name (may be null). Everything is validated before anything is committed: the whole-file
// checksum, the structure, every record's header against the task and every payload checksum.
// Then the task is created and its blocks appended one by one with AppendBlock's checks; if an
// append fails the task is deleted again. Returns OK; Corruption if the file is damaged or
// truncated; NotSupported for an export format version other than 1 or 2; AlreadyExists if the
// store has a task of that name; IOError if the file cannot be read or the store cannot be written.
// A crash during the append phase can leave the task with a prefix of its blocks (each block is
// still atomic); delete it and import again.
Status ImportTask(Store* store, const std::string& path, std::string* task_name);

}  // namespace shotdb

#endif  // SHOTDB_ENGINE_EXPORT_H_
