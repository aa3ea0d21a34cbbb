#include "tools/cli_util.h"

#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdio>
#include <iostream>

namespace shotdb::cli {

std::string HumanBytes(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return std::to_string(bytes) + " B";
  double value = static_cast<double>(bytes);
  size_t unit = 0;
  while (value >= 1024.0 && unit + 1 < std::size(kUnits)) {
    value /= 1024.0;
    ++unit;
  }
  char buf[32];
  // Three significant digits: 1.23, 12.3, 123 (a value that rounds up to 1024 stays in its unit).
  const int decimals = value < 10.0 ? 2 : value < 100.0 ? 1 : 0;
  std::snprintf(buf, sizeof buf, "%.*f %s", decimals, value, kUnits[unit]);
  return buf;
}

std::string Hex64(uint64_t value) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(value));
  return buf;
}

std::string FormatRatio(double ratio) {
  if (!std::isfinite(ratio)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", ratio);
  return buf;
}

std::string Snippet(std::string_view text, size_t max_chars) {
  std::string out;
  out.reserve(std::min(text.size(), max_chars + 3));
  for (char c : text) {
    const auto u = static_cast<unsigned char>(c);
    out.push_back(u < 0x20 || u == 0x7f ? ' ' : c);
  }
  if (out.size() <= max_chars) return out;
  size_t cut = max_chars;
  // Back up over UTF-8 continuation bytes (10xxxxxx) so that no character is split.
  while (cut > 0 && (static_cast<unsigned char>(out[cut]) & 0xC0) == 0x80) --cut;
  out.resize(cut);
  out += "...";
  return out;
}

Table::Table(std::vector<std::string> headers)
    : headers_(std::move(headers)), numeric_(headers_.size(), false) {}

void Table::SetNumeric(size_t column) {
  assert(column < numeric_.size());
  numeric_[column] = true;
}

void Table::AddRow(std::vector<std::string> cells) {
  assert(cells.size() <= headers_.size());
  cells.resize(headers_.size());
  rows_.push_back(std::move(cells));
}

void Table::Print(std::ostream& out) const {
  std::vector<size_t> width(headers_.size());
  for (size_t c = 0; c < headers_.size(); ++c) width[c] = headers_[c].size();
  for (const auto& row : rows_) {
    for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  }
  auto print_row = [&](const std::vector<std::string>& row) {
    std::string line;
    for (size_t c = 0; c < row.size(); ++c) {
      const std::string pad(width[c] - row[c].size(), ' ');
      if (c > 0) line += "  ";
      line += numeric_[c] ? pad + row[c] : row[c] + (c + 1 < row.size() ? pad : "");
    }
    out << line << '\n';
  };
  print_row(headers_);
  std::vector<std::string> rule(headers_.size());
  for (size_t c = 0; c < rule.size(); ++c) rule[c] = std::string(width[c], '-');
  print_row(rule);
  for (const auto& row : rows_) print_row(row);
}

ProgressBar::ProgressBar(std::string label, uint64_t total)
    : label_(std::move(label)), total_(total), enabled_(isatty(STDERR_FILENO) == 1) {}

ProgressBar::~ProgressBar() { Finish(); }

void ProgressBar::Update(uint64_t done, uint64_t total) {
  if (!enabled_) return;
  if (total != 0) total_ = total;
  done_ = done;
  const auto now = std::chrono::steady_clock::now();
  if (drawn_ && now - last_draw_ < std::chrono::milliseconds(100) && done_ < total_) return;
  last_draw_ = now;
  Draw();
}

void ProgressBar::SetDetail(std::string detail) { detail_ = std::move(detail); }

void ProgressBar::Draw() {
  constexpr int kWidth = 30;
  const double fraction =
      total_ == 0 ? 0.0 : std::min(1.0, static_cast<double>(done_) / static_cast<double>(total_));
  const int filled = static_cast<int>(fraction * kWidth);
  std::string bar(static_cast<size_t>(filled), '#');
  bar.resize(kWidth, ' ');
  // "\033[K" erases what a longer previous line (e.g. a longer detail) left to the right.
  std::fprintf(stderr, "\r%s [%s] %3d%% %llu/%llu%s%s\033[K", label_.c_str(), bar.c_str(),
               static_cast<int>(fraction * 100.0), static_cast<unsigned long long>(done_),
               static_cast<unsigned long long>(total_), detail_.empty() ? "" : " ",
               detail_.c_str());
  std::fflush(stderr);
  drawn_ = true;
}

void ProgressBar::Finish() {
  if (enabled_ && drawn_) {
    // Erase the bar: CR, then "erase in line" so the next message starts on a clean line.
    std::fputs("\r\033[K", stderr);
    std::fflush(stderr);
  }
  enabled_ = false;
}

int Fail(std::string_view command, const Status& status) {
  return Fail(command, status.ToString());
}

int Fail(std::string_view command, std::string_view message) {
  std::cerr << "shotdb " << command << ": " << message << '\n';
  return 1;
}

}  // namespace shotdb::cli
