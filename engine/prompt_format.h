// PromptFormat: how demonstrations, blocks and queries become text. The engine uses it to index
// each demonstration as the model sees it; query/ to build prompts.
//
// A task stores a demonstration template with exactly one {text} and one {label} placeholder, and a
// separator placed between demonstrations. For the NLU intent data (the paper's format):
//   template  "utterance: {text}\nintent: {label}"     separator "\n==\n"
// A block's text is its demonstrations joined by the separator; every block after block 0 also
// starts with the separator, so the pool's text is the concatenation of its blocks' texts in order.
// A query is the separator followed by the template cut just before {label}; spaces that preceded
// {label} move to the front of each label ("intent:" + " alarm set"), which is how BPE vocabularies
// tokenize a word after a space.
#ifndef SHOTDB_ENGINE_PROMPT_FORMAT_H_
#define SHOTDB_ENGINE_PROMPT_FORMAT_H_

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "util/status.h"

namespace shotdb {

class PromptFormat {
 public:
  static constexpr std::string_view kDefaultTemplate = "utterance: {text}\nintent: {label}";
  static constexpr std::string_view kDefaultSeparator = "\n==\n";

  // InvalidArgument unless `demo_template` holds exactly one {text} and one {label}, {text} first.
  static Result<PromptFormat> Create(std::string demo_template, std::string separator);

  // One demonstration: the template with both placeholders filled.
  std::string FormatDemo(std::string_view text, std::string_view label) const;
  // The text of a block holding `demos` (text, label pairs); see the file comment for block 0.
  std::string FormatBlock(const std::vector<std::pair<std::string, std::string>>& demos,
                          bool first_block) const;
  // The text appended after the selected blocks to ask about `text`.
  std::string FormatQuery(std::string_view text) const;
  // What the model must generate for `label` right after FormatQuery's text.
  std::string LabelContinuation(std::string_view label) const;

  const std::string& demo_template() const { return template_; }
  const std::string& separator() const { return separator_; }

 private:
  PromptFormat() = default;
  std::string template_, separator_;
  std::string before_text_, between_, label_space_, after_label_;
};

}  // namespace shotdb

#endif  // SHOTDB_ENGINE_PROMPT_FORMAT_H_
