// qlora_mini/csrc/dequant_4bit_binding.cpp: hand-written PyTorch binding (not generated).
//
// Checks the tensors at the boundary and fills the plain-C QmDequantArgs (dequant_4bit_torch.h,
// shared with the CPU binding), then launches the kernel of dequant_4bit.cu on the current CUDA
// stream. The output buffer is allocated by the caller (qlora_mini.kernels.dequantize_4bit_cuda),
// so tests can hand in a NaN-poisoned one and see every element overwritten.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "dequant_4bit_torch.h"

void dequantize_4bit_out(const torch::Tensor& packed, const torch::Tensor& code,
                         const torch::Tensor& absmax, const std::optional<torch::Tensor>& nested_absmax,
                         const std::optional<torch::Tensor>& nested_code,
                         const std::optional<torch::Tensor>& offset, int64_t blocksize,
                         int64_t nested_blocksize, torch::Tensor out) {
    TORCH_CHECK(packed.is_cuda(), "packed must be a CUDA tensor");
    const QmDequantArgs a = qm::args_from_tensors(packed, code, absmax, nested_absmax, nested_code,
                                                  offset, blocksize, nested_blocksize, out);
    const c10::cuda::CUDAGuard guard(packed.device());
    const char* err = qlora_mini_dequantize_4bit(&a, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == nullptr, "qlora_mini dequantize_4bit kernel: ", err ? err : "");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("dequantize_4bit_out", &dequantize_4bit_out,
          "Packed 4-bit codes (+ quantization state) -> out (float32/bfloat16/float16), in place",
          py::arg("packed"), py::arg("code"), py::arg("absmax"), py::arg("nested_absmax"),
          py::arg("nested_code"), py::arg("offset"), py::arg("blocksize"),
          py::arg("nested_blocksize"), py::arg("out"));
}
