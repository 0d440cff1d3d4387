// qlora_mini/csrc/dequant_4bit.cu: hand-written CUDA kernel (not generated from a notebook).
//
// Dequantize packed 4-bit codes (NF4, FP4: any 16-entry codebook) to float32, bfloat16 or float16
// in ONE launch. Layout (chapter 3, byte-identical to bitsandbytes): a flat byte array, element 2i
// in the HIGH nibble and 2i+1 in the low one; one absmax per block of `blocksize` elements (the
// last block may be ragged). With double quantization the absmax arrives as uint8 codes into the
// 256-entry dynamic map, one fp32 nested absmax per 256 blocks and a scalar offset: each thread
// decodes its one absmax in registers, so no fp32 absmax tensor is ever written to memory.
//
// The contract, bit for bit, with qlora_mini.storage._dequantize_4bit_torch, is written once, in
// dequant_4bit_core.h: the per-element function (qm_block_absmax, qm_dequant_value) that this
// kernel and its CPU twin (dequant_4bit_cpu.cpp) both call.
//
// Work split: one thread owns 32 consecutive elements = 16 packed bytes. Blocksizes are powers of
// two >= 32, so the 32 elements share one absmax. A full, aligned chunk is one 16-byte load and
// 4 (bf16/fp16) or 8 (fp32) 16-byte stores; the ragged last chunk (and misaligned pointers) take
// a scalar path. This file includes no torch header: `nvcc -cubin -arch=sm_90 dequant_4bit.cu`
// compiles it alone (qlora_mini.kernels.compile_check); dequant_4bit_binding.cpp is the torch side.
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "dequant_4bit.h"
#include "dequant_4bit_core.h"

namespace {

constexpr int kChunk = 32;     // elements per thread: 16 packed bytes
constexpr int kThreads = 256;  // threads per CTA: 8192 elements

// 16 bytes in and out. On the device one 16-byte access; on the host (the tests' emulation) a
// memcpy, since reading a byte buffer through a uint4* is undefined behaviour in C++.
__host__ __device__ __forceinline__ void load16(uint32_t words[4], const uint8_t* in) {
#if defined(__CUDA_ARCH__)
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(in));
    words[0] = q.x, words[1] = q.y, words[2] = q.z, words[3] = q.w;
#else
    memcpy(words, in, 16);
#endif
}
__host__ __device__ __forceinline__ void store16(void* out, const uint32_t words[4]) {
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<uint4*>(out) = make_uint4(words[0], words[1], words[2], words[3]);
#else
    memcpy(out, words, 16);
#endif
}

// One thread's work: elements [32 t, 32 t + 32) of the output. `code` is the 16-entry codebook
// (shared memory on the device). `vec`: packed and out are 16-byte aligned.
template <int kOut, bool DQ>
__host__ __device__ __forceinline__ void dequant_chunk(const QmDequantArgs& a, const float* code,
                                                       int64_t t, bool vec) {
    typedef typename QmOut<kOut>::Bits Bits;                 // uint32_t (fp32) or uint16_t
    const int64_t first = t * kChunk;
    if (first >= a.n) return;
    const float absmax = qm_block_absmax<DQ>(a, first >> a.log2_blocksize);
    const uint8_t* in = a.packed + first / 2;
    Bits* out = static_cast<Bits*>(a.out) + first;
    if (vec && first + kChunk <= a.n) {
        uint32_t words[4];
        load16(words, in);                                   // 16 bytes = 32 codes
        constexpr int kPerWord = 4 / sizeof(Bits);           // outputs per 32-bit word: 2 or 1
        uint32_t bits[kChunk / kPerWord] = {};               // the 64 or 128 output bytes
#pragma unroll
        for (int i = 0; i < 16; ++i) {                       // byte i (little endian in its word)
            const uint32_t byte = (words[i / 4] >> (8 * (i % 4))) & 0xFF;
            const uint32_t hi = qm_dequant_value<kOut>(code[byte >> 4], absmax);   // element 2i
            const uint32_t lo = qm_dequant_value<kOut>(code[byte & 0xF], absmax);  // 2i + 1
            bits[(2 * i) / kPerWord] |= hi << (32 / kPerWord * ((2 * i) % kPerWord));
            bits[(2 * i + 1) / kPerWord] |= lo << (32 / kPerWord * ((2 * i + 1) % kPerWord));
        }
#pragma unroll
        for (int k = 0; k < kChunk / kPerWord / 4; ++k)      // 4 (bf16, fp16) or 8 (fp32) stores
            store16(out + 4 * kPerWord * k, bits + 4 * k);
    } else {                                                 // ragged tail or misaligned
        const int m = (a.n - first < kChunk) ? static_cast<int>(a.n - first) : kChunk;
        for (int i = 0; i < m; ++i) {
            const uint8_t byte = in[i >> 1];
            const int c = (i & 1) ? (byte & 0xF) : (byte >> 4);
            out[i] = qm_dequant_value<kOut>(code[c], absmax);
        }
    }
}

// The kernel: the 16-entry codebook into shared memory, then one 32-element chunk per thread.
template <int kOut, bool DQ>
__global__ void __launch_bounds__(kThreads) dequant_4bit_kernel(QmDequantArgs a, bool vec) {
    __shared__ float code[16];
    if (threadIdx.x < 16) code[threadIdx.x] = __ldg(a.code + threadIdx.x);
    __syncthreads();
    dequant_chunk<kOut, DQ>(a, code, static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x,
                            vec);
}

bool aligned16(const QmDequantArgs* a) {
    return ((reinterpret_cast<uintptr_t>(a->packed) | reinterpret_cast<uintptr_t>(a->out)) & 15) == 0;
}

// One launch covers the whole tensor: ceil(n / 32) threads, 256 per CTA.
template <int kOut, bool DQ>
void launch(const QmDequantArgs& a, cudaStream_t stream) {
    const int64_t chunks = (a.n + kChunk - 1) / kChunk;
    const unsigned grid = static_cast<unsigned>((chunks + kThreads - 1) / kThreads);
    dequant_4bit_kernel<kOut, DQ><<<grid, kThreads, 0, stream>>>(a, aligned16(&a));
}

// The same per-thread program on the host, one "thread" after another (for CPU-only tests).
template <int kOut, bool DQ>
void run_on_host(const QmDequantArgs& a) {
    const int64_t chunks = (a.n + kChunk - 1) / kChunk;
    for (int64_t t = 0; t < chunks; ++t) dequant_chunk<kOut, DQ>(a, a.code, t, aligned16(&a));
}

}  // namespace

extern "C" const char* qlora_mini_dequantize_4bit(const QmDequantArgs* args, void* stream) {
    if (const char* err = qm_check_args(args)) return err;
    if (args->n == 0) return nullptr;
    QM_DISPATCH(launch, *args, *args, static_cast<cudaStream_t>(stream));
    const cudaError_t status = cudaGetLastError();
    return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

extern "C" const char* qlora_mini_dequantize_4bit_host(const QmDequantArgs* args) {
    if (const char* err = qm_check_args(args)) return err;
    QM_DISPATCH(run_on_host, *args, *args);
    return nullptr;
}
