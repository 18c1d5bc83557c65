// The dense q4 GEMV rows (native_dense.cpp's definition) with AVX-512 VNNI: the same int32 lanes,
// the same float32 operations in the same order, so the same bits as the scalar and AVX2 code.
//
// A row's 32-byte block of 64 weights gives 8 int32 lanes per half (low nibbles with the first
// 32 activations, high nibbles with the next 32), each the sum of 4 neighbouring products: what
// vpdpbusd computes in one instruction (AVX2 needs vpmaddubsw + vpmaddwd). Two rows share one
// 512-bit register (row 2p in lanes 0-7, row 2p + 1 in lanes 8-15), so a row's lanes accumulate
// exactly as in the definition; their per-block scales come from one permute of the chunk's
// 2 x 8 scale products.
//
// Legend: see native_dense.cpp.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "native_dense_simd.h"
#define MER_DVNNI 1
#define MER_VNNI512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")))
#else
#define MER_DVNNI 0
#endif

namespace mer_dense {

#if MER_DVNNI
bool cpu_has_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("fma");
}

namespace {

constexpr int64_t kWB4 = 64;
constexpr int64_t kPrefetch = 16384;  // bytes ahead in the rows' stream, into L2 (as AVX2)

// R rows (R even), TT tokens; arguments as native_dense.cpp's q4_rows_avx2.
template <int R, int TT>
MER_VNNI512 void q4_rows(const uint8_t* p, const uint16_t* sz, int64_t K, const int8_t* qx,
                         const float* sxa, const float* sxb, const float* c, float* out,
                         int64_t os) {
  constexpr int P = R / 2;
  const int64_t nb = K / kWB4;
  const __m512i m4 = _mm512_set1_epi8(15);
  const __m512i half = _mm512_set_epi32(8, 8, 8, 8, 8, 8, 8, 8, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[P][TT];
  __m256 off[R][TT];  // lane l: the blocks b = l mod 8
  for (int q = 0; q < P; ++q)
    for (int t = 0; t < TT; ++t) acc[q][t] = _mm512_setzero_ps();
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) off[r][t] = _mm256_setzero_ps();
  const int64_t pf = std::max<int64_t>(R * K / 2, kPrefetch);
  // per pair and token: lanes 0-7 the scale products of row 2p's 8 blocks, 8-15 row 2p + 1's
  alignas(64) float da[P][TT][16], db[P][TT][16], zc[R][8];
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    const int64_t nk = std::min<int64_t>(8, nb - b0);
    for (int r = 0; r < R; ++r) {
      float* pa[TT];
      float* pb[TT];
      for (int t = 0; t < TT; ++t)
        pa[t] = da[r / 2][t] + 8 * (r % 2), pb[t] = db[r / 2][t] + 8 * (r % 2);
      chunk_scales<TT>(sz + (r * nb + b0) * 2, nk, nb, b0, sxa, sxb, zc[r], pa, pb);
    }
    for (int64_t i = 0; i < nk; ++i) {
      const int64_t b = b0 + i;
      if ((b & 1) == 0)
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(p + r * K / 2 + b * 32 + pf), _MM_HINT_T1);
      const __m512i idx = _mm512_add_epi32(half, _mm512_set1_epi32(int(i)));
      __m512i xa[TT], xb[TT];
      for (int t = 0; t < TT; ++t) {
        xa[t] = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + t * K + b * kWB4)));
        xb[t] = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + t * K + b * kWB4 + 32)));
      }
      for (int q = 0; q < P; ++q) {
        const uint8_t* w0 = p + (2 * q) * K / 2 + b * 32;
        const __m512i v = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0))),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + K / 2)), 1);
        const __m512i lo = _mm512_and_si512(v, m4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        for (int t = 0; t < TT; ++t) {
          const __m512i z = _mm512_setzero_si512();
          const __m512 fa = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, lo, xa[t]));
          const __m512 fb = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, hi, xb[t]));
          const __m512 sa = _mm512_permutexvar_ps(idx, _mm512_load_ps(da[q][t]));
          const __m512 sb = _mm512_permutexvar_ps(idx, _mm512_load_ps(db[q][t]));
          acc[q][t] = _mm512_fmadd_ps(fb, sb, _mm512_fmadd_ps(fa, sa, acc[q][t]));
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < TT; ++t)
        off[r][t] = zero_points(off[r][t], zc[r], c + t * nb + b0, nk);
  }
  for (int q = 0; q < P; ++q)
    for (int t = 0; t < TT; ++t) {
      out[t * os + 2 * q] = hsum8(_mm512_castps512_ps256(acc[q][t])) + hsum8(off[2 * q][t]);
      out[t * os + 2 * q + 1] =
          hsum8(_mm512_extractf32x8_ps(acc[q][t], 1)) + hsum8(off[2 * q + 1][t]);
    }
}

}  // namespace

void q4_rows4_vnni(int tt, const uint8_t* p, const uint16_t* sz, int64_t K, const int8_t* qx,
                   const float* sxa, const float* sxb, const float* c, float* out, int64_t os) {
  switch (tt) {
    case 1: return q4_rows<4, 1>(p, sz, K, qx, sxa, sxb, c, out, os);
    case 2: return q4_rows<4, 2>(p, sz, K, qx, sxa, sxb, c, out, os);
    case 3: return q4_rows<4, 3>(p, sz, K, qx, sxa, sxb, c, out, os);
    default: return q4_rows<4, 4>(p, sz, K, qx, sxa, sxb, c, out, os);
  }
}

#else

bool cpu_has_vnni() { return false; }

void q4_rows4_vnni(int, const uint8_t*, const uint16_t*, int64_t, const int8_t*, const float*,
                   const float*, const float*, float*, int64_t) {}

#endif

}  // namespace mer_dense
