// A small RFC 4180 CSV reader: quoted fields, doubled quotes, embedded commas and newlines,
// CRLF or LF line ends. The first record is the header.
#ifndef SHOTDB_UTIL_CSV_H_
#define SHOTDB_UTIL_CSV_H_

#include <string>
#include <string_view>
#include <vector>

#include "util/status.h"

namespace shotdb {

struct CsvTable {
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;  // each row has header.size() fields

  // Index of the named column, or NotFound listing the columns that exist.
  Result<size_t> Column(std::string_view name) const;
};

// Parses CSV text. `source` names the input in error messages ("demos.csv"). InvalidArgument on an
// unterminated quote or a row whose field count differs from the header's (naming the line).
Result<CsvTable> ParseCsv(std::string_view text, std::string_view source);

// Reads and parses a whole file; IOError naming the path if it cannot be read.
Result<CsvTable> ReadCsvFile(const std::string& path);

// Reads a whole file into a string; IOError naming the path.
Result<std::string> ReadFileToString(const std::string& path);

}  // namespace shotdb

#endif  // SHOTDB_UTIL_CSV_H_
