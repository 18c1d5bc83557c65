// The pieces of the dense q4 GEMV that its AVX2 (native_dense.cpp) and AVX-512 VNNI
// (native_dense_vnni.cpp) kernels share: per chunk of 8 blocks, a row's scale products and
// zero-point terms, and the lane sums. AVX2 functions, inlined into either kernel (a VNNI
// function may inline AVX2 code; the reverse would not compile), so both kernels perform the
// scalar definition's float operations in the same order.
//
// Legend: see native_dense.cpp.

#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#define MER_DENSE_AVX2 __attribute__((target("avx2,fma"), always_inline))

namespace mer_dense {

// tree8 of native_dense.cpp: lanes i + i+4, then (0 + 2) + (1 + 3)
MER_DENSE_AVX2 inline float hsum8(__m256 v) {
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));  // [s4_0 + s4_2, s4_1 + s4_3]
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

// One row's chunk of nk (<= 8) blocks from block b0: zc[i] = fl(z - 8 s), and per token t
// da[t][i] = s sxa, db[t][i] = s sxb (8 floats each at da[t], db[t]). e: the row's (s, z) pairs
// of block b0; sxa / sxb: per token, nb scales apart.
template <int TT>
MER_DENSE_AVX2 inline void chunk_scales(const uint16_t* e, int64_t nk, int64_t nb, int64_t b0,
                                        const float* sxa, const float* sxb, float* zc,
                                        float* const* da, float* const* db) {
  if (nk == 8) {
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e));  // s | z << 16
    const __m256 sv = _mm256_castsi256_ps(_mm256_slli_epi32(d, 16));
    const __m256 zv =
        _mm256_castsi256_ps(_mm256_and_si256(d, _mm256_set1_epi32(int(0xFFFF0000u))));
    _mm256_storeu_ps(zc, _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), sv, zv));
    for (int t = 0; t < TT; ++t) {
      _mm256_storeu_ps(da[t], _mm256_mul_ps(sv, _mm256_loadu_ps(sxa + t * nb + b0)));
      _mm256_storeu_ps(db[t], _mm256_mul_ps(sv, _mm256_loadu_ps(sxb + t * nb + b0)));
    }
    return;
  }
  for (int64_t i = 0; i < nk; ++i) {
    const uint32_t us = uint32_t(e[2 * i]) << 16, uz = uint32_t(e[2 * i + 1]) << 16;
    float sv, zv;
    std::memcpy(&sv, &us, 4);
    std::memcpy(&zv, &uz, 4);
    zc[i] = std::fmaf(-8.0f, sv, zv);
    for (int t = 0; t < TT; ++t) {
      da[t][i] = sv * sxa[t * nb + b0 + i];
      db[t][i] = sv * sxb[t * nb + b0 + i];
    }
  }
}

// The zero-point lanes after a chunk: off_i += zc_i c_(b0 + i), lane i for block b0 + i (the
// last, partial chunk lane by lane; the others stay as they are).
MER_DENSE_AVX2 inline __m256 zero_points(__m256 off, const float* zc, const float* c, int64_t nk) {
  if (nk == 8) return _mm256_fmadd_ps(_mm256_loadu_ps(zc), _mm256_loadu_ps(c), off);
  alignas(32) float o[8];
  _mm256_store_ps(o, off);
  for (int64_t i = 0; i < nk; ++i) o[i] = std::fmaf(zc[i], c[i], o[i]);
  return _mm256_load_ps(o);
}

}  // namespace mer_dense

#endif
