// Small POSIX file-system helpers.
//
// Why not std::filesystem: PyTorch's libtorch.so (the GPU machine's, from its pip wheel) exports
// its own copies of std::filesystem functions, built against another libstdc++; a program linking
// it binds to those and crashed inside std::filesystem::remove_all. These helpers call the C
// library only, so they behave the same wherever they are linked.
#ifndef SHOTDB_UTIL_FILE_UTIL_H_
#define SHOTDB_UTIL_FILE_UTIL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "util/status.h"

namespace shotdb {

bool PathExists(const std::string& path);
bool IsDirectory(const std::string& path);
// Size in bytes of the file at `path`; 0 if it cannot be read (absent, no permission).
uint64_t FileSizeOrZero(const std::string& path);

// "a/b/c.txt" -> "a/b"; "c.txt" -> "."; "/c" -> "/".
std::string DirName(const std::string& path);
// "a/b/c.txt" -> "c.txt".
std::string BaseName(const std::string& path);
// "a/b/c.txt" -> ".txt"; "a/b/c" -> "".
std::string Extension(const std::string& path);
// "a" + "b" -> "a/b" (no doubled slash).
std::string JoinPath(const std::string& dir, const std::string& name);

// Names of the entries of `dir` (no "." or ".."), sorted. IOError naming `dir` on failure.
Result<std::vector<std::string>> ListDirectory(const std::string& dir);

// Creates `path` and its missing parents (mode 0755); OK if it already is a directory.
Status CreateDirectories(const std::string& path);

// Deletes `path` and everything below it; OK if it does not exist. Symbolic links are removed,
// not followed.
Status RemoveAll(const std::string& path);

}  // namespace shotdb

#endif  // SHOTDB_UTIL_FILE_UTIL_H_
