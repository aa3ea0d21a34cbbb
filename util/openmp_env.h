// OpenMP's wait policy for programs that link libtorch on the CPU.
//
// Debian's libtorch runs its element-wise and reduction kernels on libgomp's OpenMP threads and its
// matrix products on OpenBLAS's own pthreads. By default an OpenMP thread that finishes a parallel
// region spins for a while before sleeping, so during the next matrix product it competes for the
// cores with OpenBLAS's threads. On the 2-core development VM this made a SmolLM2 prefill 4x slower
// than the same forward with OMP_WAIT_POLICY=PASSIVE (bench/prefill_bench; docs/model.md).
//
// libgomp reads OMP_WAIT_POLICY once, when it is loaded, i.e. before main() of a program linked
// against it. Hence:
//   - SetPassiveOpenMpWait() sets it (unless the user set it) for a program about to exec one that
//     links libtorch (`shotdb` before handing a model command to `shotdb-model`);
//   - ReexecWithPassiveOpenMpWait(argv), called first in main() of a program that links libtorch,
//     sets it and re-executes the program once (/proc/self/exe, the same argv) if it was unset.
//     It returns when the variable was already set (by the user or the first execution) or when
//     the re-execution is impossible, in which case the program runs with libgomp's default.
#ifndef SHOTDB_UTIL_OPENMP_ENV_H_
#define SHOTDB_UTIL_OPENMP_ENV_H_

namespace shotdb {

void SetPassiveOpenMpWait();
void ReexecWithPassiveOpenMpWait(char** argv);

}  // namespace shotdb

#endif  // SHOTDB_UTIL_OPENMP_ENV_H_
