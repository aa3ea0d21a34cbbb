// RAII owners of the CUDA objects gpu/ uses: a stream, an event and a device allocation.
//
// Each is move-only and releases its object in the destructor (errors there are ignored: there is
// nobody to report them to, and a sticky device error is reported by the next checked call).
// Creation returns Result so that a machine without a GPU gets an IOError, never an abort.
// Thread-safety: the objects are plain handles; CUDA itself allows using one stream or event from
// several threads, but moving or destroying a wrapper while another thread uses it is a race.
#ifndef SHOTDB_GPU_STREAM_H_
#define SHOTDB_GPU_STREAM_H_

#include <cuda_runtime_api.h>

#include <cstddef>

#include "util/status.h"

namespace shotdb {
namespace gpu {

// A non-blocking stream (cudaStreamNonBlocking: it does not synchronize with the legacy default
// stream, so copies on it overlap with work other code puts on stream 0).
class CudaStream {
 public:
  // Creates a stream on the current device. IOError if CUDA refuses (e.g. no device).
  static Result<CudaStream> Create();
  CudaStream() = default;  // holds no stream; get() is nullptr (the legacy default stream)
  ~CudaStream();
  CudaStream(CudaStream&& o) noexcept;
  CudaStream& operator=(CudaStream&& o) noexcept;
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;

  cudaStream_t get() const { return stream_; }
  // Blocks until everything enqueued so far has finished. IOError with the CUDA error otherwise
  // (including errors of earlier asynchronous work on the stream).
  Status Synchronize() const;

 private:
  explicit CudaStream(cudaStream_t s) : stream_(s) {}
  cudaStream_t stream_ = nullptr;
};

// An event. With timing disabled (the default) recording and waiting are cheapest; enable it only
// for ElapsedMs.
class CudaEvent {
 public:
  // IOError if CUDA refuses.
  static Result<CudaEvent> Create(bool enable_timing = false);
  // Holds no event: stands for work already finished (WaitOn and Synchronize return at once,
  // Query says true; Record fails).
  CudaEvent() = default;
  ~CudaEvent();
  CudaEvent(CudaEvent&& o) noexcept;
  CudaEvent& operator=(CudaEvent&& o) noexcept;
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;

  cudaEvent_t get() const { return event_; }
  // Captures the work enqueued on `stream` so far.
  Status Record(cudaStream_t stream) const;
  // Makes later work on `stream` wait (on the device, not the host) for the captured work.
  Status WaitOn(cudaStream_t stream) const;
  // Blocks the host until the captured work has finished.
  Status Synchronize() const;
  // True if the captured work has finished (or nothing was recorded); IOError on a CUDA error.
  Result<bool> Query() const;
  // Milliseconds between `start` and this event; both must have timing enabled and be complete.
  Result<float> ElapsedMsSince(const CudaEvent& start) const;

 private:
  explicit CudaEvent(cudaEvent_t e) : event_(e) {}
  cudaEvent_t event_ = nullptr;
};

// `bytes` of device memory from cudaMalloc, freed with cudaFree (which synchronizes the device).
class DeviceBuffer {
 public:
  // IOError if the allocation fails (out of memory, no device). bytes == 0 gives an empty buffer.
  static Result<DeviceBuffer> Allocate(size_t bytes);
  DeviceBuffer() = default;
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return ptr_; }
  size_t size() const { return size_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  DeviceBuffer(void* p, size_t n) : ptr_(p), size_(n) {}
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

}  // namespace gpu
}  // namespace shotdb

#endif  // SHOTDB_GPU_STREAM_H_
