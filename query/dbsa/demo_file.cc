#include "query/dbsa/demo_file.h"

#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>

#include "util/csv.h"
#include "util/utf8.h"

namespace shotdb {

namespace {
std::string Where(const std::string& path, size_t row) {
  return path + ": row " + std::to_string(row);
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

Result<std::vector<LabeledText>> ReadJsonLines(const std::string& path, const DemoFileOptions& o) {
  SHOTDB_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  std::vector<LabeledText> out;
  std::istringstream in(text);
  std::string line;
  for (size_t row = 1; std::getline(in, line); ++row) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      return Status::InvalidArgument(Where(path, row) + ": not a JSON object");
    }
    LabeledText t;
    for (auto [field, dst] : {std::pair{&o.text_column, &t.text}, {&o.label_column, &t.label}}) {
      auto it = j.find(*field);
      if (it == j.end()) {
        return Status::InvalidArgument(Where(path, row) + ": missing field '" + *field + "'");
      }
      *dst = it->is_string() ? it->get<std::string>() : it->dump();
    }
    out.push_back(std::move(t));
    if (o.limit && out.size() == o.limit) break;
  }
  return out;
}

Result<std::vector<LabeledText>> ReadCsvRows(const std::string& path, const DemoFileOptions& o) {
  SHOTDB_ASSIGN_OR_RETURN(CsvTable table, ReadCsvFile(path));
  auto text_col = table.Column(o.text_column);
  if (!text_col.ok()) return text_col.status().WithContext(path);
  auto label_col = table.Column(o.label_column);
  if (!label_col.ok()) return label_col.status().WithContext(path);
  std::vector<LabeledText> out;
  for (const auto& row : table.rows) {
    out.push_back({row[*text_col], row[*label_col]});
    if (o.limit && out.size() == o.limit) break;
  }
  return out;
}
}  // namespace

Result<std::map<std::string, std::string>> ReadLabelMap(const std::string& path) {
  SHOTDB_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  std::map<std::string, std::string> map;
  std::istringstream in(text);
  std::string line;
  for (size_t n = 1; std::getline(in, line); ++n) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    const size_t tab = line.find('\t');
    if (tab == std::string::npos || tab == 0 || tab + 1 == line.size()) {
      return Status::InvalidArgument(path + ":" + std::to_string(n) +
                                     ": expected 'id<TAB>label text'");
    }
    map[line.substr(0, tab)] = line.substr(tab + 1);
  }
  if (map.empty()) return Status::InvalidArgument(path + ": no labels");
  return map;
}

Result<std::vector<LabeledText>> ReadLabeledTexts(const std::string& path,
                                                  const DemoFileOptions& options) {
  std::string format = options.format;
  if (format.empty()) {
    format = EndsWith(path, ".jsonl") || EndsWith(path, ".json") ? "jsonl" : "csv";
  }
  Result<std::vector<LabeledText>> rows =
      Status::InvalidArgument(path + ": unknown format '" + format + "' (expected csv or jsonl)");
  if (format == "csv") rows = ReadCsvRows(path, options);
  if (format == "jsonl") rows = ReadJsonLines(path, options);
  if (!rows.ok()) return rows;

  std::map<std::string, std::string> label_map;
  if (!options.label_map_path.empty()) {
    SHOTDB_ASSIGN_OR_RETURN(label_map, ReadLabelMap(options.label_map_path));
  }
  for (size_t i = 0; i < rows->size(); ++i) {
    LabeledText& t = (*rows)[i];
    for (const auto& [column, value] :
         {std::pair{&options.text_column, &t.text}, {&options.label_column, &t.label}}) {
      const std::string where = Where(path, i + 1) + ", column '" + *column + "'";
      if (value->empty()) return Status::InvalidArgument(where + ": empty");
      size_t bad = 0;
      if (!IsValidUtf8(*value, &bad)) {
        char byte[8];
        std::snprintf(byte, sizeof byte, "0x%02x", static_cast<unsigned char>((*value)[bad]));
        return Status::InvalidArgument(where + ": not valid UTF-8 (byte " + byte + " at offset " +
                                       std::to_string(bad) + ")");
      }
      if (value->size() > kMaxFieldBytes) {
        return Status::InvalidArgument(where + ": " + std::to_string(value->size()) +
                                       " bytes, more than the " + std::to_string(kMaxFieldBytes) +
                                       " a demonstration may have");
      }
    }
    if (!label_map.empty()) {
      auto it = label_map.find(t.label);
      if (it == label_map.end()) {
        return Status::InvalidArgument(Where(path, i + 1) + ": label '" + t.label + "' not in " +
                                       options.label_map_path);
      }
      t.label = it->second;
    }
  }
  return rows;
}

}  // namespace shotdb
