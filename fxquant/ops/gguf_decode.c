/* GGUF Q4_K / Q8_0 blocks -> float32, bfloat16 or float16 weights, in one pass over the bytes.
 *
 * Built by fxquant/ops/gguf_native.py with the system C compiler (-O3 -march=native
 * -ffp-contract=off) and called through ctypes on tensor memory; C99, libc and compiler headers.
 *
 *   void fxq_<q4_k|q8_0>_<f32|bf16|f16>(const uint8_t *blocks, int64_t nblocks, T *out);
 *
 * Bit-exact with fxquant.codecs.dequantize(...).to(dtype):
 *   Q8_0  y = d * q                       (exact in float32)
 *   Q4_K  y = (d * sc) * q - dmin * m     (both products exact in float32: one rounding)
 * then float32 -> bf16 / fp16 rounding to nearest even, as torch's Tensor.to() does (a NaN, from an
 * inf or NaN scale, is NaN in the same places; its bf16 bits may differ, as they do between
 * torch's own vectorized (0xFFFF) and scalar (0x7FC0) conversions). Two
 * implementations: AVX-512 intrinsics where the target has AVX-512F and AVX512-BF16, else portable
 * loops over the 32 weights of one scale, which the compiler vectorizes (the fp16 conversion is
 * c10's fp16_ieee_from_fp32_value). -ffp-contract=off keeps the Q4_K multiply and subtract
 * unfused (harmless here, since the product is exact, but the bits must not depend on it).
 */
#include <stdint.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

static inline float from_bits(uint32_t w) { float f; memcpy(&f, &w, 4); return f; }
static inline uint32_t to_bits(float f) { uint32_t w; memcpy(&w, &f, 4); return w; }

/* Little-endian fp16 at p -> float32, exact: subnormals, inf and NaN included (F16C's vcvtph2ps
 * where there is one, else c10's fp16_ieee_to_fp32_value). */
static inline float half_at(const uint8_t *p) {
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    float normal = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    float denormal = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    return from_bits(sign | (two_w < (1u << 27) ? to_bits(denormal) : to_bits(normal)));
#endif
}

static inline float keep_f32(float f) { return f; }

static inline uint16_t to_bf16(float f) {
    uint32_t u = to_bits(f);
    uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0u : rounded;
}

static inline uint16_t to_fp16(float f) {
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t w = to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = from_bits((bias >> 1) + 0x07800000u) + base;
    uint32_t bits = to_bits(base);
    uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* Q4_K: 144-byte blocks [d fp16 | dmin fp16 | scales[12] | qs[128]]; sub-block 2g is the low and
 * 2g+1 the high nibble of qs[32g .. 32g+31]. Q8_0: 34-byte blocks [d fp16 | 32 x int8].
 * (d * sc, dmin * m) of the 8 sub-blocks, (sc, m) as ggml's get_scale_min_k4 unpacks them. */
static inline void q4_k_scales(const uint8_t *blk, float ds[8], float ms[8]) {
    const uint8_t *s = blk + 4;
    const float d = half_at(blk), dmin = half_at(blk + 2);
    for (int j = 0; j < 4; ++j) {
        ds[j] = d * (float)(s[j] & 63);
        ms[j] = dmin * (float)(s[j + 4] & 63);
        ds[j + 4] = d * (float)((s[j + 8] & 15) | ((s[j] >> 6) << 4));
        ms[j + 4] = dmin * (float)((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__) && !defined(FXQ_PORTABLE)
/* AVX-512 path (e.g. Sapphire Rapids, Zen 4): the same arithmetic, fewer instructions. A Q4_K
 * sub-block's 16 possible values fl(fl(d*sc)*q - fl(dmin*m)), q = 0..15, are computed once into a
 * register and looked up with vpermps (which reads only the index's low 4 bits: the low nibble
 * for free). vcvtne2ps2bf16 rounds to nearest even like torch; it flushes subnormals, but no
 * decoded value is a float32 subnormal (every one is 0 or an integer multiple of 2**-24: fp16's
 * smallest step), and a NaN stays a NaN. vcvtps2ph is what torch's own float -> half uses. */
#include <immintrin.h>

static inline void store32_f32(float *y, __m512 a, __m512 b) {
    _mm512_storeu_ps(y, a);
    _mm512_storeu_ps(y + 16, b);
}
static inline void store32_bf16(uint16_t *y, __m512 a, __m512 b) {
    _mm512_storeu_si512((void *)y, (__m512i)_mm512_cvtne2ps_pbh(b, a));
}
static inline void store32_f16(uint16_t *y, __m512 a, __m512 b) {
    const int rne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    _mm256_storeu_si256((__m256i *)y, _mm512_cvtps_ph(a, rne));
    _mm256_storeu_si256((__m256i *)(y + 16), _mm512_cvtps_ph(b, rne));
}

#define DEFINE_Q8_0(NAME, T, STORE)                                                             \
    void NAME(const uint8_t *restrict src, int64_t nblocks, T *restrict dst) {                  \
        for (int64_t b = 0; b < nblocks; ++b) {                                                 \
            const uint8_t *blk = src + b * 34;                                                  \
            const __m512 d = _mm512_set1_ps(half_at(blk));                                      \
            __m512i q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2)));     \
            __m512i q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18)));    \
            STORE(dst + b * 32, _mm512_mul_ps(d, _mm512_cvtepi32_ps(q0)),                        \
                  _mm512_mul_ps(d, _mm512_cvtepi32_ps(q1)));                                    \
        }                                                                                       \
    }

static inline __m512 q4_table(float d, float m) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(d), iota), _mm512_set1_ps(m));
}

#define DEFINE_Q4_K(NAME, T, STORE)                                                             \
    void NAME(const uint8_t *restrict src, int64_t nblocks, T *restrict dst) {                  \
        for (int64_t b = 0; b < nblocks; ++b) {                                                 \
            const uint8_t *blk = src + b * 144, *qs = blk + 16;                                 \
            float ds[8], ms[8];                                                                 \
            q4_k_scales(blk, ds, ms);                                                           \
            T *y = dst + b * 256;                                                               \
            for (int g = 0; g < 4; ++g) {                                                       \
                const __m512 t0 = q4_table(ds[2 * g], ms[2 * g]);                               \
                const __m512 t1 = q4_table(ds[2 * g + 1], ms[2 * g + 1]);                       \
                const __m128i *q = (const __m128i *)(qs + 32 * g);                              \
                __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128(q));                           \
                __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(q + 1));                       \
                STORE(y + 64 * g, _mm512_permutexvar_ps(a, t0), _mm512_permutexvar_ps(c, t0));  \
                STORE(y + 64 * g + 32, _mm512_permutexvar_ps(_mm512_srli_epi32(a, 4), t1),      \
                      _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), t1));                      \
            }                                                                                   \
        }                                                                                       \
    }

DEFINE_Q8_0(fxq_q8_0_f32, float, store32_f32)
DEFINE_Q8_0(fxq_q8_0_bf16, uint16_t, store32_bf16)
DEFINE_Q8_0(fxq_q8_0_f16, uint16_t, store32_f16)
DEFINE_Q4_K(fxq_q4_k_f32, float, store32_f32)
DEFINE_Q4_K(fxq_q4_k_bf16, uint16_t, store32_bf16)
DEFINE_Q4_K(fxq_q4_k_f16, uint16_t, store32_f16)

#else /* portable C: loops over 32 weights of one scale, which the compiler vectorizes */
#define DEFINE_Q8_0(NAME, T, CONV)                                                              \
    void NAME(const uint8_t *restrict src, int64_t nblocks, T *restrict dst) {                  \
        for (int64_t b = 0; b < nblocks; ++b) {                                                 \
            const float d = half_at(src + b * 34);                                              \
            const int8_t *q = (const int8_t *)(src + b * 34 + 2);                               \
            T *y = dst + b * 32;                                                                \
            for (int l = 0; l < 32; ++l) y[l] = CONV(d * (float)q[l]);                          \
        }                                                                                       \
    }

#define DEFINE_Q4_K(NAME, T, CONV)                                                              \
    void NAME(const uint8_t *restrict src, int64_t nblocks, T *restrict dst) {                  \
        for (int64_t b = 0; b < nblocks; ++b) {                                                 \
            const uint8_t *qs = src + b * 144 + 16;                                             \
            float ds[8], ms[8];                                                                 \
            q4_k_scales(src + b * 144, ds, ms);                                                 \
            T *y = dst + b * 256;                                                               \
            for (int g = 0; g < 4; ++g) {                                                       \
                const float d0 = ds[2 * g], m0 = ms[2 * g];                                     \
                const float d1 = ds[2 * g + 1], m1 = ms[2 * g + 1];                             \
                const uint8_t *q = qs + 32 * g;                                                 \
                T *y0 = y + 64 * g, *y1 = y + 64 * g + 32;                                      \
                for (int l = 0; l < 32; ++l) y0[l] = CONV(d0 * (float)(q[l] & 15) - m0);        \
                for (int l = 0; l < 32; ++l) y1[l] = CONV(d1 * (float)(q[l] >> 4) - m1);        \
            }                                                                                   \
        }                                                                                       \
    }

DEFINE_Q8_0(fxq_q8_0_f32, float, keep_f32)
DEFINE_Q8_0(fxq_q8_0_bf16, uint16_t, to_bf16)
DEFINE_Q8_0(fxq_q8_0_f16, uint16_t, to_fp16)
DEFINE_Q4_K(fxq_q4_k_f32, float, keep_f32)
DEFINE_Q4_K(fxq_q4_k_bf16, uint16_t, to_bf16)
DEFINE_Q4_K(fxq_q4_k_f16, uint16_t, to_fp16)
#endif

/* dst[c * ld + r] = src[r * cols + c] for 2-byte elements: a GEMM's [rows, cols] tile of the
 * transposed output into its columns of the output (torch's copy of a transposed bf16 tensor runs
 * several times slower). 32 x 32 blocks keep both sides in cache; inside them, 8 x 8 blocks go
 * through SSE2 registers (three rounds of unpacks), and the edges element by element. */
#if defined(__SSE2__) && !defined(FXQ_PORTABLE)
#include <emmintrin.h>
#define TRANSPOSE_SIMD 1
static inline void transpose8x8(const uint16_t *s, int64_t ls, uint16_t *d, int64_t ld) {
    __m128i a[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) a[i] = _mm_loadu_si128((const __m128i *)(s + i * ls));
    for (int i = 0; i < 4; ++i) {  /* t[2i], t[2i+1]: rows 2i, 2i+1 interleaved, columns 0-3 / 4-7 */
        t[2 * i] = _mm_unpacklo_epi16(a[2 * i], a[2 * i + 1]);
        t[2 * i + 1] = _mm_unpackhi_epi16(a[2 * i], a[2 * i + 1]);
    }
    for (int h = 0; h < 2; ++h)  /* u[4h + 2k (+1)]: rows 4h..4h+3 of columns 2k, 2k+1 (2k+2, 2k+3) */
        for (int k = 0; k < 2; ++k) {
            u[4 * h + 2 * k] = _mm_unpacklo_epi32(t[4 * h + k], t[4 * h + k + 2]);
            u[4 * h + 2 * k + 1] = _mm_unpackhi_epi32(t[4 * h + k], t[4 * h + k + 2]);
        }
    for (int j = 0; j < 4; ++j) {  /* column 2j and 2j+1: rows 0-3 from u[j], rows 4-7 from u[4+j] */
        _mm_storeu_si128((__m128i *)(d + (2 * j) * ld), _mm_unpacklo_epi64(u[j], u[4 + j]));
        _mm_storeu_si128((__m128i *)(d + (2 * j + 1) * ld), _mm_unpackhi_epi64(u[j], u[4 + j]));
    }
}
#else
#define TRANSPOSE_SIMD 0
#endif

void fxq_transpose_2(const uint16_t *restrict src, int64_t rows, int64_t cols, uint16_t *restrict dst,
                     int64_t ld) {
    for (int64_t r0 = 0; r0 < rows; r0 += 32) {
        const int64_t r1 = r0 + 32 < rows ? r0 + 32 : rows;
        for (int64_t c0 = 0; c0 < cols; c0 += 32) {
            const int64_t c1 = c0 + 32 < cols ? c0 + 32 : cols;
            const int64_t rs = TRANSPOSE_SIMD ? r0 + ((r1 - r0) & ~(int64_t)7) : r0;
            const int64_t cs = TRANSPOSE_SIMD ? c0 + ((c1 - c0) & ~(int64_t)7) : c0;
#if TRANSPOSE_SIMD
            for (int64_t r = r0; r < rs; r += 8)
                for (int64_t c = c0; c < cs; c += 8) transpose8x8(src + r * cols + c, cols, dst + c * ld + r, ld);
#endif
            for (int64_t c = c0; c < c1; ++c)  /* the edges: rows rs.. of columns < cs, all rows of the rest */
                for (int64_t r = c < cs ? rs : r0; r < r1; ++r) dst[c * ld + r] = src[r * cols + c];
        }
    }
}
