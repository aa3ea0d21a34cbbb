#include "engine/prompt_format.h"

namespace shotdb {

namespace {
size_t CountOccurrences(std::string_view s, std::string_view what) {
  size_t n = 0;
  for (size_t p = s.find(what); p != std::string_view::npos; p = s.find(what, p + what.size())) ++n;
  return n;
}
}  // namespace

Result<PromptFormat> PromptFormat::Create(std::string demo_template, std::string separator) {
  if (CountOccurrences(demo_template, "{text}") != 1 ||
      CountOccurrences(demo_template, "{label}") != 1) {
    return Status::InvalidArgument(
        "prompt template must contain exactly one {text} and one {label}: '" + demo_template + "'");
  }
  const size_t t = demo_template.find("{text}");
  const size_t l = demo_template.find("{label}");
  if (l < t) {
    return Status::InvalidArgument("prompt template must place {text} before {label}: '" +
                                   demo_template + "'");
  }
  PromptFormat f;
  f.template_ = std::move(demo_template);
  f.separator_ = std::move(separator);
  f.before_text_ = f.template_.substr(0, t);
  f.between_ = f.template_.substr(t + 6, l - (t + 6));
  f.after_label_ = f.template_.substr(l + 7);
  // Trailing spaces before {label} belong to the label's tokens, not to the query prompt.
  size_t keep = f.between_.find_last_not_of(' ');
  keep = keep == std::string::npos ? 0 : keep + 1;
  f.label_space_ = f.between_.substr(keep);
  f.between_.resize(keep);
  return f;
}

std::string PromptFormat::FormatDemo(std::string_view text, std::string_view label) const {
  std::string out = before_text_;
  out.append(text).append(between_).append(label_space_).append(label).append(after_label_);
  return out;
}

std::string PromptFormat::FormatBlock(const std::vector<std::pair<std::string, std::string>>& demos,
                                      bool first_block) const {
  std::string out;
  for (size_t i = 0; i < demos.size(); ++i) {
    if (i > 0 || !first_block) out += separator_;
    out += FormatDemo(demos[i].first, demos[i].second);
  }
  return out;
}

std::string PromptFormat::FormatQuery(std::string_view text) const {
  std::string out = separator_ + before_text_;
  out.append(text).append(between_);
  return out;
}

std::string PromptFormat::LabelContinuation(std::string_view label) const {
  return label_space_ + std::string(label);
}

}  // namespace shotdb
