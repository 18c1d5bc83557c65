// q4 rows with float32 activations (declared in native_common.h): the portable scalar code,
// AVX-512 float32 (mode 1), AVX-512 with BF16 dot products (mode 2) and AVX2 + FMA float32
// (mode 3), and q4_block, which picks one per row block and tiles the tokens.
//
// Weights are read in place from the expert buffer (reference.py's sections). The float32 SIMD
// kernels and the scalar code perform the same IEEE operations in the same order (explicit
// fmaf, rows across lanes, k in order), so they give identical bits; the tests check it. The
// BF16-dot kernel does not: it multiplies bf16 splits of x and rounds differently, within the
// bound stated in docs/quantization.md and checked by the tests.
//
// Legend: see native_common.h.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "native_common.h"

namespace mer_native {
namespace {

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

#if MER_X86
// Software prefetch, measured on 1 thread from DRAM: the q4 kernels (compute-bound) fetch
// kPrefetch4 bytes ahead into L1; farther or into L2 changed nothing.
constexpr int64_t kPrefetch4 = 2048;

// ---- AVX-512 kernels -------------------------------------------------------------------------

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

#endif

// ---- AVX2 + FMA kernels (x86-64 without AVX-512) ---------------------------------------------
//
// The same arithmetic as the scalar reference, lane by lane, so the bits match it: one
// accumulator per row (rows across lanes, k in order).

#if MER_X86
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

#endif

}  // namespace

// ---- dispatch over token tiles ---------------------------------------------------------------

// Kernel modes: see native_common.h. xp / xps: x as bf16 (hi, lo) pairs and the block sums of hi + lo (mode 2 only).
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

}  // namespace mer_native
