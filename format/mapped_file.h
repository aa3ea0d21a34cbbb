// MappedFile: a whole file mapped read-only into memory (RAII, move-only).
//
// Weight files are mapped rather than read so that a 100 MB GGUF or a sharded checkpoint costs no
// copy until a tensor is dequantized. The mapping stays valid until the object is destroyed.
#ifndef SHOTDB_FORMAT_MAPPED_FILE_H_
#define SHOTDB_FORMAT_MAPPED_FILE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "util/status.h"

namespace shotdb {

class MappedFile {
 public:
  // Maps `path`. IOError naming the path and the OS error if it cannot be opened or mapped. An
  // empty file maps to data() == nullptr, size() == 0.
  static Result<std::unique_ptr<MappedFile>> Open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  std::string path_;
  const uint8_t* data_;
  size_t size_;
};

}  // namespace shotdb

#endif  // SHOTDB_FORMAT_MAPPED_FILE_H_
