// The NLU evaluation data as BM25 tests and benchmarks use it: the training texts grouped into
// blocks of consecutive rows (the DBSA demonstration blocks) and the test utterances as queries.
// The data is optional (SHOTDB_DATA_DIR, see tests/scripts/make_bm25_golden.py); callers skip when
// Load() returns NotFound.
#ifndef SHOTDB_TESTS_NLU_BLOCKS_H_
#define SHOTDB_TESTS_NLU_BLOCKS_H_

#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "util/csv.h"
#include "util/status.h"

namespace shotdb {
namespace testing {

struct NluBlocks {
  std::vector<std::string> blocks;   // each: up to rows_per_block training texts joined by "\n"
  std::vector<std::string> queries;  // the test utterances, in file order
  size_t num_train_rows = 0;         // training rows used (all rows of the first max_blocks blocks)
};

// The data directory: $SHOTDB_DATA_DIR, else ../shared/data relative to the source tree.
inline std::string NluDataDir() {
  const char* env = std::getenv("SHOTDB_DATA_DIR");
  return env != nullptr && *env != '\0' ? env : std::string(SHOTDB_SOURCE_DIR) + "/../shared/data";
}

inline Result<std::vector<std::string>> ReadTextColumn(const std::string& path) {
  SHOTDB_ASSIGN_OR_RETURN(CsvTable table, ReadCsvFile(path));
  SHOTDB_ASSIGN_OR_RETURN(size_t column, table.Column("text"));
  std::vector<std::string> texts;
  texts.reserve(table.rows.size());
  for (auto& row : table.rows) texts.push_back(std::move(row[column]));
  return texts;
}

// NotFound when the training CSV does not exist; otherwise the CSV reader's errors.
inline Result<NluBlocks> LoadNluBlocks(const std::string& data_dir, size_t rows_per_block = 50,
                                       size_t max_blocks = 400) {
  const std::string train_path = data_dir + "/nlu_evaluation_data_train.csv";
  if (!std::ifstream(train_path).good()) return Status::NotFound("no NLU data at " + train_path);
  SHOTDB_ASSIGN_OR_RETURN(std::vector<std::string> train, ReadTextColumn(train_path));
  NluBlocks out;
  SHOTDB_ASSIGN_OR_RETURN(out.queries, ReadTextColumn(data_dir + "/nlu_evaluation_data_test.csv"));
  for (size_t row = 0; row < train.size() && out.blocks.size() < max_blocks;
       row += rows_per_block) {
    std::string block;
    for (size_t i = row; i < train.size() && i < row + rows_per_block; ++i) {
      if (i > row) block += '\n';
      block += train[i];
      ++out.num_train_rows;
    }
    out.blocks.push_back(std::move(block));
  }
  return out;
}

// The training rows as (text, label text) pairs, in file order, with the labels mapped through
// nlu_labels.txt ("id<TAB>label text"). NotFound when the data is absent.
struct LabeledRow {
  std::string text, label;
};
inline Result<std::vector<LabeledRow>> LoadNluTrainRows(const std::string& data_dir) {
  const std::string train_path = data_dir + "/nlu_evaluation_data_train.csv";
  if (!std::ifstream(train_path).good()) return Status::NotFound("no NLU data at " + train_path);
  std::ifstream labels_file(data_dir + "/nlu_labels.txt");
  if (!labels_file.good()) return Status::NotFound("no nlu_labels.txt in " + data_dir);
  std::vector<std::pair<std::string, std::string>> label_map;
  for (std::string line; std::getline(labels_file, line);) {
    const size_t tab = line.find('\t');
    if (tab != std::string::npos) label_map.emplace_back(line.substr(0, tab), line.substr(tab + 1));
  }
  SHOTDB_ASSIGN_OR_RETURN(CsvTable table, ReadCsvFile(train_path));
  SHOTDB_ASSIGN_OR_RETURN(size_t text_col, table.Column("text"));
  SHOTDB_ASSIGN_OR_RETURN(size_t label_col, table.Column("label"));
  std::vector<LabeledRow> rows;
  for (auto& row : table.rows) {
    LabeledRow r{row[text_col], row[label_col]};
    for (const auto& [id, text] : label_map) {
      if (id == r.label) r.label = text;
    }
    rows.push_back(std::move(r));
  }
  return rows;
}

}  // namespace testing
}  // namespace shotdb

#endif  // SHOTDB_TESTS_NLU_BLOCKS_H_
