#include "engine/text_tokenizer.h"

namespace shotdb {
namespace {

constexpr std::string_view kLower = "lower";
constexpr std::string_view kKeepCase = "keepcase";
constexpr std::string_view kNonAlnum = "nonalnum";
constexpr std::string_view kWhitespace = "whitespace";

bool IsAlphanumeric(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c >= 0x80;
}

// The ASCII bytes for which Python's str.isspace() is true.
bool IsWhitespace(unsigned char c) {
  return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f);
}

char AsciiLower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

}  // namespace

std::string TextTokenizerOptions::Serialize() const {
  std::string out(lowercase ? kLower : kKeepCase);
  out += ',';
  out += split == Split::kNonAlphanumeric ? kNonAlnum : kWhitespace;
  return out;
}

Result<TextTokenizerOptions> TextTokenizerOptions::Parse(std::string_view text) {
  const std::string context = "tokenizer options \"" + std::string(text) + "\"";
  const size_t comma = text.find(',');
  if (comma == std::string_view::npos || text.find(',', comma + 1) != std::string_view::npos) {
    return Status::InvalidArgument(context +
                                   ": expected two comma-separated parts \"<case>,<split>\"");
  }
  const std::string_view case_part = text.substr(0, comma);
  const std::string_view split_part = text.substr(comma + 1);
  TextTokenizerOptions options;
  if (case_part == kLower) {
    options.lowercase = true;
  } else if (case_part == kKeepCase) {
    options.lowercase = false;
  } else {
    return Status::InvalidArgument(context + ": unknown case \"" + std::string(case_part) +
                                   "\", expected \"lower\" or \"keepcase\"");
  }
  if (split_part == kNonAlnum) {
    options.split = Split::kNonAlphanumeric;
  } else if (split_part == kWhitespace) {
    options.split = Split::kWhitespace;
  } else {
    return Status::InvalidArgument(context + ": unknown split \"" + std::string(split_part) +
                                   "\", expected \"nonalnum\" or \"whitespace\"");
  }
  return options;
}

std::vector<std::string> TokenizeText(std::string_view text, const TextTokenizerOptions& options) {
  const bool by_alnum = options.split == TextTokenizerOptions::Split::kNonAlphanumeric;
  std::vector<std::string> tokens;
  size_t i = 0;
  while (i < text.size()) {
    const auto is_token_byte = [&](size_t pos) {
      const auto c = static_cast<unsigned char>(text[pos]);
      return by_alnum ? IsAlphanumeric(c) : !IsWhitespace(c);
    };
    if (!is_token_byte(i)) {
      ++i;
      continue;
    }
    size_t end = i + 1;
    while (end < text.size() && is_token_byte(end)) ++end;
    std::string token(text.substr(i, end - i));
    if (options.lowercase) {
      for (char& c : token) c = AsciiLower(c);
    }
    tokens.push_back(std::move(token));
    i = end;
  }
  return tokens;
}

}  // namespace shotdb
