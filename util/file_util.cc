#include "util/file_util.h"

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace shotdb {

namespace {

Status Errno(const std::string& what, const std::string& path) {
  return Status::IOError(path + ": " + what + ": " + std::strerror(errno));
}

}  // namespace

bool PathExists(const std::string& path) {
  struct stat st;
  return lstat(path.c_str(), &st) == 0;
}

bool IsDirectory(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

uint64_t FileSizeOrZero(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
}

std::string DirName(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

std::string BaseName(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string Extension(const std::string& path) {
  const std::string base = BaseName(path);
  const size_t dot = base.find_last_of('.');
  return dot == std::string::npos || dot == 0 ? "" : base.substr(dot);
}

std::string JoinPath(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

Result<std::vector<std::string>> ListDirectory(const std::string& dir) {
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return Errno("cannot list directory", dir);
  std::vector<std::string> names;
  errno = 0;
  while (const dirent* e = readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  const int err = errno;
  closedir(d);
  if (err != 0) {
    errno = err;
    return Errno("cannot list directory", dir);
  }
  std::sort(names.begin(), names.end());
  return names;
}

Status CreateDirectories(const std::string& path) {
  if (path.empty() || IsDirectory(path)) return Status::OK();
  const std::string parent = DirName(path);
  if (parent != path) SHOTDB_RETURN_IF_ERROR(CreateDirectories(parent));
  if (mkdir(path.c_str(), 0755) != 0 && !(errno == EEXIST && IsDirectory(path))) {
    return Errno("cannot create directory", path);
  }
  return Status::OK();
}

Status RemoveAll(const std::string& path) {
  if (!PathExists(path)) return Status::OK();
  // Depth-first (FTW_DEPTH) so that a directory is empty when it is removed; FTW_PHYS so that
  // symbolic links are removed rather than followed.
  const int rc = nftw(
      path.c_str(),
      [](const char* p, const struct stat*, int, struct FTW*) { return std::remove(p); }, 16,
      FTW_DEPTH | FTW_PHYS);
  if (rc != 0) return Errno("cannot remove", path);
  return Status::OK();
}

}  // namespace shotdb
