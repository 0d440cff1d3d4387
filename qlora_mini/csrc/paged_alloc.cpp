// Hand-written (not generated from a notebook): torch bindings for paged_alloc.cu, built JIT by
// qlora_mini.paged.load_extension() on CUDA machines (torch.utils.cpp_extension.load).
//
//   managed_zeros(shape, dtype, device_index) -> a CUDA tensor whose storage is cudaMallocManaged
//                                                memory, freed by a deleter when torch drops it
//   prefetch(tensor, device_index, stream)    -> cudaMemPrefetchAsync on `stream` (the integer
//                                                torch.cuda.current_stream().cuda_stream);
//                                                device_index -1 sends the pages to the CPU
// Only torch's CPU-side headers are used (no c10/cuda), so this file also syntax-checks against
// a CPU build of torch.
#include <algorithm>

#include <torch/extension.h>

#include "paged_alloc.h"

torch::Tensor managed_zeros(std::vector<int64_t> shape, torch::ScalarType dtype, int64_t device) {
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  const size_t nbytes = static_cast<size_t>(std::max<int64_t>(numel, 1)) * c10::elementSize(dtype);
  void* ptr = nullptr;
  std::string err = qlora_mini::managed_alloc(&ptr, nbytes);
  TORCH_CHECK(err.empty(), "paged_alloc: ", err, " (", nbytes, " bytes)");
  auto options = torch::TensorOptions().dtype(dtype).device(torch::kCUDA, device);
  return torch::from_blob(ptr, shape, [](void* p) { qlora_mini::managed_free(p); }, options);
}

void prefetch(const torch::Tensor& t, int64_t device, int64_t stream_handle) {
  TORCH_CHECK(t.is_cuda(), "prefetch: expected a CUDA (managed) tensor");
  const size_t nbytes = static_cast<size_t>(t.numel()) * t.element_size();
  void* stream = reinterpret_cast<void*>(stream_handle);
  std::string err = qlora_mini::managed_prefetch(t.data_ptr(), nbytes, static_cast<int>(device), stream);
  TORCH_CHECK(err.empty(), "paged_alloc: ", err);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qlora_mini paged (unified-memory) buffers for optimizer states";
  m.def("managed_zeros", &managed_zeros, "zero-filled tensor in CUDA unified memory");
  m.def("prefetch", &prefetch, "cudaMemPrefetchAsync a managed tensor to a device (-1: CPU)");
}
