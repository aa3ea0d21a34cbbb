#include "gpu/stream.h"

#include <utility>

#include "gpu/cuda_util.h"

namespace shotdb {
namespace gpu {

Result<CudaStream> CudaStream::Create() {
  cudaStream_t s = nullptr;
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return CudaStream(s);
}

CudaStream::~CudaStream() {
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

CudaStream::CudaStream(CudaStream&& o) noexcept : stream_(std::exchange(o.stream_, nullptr)) {}

CudaStream& CudaStream::operator=(CudaStream&& o) noexcept {
  if (this != &o) {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    stream_ = std::exchange(o.stream_, nullptr);
  }
  return *this;
}

Status CudaStream::Synchronize() const {
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return Status::OK();
}

Result<CudaEvent> CudaEvent::Create(bool enable_timing) {
  cudaEvent_t e = nullptr;
  SHOTDB_CUDA_RETURN_IF_ERROR(
      cudaEventCreateWithFlags(&e, enable_timing ? cudaEventDefault : cudaEventDisableTiming));
  return CudaEvent(e);
}

CudaEvent::~CudaEvent() {
  if (event_ != nullptr) cudaEventDestroy(event_);
}

CudaEvent::CudaEvent(CudaEvent&& o) noexcept : event_(std::exchange(o.event_, nullptr)) {}

CudaEvent& CudaEvent::operator=(CudaEvent&& o) noexcept {
  if (this != &o) {
    if (event_ != nullptr) cudaEventDestroy(event_);
    event_ = std::exchange(o.event_, nullptr);
  }
  return *this;
}

Status CudaEvent::Record(cudaStream_t stream) const {
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaEventRecord(event_, stream));
  return Status::OK();
}

Status CudaEvent::WaitOn(cudaStream_t stream) const {
  if (event_ == nullptr) return Status::OK();  // no event: nothing to wait for
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream, event_, 0));
  return Status::OK();
}

Status CudaEvent::Synchronize() const {
  if (event_ == nullptr) return Status::OK();
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(event_));
  return Status::OK();
}

Result<bool> CudaEvent::Query() const {
  if (event_ == nullptr) return true;
  cudaError_t err = cudaEventQuery(event_);
  if (err == cudaSuccess) return true;
  if (err == cudaErrorNotReady) return false;
  return CudaStatus(err, "cudaEventQuery", "CudaEvent::Query");
}

Result<float> CudaEvent::ElapsedMsSince(const CudaEvent& start) const {
  float ms = 0;
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start.event_, event_));
  return ms;
}

Result<DeviceBuffer> DeviceBuffer::Allocate(size_t bytes) {
  if (bytes == 0) return DeviceBuffer();
  void* p = nullptr;
  SHOTDB_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, bytes));
  return DeviceBuffer(p, bytes);
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_ != nullptr) cudaFree(ptr_);
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept
    : ptr_(std::exchange(o.ptr_, nullptr)), size_(std::exchange(o.size_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = std::exchange(o.ptr_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

}  // namespace gpu
}  // namespace shotdb
