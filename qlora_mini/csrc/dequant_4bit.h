// qlora_mini/csrc/dequant_4bit.h: hand-written (not generated from a notebook).
//
// The plain-C interface between the CUDA kernel (dequant_4bit.cu, no torch headers) and its
// PyTorch binding (dequant_4bit_binding.cpp). Only pointers and integers cross it, so the kernel
// file compiles alone with `nvcc -cubin` and the binding needs no CUDA types.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum QmOutDtype { QM_FLOAT32 = 0, QM_BFLOAT16 = 1, QM_FLOAT16 = 2 };

typedef struct QmDequantArgs {
    const uint8_t* packed;       // (ceil(n/2),) uint8: element 2i in the HIGH nibble
    const float* code;           // (16,) float32 codebook (NF4, FP4, ...), indexed by the 4-bit code
    const float* absmax;         // (n_blocks,) float32                  [without double quant]
    const uint8_t* absmax_q;     // (n_blocks,) uint8 codes of absmax - offset  [double quant]
    const float* nested_absmax;  // (ceil(n_blocks / nested_blocksize),) float32  [double quant]
    const float* nested_code;    // (256,) float32 dynamic map                  [double quant]
    const float* offset;         // () float32, mean of the absmax               [double quant]
    void* out;                   // (n,) float32 / bfloat16 / float16
    int64_t n;                   // number of elements
    int log2_blocksize;          // 5..12 (blocksize 32..4096)
    int log2_nested_blocksize;   // 8 (256) in bitsandbytes' format
    int out_dtype;               // a QmOutDtype
} QmDequantArgs;

// Launch the kernel on `stream` (a cudaStream_t). Returns NULL, or an error message.
const char* qlora_mini_dequantize_4bit(const QmDequantArgs* args, void* stream);

// The same per-thread program, run on the host one "thread" after another (all pointers are host
// pointers). It lets a machine without a GPU test the kernel's indexing and arithmetic.
const char* qlora_mini_dequantize_4bit_host(const QmDequantArgs* args);

#ifdef __cplusplus
}
#endif
