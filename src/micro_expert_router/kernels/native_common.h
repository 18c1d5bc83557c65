// Shared declarations of the native expert kernels (kernels/native.py builds native.cpp,
// native_q4.cpp, native_q8.cpp and native_int8.cpp into one library; docs/quantization.md).
//
//   native.cpp       the ops: argument checks, the two parallel phases, the bindings
//   native_q4.cpp    q4 rows with float32 activations (scalar, AVX-512, AVX512_BF16, AVX2)
//   native_q8.cpp    q8 rows with float32 activations, and silu(h) * u
//   native_int8.cpp  int8 activations: their quantization, q4 and q8 rows (scalar, AVX2)
//
// Every SIMD function carries its own target attribute and is chosen at run time, so the
// library runs on any x86-64 (a function compiled for AVX-512 must never run on a CPU without
// it, even its scalar-looking parts, which the compiler may vectorise).
//
// Legend: T tokens, D hidden, g neurons per group, b q4 block along K, N rows, K reduction
// length, bn rows per int4 row block (64 in torch's AVX-512 packing "n64", 32 in its AVX2
// packing "n32").

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MER_X86 1
#define MER_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define MER_AVX2 __attribute__((target("avx2,fma")))
#else
#define MER_X86 0
#endif

namespace mer_native {

inline float bf16_bits(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- exp and silu: one polynomial for every path (Cephes expf coefficients, ~1 ulp) ---------

constexpr float kLog2e = 1.44269504088896341f, kC1 = 0.693359375f, kC2 = -2.12194440e-4f;
constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// 2^k for |k| <= 126, exactly.
inline float pow2i(int32_t k) {
  const uint32_t u = uint32_t(k + 127) << 23;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round half to even for |v| < 2^22 (the default rounding mode's add and subtract), without
// a libm call (std::nearbyint is a call on baseline x86-64, tens of cycles).
inline float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }  // 1.5 * 2^23

// e^x: n = nearest(x log2 e) clamped to [-200, 200] (clamping first gives the same n), the
// reduced argument and polynomial, then e 2^n as two exact power-of-two products (the first
// exact, the second rounded once: ldexp's result, subnormals included).
inline float exp_scalar(float x) {
  float v = x * kLog2e;
  v = v > -200.0f ? v : -200.0f;  // NaN -> -200, as fmax (and vmaxps with -200 second)
  v = v < 200.0f ? v : 200.0f;
  const float n = round_even(v);
  float r = std::fmaf(-n, kC1, x);
  r = std::fmaf(-n, kC2, r);
  float p = kP[0];
  for (int i = 1; i < 6; ++i) p = std::fmaf(p, r, kP[i]);
  float e = std::fmaf(p, r * r, r) + 1.0f;
  const int32_t k = int32_t(n), k1 = k >> 1;
  return e * pow2i(k1) * pow2i(k - k1);
}

inline float silu_mul_scalar(float h, float u) { return h / (1.0f + exp_scalar(-h)) * u; }

#if MER_X86
// exp_scalar, 8 lanes at a time: the same operations (vmaxps returns its second operand, -200,
// for a NaN, as the scalar comparison does).
MER_AVX2 inline __m256 exp_avx2(__m256 x) {
  __m256 v = _mm256_mul_ps(x, _mm256_set1_ps(kLog2e));
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-200.0f)), _mm256_set1_ps(200.0f));
  const __m256 m = _mm256_set1_ps(12582912.0f);
  const __m256 n = _mm256_sub_ps(_mm256_add_ps(v, m), m);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kC1), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kC2), r);
  __m256 p = _mm256_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP[i]));
  const __m256 e = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i k = _mm256_cvtps_epi32(n), k1 = _mm256_srai_epi32(k, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
  const __m256 p2 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(k, k1), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(e, p1), p2);
}

// The sum of 8 lanes in a fixed tree: (0 + 4, 1 + 5, 2 + 6, 3 + 7), then (a + c, b + d), then
// the two.
MER_AVX2 inline float hsum8(__m256 v) {
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));  // [s4_0 + s4_2, s4_1 + s4_3]
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
#endif

// ---- CPU features (native.cpp) ----------------------------------------------------------------

bool cpu_has_avx2_fma();
bool cpu_has_avx512();
bool cpu_has_avx512_bf16();
bool cpu_has_avx512_vnni();  // with VBMI (native_vnni.cpp)

// ---- float32 activations ---------------------------------------------------------------------

// Kernel modes: 0 scalar, 1 AVX-512 float32, 2 AVX-512 with BF16 dot products (q4 only),
// 3 AVX2 + FMA float32 (q4 in torch's AVX2 packing "n32").

// Rows [r0, r0 + rows) of a q4 matrix [N, K] in torch's int4 packing (bn, split), T tokens:
// out[t * os + r] = sum_k w_rk x_tk. xs: block sums of x; xp / xps: x as bf16 (hi, lo) pairs and
// their block sums (mode 2 only). native_q4.cpp.
void q4_block(int mode, const uint8_t* mat, const uint16_t* sz, int64_t N, int64_t K, int64_t b,
              int64_t r0, int64_t rows, int64_t bn, bool split, const float* x, int64_t xst,
              const float* xs, int64_t xsst, const uint32_t* xp, const float* xps, int64_t T,
              float* out, int64_t os);

// int8 rows [0, rows) of a row-major [N, K] matrix at w, bf16 scales s. native_q8.cpp.
void q8_rows(int mode, const int8_t* w, const uint16_t* s, int64_t rows, int64_t K,
             const float* x, int64_t xst, int64_t T, float* out, int64_t os);

// a = silu(h) * u over g elements; isa 0 scalar, 1 AVX-512, 2 AVX2 (the same bits).
// native_q8.cpp.
void silu_mul_rows(int isa, const float* h, const float* u, float* a, int64_t g);

// ---- int8 activations (native_int8.cpp) -------------------------------------------------------

constexpr int64_t kXB = 32;  // activations per int8 scale

// One token row set [T, K] quantized to int8 in blocks of 32 along K (sx = max|x| / 127,
// qx = rint(x / sx)); c: per q4 block of b, the sum of its dequantized activations; v: qx
// rearranged for the AVX2 q4 kernel (empty when it does not run).
struct Acts {
  int64_t T = 0, K = 0, b = 0;
  int8_t* q = nullptr;   // [T, K]
  float* s = nullptr;    // [T, K/32]
  float* c = nullptr;    // [T, K/b] (q4 only)
  int8_t* v = nullptr;   // [T, K/4, 32] (the AVX2 q4 kernel only)
};

// Bytes quantize_acts needs for T x K (b = 0: no c, no v). simd: q4_block_i8's; only the AVX2
// kernel (1) reads v, so only it pays for building v.
int64_t acts_nbytes(int64_t T, int64_t K, int64_t b, int simd);
// Quantize x [T, K] (row stride xst) into `mem` (acts_nbytes bytes, 32-byte aligned).
Acts quantize_acts(const float* x, int64_t xst, int64_t T, int64_t K, int64_t b, int simd,
                   uint8_t* mem);

// As q4_block / q8_rows, on int8 activations. simd: 0 the scalar code, 1 the AVX2 kernels,
// 2 the AVX-512 VNNI q4 kernel (q8: AVX2), where they apply; all give the same bits.
void q4_block_i8(int simd, const uint8_t* mat, const uint16_t* sz, int64_t N, int64_t r0,
                 int64_t rows, int64_t bn, bool split, const Acts& a, float* out, int64_t os);
void q8_rows_i8(int simd, const int8_t* w, const uint16_t* s, int64_t rows, const Acts& a,
                float* out, int64_t os);

// A whole q4 row block (split packing, bn = 32 or 64) with AVX-512 VNNI. native_vnni.cpp.
void q4_block_vnni(const uint8_t* mat, const uint16_t* sz, int64_t N, int64_t r0, int64_t bn,
                   const Acts& a, float* out, int64_t os);

}  // namespace mer_native
