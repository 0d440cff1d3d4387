// qlora_mini/csrc/dequant_4bit_torch.h: hand-written (not generated from a notebook).
//
// Tensors -> the plain-C QmDequantArgs, every tensor checked at the boundary (device, dtype,
// size, contiguity) so that the kernels never read or write outside a buffer. Both torch
// bindings use it: dequant_4bit_binding.cpp (CUDA) and dequant_4bit_cpu_binding.cpp (CPU).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "dequant_4bit.h"

namespace qm {

inline void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                         int64_t numel, const at::Device& device) {
    TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(t.numel() == numel, name, " has ", t.numel(), " elements, expected ", numel);
}

inline int log2_exact(int64_t v, const char* name) {
    TORCH_CHECK(v > 0 && (v & (v - 1)) == 0, name, " must be a power of two, got ", v);
    int k = 0;
    while ((int64_t{1} << k) < v) ++k;
    return k;
}

inline int out_dtype(at::ScalarType t) {
    switch (t) {
        case at::kFloat: return QM_FLOAT32;
        case at::kBFloat16: return QM_BFLOAT16;
        case at::kHalf: return QM_FLOAT16;
        default: TORCH_CHECK(false, "out must be float32, bfloat16 or float16, got ", t);
    }
}

// The arguments of one dequantization into `out` (its numel is the element count), on packed's
// device. Without double quant, nested_absmax, nested_code and offset are empty.
inline QmDequantArgs args_from_tensors(
        const at::Tensor& packed, const at::Tensor& code, const at::Tensor& absmax,
        const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
        const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t nested_blocksize,
        const at::Tensor& out) {
    const auto device = packed.device();
    const int64_t n = out.numel();
    QmDequantArgs a{};
    a.log2_blocksize = log2_exact(blocksize, "blocksize");
    a.log2_nested_blocksize = log2_exact(nested_blocksize, "nested_blocksize");
    const int64_t n_blocks = (n + blocksize - 1) / blocksize;
    const bool dq = nested_absmax.has_value();
    check_tensor(packed, "packed", at::kByte, (n + 1) / 2, device);
    check_tensor(code, "code", at::kFloat, 16, device);
    check_tensor(absmax, "absmax", dq ? at::kByte : at::kFloat, n_blocks, device);
    TORCH_CHECK(out.device() == device && out.is_contiguous(), "out must be contiguous on ", device);
    a.packed = packed.data_ptr<uint8_t>();
    a.code = code.data_ptr<float>();
    if (dq) {
        TORCH_CHECK(nested_code.has_value() && offset.has_value(),
                    "double quant needs nested_absmax, nested_code and offset");
        const int64_t n_nested = (n_blocks + nested_blocksize - 1) / nested_blocksize;
        check_tensor(*nested_absmax, "nested_absmax", at::kFloat, n_nested, device);
        check_tensor(*nested_code, "nested_code", at::kFloat, 256, device);
        check_tensor(*offset, "offset", at::kFloat, 1, device);
        a.absmax_q = absmax.data_ptr<uint8_t>();
        a.nested_absmax = nested_absmax->data_ptr<float>();
        a.nested_code = nested_code->data_ptr<float>();
        a.offset = offset->data_ptr<float>();
    } else {
        a.absmax = absmax.data_ptr<float>();
    }
    a.out_dtype = out_dtype(out.scalar_type());
    a.out = out.data_ptr();
    a.n = n;
    return a;
}

}  // namespace qm
