// Native decode kernels for the q4 and q8 expert formats (see kernels/native.py and
// docs/quantization.md). One call computes a whole segment of an expert (all its groups) in two
// parallel regions of torch's own thread pool (at::parallel_for):
//   1. gate+up rows of every group: h, u = W_gu x               (parallel over row blocks)
//   2. per output row block of down, for each group j in order: a_j = silu(h_j) * u_j (each
//      thread computes it), p_j = W_dn_j a_j, y += p_j              (parallel over D)
// Every group's partial p_j is computed by code that does not depend on the other groups of the
// call, and added to y in group order, so an expert computed in one call or as a top segment
// followed by a bottom segment into the same y gives the same bits.
//
// Weights are read in place from the expert buffer (the bytes of reference.py's sections);
// activations and accumulation are float32. The float32 SIMD kernels (AVX-512, mode 1, and
// AVX2 + FMA, mode 3) and the portable scalar code perform the same IEEE operations in the same
// order (explicit fmaf, the same reduction tree, the same exp polynomial), so they give
// identical bits; the tests check it. The default q4 path on CPUs with AVX512_BF16 (mode 2)
// does not: it multiplies bf16 splits of x and rounds differently, within the bound stated in
// docs/quantization.md and checked by the tests.
//
// Legend: T tokens, D hidden, g neurons per group, n groups, b q4 block along K, N rows, K
// reduction length, bn rows per int4 row block (64 in torch's AVX-512 packing "n64", 32 in its
// AVX2 packing "n32").

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MER_X86 1
#define MER_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#else
#define MER_X86 0
#endif

namespace {

inline float bf16_bits(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- exp and silu: one polynomial for both paths (Cephes expf coefficients, ~1 ulp) ----------

constexpr float kLog2e = 1.44269504088896341f, kC1 = 0.693359375f, kC2 = -2.12194440e-4f;
constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline float exp_scalar(float x) {
  float n = std::nearbyint(x * kLog2e);
  n = std::fmin(std::fmax(n, -200.0f), 200.0f);
  float r = std::fmaf(-n, kC1, x);
  r = std::fmaf(-n, kC2, r);
  float p = kP[0];
  for (int i = 1; i < 6; ++i) p = std::fmaf(p, r, kP[i]);
  float e = std::fmaf(p, r * r, r) + 1.0f;
  return std::ldexp(e, int(n));
}

inline float silu_mul_scalar(float h, float u) { return h / (1.0f + exp_scalar(-h)) * u; }

// ---- scalar kernels (reference order for the SIMD ones) --------------------------------------

// One int4 row block: rows [r0, r0 + rows) of a [N, K] matrix in torch's int4 packing
// (block of bn rows stored [K, bn/2] bytes; full blocks "split": byte j = row j (low nibble),
// row j + bn/2 (high); partial blocks and "pair": byte j = rows 2j (low), 2j + 1 (high)).
// out[t * os + r] = sum_kb s (sum_k q x) + (z - 8 s) (sum_k x)   (k in block kb)
void q4_block_scalar(const uint8_t* mat, const uint16_t* sz, int64_t N, int64_t K, int64_t b,
                     int64_t r0, int64_t rows, int64_t bn, bool split, const float* x,
                     int64_t xst, const float* xs, int64_t xsst, int64_t T, float* out,
                     int64_t os) {
  const uint8_t* blk = mat + r0 * K / 2;
  const bool full_split = split && rows == bn;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t byte = full_split ? r % (bn / 2) : r / 2;
    int shift = (full_split ? r >= bn / 2 : r % 2) ? 4 : 0;
    for (int64_t t = 0; t < T; ++t) {
      float o = 0.0f;
      for (int64_t kb = 0; kb < K / b; ++kb) {
        float acc = 0.0f;
        for (int64_t k = kb * b; k < (kb + 1) * b; ++k) {
          float q = float((blk[k * (rows / 2) + byte] >> shift) & 15);
          acc = std::fmaf(q, x[t * xst + k], acc);
        }
        const uint16_t* p = sz + (kb * N + r0 + r) * 2;
        float s = bf16_bits(p[0]), z = bf16_bits(p[1]);
        float zc = std::fmaf(-8.0f, s, z);
        o = std::fmaf(s, acc, o);
        o = std::fmaf(zc, xs[t * xsst + kb], o);
      }
      out[t * os + r] = o;
    }
  }
}

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

// ---- AVX-512 kernels -------------------------------------------------------------------------

#if MER_X86
// Software prefetch, measured here on 1 thread from DRAM. q4 (compute-bound) fetches kPrefetch4
// bytes ahead into L1; farther or into L2 changed nothing. q8 fetches into L2 at least
// kPrefetch8 bytes (and at least one tile of R rows) ahead in the rows' contiguous stream: that
// took one core from ~10 to ~25 GB/s at 2048x5632, and short rows (a group's down rows, g
// bytes) from 9 to 18 GB/s; prefetching into L1 (at any distance up to 32 KiB) gave ~9-19.
constexpr int64_t kPrefetch4 = 2048;
constexpr int64_t kPrefetch8 = 16384;

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


// A full 64-row "n64" block, TT tokens: 4 vectors of 16 rows per token.
template <int TT>
MER_AVX512 void q4_block64_avx512(const uint8_t* blk, const uint16_t* sz, int64_t N, int64_t K,
                                  int64_t b, const float* x, int64_t xst, const float* xs,
                                  int64_t xsst, float* out, int64_t os) {
  const __m512i m4 = _mm512_set1_epi32(15), mhi = _mm512_set1_epi32(int(0xFFFF0000u));
  __m512 o[TT][4];
  for (int t = 0; t < TT; ++t)
    for (int i = 0; i < 4; ++i) o[t][i] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < K / b; ++kb) {
    __m512 acc[TT][4];
    for (int t = 0; t < TT; ++t)
      for (int i = 0; i < 4; ++i) acc[t][i] = _mm512_setzero_ps();
    const uint8_t* p = blk + kb * b * 32;
    for (int64_t k = kb * b; k < (kb + 1) * b; ++k, p += 32) {
      if ((k & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch4), _MM_HINT_T0);
      __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      __m512i v1 =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
      __m512 w[4] = {_mm512_cvtepi32_ps(_mm512_and_si512(v0, m4)),
                     _mm512_cvtepi32_ps(_mm512_and_si512(v1, m4)),
                     _mm512_cvtepi32_ps(_mm512_srli_epi32(v0, 4)),
                     _mm512_cvtepi32_ps(_mm512_srli_epi32(v1, 4))};
      for (int t = 0; t < TT; ++t) {
        __m512 xb = _mm512_set1_ps(x[t * xst + k]);
        for (int i = 0; i < 4; ++i) acc[t][i] = _mm512_fmadd_ps(w[i], xb, acc[t][i]);
      }
    }
    const uint32_t* szp = reinterpret_cast<const uint32_t*>(sz + kb * N * 2);  // (s | z << 16)
    for (int i = 0; i < 4; ++i) {
      __m512i d = _mm512_loadu_si512(szp + 16 * i);
      __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(d, 16));
      __m512 z = _mm512_castsi512_ps(_mm512_and_si512(d, mhi));
      __m512 zc = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s, z);
      for (int t = 0; t < TT; ++t) {
        o[t][i] = _mm512_fmadd_ps(s, acc[t][i], o[t][i]);
        o[t][i] = _mm512_fmadd_ps(zc, _mm512_set1_ps(xs[t * xsst + kb]), o[t][i]);
      }
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out + t * os + 16 * i, o[t][i]);
}

// The same block with AVX512_BF16 dot products, two k at a time. Each code becomes the bf16
// value 1 + q/16 (bits 0x3F80 | q << 3, built with byte shifts and a two-source byte permute
// that pairs row r's codes at k and k + 1), and x is split into x ~= hi + lo, both bf16
// (|x - hi - lo| <= 2^-17 |x|): products of bf16 values are exact, sums are f32. Per block,
// D = sum (1 + q/16) x~ and X = sum x~, so sum ((q - 8) s + z) x~ = 16 s D + (z - 24 s) X.
// xp holds per token and k pair the (hi, lo) dwords of bf16 (x_k, x_k+1); xs the block sums
// of x~. About 9 vector instructions decode 128 weights here, against 20 in q4_block64_avx512.
alignas(64) static const uint8_t kPairIdx[2][64] = {
#define MER_I(o, i) (o) + (i), 64, 32 + (o) + (i), 64
#define MER_ROW(o)                                                                             \
  MER_I(o, 0), MER_I(o, 1), MER_I(o, 2), MER_I(o, 3), MER_I(o, 4), MER_I(o, 5), MER_I(o, 6),   \
      MER_I(o, 7), MER_I(o, 8), MER_I(o, 9), MER_I(o, 10), MER_I(o, 11), MER_I(o, 12),         \
      MER_I(o, 13), MER_I(o, 14), MER_I(o, 15)
    {MER_ROW(0)}, {MER_ROW(16)}};
#undef MER_ROW
#undef MER_I

#define MER_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16,fma")))

template <int TT>
MER_AVX512BF16 void q4_block64_bf16(const uint8_t* blk, const uint16_t* sz, int64_t N, int64_t K,
                                    int64_t b, const uint32_t* xp, int64_t xpst, const float* xs,
                                    int64_t xsst, float* out, int64_t os) {
  const __m512i mhi = _mm512_set1_epi32(int(0xFFFF0000u));
  const __m512i i0 = _mm512_load_si512(kPairIdx[0]), i16 = _mm512_load_si512(kPairIdx[1]);
  const __m512i c3f = _mm512_set1_epi8(0x3F), m78 = _mm512_set1_epi8(0x78);
  const __m512i c80 = _mm512_set1_epi8(char(0x80));
  __m512 o[TT][4];
  for (int t = 0; t < TT; ++t)
    for (int i = 0; i < 4; ++i) o[t][i] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < K / b; ++kb) {
    __m512 acc[TT][4];
    for (int t = 0; t < TT; ++t)
      for (int i = 0; i < 4; ++i) acc[t][i] = _mm512_setzero_ps();
    const uint8_t* p = blk + kb * b * 32;
    for (int64_t k = kb * b; k < (kb + 1) * b; k += 2, p += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch4), _MM_HINT_T0);
      __m512i z = _mm512_loadu_si512(p);  // bytes 0-31: k, 32-63: k + 1
      // (v & 0x78) | 0x80 per byte: low nibbles (rows 0-31) and high nibbles (rows 32-63)
      __m512i lo = _mm512_ternarylogic_epi32(_mm512_slli_epi16(z, 3), m78, c80, 0xEA);
      __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(z, 1), m78, c80, 0xEA);
      __m512bh w[4] = {(__m512bh)_mm512_permutex2var_epi8(lo, i0, c3f),
                       (__m512bh)_mm512_permutex2var_epi8(lo, i16, c3f),
                       (__m512bh)_mm512_permutex2var_epi8(hi, i0, c3f),
                       (__m512bh)_mm512_permutex2var_epi8(hi, i16, c3f)};
      for (int t = 0; t < TT; ++t) {
        const uint32_t* q = xp + (t * xpst + k / 2) * 2;
        __m512bh xh = (__m512bh)_mm512_set1_epi32(int(q[0]));
        __m512bh xl = (__m512bh)_mm512_set1_epi32(int(q[1]));
        for (int i = 0; i < 4; ++i) {
          acc[t][i] = _mm512_dpbf16_ps(acc[t][i], w[i], xh);
          acc[t][i] = _mm512_dpbf16_ps(acc[t][i], w[i], xl);
        }
      }
    }
    const uint32_t* szp = reinterpret_cast<const uint32_t*>(sz + kb * N * 2);  // (s | z << 16)
    for (int i = 0; i < 4; ++i) {
      __m512i d = _mm512_loadu_si512(szp + 16 * i);
      __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(d, 16));
      __m512 z = _mm512_castsi512_ps(_mm512_and_si512(d, mhi));
      __m512 s16 = _mm512_mul_ps(s, _mm512_set1_ps(16.0f));       // exact
      __m512 zc = _mm512_fnmadd_ps(_mm512_set1_ps(24.0f), s, z);  // 24 s exact: one rounding
      for (int t = 0; t < TT; ++t) {
        o[t][i] = _mm512_fmadd_ps(s16, acc[t][i], o[t][i]);
        o[t][i] = _mm512_fmadd_ps(zc, _mm512_set1_ps(xs[t * xsst + kb]), o[t][i]);
      }
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out + t * os + 16 * i, o[t][i]);
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

// ---- AVX2 + FMA kernels (x86-64 without AVX-512) ---------------------------------------------
//
// The same arithmetic as the scalar reference, lane by lane, so the bits match it: q4 keeps one
// accumulator per row (rows across lanes, k in order), q8 the 16 partial sums k mod 16 in two
// 8-lane vectors, reduced in tree16's order.

#if MER_X86
#define MER_AVX2 __attribute__((target("avx2,fma")))

// A full 32-row "n32" block (torch's AVX2 packing: [K, 16] bytes, byte j = row j low nibble,
// row j + 16 high nibble), TT tokens: 4 vectors of 8 rows per token.
template <int TT>
MER_AVX2 void q4_block32_avx2(const uint8_t* blk, const uint16_t* sz, int64_t N, int64_t K,
                              int64_t b, const float* x, int64_t xst, const float* xs,
                              int64_t xsst, float* out, int64_t os) {
  const __m256i m4 = _mm256_set1_epi32(15), mhi = _mm256_set1_epi32(int(0xFFFF0000u));
  __m256 o[TT][4];
  for (int t = 0; t < TT; ++t)
    for (int i = 0; i < 4; ++i) o[t][i] = _mm256_setzero_ps();
  for (int64_t kb = 0; kb < K / b; ++kb) {
    __m256 acc[TT][4];
    for (int t = 0; t < TT; ++t)
      for (int i = 0; i < 4; ++i) acc[t][i] = _mm256_setzero_ps();
    const uint8_t* p = blk + kb * b * 16;
    for (int64_t k = kb * b; k < (kb + 1) * b; ++k, p += 16) {
      if ((k & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch4), _MM_HINT_T0);
      __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      __m256i v0 = _mm256_cvtepu8_epi32(bytes);                    // bytes 0-7
      __m256i v1 = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));  // bytes 8-15
      __m256 w[4] = {_mm256_cvtepi32_ps(_mm256_and_si256(v0, m4)),   // rows 0-7
                     _mm256_cvtepi32_ps(_mm256_and_si256(v1, m4)),   // rows 8-15
                     _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)),   // rows 16-23
                     _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4))};  // rows 24-31
      for (int t = 0; t < TT; ++t) {
        __m256 xb = _mm256_set1_ps(x[t * xst + k]);
        for (int i = 0; i < 4; ++i) acc[t][i] = _mm256_fmadd_ps(w[i], xb, acc[t][i]);
      }
    }
    const uint32_t* szp = reinterpret_cast<const uint32_t*>(sz + kb * N * 2);  // (s | z << 16)
    for (int i = 0; i < 4; ++i) {
      __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(szp + 8 * i));
      __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(d, 16));
      __m256 z = _mm256_castsi256_ps(_mm256_and_si256(d, mhi));
      __m256 zc = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, z);
      for (int t = 0; t < TT; ++t) {
        o[t][i] = _mm256_fmadd_ps(s, acc[t][i], o[t][i]);
        o[t][i] = _mm256_fmadd_ps(zc, _mm256_set1_ps(xs[t * xsst + kb]), o[t][i]);
      }
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + t * os + 8 * i, o[t][i]);
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

bool cpu_has_avx2_fma() {
#if MER_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#if MER_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if MER_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// ---- dispatch over token tiles ---------------------------------------------------------------

// Kernel modes: 0 scalar, 1 AVX-512 float32, 2 AVX-512 with BF16 dot products (q4 only),
// 3 AVX2 + FMA float32 (q4 in torch's AVX2 packing "n32").
// xp / xps: x as bf16 (hi, lo) pairs and the block sums of hi + lo (mode 2 only).
void q4_block(int mode, const uint8_t* mat, const uint16_t* sz, int64_t N, int64_t K, int64_t b,
              int64_t r0, int64_t rows, int64_t bn, bool split, const float* x, int64_t xst,
              const float* xs, int64_t xsst, const uint32_t* xp, const float* xps, int64_t T,
              float* out, int64_t os) {
#if MER_X86
  if (mode == 2 && bn == 64 && split && rows == 64) {
    const uint8_t* blk = mat + r0 * K / 2;
    const uint16_t* szr = sz + r0 * 2;
    for (int64_t t0 = 0; t0 < T; t0 += 4) {
      const uint32_t* xt = xp + t0 * K;  // K/2 pairs of 2 dwords per token
      const float* st = xps + t0 * xsst;
      float* ot = out + t0 * os;
      switch (std::min<int64_t>(4, T - t0)) {
        case 1: q4_block64_bf16<1>(blk, szr, N, K, b, xt, K / 2, st, xsst, ot, os); break;
        case 2: q4_block64_bf16<2>(blk, szr, N, K, b, xt, K / 2, st, xsst, ot, os); break;
        case 3: q4_block64_bf16<3>(blk, szr, N, K, b, xt, K / 2, st, xsst, ot, os); break;
        default: q4_block64_bf16<4>(blk, szr, N, K, b, xt, K / 2, st, xsst, ot, os); break;
      }
    }
    return;
  }
  if ((mode == 1 || mode == 2) && bn == 64 && split && rows == 64) {
    const uint8_t* blk = mat + r0 * K / 2;
    const uint16_t* szr = sz + r0 * 2;
    for (int64_t t0 = 0; t0 < T; t0 += 4) {
      const float *xt = x + t0 * xst, *xst_ = xs + t0 * xsst;
      float* ot = out + t0 * os;
      switch (std::min<int64_t>(4, T - t0)) {
        case 1: q4_block64_avx512<1>(blk, szr, N, K, b, xt, xst, xst_, xsst, ot, os); break;
        case 2: q4_block64_avx512<2>(blk, szr, N, K, b, xt, xst, xst_, xsst, ot, os); break;
        case 3: q4_block64_avx512<3>(blk, szr, N, K, b, xt, xst, xst_, xsst, ot, os); break;
        default: q4_block64_avx512<4>(blk, szr, N, K, b, xt, xst, xst_, xsst, ot, os); break;
      }
    }
    return;
  }
  if (mode == 3 && bn == 32 && split && rows == 32) {
    const uint8_t* blk = mat + r0 * K / 2;
    const uint16_t* szr = sz + r0 * 2;
    for (int64_t t0 = 0; t0 < T; t0 += 2) {
      const float *xt = x + t0 * xst, *xst_ = xs + t0 * xsst;
      float* ot = out + t0 * os;
      if (T - t0 == 1)
        q4_block32_avx2<1>(blk, szr, N, K, b, xt, xst, xst_, xsst, ot, os);
      else
        q4_block32_avx2<2>(blk, szr, N, K, b, xt, xst, xst_, xsst, ot, os);
    }
    return;
  }
#endif
  q4_block_scalar(mat, sz, N, K, b, r0, rows, bn, split, x, xst, xs, xsst, T, out, os);
}

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

void silu_mul_rows(bool simd, const float* h, const float* u, float* a, int64_t g) {
#if MER_X86
  if (simd) return silu_mul_rows_avx512(h, u, a, g);
#endif
  silu_mul_rows_scalar(h, u, a, g);
}

// Sums of x over blocks of b along K, in order: xs[t * (K/b) + kb].
void block_sums(const float* x, int64_t T, int64_t K, int64_t b, float* xs) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t kb = 0; kb < K / b; ++kb) {
      float s = 0.0f;
      for (int64_t k = kb * b; k < (kb + 1) * b; ++k) s += x[t * K + k];
      xs[t * (K / b) + kb] = s;
    }
}

// x [T, K] -> per token and k pair, the dwords of bf16 (hi_k, hi_k+1) and (lo_k, lo_k+1) with
// hi = bf16(x), lo = bf16(x - hi); and the block sums of x~ = hi + lo (exact in f32), in order.
void bf16_pairs(const float* x, int64_t T, int64_t K, int64_t b, uint32_t* xp, float* xs) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t kb = 0; kb < K / b; ++kb) {
      float s = 0.0f;
      for (int64_t k = kb * b; k < (kb + 1) * b; k += 2) {
        uint16_t h[2], l[2];
        for (int e = 0; e < 2; ++e) {
          float v = x[t * K + k + e];
          c10::BFloat16 hv(v), lv(v - float(hv));
          h[e] = hv.x, l[e] = lv.x;
          s += float(hv) + float(lv);
        }
        xp[(t * (K / 2) + k / 2) * 2] = uint32_t(h[0]) | uint32_t(h[1]) << 16;
        xp[(t * (K / 2) + k / 2) * 2 + 1] = uint32_t(l[0]) | uint32_t(l[1]) << 16;
      }
      xs[t * (K / b) + kb] = s;
    }
}

void add_rows(const at::Tensor& y, int64_t D, int64_t T, int64_t r0, int64_t rows,
              const float* p, int64_t ps) {
  if (y.scalar_type() == at::kFloat) {
    float* Y = static_cast<float*>(y.data_ptr());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t r = 0; r < rows; ++r) Y[t * D + r0 + r] += p[t * ps + r];
  } else {  // bf16: the sum in f32, rounded to nearest even, as torch's add_
    auto* Y = static_cast<c10::BFloat16*>(y.data_ptr());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t r = 0; r < rows; ++r)
        Y[t * D + r0 + r] = c10::BFloat16(float(Y[t * D + r0 + r]) + p[t * ps + r]);
  }
}

// isa: 0 scalar, 1 the best this CPU has, 2 AVX-512 without BF16 dot products, 3 AVX2 + FMA
// -> kernel mode
int kernel_mode(int64_t isa) {
  static const bool has = cpu_has_avx512(), bf16 = has && cpu_has_avx512_bf16(),
                    avx2 = cpu_has_avx2_fma();
  TORCH_CHECK(isa >= 0 && isa <= 3,
              "mer: isa must be 0 (scalar), 1 (best), 2 (avx512 f32) or 3 (avx2)");
  TORCH_CHECK(isa != 2 || has, "mer: isa=2 asked for AVX-512, which this CPU lacks");
  TORCH_CHECK(isa != 3 || avx2, "mer: isa=3 asked for AVX2 + FMA, which this CPU lacks");
  TORCH_CHECK(isa != 1 || has || avx2, "mer: this CPU has neither AVX-512 nor AVX2 + FMA");
  if (isa == 0) return 0;
  if (isa == 3 || (isa == 1 && !has)) return 3;
  return (isa == 1 && bf16) ? 2 : 1;
}

void check_common(const at::Tensor& y, const at::Tensor& x, const at::Tensor& buf, int64_t D,
                  int64_t per) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() &&
                  x.size(1) == D,
              "mer: x must be contiguous float32 [T, D]");
  TORCH_CHECK((y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16) &&
                  y.dim() == 2 && y.is_contiguous() && y.size(0) == x.size(0) && y.size(1) == D,
              "mer: y must be contiguous float32 or bfloat16 [T, D]");
  TORCH_CHECK(buf.scalar_type() == at::kByte && buf.dim() == 1 && buf.is_contiguous() &&
                  per > 0 && buf.numel() % per == 0 && buf.numel() > 0,
              "mer: buf must be a contiguous uint8 buffer of whole groups");
}

// ---- the ops ---------------------------------------------------------------------------------
//
// One call computes several segments (bufs[i], its own group count) of one or more experts on
// the same x, segment i adding into ys[i]: phase 1 is one parallel region over the gate/up row
// blocks of every group of every segment, phase 2 one region over (segment, output row block).
// Each (segment, row block) adds its groups' partials in group order, and a group's partial
// does not depend on the other work of the call, so the result is bit-identical to one call per
// segment (the single-segment ops below are this with one segment).

struct Segs {
  std::vector<const uint8_t*> base;
  std::vector<int64_t> n, gu_off, start1;  // groups, offset into gu, first phase-1 item
  int64_t items1 = 0, gu_size = 0, max_n = 0;
};

Segs segments(at::TensorList ys, const at::Tensor& x, at::TensorList bufs, int64_t D,
              int64_t per, int64_t N1, int64_t nb1) {
  TORCH_CHECK(ys.size() == bufs.size() && !bufs.empty(), "mer: one y per segment buffer");
  Segs S;
  const int64_t T = x.size(0);
  for (size_t i = 0; i < bufs.size(); ++i) {
    check_common(ys[i], x, bufs[i], D, per);
    int64_t n = bufs[i].numel() / per;
    S.base.push_back(static_cast<const uint8_t*>(bufs[i].data_ptr()));
    S.n.push_back(n);
    S.gu_off.push_back(S.gu_size);
    S.start1.push_back(S.items1);
    S.gu_size += n * T * N1;
    S.items1 += n * nb1;
    S.max_n = std::max(S.max_n, n);
  }
  S.start1.push_back(S.items1);
  return S;
}

// phase-1 item -> (segment, group, row block)
inline void locate1(const Segs& S, int64_t it, int64_t nb1, int64_t& i, int64_t& j, int64_t& rb) {
  i = std::upper_bound(S.start1.begin(), S.start1.end(), it) - S.start1.begin() - 1;
  int64_t local = it - S.start1[i];
  j = local / nb1, rb = local % nb1;
}

void q4_experts_swiglu_(at::TensorList ys, const at::Tensor& x, at::TensorList bufs, int64_t D,
                        int64_t g, int64_t b, at::IntArrayRef offs, int64_t per, int64_t bn,
                        bool split, int64_t isa) {
  TORCH_CHECK(offs.size() == 4 && D % b == 0 && g % b == 0 && (2 * g) % bn == 0 && b % 2 == 0,
              "mer: bad q4 dimensions");
  const int mode = kernel_mode(isa);
  const bool simd = mode == 1 || mode == 2;  // AVX-512 silu (AVX2 keeps the scalar one)
  const int64_t T = x.size(0), N1 = 2 * g, nb1 = N1 / bn, K = bufs.size();
  const Segs S = segments(ys, x, bufs, D, per, N1, nb1);
  if (T == 0) return;
  const float* X = static_cast<const float*>(x.data_ptr());
  std::vector<float> xs(T * (D / b)), gu(S.gu_size), xps(T * (D / b));  // gu: per segment [n, T, 2g]
  std::vector<uint32_t> xp(mode == 2 ? T * D : 0);
  block_sums(X, T, D, b, xs.data());
  if (mode == 2) bf16_pairs(X, T, D, b, xp.data(), xps.data());
  at::parallel_for(0, S.items1, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      int64_t i, j, rb;
      locate1(S, it, nb1, i, j, rb);
      const uint8_t* grp = S.base[i] + j * per;
      q4_block(mode, grp + offs[0], reinterpret_cast<const uint16_t*>(grp + offs[1]), N1, D, b,
               rb * bn, bn, bn, split, X, D, xs.data(), D / b, xp.data(), xps.data(), T,
               gu.data() + S.gu_off[i] + j * T * N1 + rb * bn, N1);
    }
  });
  const int64_t nb2 = (D + bn - 1) / bn, m = S.max_n;
  at::parallel_for(0, K * nb2, 1, [&](int64_t i0, int64_t i1) {
    // a = silu(h) * u of every group of the current segment (recomputed per thread)
    std::vector<float> a(m * T * g), as(m * T * (g / b)), p(T * bn), aps(m * T * (g / b));
    std::vector<uint32_t> ap(mode == 2 ? m * T * g : 0);
    int64_t cur = -1;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t i = it / nb2, r0 = (it % nb2) * bn, rows = std::min(bn, D - r0);
      if (i != cur) {
        cur = i;
        for (int64_t j = 0; j < S.n[i]; ++j) {
          const float* h = gu.data() + S.gu_off[i] + j * T * N1;
          float* aj = &a[j * T * g];
          for (int64_t t = 0; t < T; ++t)
            silu_mul_rows(simd, h + t * N1, h + t * N1 + g, aj + t * g, g);
          block_sums(aj, T, g, b, &as[j * T * (g / b)]);
          if (mode == 2) bf16_pairs(aj, T, g, b, &ap[j * T * g], &aps[j * T * (g / b)]);
        }
      }
      for (int64_t j = 0; j < S.n[i]; ++j) {
        const uint8_t* grp = S.base[i] + j * per;
        q4_block(mode, grp + offs[2], reinterpret_cast<const uint16_t*>(grp + offs[3]), D, g, b,
                 r0, rows, bn, split, &a[j * T * g], g, &as[j * T * (g / b)], g / b,
                 mode == 2 ? &ap[j * T * g] : nullptr, &aps[j * T * (g / b)], T, p.data(), bn);
        add_rows(ys[i], D, T, r0, rows, p.data(), bn);
      }
    }
  });
}

constexpr int64_t kRows = 64;  // q8 rows per work item

void q8_experts_swiglu_(at::TensorList ys, const at::Tensor& x, at::TensorList bufs, int64_t D,
                        int64_t g, at::IntArrayRef offs, int64_t per, int64_t isa) {
  TORCH_CHECK(offs.size() == 4 && D % 16 == 0 && g % 16 == 0, "mer: bad q8 dimensions");
  const int mode = kernel_mode(isa);
  const bool simd = mode == 1 || mode == 2;  // AVX-512 silu (AVX2 keeps the scalar one)
  const int64_t T = x.size(0), N1 = 2 * g, nb1 = (N1 + kRows - 1) / kRows, K = bufs.size();
  const Segs S = segments(ys, x, bufs, D, per, N1, nb1);
  if (T == 0) return;
  const float* X = static_cast<const float*>(x.data_ptr());
  std::vector<float> gu(S.gu_size);  // per segment [n, T, 2g]
  at::parallel_for(0, S.items1, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      int64_t i, j, rb;
      locate1(S, it, nb1, i, j, rb);
      const int64_t r0 = rb * kRows, rows = std::min(kRows, N1 - r0);
      const uint8_t* grp = S.base[i] + j * per;
      q8_rows(mode, reinterpret_cast<const int8_t*>(grp + offs[0]) + r0 * D,
              reinterpret_cast<const uint16_t*>(grp + offs[2]) + r0, rows, D, X, D, T,
              gu.data() + S.gu_off[i] + j * T * N1 + r0, N1);
    }
  });
  const int64_t nb2 = (D + kRows - 1) / kRows, m = S.max_n;
  at::parallel_for(0, K * nb2, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> a(m * T * g), p(T * kRows);
    int64_t cur = -1;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t i = it / nb2, r0 = (it % nb2) * kRows, rows = std::min(kRows, D - r0);
      if (i != cur) {
        cur = i;
        for (int64_t j = 0; j < S.n[i]; ++j) {
          const float* h = gu.data() + S.gu_off[i] + j * T * N1;
          for (int64_t t = 0; t < T; ++t)
            silu_mul_rows(simd, h + t * N1, h + t * N1 + g, &a[(j * T + t) * g], g);
        }
      }
      for (int64_t j = 0; j < S.n[i]; ++j) {
        const uint8_t* grp = S.base[i] + j * per;
        q8_rows(mode, reinterpret_cast<const int8_t*>(grp + offs[1]) + r0 * g,
                reinterpret_cast<const uint16_t*>(grp + offs[3]) + r0, rows, g, &a[j * T * g], g,
                T, p.data(), kRows);
        add_rows(ys[i], D, T, r0, rows, p.data(), kRows);
      }
    }
  });
}

void q4_swiglu_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& buf, int64_t D,
                int64_t g, int64_t b, at::IntArrayRef offs, int64_t per, int64_t bn, bool split,
                int64_t isa) {
  q4_experts_swiglu_({y}, x, {buf}, D, g, b, offs, per, bn, split, isa);
}

void q8_swiglu_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& buf, int64_t D,
                int64_t g, at::IntArrayRef offs, int64_t per, int64_t isa) {
  q8_experts_swiglu_({y}, x, {buf}, D, g, offs, per, isa);
}

// Single matrices, for the tests: y [T, N] float32 = x [T, K] @ W.T.
void q4_linear_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& packed,
                const at::Tensor& sz, int64_t b, int64_t bn, bool split, int64_t isa) {
  const int64_t T = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && y.scalar_type() == at::kFloat &&
                  y.is_contiguous() && y.size(0) == T && y.size(1) == N &&
                  packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(1) * 2 == K && sz.scalar_type() == at::kBFloat16 &&
                  sz.is_contiguous() && sz.numel() == (K / b) * N * 2 && K % b == 0,
              "mer: bad q4_linear arguments");
  const int mode = kernel_mode(isa);
  const float* X = static_cast<const float*>(x.data_ptr());
  std::vector<float> xs(T * (K / b)), xps(T * (K / b));
  std::vector<uint32_t> xp(mode == 2 ? T * K : 0);
  block_sums(X, T, K, b, xs.data());
  if (mode == 2) bf16_pairs(X, T, K, b, xp.data(), xps.data());
  for (int64_t r0 = 0; r0 < N; r0 += bn)
    q4_block(mode, static_cast<const uint8_t*>(packed.data_ptr()),
             static_cast<const uint16_t*>(sz.data_ptr()), N, K, b, r0, std::min(bn, N - r0), bn,
             split, X, K, xs.data(), K / b, xp.data(), xps.data(), T,
             static_cast<float*>(y.data_ptr()) + r0, N);
}

void q8_linear_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& w,
                const at::Tensor& s, int64_t isa) {
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && y.scalar_type() == at::kFloat &&
                  y.is_contiguous() && y.size(0) == T && y.size(1) == N &&
                  w.scalar_type() == at::kChar && w.is_contiguous() && w.size(1) == K &&
                  s.scalar_type() == at::kBFloat16 && s.numel() == N && K % 16 == 0,
              "mer: bad q8_linear arguments");
  q8_rows(kernel_mode(isa), static_cast<const int8_t*>(w.data_ptr()),
          static_cast<const uint16_t*>(s.data_ptr()), N, K,
          static_cast<const float*>(x.data_ptr()), K, T, static_cast<float*>(y.data_ptr()), N);
}

bool has_avx512() { return cpu_has_avx512(); }
bool has_avx2_fma() { return cpu_has_avx2_fma(); }
bool has_avx512_bf16() { return cpu_has_avx512() && cpu_has_avx512_bf16(); }

}  // namespace

TORCH_LIBRARY(mer, m) {
  m.def("q4_swiglu_(Tensor(a!) y, Tensor x, Tensor buf, int hidden, int group, int block, "
        "int[] offsets, int per, int block_n, bool split, int isa) -> ()",
        &q4_swiglu_);
  m.def("q8_swiglu_(Tensor(a!) y, Tensor x, Tensor buf, int hidden, int group, int[] offsets, "
        "int per, int isa) -> ()",
        &q8_swiglu_);
  m.def("q4_experts_swiglu_(Tensor(a!)[] ys, Tensor x, Tensor[] bufs, int hidden, int group, "
        "int block, int[] offsets, int per, int block_n, bool split, int isa) -> ()",
        &q4_experts_swiglu_);
  m.def("q8_experts_swiglu_(Tensor(a!)[] ys, Tensor x, Tensor[] bufs, int hidden, int group, "
        "int[] offsets, int per, int isa) -> ()",
        &q8_experts_swiglu_);
  m.def("q4_linear_(Tensor(a!) y, Tensor x, Tensor packed, Tensor sz, int block, int block_n, "
        "bool split, int isa) -> ()",
        &q4_linear_);
  m.def("q8_linear_(Tensor(a!) y, Tensor x, Tensor w, Tensor s, int isa) -> ()", &q8_linear_);
  m.def("has_avx512() -> bool", &has_avx512);
  m.def("has_avx2_fma() -> bool", &has_avx2_fma);
  m.def("has_avx512_bf16() -> bool", &has_avx512_bf16);
}
