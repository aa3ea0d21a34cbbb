// PhaseClock: splits wall time into phases for ForwardProfile and the decode loops' profiles.
// Each Charge adds the milliseconds since the previous Charge (or construction) to one counter,
// after waiting for the device, so queued GPU work lands in the phase that launched it. A disabled
// clock does nothing (no synchronisation), so profiling code can stay on the normal path.
//
// Thread-safety: one clock per thread (it holds the last mark).
#ifndef SHOTDB_QUERY_MODEL_PHASE_CLOCK_H_
#define SHOTDB_QUERY_MODEL_PHASE_CLOCK_H_

#include <torch/torch.h>

#include <chrono>

namespace shotdb {

class PhaseClock {
 public:
  PhaseClock(torch::Device device, bool enabled) : device_(device), enabled_(enabled) {
    if (enabled_) mark_ = std::chrono::steady_clock::now();
  }

  bool enabled() const { return enabled_; }

  // Adds the milliseconds since the last mark to *ms (when ms is not null) and sets a new mark; a
  // null ms discards the interval (e.g. time already charged by a nested clock).
  void Charge(double* ms) {
    if (!enabled_) return;
    if (device_.is_cuda()) torch::cuda::synchronize(device_.has_index() ? device_.index() : -1);
    const auto now = std::chrono::steady_clock::now();
    if (ms != nullptr) *ms += std::chrono::duration<double, std::milli>(now - mark_).count();
    mark_ = now;
  }

 private:
  torch::Device device_;
  bool enabled_;
  std::chrono::steady_clock::time_point mark_;
};

}  // namespace shotdb

#endif  // SHOTDB_QUERY_MODEL_PHASE_CLOCK_H_
