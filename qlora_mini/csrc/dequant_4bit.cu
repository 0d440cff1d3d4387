// qlora_mini/csrc/dequant_4bit.cu: hand-written CUDA kernel (not generated from a notebook).
//
// Dequantize packed 4-bit codes (NF4, FP4: any 16-entry codebook) to float32, bfloat16 or float16
// in ONE launch. Layout (chapter 3, byte-identical to bitsandbytes): a flat byte array, element 2i
// in the HIGH nibble and 2i+1 in the low one; one absmax per block of `blocksize` elements (the
// last block may be ragged). With double quantization the absmax arrives as uint8 codes into the
// 256-entry dynamic map, one fp32 nested absmax per 256 blocks and a scalar offset: each thread
// decodes its one absmax in registers, so no fp32 absmax tensor is ever written to memory.
//
// The contract, bit for bit, with qlora_mini.storage._dequantize_4bit_torch:
//   absmax = nested_code[q] * nested_absmax[block >> 8] + offset   (fp32, two roundings)
//   value  = code[c] * absmax                                      (fp32, one rounding)
//   out    = value rounded once to the output dtype                (round to nearest even)
// __fmul_rn / __fadd_rn keep the compiler from fusing the first line into one FMA (one rounding),
// which would differ from PyTorch in the last bit.
//
// Work split: one thread owns 32 consecutive elements = 16 packed bytes. Blocksizes are powers of
// two >= 32, so the 32 elements share one absmax. A full, aligned chunk is one 16-byte load and
// 4 (bf16/fp16) or 8 (fp32) 16-byte stores; the ragged last chunk (and misaligned pointers) take
// a scalar path. This file includes no torch header: `nvcc -cubin -arch=sm_90 dequant_4bit.cu`
// compiles it alone (qlora_mini.kernels.compile_check); dequant_4bit_binding.cpp is the torch side.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "dequant_4bit.h"

namespace {

constexpr int kChunk = 32;     // elements per thread: 16 packed bytes
constexpr int kThreads = 256;  // threads per CTA: 8192 elements

// The same source runs on the device (the kernel) and on the host (the CPU emulation below).
#if defined(__CUDA_ARCH__)
#define QM_LDG(ptr) __ldg(ptr)
#define QM_MUL(a, b) __fmul_rn((a), (b))
#define QM_ADD(a, b) __fadd_rn((a), (b))
#else  // host: plain IEEE float ops; built with -ffp-contract=off so they are never fused
#define QM_LDG(ptr) (*(ptr))
#define QM_MUL(a, b) ((a) * (b))
#define QM_ADD(a, b) ((a) + (b))
#endif

// float -> output type, rounded to nearest even; to_bits gives the raw bits of that value.
template <typename T> __host__ __device__ __forceinline__ T from_float(float v);
template <> __host__ __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __host__ __device__ __forceinline__ __half from_float<__half>(float v) {
    return __float2half_rn(v);
}
__host__ __device__ __forceinline__ uint32_t to_bits(float v) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(v);
#else
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u;
#endif
}
__host__ __device__ __forceinline__ uint32_t to_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__host__ __device__ __forceinline__ uint32_t to_bits(__half v) { return __half_as_ushort(v); }

// The fp32 absmax of one block, decoded from the double-quantized constants when DQ.
template <bool DQ>
__host__ __device__ __forceinline__ float block_absmax(const QmDequantArgs& a, int64_t block) {
    if (!DQ) return QM_LDG(a.absmax + block);
    const uint8_t q = QM_LDG(a.absmax_q + block);
    const float scale = QM_LDG(a.nested_absmax + (block >> a.log2_nested_blocksize));
    return QM_ADD(QM_MUL(QM_LDG(a.nested_code + q), scale), QM_LDG(a.offset));
}

// One thread's work: elements [32 t, 32 t + 32) of the output. `code` is the 16-entry codebook
// (shared memory on the device). `vec`: packed and out are 16-byte aligned.
template <typename T, bool DQ>
__host__ __device__ __forceinline__ void dequant_chunk(const QmDequantArgs& a, const float* code,
                                                       int64_t t, bool vec) {
    const int64_t first = t * kChunk;
    if (first >= a.n) return;
    const float absmax = block_absmax<DQ>(a, first >> a.log2_blocksize);
    const uint8_t* in = a.packed + first / 2;
    T* out = static_cast<T*>(a.out) + first;
    if (vec && first + kChunk <= a.n) {
        const uint4 q = QM_LDG(reinterpret_cast<const uint4*>(in));  // 16 bytes = 32 codes
        const uint32_t words[4] = {q.x, q.y, q.z, q.w};
        constexpr int kPerWord = 4 / sizeof(T);              // outputs per 32-bit word: 2 or 1
        uint32_t bits[kChunk / kPerWord] = {};               // the 64 or 128 output bytes
#pragma unroll
        for (int i = 0; i < 16; ++i) {                       // byte i (little endian in its word)
            const uint32_t byte = (words[i / 4] >> (8 * (i % 4))) & 0xFF;
            const uint32_t hi = to_bits(from_float<T>(QM_MUL(code[byte >> 4], absmax)));  // 2i
            const uint32_t lo = to_bits(from_float<T>(QM_MUL(code[byte & 0xF], absmax))); // 2i+1
            bits[(2 * i) / kPerWord] |= hi << (32 / kPerWord * ((2 * i) % kPerWord));
            bits[(2 * i + 1) / kPerWord] |= lo << (32 / kPerWord * ((2 * i + 1) % kPerWord));
        }
#pragma unroll
        for (int k = 0; k < kChunk / kPerWord / 4; ++k)      // 4 (bf16, fp16) or 8 (fp32) stores
            reinterpret_cast<uint4*>(out)[k] =
                make_uint4(bits[4 * k], bits[4 * k + 1], bits[4 * k + 2], bits[4 * k + 3]);
    } else {                                                 // ragged tail or misaligned
        const int m = (a.n - first < kChunk) ? static_cast<int>(a.n - first) : kChunk;
        for (int i = 0; i < m; ++i) {
            const uint8_t byte = in[i >> 1];
            const int c = (i & 1) ? (byte & 0xF) : (byte >> 4);
            out[i] = from_float<T>(QM_MUL(code[c], absmax));
        }
    }
}

// The kernel: the 16-entry codebook into shared memory, then one 32-element chunk per thread.
template <typename T, bool DQ>
__global__ void __launch_bounds__(kThreads) dequant_4bit_kernel(QmDequantArgs a, bool vec) {
    __shared__ float code[16];
    if (threadIdx.x < 16) code[threadIdx.x] = __ldg(a.code + threadIdx.x);
    __syncthreads();
    dequant_chunk<T, DQ>(a, code, static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x, vec);
}

const char* check_args(const QmDequantArgs* a) {
    if (a->n < 0) return "n must be >= 0";
    if (a->log2_blocksize < 5 || a->log2_blocksize > 12) return "blocksize must be 32..4096";
    const bool dq = a->absmax_q != nullptr;
    if (dq && (!a->nested_absmax || !a->nested_code || !a->offset))
        return "double quant needs nested_absmax, nested_code and offset";
    if (!dq && !a->absmax) return "absmax is missing";
    if (a->out_dtype < QM_FLOAT32 || a->out_dtype > QM_FLOAT16) return "unknown out_dtype";
    return nullptr;
}

bool aligned16(const QmDequantArgs* a) {
    return ((reinterpret_cast<uintptr_t>(a->packed) | reinterpret_cast<uintptr_t>(a->out)) & 15) == 0;
}

// One launch covers the whole tensor: ceil(n / 32) threads, 256 per CTA.
template <typename T, bool DQ>
void launch(const QmDequantArgs& a, cudaStream_t stream) {
    const int64_t chunks = (a.n + kChunk - 1) / kChunk;
    const unsigned grid = static_cast<unsigned>((chunks + kThreads - 1) / kThreads);
    dequant_4bit_kernel<T, DQ><<<grid, kThreads, 0, stream>>>(a, aligned16(&a));
}

// The same per-thread program on the host, one "thread" after another (for CPU-only tests).
template <typename T, bool DQ>
void run_on_host(const QmDequantArgs& a) {
    const int64_t chunks = (a.n + kChunk - 1) / kChunk;
    for (int64_t t = 0; t < chunks; ++t) dequant_chunk<T, DQ>(a, a.code, t, aligned16(&a));
}

// Calls F<T, DQ>(args...) for the runtime out dtype and double-quant flag.
#define QM_DISPATCH(F, a, ...)                                                        \
    do {                                                                              \
        const bool dq_ = (a).absmax_q != nullptr;                                     \
        switch ((a).out_dtype) {                                                      \
            case QM_FLOAT32:                                                          \
                dq_ ? F<float, true>(__VA_ARGS__) : F<float, false>(__VA_ARGS__);     \
                break;                                                                \
            case QM_BFLOAT16:                                                         \
                dq_ ? F<__nv_bfloat16, true>(__VA_ARGS__)                             \
                    : F<__nv_bfloat16, false>(__VA_ARGS__);                           \
                break;                                                                \
            default:                                                                  \
                dq_ ? F<__half, true>(__VA_ARGS__) : F<__half, false>(__VA_ARGS__);   \
        }                                                                             \
    } while (0)

}  // namespace

extern "C" const char* qlora_mini_dequantize_4bit(const QmDequantArgs* args, void* stream) {
    if (const char* err = check_args(args)) return err;
    if (args->n == 0) return nullptr;
    QM_DISPATCH(launch, *args, *args, static_cast<cudaStream_t>(stream));
    const cudaError_t status = cudaGetLastError();
    return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

extern "C" const char* qlora_mini_dequantize_4bit_host(const QmDequantArgs* args) {
    if (const char* err = check_args(args)) return err;
    QM_DISPATCH(run_on_host, *args, *args);
    return nullptr;
}
