// qlora_mini/csrc/dequant_4bit_cpu_binding.cpp: hand-written PyTorch binding (not generated).
//
// The CPU twin (dequant_4bit_cpu.cpp, no torch headers) as a Python function that takes tensors:
// the checks (dequant_4bit_torch.h, shared with the CUDA binding), the output's allocation and
// the call all happen here, in one crossing from Python. On a 1024x1024 weight the kernel takes
// about 0.1 ms, and the same work done in Python (checks, argument marshalling through ctypes)
// cost about half as much again; chapter 4 measures both.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>

#include "dequant_4bit_torch.h"

extern "C" const char* qlora_mini_dequantize_4bit_cpu(const QmDequantArgs* args, int n_threads,
                                                      int fresh_out);
extern "C" const char* qlora_mini_quantize_4bit_cpu(const float* x, int64_t n, int log2_blocksize,
                                                    const float* cuts, const uint8_t* order,
                                                    uint8_t* packed, float* absmax, int n_threads);
extern "C" const char* qlora_mini_dequantize_4bit_cpu_isa(void);

// Dequantize into `out` (checked), or into a new tensor of `shape` and `dtype`.
at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& code, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& offset, int64_t blocksize,
                           int64_t nested_blocksize, at::IntArrayRef shape, at::ScalarType dtype,
                           const std::optional<at::Tensor>& out) {
    TORCH_CHECK(packed.device().is_cpu(), "packed must be a CPU tensor");
    at::Tensor o = out.has_value() ? *out : at::empty(shape, at::TensorOptions().dtype(dtype));
    TORCH_CHECK(o.sizes() == shape && o.scalar_type() == dtype, "out must be ", dtype,
                " of shape ", shape, ", got ", o.scalar_type(), " ", o.sizes());
    // Inputs may be strided views: dense copies (the tensors themselves when already dense),
    // held here until the kernel has run.
    auto dense = [](const std::optional<at::Tensor>& t) {
        return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
    };
    const at::Tensor p = packed.contiguous(), c = code.contiguous(), am = absmax.contiguous();
    const auto na = dense(nested_absmax), nc = dense(nested_code), off = dense(offset);
    const QmDequantArgs a = qm::args_from_tensors(p, c, am, na, nc, off, blocksize,
                                                  nested_blocksize, o);
    const char* err = qlora_mini_dequantize_4bit_cpu(&a, at::get_num_threads(), !out.has_value());
    TORCH_CHECK(err == nullptr, "qlora_mini dequantize_4bit_cpu: ", err ? err : "");
    return o;
}

// Chapter 3's blockwise absmax + nearest code + packing in one pass (kernels.quantize_blocks_cpu
// checks and allocates; here only what the C function needs to stay inside the buffers).
void quantize_blocks(const at::Tensor& x, int64_t blocksize, const at::Tensor& cuts,
                     const at::Tensor& order, at::Tensor packed, at::Tensor absmax) {
    const int64_t n = x.numel();
    const auto cpu = at::Device(at::kCPU);
    qm::check_tensor(x, "x", at::kFloat, n, cpu);
    qm::check_tensor(cuts, "cuts", at::kFloat, 15, cpu);
    qm::check_tensor(order, "order", at::kByte, 16, cpu);
    qm::check_tensor(packed, "packed", at::kByte, (n + 1) / 2, cpu);
    qm::check_tensor(absmax, "absmax", at::kFloat, (n + blocksize - 1) / blocksize, cpu);
    const char* err = qlora_mini_quantize_4bit_cpu(
        x.data_ptr<float>(), n, qm::log2_exact(blocksize, "blocksize"), cuts.data_ptr<float>(),
        order.data_ptr<uint8_t>(), packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
        at::get_num_threads());
    TORCH_CHECK(err == nullptr, "qlora_mini quantize_4bit_cpu: ", err ? err : "");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("dequantize_4bit", &dequantize_4bit,
          "Packed 4-bit codes (+ quantization state) -> float32/bfloat16/float16, on the CPU",
          py::arg("packed"), py::arg("code"), py::arg("absmax"), py::arg("nested_absmax"),
          py::arg("nested_code"), py::arg("offset"), py::arg("blocksize"),
          py::arg("nested_blocksize"), py::arg("shape"), py::arg("dtype"), py::arg("out"));
    m.def("quantize_blocks", &quantize_blocks, "float32 values -> packed 4-bit codes and absmax",
          py::arg("x"), py::arg("blocksize"), py::arg("cuts"), py::arg("order"),
          py::arg("packed"), py::arg("absmax"));
    m.def("isa", [] { return std::string(qlora_mini_dequantize_4bit_cpu_isa()); },
          "Which inner loop the kernel was built with (avx512bw or scalar)");
}
