// The C heap's policy for programs that run models on the CPU.
//
// A forward pass allocates and frees tensors of megabytes every layer (a DBSA query over an
// 8k-token context gathers ~370 MB of K/V and scores it per layer). With glibc's defaults, blocks
// above the mmap threshold (128 KiB, raised adaptively up to 32 MiB) are mapped fresh and unmapped
// on free, and the top of the heap is trimmed back to the OS, so every layer pays first-touch page
// faults again: on the 2-core development VM such a query spent ~20% of its time clearing pages
// (perf), and its decode took 1.5-1.8 s against 1.0-1.2 s with the memory kept (docs/results.md).
//
// KeepFreedHeapMemory() raises the mmap threshold to glibc's maximum (32 MiB) and stops trimming,
// so freed memory is reused by the next allocation instead of being returned and faulted in again.
// The price is that the process keeps its peak heap until it exits: right for the command-line
// model programs (`shotdb-model`), which call it first in main(); a library embedded in a serving
// process does not change its host's allocator. Returns false (and changes nothing further) where
// the C library is not glibc or refuses a setting.
#ifndef SHOTDB_UTIL_HEAP_ENV_H_
#define SHOTDB_UTIL_HEAP_ENV_H_

namespace shotdb {

bool KeepFreedHeapMemory();

}  // namespace shotdb

#endif  // SHOTDB_UTIL_HEAP_ENV_H_
