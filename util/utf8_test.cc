#include "util/utf8.h"

#include <gtest/gtest.h>

#include <string>

namespace shotdb {
namespace {

TEST(Utf8Test, AcceptsWellFormedAndNamesTheFirstBadByte) {
  EXPECT_TRUE(IsValidUtf8(""));
  EXPECT_TRUE(IsValidUtf8("plain ascii"));
  EXPECT_TRUE(IsValidUtf8("caf\xc3\xa9 \xe6\x9d\xb1\xe4\xba\xac \xf0\x9f\x98\x80"));  // é 東京 😀
  size_t at = 99;
  EXPECT_FALSE(IsValidUtf8("ok\xff", &at));
  EXPECT_EQ(at, 2u);
  EXPECT_FALSE(IsValidUtf8("a\xc3", &at));  // truncated sequence
  EXPECT_EQ(at, 1u);
  EXPECT_FALSE(IsValidUtf8("\xc0\xaf", &at));  // overlong "/"
  EXPECT_EQ(at, 0u);
  EXPECT_FALSE(IsValidUtf8("x\xed\xa0\x80", &at));  // a surrogate, U+D800
  EXPECT_EQ(at, 1u);
  EXPECT_FALSE(IsValidUtf8("\xf4\x90\x80\x80", &at));  // above U+10FFFF
  EXPECT_EQ(at, 0u);
  EXPECT_FALSE(IsValidUtf8("\xe2\x28\xa1"));  // bad continuation byte
  // Python agrees on each of these: bytes(...).decode("utf-8") raises for exactly the false ones.
}

}  // namespace
}  // namespace shotdb
