// qlora_mini/csrc/dequant_4bit_binding.cpp: hand-written PyTorch binding (not generated).
//
// Checks the tensors at the boundary (device, dtype, size, contiguity), fills the plain-C
// QmDequantArgs and launches the kernel of dequant_4bit.cu on the current CUDA stream. The
// output buffer is allocated by the caller (qlora_mini.kernels.dequantize_4bit_cuda), so tests
// can hand in a NaN-poisoned one and see every element overwritten.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>

#include "dequant_4bit.h"

namespace {

void check_cuda(const torch::Tensor& t, const char* name, torch::ScalarType dtype, int64_t numel,
                const torch::Device& device) {
    TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(numel < 0 || t.numel() == numel, name, " has ", t.numel(), " elements, expected ",
                numel);
}

int log2_exact(int64_t v, const char* name) {
    TORCH_CHECK(v > 0 && (v & (v - 1)) == 0, name, " must be a power of two, got ", v);
    int k = 0;
    while ((int64_t{1} << k) < v) ++k;
    return k;
}

}  // namespace

void dequantize_4bit_out(const torch::Tensor& packed, const torch::Tensor& code,
                         const torch::Tensor& absmax, const std::optional<torch::Tensor>& nested_absmax,
                         const std::optional<torch::Tensor>& nested_code,
                         const std::optional<torch::Tensor>& offset, int64_t blocksize,
                         int64_t nested_blocksize, torch::Tensor out) {
    TORCH_CHECK(packed.is_cuda(), "packed must be a CUDA tensor");
    const auto device = packed.device();
    const int64_t n = out.numel();
    const int64_t n_blocks = (n + blocksize - 1) / blocksize;
    const bool dq = nested_absmax.has_value();
    check_cuda(packed, "packed", torch::kUInt8, (n + 1) / 2, device);
    check_cuda(code, "code", torch::kFloat32, 16, device);
    check_cuda(absmax, "absmax", dq ? torch::kUInt8 : torch::kFloat32, n_blocks, device);
    TORCH_CHECK(out.device() == device && out.is_contiguous(), "out must be contiguous on ", device);

    QmDequantArgs a{};
    a.packed = packed.data_ptr<uint8_t>();
    a.code = code.data_ptr<float>();
    if (dq) {
        TORCH_CHECK(nested_code.has_value() && offset.has_value(),
                    "double quant needs nested_absmax, nested_code and offset");
        const int64_t n_nested = (n_blocks + nested_blocksize - 1) / nested_blocksize;
        check_cuda(*nested_absmax, "nested_absmax", torch::kFloat32, n_nested, device);
        check_cuda(*nested_code, "nested_code", torch::kFloat32, 256, device);
        check_cuda(*offset, "offset", torch::kFloat32, 1, device);
        a.absmax_q = absmax.data_ptr<uint8_t>();
        a.nested_absmax = nested_absmax->data_ptr<float>();
        a.nested_code = nested_code->data_ptr<float>();
        a.offset = offset->data_ptr<float>();
    } else {
        a.absmax = absmax.data_ptr<float>();
    }
    switch (out.scalar_type()) {
        case torch::kFloat32: a.out_dtype = QM_FLOAT32; break;
        case torch::kBFloat16: a.out_dtype = QM_BFLOAT16; break;
        case torch::kFloat16: a.out_dtype = QM_FLOAT16; break;
        default: TORCH_CHECK(false, "out must be float32, bfloat16 or float16, got ", out.scalar_type());
    }
    a.out = out.data_ptr();
    a.n = n;
    a.log2_blocksize = log2_exact(blocksize, "blocksize");
    a.log2_nested_blocksize = log2_exact(nested_blocksize, "nested_blocksize");

    const c10::cuda::CUDAGuard guard(device);
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
