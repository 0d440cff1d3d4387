// qlora_mini/csrc/dequant_4bit_core.h: hand-written (not generated from a notebook).
//
// The per-element program of 4-bit dequantization, shared by the two back ends:
//   dequant_4bit.cu      the CUDA kernel (nvcc; also compiled by nvcc for the host in the tests)
//   dequant_4bit_cpu.cpp its CPU twin (g++, OpenMP over blocks)
// Everything that rounds lives here, so both back ends round alike, and like the PyTorch
// reference qlora_mini.storage._dequantize_4bit_torch:
//   absmax = nested_code[q] * nested_absmax[block >> 8] + offset   (fp32, two roundings)
//   value  = code[c] * absmax                                      (fp32, one rounding)
//   out    = value rounded once to the output dtype                (round to nearest even)
// The compiler must not fuse the first line into one FMA (one rounding): on the device
// __fmul_rn / __fadd_rn forbid it, on the host the build passes -ffp-contract=off.
// This header needs no CUDA and no torch header outside nvcc.
#pragma once
#include <stdint.h>
#include <string.h>

#include "dequant_4bit.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define QM_HD __host__ __device__ __forceinline__
#else
#define QM_HD inline __attribute__((always_inline))
#endif

#if defined(__CUDA_ARCH__)
#define QM_LDG(ptr) __ldg(ptr)
#define QM_MUL(a, b) __fmul_rn((a), (b))
#define QM_ADD(a, b) __fadd_rn((a), (b))
#else  // host: plain IEEE float ops; built with -ffp-contract=off so they are never fused
#define QM_LDG(ptr) (*(ptr))
#define QM_MUL(a, b) ((a) * (b))
#define QM_ADD(a, b) ((a) + (b))
#endif

// The raw bits of each output dtype: both back ends store bits, never a C++ half/bfloat16 type.
template <int kOut> struct QmOut { typedef uint16_t Bits; };  // QM_BFLOAT16, QM_FLOAT16
template <> struct QmOut<QM_FLOAT32> { typedef uint32_t Bits; };

QM_HD uint32_t qm_float_bits(float v) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(v);
#else
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u;
#endif
}

// float -> bfloat16 bits, round to nearest even (NaN -> 0x7FC0, as PyTorch does). The host
// versions are branch-free (selects), so that a compiler can vectorize a loop over them.
QM_HD uint16_t qm_bf16_bits(float v) {
#if defined(__CUDA_ARCH__)
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
#else
    const uint32_t u = qm_float_bits(v);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
#endif
}

// float -> float16 bits, round to nearest even, subnormals and overflow to inf included.
QM_HD uint16_t qm_f16_bits(float v) {
#if defined(__CUDA_ARCH__)
    return __half_as_ushort(__float2half_rn(v));
#else
    const uint32_t u = qm_float_bits(v);
    const uint32_t sign = (u >> 16) & 0x8000u, mag = u & 0x7FFFFFFFu;
    const uint32_t r = mag - 0x38000000u;                       // normal half: rebias 127 -> 15
    const uint32_t normal = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;
    // Subnormal half (|v| < 2^-14): adding 0.5f puts the units of 2^-24 in the low mantissa
    // bits, and the float addition itself rounds to nearest even.
    float f;
    memcpy(&f, &mag, sizeof f);
    const uint32_t subnormal = qm_float_bits(f + 0.5f) - 0x3F000000u;
    uint32_t h = mag >= 0x38800000u ? normal : subnormal;
    h = mag >= 0x477FF000u ? 0x7C00u : h;                       // >= 65520 rounds to inf
    h = mag > 0x7F800000u ? 0x7E00u : h;                        // NaN
    return static_cast<uint16_t>(sign | h);
#endif
}

template <int kOut> QM_HD typename QmOut<kOut>::Bits qm_round(float v);
template <> QM_HD uint32_t qm_round<QM_FLOAT32>(float v) { return qm_float_bits(v); }
template <> QM_HD uint16_t qm_round<QM_BFLOAT16>(float v) { return qm_bf16_bits(v); }
template <> QM_HD uint16_t qm_round<QM_FLOAT16>(float v) { return qm_f16_bits(v); }

// The fp32 absmax of one block, decoded from the double-quantized constants when DQ.
template <bool DQ>
QM_HD float qm_block_absmax(const QmDequantArgs& a, int64_t block) {
    if (!DQ) return QM_LDG(a.absmax + block);
    const uint8_t q = QM_LDG(a.absmax_q + block);
    const float scale = QM_LDG(a.nested_absmax + (block >> a.log2_nested_blocksize));
    return QM_ADD(QM_MUL(QM_LDG(a.nested_code + q), scale), QM_LDG(a.offset));
}

// THE per-element function: one 4-bit code's codebook value times its block's absmax, rounded
// once to the output dtype. Returns the output element's bits.
template <int kOut>
QM_HD typename QmOut<kOut>::Bits qm_dequant_value(float code_value, float absmax) {
    return qm_round<kOut>(QM_MUL(code_value, absmax));
}

// Argument checks shared by both back ends (host code). NULL when the arguments are usable.
inline const char* qm_check_args(const QmDequantArgs* a) {
    if (a->n < 0) return "n must be >= 0";
    if (a->log2_blocksize < 5 || a->log2_blocksize > 12) return "blocksize must be 32..4096";
    const bool dq = a->absmax_q != nullptr;
    if (dq && (!a->nested_absmax || !a->nested_code || !a->offset))
        return "double quant needs nested_absmax, nested_code and offset";
    if (!dq && !a->absmax) return "absmax is missing";
    if (a->out_dtype < QM_FLOAT32 || a->out_dtype > QM_FLOAT16) return "unknown out_dtype";
    return nullptr;
}

// Calls F<kOut, DQ>(args...) for the runtime out dtype and double-quant flag.
#define QM_DISPATCH(F, a, ...)                                                          \
    do {                                                                                \
        const bool dq_ = (a).absmax_q != nullptr;                                       \
        switch ((a).out_dtype) {                                                        \
            case QM_FLOAT32:                                                            \
                dq_ ? F<QM_FLOAT32, true>(__VA_ARGS__) : F<QM_FLOAT32, false>(__VA_ARGS__); \
                break;                                                                  \
            case QM_BFLOAT16:                                                           \
                dq_ ? F<QM_BFLOAT16, true>(__VA_ARGS__)                                 \
                    : F<QM_BFLOAT16, false>(__VA_ARGS__);                               \
                break;                                                                  \
            default:                                                                    \
                dq_ ? F<QM_FLOAT16, true>(__VA_ARGS__) : F<QM_FLOAT16, false>(__VA_ARGS__); \
        }                                                                               \
    } while (0)
