// How the extensions of the `shotdb` package turn an engine Status into a Python exception: C++
// code throws StatusError, and the translator that Register installs raises the class of
// python/shotdb/errors.py named by the status code, with the engine's message.
#ifndef SHOTDB_PYTHON_STATUS_ERROR_H_
#define SHOTDB_PYTHON_STATUS_ERROR_H_

#include <nanobind/nanobind.h>

#include <exception>
#include <utility>

#include "util/status.h"

namespace shotdb::python {

struct StatusError {
  Status status;
};

[[noreturn]] inline void Raise(const Status& s) { throw StatusError{s}; }

template <typename T>
T Check(Result<T> r) {
  if (!r.ok()) Raise(r.status());
  return std::move(r).value();
}
inline void Check(const Status& s) {
  if (!s.ok()) Raise(s);
}

inline const char* ErrorClassName(const Status& s) {
  if (s.IsNotFound()) return "NotFoundError";
  if (s.IsCorruption()) return "CorruptionError";
  if (s.IsInvalidArgument()) return "InvalidArgumentError";
  if (s.IsIOError()) return "StoreIOError";
  if (s.IsAlreadyExists()) return "AlreadyExistsError";
  if (s.IsNotSupported()) return "NotSupportedError";
  if (s.IsFailedPrecondition()) return "FailedPreconditionError";
  return "ShotdbError";
}

// Installs the StatusError translator (once per extension module).
inline void RegisterStatusErrors() {
  nanobind::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const StatusError& e) {
      nanobind::object cls =
          nanobind::module_::import_("shotdb.errors").attr(ErrorClassName(e.status));
      PyErr_SetString(cls.ptr(), e.status.message().c_str());
    }
  });
}

}  // namespace shotdb::python

#endif  // SHOTDB_PYTHON_STATUS_ERROR_H_
