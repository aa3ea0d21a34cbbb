// Reading labelled texts (demonstrations or test queries) from CSV or JSON Lines files.
#ifndef SHOTDB_QUERY_DBSA_DEMO_FILE_H_
#define SHOTDB_QUERY_DBSA_DEMO_FILE_H_

#include <map>
#include <string>
#include <vector>

#include "util/status.h"

namespace shotdb {

struct LabeledText {
  std::string text;
  std::string label;  // after the label map, if one was given
};

struct DemoFileOptions {
  std::string text_column = "text";
  std::string label_column = "label";
  // "csv", "jsonl", or "" to choose by the file extension (.jsonl/.json -> jsonl, else csv).
  std::string format;
  // Optional "id<TAB>label text" file: labels found in the data are looked up in it (e.g. the NLU
  // data stores label ids). A label missing from the map is an error naming the row.
  std::string label_map_path;
  // Read at most this many rows (0 = all), in file order.
  size_t limit = 0;
};

// The longest text or label a row may hold (64 KiB; a demonstration is a sentence or a paragraph).
constexpr size_t kMaxFieldBytes = 64 * 1024;

// Reads every row and checks it before returning any. InvalidArgument naming the file, row (data
// rows from 1) and column for a missing column, an empty text or label, one that is not valid
// UTF-8 (with the offending byte and offset) or longer than kMaxFieldBytes, an unknown label id,
// or malformed JSON; IOError if the file cannot be read.
Result<std::vector<LabeledText>> ReadLabeledTexts(const std::string& path,
                                                  const DemoFileOptions& options);

// Reads an "id<TAB>label text" file into a map.
Result<std::map<std::string, std::string>> ReadLabelMap(const std::string& path);

}  // namespace shotdb

#endif  // SHOTDB_QUERY_DBSA_DEMO_FILE_H_
