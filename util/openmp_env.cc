#include "util/openmp_env.h"

#include <unistd.h>

#include <cstdlib>

namespace shotdb {

void SetPassiveOpenMpWait() { ::setenv("OMP_WAIT_POLICY", "PASSIVE", /*overwrite=*/0); }

void ReexecWithPassiveOpenMpWait(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return;
  SetPassiveOpenMpWait();
  ::execv("/proc/self/exe", argv);
  // Not reached unless exec failed: run on with the default policy.
}

}  // namespace shotdb
