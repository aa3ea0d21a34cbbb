#include "util/csv.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

namespace shotdb {

Result<size_t> CsvTable::Column(std::string_view name) const {
  for (size_t i = 0; i < header.size(); ++i) {
    if (header[i] == name) return i;
  }
  std::string have;
  for (const auto& h : header) have += (have.empty() ? "" : ", ") + h;
  return Status::NotFound("no column '" + std::string(name) + "' (columns: " + have + ")");
}

Result<CsvTable> ParseCsv(std::string_view text, std::string_view source) {
  std::vector<std::vector<std::string>> records;
  std::vector<std::string> record;
  std::string field;
  bool in_quotes = false;
  bool field_started = false;  // distinguishes an empty last line from an empty field
  size_t line = 1, record_line = 1;
  auto end_field = [&] {
    record.push_back(std::move(field));
    field.clear();
    field_started = false;
  };
  auto end_record = [&] {
    end_field();
    records.push_back(std::move(record));
    record.clear();
  };
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_quotes) {
      if (c == '"') {
        if (i + 1 < text.size() && text[i + 1] == '"') {
          field += '"';
          ++i;
        } else {
          in_quotes = false;
        }
      } else {
        if (c == '\n') ++line;
        field += c;
      }
      continue;
    }
    switch (c) {
      case '"':
        in_quotes = true;
        field_started = true;
        break;
      case ',':
        end_field();
        field_started = true;
        break;
      case '\r':
        break;  // CRLF: the '\n' ends the record
      case '\n':
        if (field_started || !record.empty() || !field.empty()) end_record();
        record_line = ++line;
        break;
      default:
        field += c;
        field_started = true;
    }
  }
  if (in_quotes) {
    return Status::InvalidArgument(std::string(source) + ":" + std::to_string(record_line) +
                                   ": unterminated quoted field");
  }
  if (field_started || !record.empty() || !field.empty()) end_record();
  if (records.empty())
    return Status::InvalidArgument(std::string(source) + ": empty CSV, no header");

  CsvTable table;
  table.header = std::move(records[0]);
  for (size_t r = 1; r < records.size(); ++r) {
    if (records[r].size() != table.header.size()) {
      return Status::InvalidArgument(std::string(source) + ": record " + std::to_string(r + 1) +
                                     " has " + std::to_string(records[r].size()) +
                                     " fields, expected " + std::to_string(table.header.size()));
    }
    table.rows.push_back(std::move(records[r]));
  }
  return table;
}

Result<std::string> ReadFileToString(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IOError(path + ": cannot open: " + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return Status::IOError(path + ": read failed");
  return ss.str();
}

Result<CsvTable> ReadCsvFile(const std::string& path) {
  SHOTDB_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return ParseCsv(text, path);
}

}  // namespace shotdb
