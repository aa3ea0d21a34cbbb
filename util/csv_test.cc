#include "util/csv.h"

#include <gtest/gtest.h>

namespace shotdb {
namespace {

TEST(CsvTest, QuotedFieldsCommasNewlinesAndDoubledQuotes) {
  auto t = ParseCsv("text,label\r\n\"a, b\",1\n\"say \"\"hi\"\"\nthere\",2\nplain,\n", "t.csv");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_EQ(t->header, (std::vector<std::string>{"text", "label"}));
  ASSERT_EQ(t->rows.size(), 3u);
  EXPECT_EQ(t->rows[0][0], "a, b");
  EXPECT_EQ(t->rows[1][0], "say \"hi\"\nthere");
  EXPECT_EQ(t->rows[1][1], "2");
  EXPECT_EQ(t->rows[2][1], "");
  EXPECT_EQ(*t->Column("label"), 1u);
  EXPECT_TRUE(t->Column("nope").status().IsNotFound());
}

TEST(CsvTest, NoTrailingNewlineAndEmptyQuotedField) {
  auto t = ParseCsv("a,b\n\"\",x", "t.csv");
  ASSERT_TRUE(t.ok());
  ASSERT_EQ(t->rows.size(), 1u);
  EXPECT_EQ(t->rows[0][0], "");
  EXPECT_EQ(t->rows[0][1], "x");
}

TEST(CsvTest, ErrorsNameTheProblem) {
  auto unterminated = ParseCsv("a,b\n\"open,1\n", "bad.csv");
  ASSERT_FALSE(unterminated.ok());
  EXPECT_NE(unterminated.status().message().find("bad.csv:2: unterminated"), std::string::npos);
  auto ragged = ParseCsv("a,b\n1,2,3\n", "r.csv");
  ASSERT_FALSE(ragged.ok());
  EXPECT_NE(ragged.status().message().find("3 fields, expected 2"), std::string::npos);
  EXPECT_TRUE(ReadCsvFile("/nonexistent/x.csv").status().IsIOError());
}

TEST(StatusTest, CodesAndContext) {
  Status s = Status::Corruption("xxh3 mismatch").WithContext("block 3");
  EXPECT_TRUE(s.IsCorruption());
  EXPECT_EQ(s.ToString(), "Corruption: block 3: xxh3 mismatch");
  EXPECT_EQ(Status::OK().WithContext("x").ToString(), "OK");
  Result<int> r = Status::NotFound("k");
  EXPECT_TRUE(r.status().IsNotFound());
  Result<int> v = 7;
  EXPECT_EQ(*v, 7);
}

}  // namespace
}  // namespace shotdb
