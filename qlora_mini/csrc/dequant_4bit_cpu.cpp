// qlora_mini/csrc/dequant_4bit_cpu.cpp: hand-written CPU twin of the CUDA kernel (not generated).
//
// The same per-element program as dequant_4bit.cu (both include dequant_4bit_core.h), arranged
// for a CPU. OpenMP threads take runs of whole blocks. Per block, the 16 possible outputs
// (code[c] * absmax, rounded once to the output dtype) are computed first into a table, and then
// every packed byte becomes two table lookups: 16 multiplies per block instead of one per element,
// with bit-identical results (the same product, the same rounding). Two inner loops:
// - portable: the table from the shared per-element function qm_dequant_value; 8 packed bytes in
//   and 16 outputs out per step, both through memcpy (a uint64_t* or uint4* view of a byte buffer
//   would be undefined behaviour in C++);
// - AVX-512 (BW): the same table on 16 lanes at once, and 32 outputs per permute instruction
//   (fewer instructions still with AVX512-VBMI and AVX512-BF16, where the CPU has them).
//
// Built just in time by qlora_mini.kernels (torch.utils.cpp_extension.load, g++ -O3
// -march=native -ffp-contract=off -fopenmp) together with its torch binding,
// dequant_4bit_cpu_binding.cpp; this file includes no torch header and takes the plain-C
// QmDequantArgs of dequant_4bit.h (the tests also call it alone, through ctypes).
#include <math.h>
#include <algorithm>
#include <stdint.h>
#include <string.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX512BW__)
#include <immintrin.h>
#endif

#include "dequant_4bit.h"
#include "dequant_4bit_core.h"

namespace {

// Elements [first, first + m) of one block, whose 16 possible outputs are lut[0..15].
template <typename Bits>
inline void expand_scalar(const uint8_t* in, Bits* out, int64_t m, const Bits lut[16]) {
    int64_t i = 0;
    for (; i + 16 <= m; i += 16) {                        // 8 bytes in, 16 outputs out
        uint64_t w;
        memcpy(&w, in + i / 2, sizeof w);
        Bits v[16];
        for (int k = 0; k < 8; ++k) {                     // byte k: element 2k high, 2k+1 low
            const uint32_t byte = static_cast<uint32_t>(w >> (8 * k)) & 0xFF;
            v[2 * k] = lut[byte >> 4];
            v[2 * k + 1] = lut[byte & 0xF];
        }
        memcpy(out + i, v, sizeof v);
    }
    for (; i < m; ++i) {                                  // ragged tail of the tensor
        const uint8_t byte = in[i >> 1];
        out[i] = lut[(i & 1) ? (byte & 0xF) : (byte >> 4)];
    }
}

// Blocks [b0, b1): per block, the table of its 16 outputs, then two lookups per packed byte.
template <int kOut, bool DQ>
void dequant_blocks_scalar(const QmDequantArgs& a, int64_t b0, int64_t b1) {
    typedef typename QmOut<kOut>::Bits Bits;
    const int64_t bs = int64_t{1} << a.log2_blocksize;
    for (int64_t block = b0; block < b1; ++block) {
        const float absmax = qm_block_absmax<DQ>(a, block);
        Bits lut[16];                                         // the shared per-element function
        for (int c = 0; c < 16; ++c) lut[c] = qm_dequant_value<kOut>(a.code[c], absmax);
        const int64_t first = block * bs;
        const int64_t m = (a.n - first < bs) ? a.n - first : bs;   // the last block may be ragged
        expand_scalar(a.packed + first / 2, static_cast<Bits*>(a.out) + first, m, lut);
    }
}

#if defined(__AVX512BW__)
// The same blocks with AVX-512. The table is qm_dequant_value on 16 lanes at once: the same fp32
// product (vmulps, never fused), the same rounding (bf16: the integer round-to-nearest-even of
// qm_bf16_bits, or where the CPU has AVX512-BF16 its vcvtneps2bf16, which rounds the same except
// for NaN and subnormals, so those take the integer path; fp16: vcvtps2ph, the IEEE conversion),
// bit for bit (tests/test_kernels.py checks ties, subnormals and overflow). Then 32 outputs per
// permute: vpermw (16-bit), vpermd (32-bit).
inline __m512i nibbles_as_pairs(const uint8_t* in) {        // 16 bytes -> 16 lanes (hi | lo << 16)
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in)));
    const __m512i lo = _mm512_and_si512(b, _mm512_set1_epi32(0xF));
    return _mm512_or_si512(_mm512_srli_epi32(b, 4), _mm512_slli_epi32(lo, 16));
}

#if defined(__AVX512VBMI__)
// The same 32 word indices with two instructions: vpermb copies byte k into words 2k and 2k+1,
// vpsrlvw shifts the even words right by 4. The odd words keep the whole byte: vpermw reads only
// their low 5 bits, and the table repeats its 16 entries in words 16..31, so that is entry lo.
inline __m512i nibbles_as_words(const uint8_t* in) {
    const __m512i spread = _mm512_set_epi8(
        0, 15, 0, 15, 0, 14, 0, 14, 0, 13, 0, 13, 0, 12, 0, 12, 0, 11, 0, 11, 0, 10, 0, 10,
        0, 9, 0, 9, 0, 8, 0, 8, 0, 7, 0, 7, 0, 6, 0, 6, 0, 5, 0, 5, 0, 4, 0, 4,
        0, 3, 0, 3, 0, 2, 0, 2, 0, 1, 0, 1, 0, 0, 0, 0);
    const __m512i bytes = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in)));
    const __m512i words = _mm512_maskz_permutexvar_epi8(0x5555555555555555ULL, spread, bytes);
    return _mm512_srlv_epi16(words, _mm512_set1_epi32(4));  // word shifts: 4, 0, 4, 0, ...
}
#else
inline __m512i nibbles_as_words(const uint8_t* in) { return nibbles_as_pairs(in); }
#endif

inline __m512i twice(__m256i words) {                       // 16 words -> words 0..15, 0..15
    const __m512i t = _mm512_castsi256_si512(words);
    return _mm512_shuffle_i64x2(t, t, 0x44);
}

template <int kOut>
inline __m512i table16(__m512 code, float absmax) {         // the 16 outputs' bits, one per lane
    const __m512 v = _mm512_mul_ps(code, _mm512_set1_ps(absmax));
    if (kOut == QM_FLOAT32) return _mm512_castps_si512(v);
    if (kOut == QM_FLOAT16) return twice(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#if defined(__AVX512BF16__)
    if (__builtin_expect(_mm512_fpclass_ps_mask(v, 0xA1) == 0, 1))   // no NaN, no subnormal
        return twice(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#endif
    const __m512i u = _mm512_castps_si512(v);               // bfloat16, as qm_bf16_bits
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                  _mm512_set1_epi32(0x7F800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    return twice(_mm512_cvtepi32_epi16(r));
}

// 32 outputs from 16 packed bytes and their block's table.
template <typename Bits>
inline void expand32(const uint8_t* in, Bits* out, __m512i table) {
    if (sizeof(Bits) == 2) {
        _mm512_storeu_si512(out, _mm512_permutexvar_epi16(nibbles_as_words(in), table));
        return;
    }
    const __m512i first_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in)));
    const __m512i hi = _mm512_permutexvar_epi32(_mm512_srli_epi32(b, 4), table);
    const __m512i lo = _mm512_permutexvar_epi32(b, table);   // vpermd reads the low 4 bits: lo
    _mm512_storeu_si512(out, _mm512_permutex2var_epi32(hi, first_half, lo));
    _mm512_storeu_si512(out + 16, _mm512_permutex2var_epi32(
        hi, _mm512_add_epi32(first_half, _mm512_set1_epi32(8)), lo));
}

template <int kOut, bool DQ>
void dequant_blocks(const QmDequantArgs& args, int64_t b0, int64_t b1) {
    typedef typename QmOut<kOut>::Bits Bits;
    const QmDequantArgs a = args;       // a copy: the compiler may keep it in registers, since
    const int lb = a.log2_blocksize;    // writes through a.out can no longer change it
    const __m512 code = _mm512_loadu_ps(a.code);
    Bits* const out = static_cast<Bits*>(a.out);
    const int64_t whole = (a.n >> lb) < b1 ? (a.n >> lb) : b1;   // blocks before a ragged one
    for (int64_t block = b0; block < whole; ++block) {       // a whole block: bs/32 steps, no tail
        const __m512i table = table16<kOut>(code, qm_block_absmax<DQ>(a, block));
        for (int64_t i = block << lb; i < (block + 1) << lb; i += 32)
            expand32(a.packed + i / 2, out + i, table);
    }
    if (whole < b1 && whole >= b0) {                          // the ragged last block
        alignas(64) Bits lut[64 / sizeof(Bits)];
        _mm512_store_si512(lut, table16<kOut>(code, qm_block_absmax<DQ>(a, whole)));
        const int64_t first = whole << lb;
        expand_scalar(a.packed + first / 2, out + first, a.n - first, lut);
    }
}
#else  // without AVX-512: the portable loop
template <int kOut, bool DQ>
void dequant_blocks(const QmDequantArgs& a, int64_t b0, int64_t b1) {
    dequant_blocks_scalar<kOut, DQ>(a, b0, b1);
}
#endif

// A large output fresh from the allocator (above glibc's mmap threshold, new memory on every
// call) is faulted in as it is written, one trap per 4 KiB page. So when the caller says the
// output is fresh, each thread first asks Linux to map the pages of its run in one call
// (MADV_POPULATE_WRITE, Linux 5.14+; where it is missing the call fails and the writes fault as
// before). Only a request: the contents are unchanged. Not for a reused output: walking pages that
// are already mapped costs time too. (2 MiB pages, MADV_HUGEPAGE, made the median call faster on
// this project's virtual machine, but a third of the calls three to four times slower.)
inline void populate(const void* begin, const void* end) {
#if defined(__linux__)
    const uintptr_t page = 4096;
    const uintptr_t lo = (reinterpret_cast<uintptr_t>(begin) + page - 1) & ~(page - 1);
    const uintptr_t hi = reinterpret_cast<uintptr_t>(end) & ~(page - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, 23 /* MADV_POPULATE_WRITE */);
#endif
}

// OpenMP threads take runs of whole blocks (>= 32 Ki elements each) from a shared counter
// (dynamic schedule): on a busy machine a thread that loses its core does not hold up half the work.
template <int kOut, bool DQ>
void run(const QmDequantArgs& a, int n_threads, bool fresh_out) {
    const int64_t bs = int64_t{1} << a.log2_blocksize;
    const int64_t n_blocks = (a.n + bs - 1) / bs;
    const int64_t grain = ((int64_t{1} << 15) + bs - 1) / bs;           // blocks per run
    const int64_t runs = (n_blocks + grain - 1) / grain;
    const int threads = static_cast<int>(runs < n_threads ? runs : n_threads);
    typedef typename QmOut<kOut>::Bits Bits;
    const bool populate_out = fresh_out && a.n * int64_t{sizeof(Bits)} >= (int64_t{8} << 20);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < runs; ++r) {
        const int64_t b0 = r * grain, b1 = (r + 1) * grain < n_blocks ? (r + 1) * grain : n_blocks;
        Bits* out = static_cast<Bits*>(a.out);
        if (populate_out) populate(out + (b0 << a.log2_blocksize), out + std::min(b1 << a.log2_blocksize, a.n));
        dequant_blocks<kOut, DQ>(a, b0, b1);
    }
}

}  // namespace

// Dequantize on the CPU with up to n_threads OpenMP threads; fresh_out: args->out is new memory,
// not written yet (see populate). Returns NULL, or an error message.
extern "C" const char* qlora_mini_dequantize_4bit_cpu(const QmDequantArgs* args, int n_threads,
                                                      int fresh_out) {
    if (const char* err = qm_check_args(args)) return err;
    if (args->n == 0) return nullptr;
    QM_DISPATCH(run, *args, *args, n_threads < 1 ? 1 : n_threads, fresh_out != 0);
    return nullptr;
}

// ---------------------------------------------------------------------------------------------
// The other direction, for loading (chapter 5's load_4bit): the first half of chapter 3's
// quantize_4bit, the same bytes as its PyTorch reference. Per block of x (float32): absmax =
// max |x|; a full block is multiplied by 1/max(absmax, 1e-38), a ragged last block divided by
// max(absmax, 1e-38) (which is also the absmax stored for it), as bitsandbytes does; clamp to
// [-1, 1]; the code of a value is order[number of cuts below it] (torch.bucketize: a tie goes to
// the lower level); two codes per byte, the even element in the high nibble; an odd n pads with
// the code of 0.0. No temporaries: one pass over x.
namespace {

inline uint8_t qm_nearest(float v, const float* cuts, const uint8_t* order) {
    int pos = 0;
    for (int j = 0; j < 15; ++j) pos += cuts[j] < v;          // sorted cuts: a branch-free count
    return order[pos];
}

inline float qm_clamp1(float v) { return v > 1.0f ? 1.0f : (v < -1.0f ? -1.0f : v); }

void quant_block(const float* x, int64_t m, bool ragged, const float* cuts, const uint8_t* order,
                 uint8_t* packed, float* absmax) {
    float amax = 0.0f;
    for (int64_t i = 0; i < m; ++i) amax = amax < fabsf(x[i]) ? fabsf(x[i]) : amax;
    const float a = amax < 1e-38f ? 1e-38f : amax;             // clamp(min=1e-38) in float32
    const float inv = 1.0f / a;
    *absmax = ragged ? a : amax;
    for (int64_t i = 0; i < m; i += 2) {                       // a block starts at an even index
        const float v0 = qm_clamp1(ragged ? x[i] / a : x[i] * inv);
        const float v1 = i + 1 < m ? qm_clamp1(ragged ? x[i + 1] / a : x[i + 1] * inv) : 0.0f;
        packed[i / 2] = static_cast<uint8_t>(qm_nearest(v0, cuts, order) << 4 |
                                             qm_nearest(v1, cuts, order));
    }
}

}  // namespace

// Quantize n float32 values with up to n_threads OpenMP threads (runs of whole blocks); writes
// packed (ceil(n/2),) and absmax (ceil(n/blocksize),). Returns NULL, or an error message.
extern "C" const char* qlora_mini_quantize_4bit_cpu(const float* x, int64_t n, int log2_blocksize,
                                                    const float* cuts, const uint8_t* order,
                                                    uint8_t* packed, float* absmax, int n_threads) {
    if (!x || !cuts || !order || !packed || !absmax) return "qlora_mini_quantize_4bit_cpu: null pointer";
    if (log2_blocksize < 1 || log2_blocksize > 12) return "qlora_mini_quantize_4bit_cpu: bad blocksize";
    const int64_t bs = int64_t{1} << log2_blocksize;
    const int64_t n_blocks = (n + bs - 1) / bs;
#pragma omp parallel for schedule(static) num_threads(n_threads < 1 ? 1 : n_threads) if (n_blocks > 64)
    for (int64_t b = 0; b < n_blocks; ++b) {
        const int64_t first = b * bs, m = n - first < bs ? n - first : bs;
        quant_block(x + first, m, m < bs, cuts, order, packed + first / 2, absmax + b);
    }
    return nullptr;
}

// Which inner loop this build uses (the chapter and kernels.active_path() report it).
extern "C" const char* qlora_mini_dequantize_4bit_cpu_isa(void) {
#if defined(__AVX512BW__)
    return "avx512bw";
#else
    return "scalar";
#endif
}
