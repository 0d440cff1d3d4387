// Hand-written (not generated from a notebook): CUDA unified-memory helpers for qlora_mini's
// PagedAdamW (chapter 7). Plain CUDA runtime calls only, no torch headers, so that this file
// compiles on its own with `nvcc -c` (tests/test_paged.py checks sm_80 and sm_90).
//
// cudaMallocManaged gives one pointer valid on host and device; the driver migrates 4 KiB-2 MiB
// pages on demand, and under GPU memory pressure it evicts pages to CPU RAM instead of failing.
// cudaMemPrefetchAsync moves the pages to the GPU ahead of the optimizer update, so the update
// does not stall on page faults one page at a time.
#include <cuda_runtime.h>
#include <cstddef>
#include <string>

#include "paged_alloc.h"

namespace qlora_mini {

static std::string check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return std::string();
  return std::string(what) + ": " + cudaGetErrorString(err);
}

// Allocate `nbytes` of managed memory, zero it; returns "" on success or an error message.
std::string managed_alloc(void** ptr, size_t nbytes) {
  *ptr = nullptr;
  std::string err = check(cudaMallocManaged(ptr, nbytes, cudaMemAttachGlobal), "cudaMallocManaged");
  if (!err.empty()) return err;
  return check(cudaMemset(*ptr, 0, nbytes), "cudaMemset");
}

void managed_free(void* ptr) {
  if (ptr != nullptr) cudaFree(ptr);  // deleter: errors at teardown are ignored on purpose
}

// Prefetch to `device` (>= 0: that GPU; -1: the CPU) on `stream` (a cudaStream_t as void*).
std::string managed_prefetch(void* ptr, size_t nbytes, int device, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
#if CUDART_VERSION >= 13000
  // CUDA 13 takes a cudaMemLocation (the int-device overload was removed).
  cudaMemLocation loc;
  loc.type = device < 0 ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  loc.id = device < 0 ? 0 : device;
  return check(cudaMemPrefetchAsync(ptr, nbytes, loc, 0, s), "cudaMemPrefetchAsync");
#else
  return check(cudaMemPrefetchAsync(ptr, nbytes, device < 0 ? cudaCpuDeviceId : device, s),
               "cudaMemPrefetchAsync");
#endif
}

}  // namespace qlora_mini
