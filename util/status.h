// Status and Result<T>: how shotdb reports expected failures.
//
// Every fallible operation in format/, engine/, query/ and gpu/ returns a Status (or a Result<T>,
// which is a Status or a value). Exceptions never cross the public API. Corruption is its own code,
// because a caller handles "this block's bytes are damaged" differently from "no such block" or
// "the disk is full". Messages name the file, the field and what was expected.
#ifndef SHOTDB_UTIL_STATUS_H_
#define SHOTDB_UTIL_STATUS_H_

#include <cassert>
#include <optional>
#include <string>
#include <utility>

namespace shotdb {

class Status {
 public:
  enum class Code {
    kOk = 0,
    kNotFound,            // the named object does not exist
    kCorruption,          // stored bytes fail a checksum or structural check
    kInvalidArgument,     // the caller's input is malformed or inconsistent
    kIOError,             // the OS or LMDB refused an operation
    kAlreadyExists,       // a create would overwrite an existing object
    kNotSupported,        // a valid but unimplemented variant (e.g. an unknown dtype)
    kFailedPrecondition,  // the object is in the wrong state (e.g. shape differs from the task's)
  };

  Status() = default;  // OK
  static Status OK() { return Status(); }
  static Status NotFound(std::string msg) { return Status(Code::kNotFound, std::move(msg)); }
  static Status Corruption(std::string msg) { return Status(Code::kCorruption, std::move(msg)); }
  static Status InvalidArgument(std::string msg) {
    return Status(Code::kInvalidArgument, std::move(msg));
  }
  static Status IOError(std::string msg) { return Status(Code::kIOError, std::move(msg)); }
  static Status AlreadyExists(std::string msg) {
    return Status(Code::kAlreadyExists, std::move(msg));
  }
  static Status NotSupported(std::string msg) {
    return Status(Code::kNotSupported, std::move(msg));
  }
  static Status FailedPrecondition(std::string msg) {
    return Status(Code::kFailedPrecondition, std::move(msg));
  }

  bool ok() const { return code_ == Code::kOk; }
  bool IsNotFound() const { return code_ == Code::kNotFound; }
  bool IsCorruption() const { return code_ == Code::kCorruption; }
  bool IsInvalidArgument() const { return code_ == Code::kInvalidArgument; }
  bool IsIOError() const { return code_ == Code::kIOError; }
  bool IsAlreadyExists() const { return code_ == Code::kAlreadyExists; }
  bool IsNotSupported() const { return code_ == Code::kNotSupported; }
  bool IsFailedPrecondition() const { return code_ == Code::kFailedPrecondition; }

  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  // "OK" or "<Code name>: <message>", e.g. "Corruption: block 3 layer 7 K: xxh3 mismatch".
  std::string ToString() const;

  // Returns a copy whose message is "<context>: <message>"; OK stays OK.
  Status WithContext(const std::string& context) const;

 private:
  Status(Code code, std::string msg) : code_(code), message_(std::move(msg)) {}
  Code code_ = Code::kOk;
  std::string message_;
};

// Either a value or a non-OK Status. Accessing value() of a failed Result is a programming error.
template <typename T>
class Result {
 public:
  Result(Status status) : status_(std::move(status)) {  // NOLINT: implicit by design
    assert(!status_.ok() && "Result constructed from an OK status without a value");
  }
  Result(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design

  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }

  T& value() & {
    assert(ok());
    return *value_;
  }
  const T& value() const& {
    assert(ok());
    return *value_;
  }
  T&& value() && {
    assert(ok());
    return std::move(*value_);
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  Status status_;
  std::optional<T> value_;
};

}  // namespace shotdb

#define SHOTDB_CONCAT_INNER_(a, b) a##b
#define SHOTDB_CONCAT_(a, b) SHOTDB_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (a Status) is not OK.
#define SHOTDB_RETURN_IF_ERROR(expr)                 \
  do {                                               \
    ::shotdb::Status shotdb_status_ = (expr);        \
    if (!shotdb_status_.ok()) return shotdb_status_; \
  } while (0)

// `lhs = value of expr` (a Result<T>), or returns its Status from the enclosing function.
#define SHOTDB_ASSIGN_OR_RETURN(lhs, expr) \
  SHOTDB_ASSIGN_OR_RETURN_IMPL_(SHOTDB_CONCAT_(shotdb_result_, __LINE__), lhs, expr)
#define SHOTDB_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.ok()) return tmp.status();                 \
  lhs = std::move(tmp).value()

#endif  // SHOTDB_UTIL_STATUS_H_
