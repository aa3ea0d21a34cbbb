#include "engine/prompt_format.h"

#include <gtest/gtest.h>

namespace shotdb {
namespace {

TEST(PromptFormatTest, FormatsDemosQueriesAndLabels) {
  auto f = PromptFormat::Create("utterance: {text}\nintent: {label}", "\n==\n");
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->FormatDemo("hi", "greet"), "utterance: hi\nintent: greet");
  EXPECT_EQ(f->FormatBlock({{"a", "x"}, {"b", "y"}}, true),
            "utterance: a\nintent: x\n==\nutterance: b\nintent: y");
  EXPECT_EQ(f->FormatBlock({{"a", "x"}}, false), "\n==\nutterance: a\nintent: x");
  EXPECT_EQ(f->FormatQuery("q") + f->LabelContinuation("x"), "\n==\n" + f->FormatDemo("q", "x"));
  EXPECT_EQ(f->LabelContinuation("x"), " x");
  EXPECT_TRUE(PromptFormat::Create("{label} {text}", "\n").status().IsInvalidArgument());
  EXPECT_TRUE(PromptFormat::Create("{text}", "\n").status().IsInvalidArgument());
}

}  // namespace
}  // namespace shotdb
