// Output helpers shared by the shotdb subcommands: aligned text tables, human-readable sizes, hex,
// a progress bar for stderr, and the one-line error convention.
//
// Nothing here touches the store; the commands own what they print. Not thread-safe: each object
// is used by the one thread that runs the command.
#ifndef SHOTDB_TOOLS_CLI_UTIL_H_
#define SHOTDB_TOOLS_CLI_UTIL_H_

#include <chrono>
#include <cstdint>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include "util/status.h"

namespace shotdb::cli {

// "0 B", "512 B", "1.5 KiB", "12.0 MiB", "3.21 GiB" (binary units, 3 significant digits).
std::string HumanBytes(uint64_t bytes);

// "0123abcd..." : 16 lowercase hex digits, zero-padded.
std::string Hex64(uint64_t value);

// `ratio` with two decimals ("3.14"), or "-" when the denominator was zero (ratio is NaN/inf).
std::string FormatRatio(double ratio);

// `text` with control characters (newline, tab, ...) shown as spaces and cut to at most
// `max_chars` bytes (on a UTF-8 character boundary), with "..." appended when cut.
std::string Snippet(std::string_view text, size_t max_chars);

// A text table: a header row, then rows of cells, printed with columns padded to their widest
// cell. Columns marked numeric are right-aligned. Rows shorter than the header are padded with
// empty cells; longer rows are a programming error.
class Table {
 public:
  explicit Table(std::vector<std::string> headers);
  // Right-aligns column `column` (0-based) in Print.
  void SetNumeric(size_t column);
  void AddRow(std::vector<std::string> cells);
  size_t rows() const { return rows_.size(); }
  // Writes the header, a rule of dashes, and every row, each line ending in '\n'.
  void Print(std::ostream& out) const;

 private:
  std::vector<std::string> headers_;
  std::vector<bool> numeric_;
  std::vector<std::vector<std::string>> rows_;
};

// A single-line progress bar redrawn in place on stderr, "label [#####     ] 50% 5/10 detail".
// It draws only when stderr is a terminal (so that logs and tests see no carriage returns), at most
// ten times a second, and erases itself in Finish() or the destructor.
class ProgressBar {
 public:
  ProgressBar(std::string label, uint64_t total);
  ~ProgressBar();
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  // Records that `done` of `total` units are finished; `total` may be revised (0 keeps the old).
  void Update(uint64_t done, uint64_t total = 0);
  // Sets free text drawn after the counts (e.g. "1234 tok/s, ETA 0:42"); shown from the next
  // redraw on. An empty string draws nothing.
  void SetDetail(std::string detail);
  // Clears the line. Further updates are ignored.
  void Finish();

 private:
  void Draw();

  std::string label_;
  std::string detail_;
  uint64_t total_;
  uint64_t done_ = 0;
  bool enabled_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point last_draw_{};
};

// Prints "shotdb <command>: <status message>" as one line on stderr and returns 1, the exit code of
// a failed command, so that commands can `return Fail("ls", status);`.
int Fail(std::string_view command, const Status& status);
// The same with a plain message.
int Fail(std::string_view command, std::string_view message);

}  // namespace shotdb::cli

#endif  // SHOTDB_TOOLS_CLI_UTIL_H_
