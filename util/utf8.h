// UTF-8 validation, for the places that accept text from users (demonstration files, stop lists)
// and must reject bad bytes with the position before anything is written.
#ifndef SHOTDB_UTIL_UTF8_H_
#define SHOTDB_UTIL_UTF8_H_

#include <cstddef>
#include <string_view>

namespace shotdb {

// True if `text` is well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing above
// U+10FFFF). Otherwise false, with *bad_offset (if not null) set to the first offending byte.
bool IsValidUtf8(std::string_view text, size_t* bad_offset = nullptr);

}  // namespace shotdb

#endif  // SHOTDB_UTIL_UTF8_H_
