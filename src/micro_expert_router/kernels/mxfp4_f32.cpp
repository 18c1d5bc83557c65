// The float32-activation dots of the mxfp4 kernel (the float32 engine mode; mxfp4.cpp has the
// ops, mxfp4_i8.cpp the int8 mode).
//
// Activations: x permuted once per block of 32 into [even elements | odd elements], so byte l of
// a block's codes (element 2l low nibble, 2l + 1 high) meets x at positions l and 16 + l.
// With 16 float lanes l (the 16 code bytes of a block) and d_b = 2^(e_b - 128):
//   t_l = v(low nibble of byte l) xp(l);  t_l = fma(v(high nibble), xp(16 + l), t_l)
//   acc_l = fma(t_l, d_b, acc_l)   for every block, in order;   dot = finish(lanes 0-7, 8-15)
// AVX-512: the codes widened to 32-bit lanes pick their float value with vpermps (which reads
// only the low 4 bits of an index: no masking); AVX2: the lanes as two ymm halves, values from a
// pshufb table widened to float; the scalar code does the same float operations in the same
// order (-ffp-contract=off), so all three give identical bits.

#include "mxfp4.h"

namespace mer_mxfp4 {

void Act::prepare(const float* x, int64_t K, bool i8, bool simd) {
  if (i8) return prepare_i8(x, K, simd);
  xp.resize(K);
  for (int64_t b = 0; b < K / 32; ++b)
    for (int k = 0; k < 16; ++k) {
      xp[b * 32 + k] = x[b * 32 + 2 * k];
      xp[b * 32 + 16 + k] = x[b * 32 + 2 * k + 1];
    }
}

void rows_f32_scalar(const uint8_t* q, const uint8_t* e, int64_t rows, int64_t nb,
                     const float* xp, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc[16] = {};
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* qb = q + (r * nb + b) * 16;
      const float* xb = xp + b * 32;
      const float d = half_scale(e[r * nb + b]);
      for (int l = 0; l < 16; ++l) {
        float t = float(kValues[qb[l] & 15]) * xb[l];
        t = std::fmaf(float(kValues[qb[l] >> 4]), xb[16 + l], t);
        acc[l] = std::fmaf(t, d, acc[l]);
      }
    }
    out[r] = finish(acc, acc + 8);
  }
}

#if MX_X86

// ---- AVX2 ------------------------------------------------------------------------------------

MX_AVX2 void rows_f32_avx2(const uint8_t* q, const uint8_t* e, int64_t rows, int64_t nb,
                           const float* xp, float* out) {
  const __m128i lut = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kValues));
  const __m128i m4 = _mm_set1_epi8(15);
  for (int64_t r = 0; r < rows; ++r) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* qb = q + (r * nb + b) * 16;
      const float* xb = xp + b * 32;
      if ((b & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(qb + 2048), _MM_HINT_T0);
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb));
      const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(v, m4));
      const __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(v, 4), m4));
      const __m256 d = _mm256_set1_ps(half_scale(e[r * nb + b]));
      __m256 t0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), _mm256_loadu_ps(xb));
      __m256 t1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))),
                                _mm256_loadu_ps(xb + 8));
      t0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), _mm256_loadu_ps(xb + 16),
                           t0);
      t1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))),
                           _mm256_loadu_ps(xb + 24), t1);
      a0 = _mm256_fmadd_ps(t0, d, a0);
      a1 = _mm256_fmadd_ps(t1, d, a1);
    }
    alignas(32) float r0[8], r1[8];
    _mm256_store_ps(r0, a0);
    _mm256_store_ps(r1, a1);
    out[r] = finish(r0, r1);
  }
}

// ---- AVX-512 ---------------------------------------------------------------------------------

namespace {

// One block of one row into acc: codes widened to 16 x 32 bits, values by vpermps.
MX_AVX512 __attribute__((always_inline)) inline __m512 block512(const uint8_t* qb, uint8_t e,
                                                                __m512 xe, __m512 xo,
                                                                __m512 tab, __m512 acc) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb)));
  __m512 t = _mm512_mul_ps(_mm512_permutexvar_ps(v, tab), xe);
  t = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab), xo, t);
  return _mm512_fmadd_ps(t, _mm512_set1_ps(half_scale(e)), acc);
}

// finish() of one accumulator.
MX_AVX512 inline float finish512(__m512 acc) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 t = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

}  // namespace

MX_AVX512 void rows_f32_avx512(const uint8_t* q, const uint8_t* e, int64_t rows, int64_t nb,
                               const float* xp, float* out) {
  alignas(64) float tv[16];
  for (int c = 0; c < 16; ++c) tv[c] = float(kValues[c]);
  const __m512 tab = _mm512_load_ps(tv);
  const int64_t rs = nb * 16;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {  // four rows share each block's activations
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (int64_t b = 0; b < nb; ++b) {
      const __m512 xe = _mm512_loadu_ps(xp + b * 32), xo = _mm512_loadu_ps(xp + b * 32 + 16);
      for (int k = 0; k < 4; ++k) {
        const uint8_t* qb = q + (r + k) * rs + b * 16;
        if ((b & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(qb + 2048), _MM_HINT_T0);
        acc[k] = block512(qb, e[(r + k) * nb + b], xe, xo, tab, acc[k]);
      }
    }
    for (int k = 0; k < 4; ++k) out[r + k] = finish512(acc[k]);
  }
  for (; r < rows; ++r) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b)
      acc = block512(q + r * rs + b * 16, e[r * nb + b], _mm512_loadu_ps(xp + b * 32),
                     _mm512_loadu_ps(xp + b * 32 + 16), tab, acc);
    out[r] = finish512(acc);
  }
}

#else
void rows_f32_avx2(const uint8_t* q, const uint8_t* e, int64_t rows, int64_t nb, const float* xp,
                   float* out) {
  rows_f32_scalar(q, e, rows, nb, xp, out);
}
void rows_f32_avx512(const uint8_t* q, const uint8_t* e, int64_t rows, int64_t nb,
                     const float* xp, float* out) {
  rows_f32_scalar(q, e, rows, nb, xp, out);
}
#endif

}  // namespace mer_mxfp4
