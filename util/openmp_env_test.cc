#include "util/openmp_env.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

namespace shotdb {
namespace {

// Runs in the re-executed test binary (selected by the parent through argv and an env marker).
TEST(OpenMpEnvChild, SeesPassive) {
  if (std::getenv("SHOTDB_OPENMP_ENV_CHILD") == nullptr) GTEST_SKIP() << "run by the test below";
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  ASSERT_NE(policy, nullptr);
  EXPECT_EQ(std::string(policy), "PASSIVE");
}

// Without OMP_WAIT_POLICY the program re-executes itself with PASSIVE; the re-executed program
// (here: this test binary running only the test above) sees it.
TEST(OpenMpEnvTest, ReexecutesWithPassiveWhenUnset) {
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::unsetenv("OMP_WAIT_POLICY");
    ::setenv("SHOTDB_OPENMP_ENV_CHILD", "1", 1);
    std::string filter = "--gtest_filter=OpenMpEnvChild.SeesPassive";
    char* argv[] = {const_cast<char*>("util_test"), filter.data(), nullptr};
    ReexecWithPassiveOpenMpWait(argv);
    _exit(97);  // exec failed
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

// A policy the user chose is kept, and then nothing is re-executed.
TEST(OpenMpEnvTest, KeepsTheUsersChoice) {
  const char* before = std::getenv("OMP_WAIT_POLICY");
  const std::string saved = before != nullptr ? before : "";
  ::setenv("OMP_WAIT_POLICY", "ACTIVE", 1);
  char* argv[] = {const_cast<char*>("util_test"), nullptr};
  ReexecWithPassiveOpenMpWait(argv);  // returns: already set
  SetPassiveOpenMpWait();
  EXPECT_EQ(std::string(std::getenv("OMP_WAIT_POLICY")), "ACTIVE");
  if (before != nullptr) {
    ::setenv("OMP_WAIT_POLICY", saved.c_str(), 1);
  } else {
    ::unsetenv("OMP_WAIT_POLICY");
  }
}

}  // namespace
}  // namespace shotdb
