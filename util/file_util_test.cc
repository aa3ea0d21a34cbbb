#include "util/file_util.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>

namespace shotdb {
namespace {

TEST(FileUtilTest, PathPieces) {
  EXPECT_EQ(DirName("a/b/c.txt"), "a/b");
  EXPECT_EQ(DirName("c.txt"), ".");
  EXPECT_EQ(DirName("/c"), "/");
  EXPECT_EQ(BaseName("a/b/c.txt"), "c.txt");
  EXPECT_EQ(Extension("a/b/model.gguf"), ".gguf");
  EXPECT_EQ(Extension("a.d/model"), "");
  EXPECT_EQ(Extension(".hidden"), "");
  EXPECT_EQ(JoinPath("a/", "b"), "a/b");
  EXPECT_EQ(JoinPath("a", "b"), "a/b");
}

// Builds a tree with a file, a nested directory and a symbolic link to a directory outside the
// tree, lists it, and removes it: the link's target must survive (links are not followed).
TEST(FileUtilTest, CreateListAndRemoveTree) {
  char tmpl[] = "/tmp/shotdb_file_util_XXXXXX";
  const std::string root = mkdtemp(tmpl);
  const std::string outside = root + "-outside";
  ASSERT_TRUE(CreateDirectories(root + "/tree/x/y").ok());
  ASSERT_TRUE(CreateDirectories(root + "/tree/x/y").ok());  // already there: fine
  ASSERT_TRUE(CreateDirectories(outside).ok());
  std::ofstream(root + "/tree/b.txt") << "b";
  std::ofstream(root + "/tree/x/y/a.bin") << "a";
  std::ofstream(outside + "/keep") << "k";
  ASSERT_EQ(symlink(outside.c_str(), (root + "/tree/link").c_str()), 0);

  auto names = ListDirectory(root + "/tree");
  ASSERT_TRUE(names.ok());
  EXPECT_EQ(*names, (std::vector<std::string>{"b.txt", "link", "x"}));
  EXPECT_TRUE(IsDirectory(root + "/tree/x"));
  EXPECT_FALSE(IsDirectory(root + "/tree/b.txt"));
  EXPECT_EQ(FileSizeOrZero(root + "/tree/b.txt"), 1u);
  EXPECT_EQ(FileSizeOrZero(root + "/tree/missing"), 0u);

  ASSERT_TRUE(RemoveAll(root).ok());
  EXPECT_FALSE(PathExists(root));
  EXPECT_TRUE(PathExists(outside + "/keep"));
  EXPECT_TRUE(RemoveAll(root).ok());  // nothing left: still OK
  ASSERT_TRUE(RemoveAll(outside).ok());

  auto missing = ListDirectory(root);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find(root), std::string::npos);
  std::ofstream(root) << "a file";
  Status s = CreateDirectories(root + "/sub");
  EXPECT_FALSE(s.ok());
  std::remove(root.c_str());
}

}  // namespace
}  // namespace shotdb
