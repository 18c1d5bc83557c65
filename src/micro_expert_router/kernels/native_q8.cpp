// q8 rows with float32 activations (declared in native_common.h): the portable scalar code,
// AVX-512 float32 (modes 1 and 2) and AVX2 + FMA float32 (mode 3), and q8_rows, which picks one
// and tiles rows and tokens; and silu(h) * u (scalar, AVX-512 or AVX2, all with the same bits).
//
// Per row, 16 partial sums (k mod 16) of fused multiply-adds, reduced in tree16's order and
// multiplied by the row's scale: the SIMD kernels perform the same IEEE operations in the same
// order as the scalar code, so they give identical bits; the tests check it.
//
// Legend: see native_common.h.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "native_common.h"

namespace mer_native {
namespace {

// Sum of 16 lanes in the tree order of hsum16 below.
inline float tree16(const float* a) {
  float s8[8], s4[4];
  for (int i = 0; i < 8; ++i) s8[i] = a[i] + a[i + 8];
  for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
  float s2a = s4[0] + s4[2], s2b = s4[1] + s4[3];
  return s2a + s2b;
}

// int8 rows [0, rows) of a row-major [N, K] matrix (w points at the first), one bf16 scale per
// row: out[t * os + r] = s_r * sum_k w_rk x_tk, with 16 partial sums (k mod 16) and a tree.
void q8_rows_scalar(const int8_t* w, const uint16_t* s, int64_t rows, int64_t K, const float* x,
                    int64_t xst, int64_t T, float* out, int64_t os) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < T; ++t) {
      float acc[16] = {};
      for (int64_t k = 0; k < K; k += 16)
        for (int l = 0; l < 16; ++l)
          acc[l] = std::fmaf(float(w[r * K + k + l]), x[t * xst + k + l], acc[l]);
      out[t * os + r] = tree16(acc) * bf16_bits(s[r]);
    }
}

void silu_mul_rows_scalar(const float* h, const float* u, float* a, int64_t g) {
  for (int64_t i = 0; i < g; ++i) a[i] = silu_mul_scalar(h[i], u[i]);
}

#if MER_X86
// Software prefetch, measured here on 1 thread from DRAM: q8 fetches into L2 at least
// kPrefetch8 bytes (and at least one tile of R rows) ahead in the rows' contiguous stream: that
// took one core from ~10 to ~25 GB/s at 2048x5632, and short rows (a group's down rows, g
// bytes) from 9 to 18 GB/s; prefetching into L1 (at any distance up to 32 KiB) gave ~9-19.
constexpr int64_t kPrefetch8 = 16384;

// ---- AVX-512 kernels -------------------------------------------------------------------------

MER_AVX512 inline __m512 exp_avx512(__m512 x) {
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  n = _mm512_min_ps(_mm512_max_ps(n, _mm512_set1_ps(-200.0f)), _mm512_set1_ps(200.0f));
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kC1), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kC2), r);
  __m512 p = _mm512_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP[i]));
  __m512 e = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(e, n);
}

MER_AVX512 void silu_mul_rows_avx512(const float* h, const float* u, float* a, int64_t g) {
  int64_t i = 0;
  for (; i + 16 <= g; i += 16) {
    __m512 hv = _mm512_loadu_ps(h + i);
    __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), hv));
    __m512 sv = _mm512_div_ps(hv, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    _mm512_storeu_ps(a + i, _mm512_mul_ps(sv, _mm512_loadu_ps(u + i)));
  }
  for (; i < g; ++i) a[i] = silu_mul_scalar(h[i], u[i]);
}

MER_AVX512 inline float hsum16(__m512 v) {
  __m256 lo = _mm512_castps512_ps256(v);
  __m256 hi = _mm512_extractf32x8_ps(v, 1);
  __m256 s8 = _mm256_add_ps(lo, hi);
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));  // [s4_0 + s4_2, s4_1 + s4_3]
  __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
  return _mm_cvtss_f32(s1);
}

// R int8 rows, TT tokens.
template <int R, int TT>
MER_AVX512 void q8_rows_avx512(const int8_t* w, const uint16_t* s, int64_t K, const float* x,
                               int64_t xst, float* out, int64_t os) {
  __m512 acc[R][TT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t pf = std::max<int64_t>(R * K, kPrefetch8);
  for (int64_t k = 0; k < K; k += 16) {
    if ((k & 63) == 0)  // the rows are one contiguous stream
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k + pf), _MM_HINT_T1);
    __m512 xv[TT];
    for (int t = 0; t < TT; ++t) xv[t] = _mm512_loadu_ps(x + t * xst + k);
    for (int r = 0; r < R; ++r) {
      __m512 wv = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k))));
      for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) out[t * os + r] = hsum16(acc[r][t]) * bf16_bits(s[r]);
}
#endif

// ---- AVX2 + FMA kernels ----------------------------------------------------------------------

#if MER_X86
MER_AVX2 void silu_mul_rows_avx2(const float* h, const float* u, float* a, int64_t g) {
  int64_t i = 0;
  for (; i + 8 <= g; i += 8) {
    const __m256 hv = _mm256_loadu_ps(h + i);
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), hv));
    const __m256 sv = _mm256_div_ps(hv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    _mm256_storeu_ps(a + i, _mm256_mul_ps(sv, _mm256_loadu_ps(u + i)));
  }
  for (; i < g; ++i) a[i] = silu_mul_scalar(h[i], u[i]);
}

// tree16 of the 16 lanes (a0 = lanes 0-7, a1 = lanes 8-15).
MER_AVX2 inline float tree16_avx2(__m256 a0, __m256 a1) {
  __m256 s8 = _mm256_add_ps(a0, a1);
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));  // [s4_0 + s4_2, s4_1 + s4_3]
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

// R int8 rows, TT tokens.
template <int R, int TT>
MER_AVX2 void q8_rows_avx2(const int8_t* w, const uint16_t* s, int64_t K, const float* x,
                           int64_t xst, float* out, int64_t os) {
  __m256 acc[R][TT][2];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) acc[r][t][0] = acc[r][t][1] = _mm256_setzero_ps();
  const int64_t pf = std::max<int64_t>(R * K, kPrefetch8);
  for (int64_t k = 0; k < K; k += 16) {
    if ((k & 63) == 0)
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k + pf), _MM_HINT_T1);
    __m256 xv[TT][2];
    for (int t = 0; t < TT; ++t) {
      xv[t][0] = _mm256_loadu_ps(x + t * xst + k);
      xv[t][1] = _mm256_loadu_ps(x + t * xst + k + 8);
    }
    for (int r = 0; r < R; ++r) {
      __m128i by = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k));
      __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(by));
      __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(by, 8)));
      for (int t = 0; t < TT; ++t) {
        acc[r][t][0] = _mm256_fmadd_ps(w0, xv[t][0], acc[r][t][0]);
        acc[r][t][1] = _mm256_fmadd_ps(w1, xv[t][1], acc[r][t][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t)
      out[t * os + r] = tree16_avx2(acc[r][t][0], acc[r][t][1]) * bf16_bits(s[r]);
}
#endif

}  // namespace

// rows [0, rows) starting at w (row-major, K per row), scales s
void q8_rows(int mode, const int8_t* w, const uint16_t* s, int64_t rows, int64_t K,
             const float* x, int64_t xst, int64_t T, float* out, int64_t os) {
#if MER_X86
  if (mode == 3) {
    int64_t r = 0;
    if (T == 1)
      for (; r + 4 <= rows; r += 4) q8_rows_avx2<4, 1>(w + r * K, s + r, K, x, xst, out + r, os);
    for (; r + 2 <= rows; r += 2)
      for (int64_t t0 = 0; t0 < T; t0 += 2) {
        const int8_t* wr = w + r * K;
        const float* xt = x + t0 * xst;
        float* ot = out + t0 * os + r;
        if (T - t0 == 1)
          q8_rows_avx2<2, 1>(wr, s + r, K, xt, xst, ot, os);
        else
          q8_rows_avx2<2, 2>(wr, s + r, K, xt, xst, ot, os);
      }
    for (; r < rows; ++r)
      for (int64_t t = 0; t < T; ++t)
        q8_rows_avx2<1, 1>(w + r * K, s + r, K, x + t * xst, xst, out + t * os + r, os);
    return;
  }
  if (mode == 1 || mode == 2) {
    int64_t r = 0;
    if (T == 1)  // decode: more independent chains per x load (a row's sum is the same)
      for (; r + 8 <= rows; r += 8) q8_rows_avx512<8, 1>(w + r * K, s + r, K, x, xst, out + r, os);
    for (; r + 4 <= rows; r += 4)
      for (int64_t t0 = 0; t0 < T; t0 += 4) {
        const int8_t* wr = w + r * K;
        const float* xt = x + t0 * xst;
        float* ot = out + t0 * os + r;
        switch (std::min<int64_t>(4, T - t0)) {
          case 1: q8_rows_avx512<4, 1>(wr, s + r, K, xt, xst, ot, os); break;
          case 2: q8_rows_avx512<4, 2>(wr, s + r, K, xt, xst, ot, os); break;
          case 3: q8_rows_avx512<4, 3>(wr, s + r, K, xt, xst, ot, os); break;
          default: q8_rows_avx512<4, 4>(wr, s + r, K, xt, xst, ot, os); break;
        }
      }
    for (; r < rows; ++r)
      for (int64_t t = 0; t < T; ++t)
        q8_rows_avx512<1, 1>(w + r * K, s + r, K, x + t * xst, xst, out + t * os + r, os);
    return;
  }
#endif
  q8_rows_scalar(w, s, rows, K, x, xst, T, out, os);
}

void silu_mul_rows(int isa, const float* h, const float* u, float* a, int64_t g) {
#if MER_X86
  if (isa == 1) return silu_mul_rows_avx512(h, u, a, g);
  if (isa == 2) return silu_mul_rows_avx2(h, u, a, g);
#endif
  silu_mul_rows_scalar(h, u, a, g);
}

}  // namespace mer_native
