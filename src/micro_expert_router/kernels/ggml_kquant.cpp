// Row dots of the K-quants (Q4_K, Q5_K, Q6_K: 256-weight blocks) with int8 activations, the
// decode path of ggml_native.cpp in bfloat16 mode (block_kind picks them for isa 2 and 3).
//
// Activations come as ActView: int8 codes xq per weight, one float scale dx per block of 256,
// and code sums bs per G weights (G = 32 for Q4_K/Q5_K, 16 for Q6_K). A block of weights is
//   Q4_K/Q5_K  w_i = d sc_j q_i - dmin mn_j     (j = i / 32; codes 0..15 / 0..31)
//   Q6_K       w_i = d sc_j (q_i - 32)          (j = i / 16; codes 0..63, sc signed)
// Definition of a row dot over nb blocks (8 float lanes acc, 4 float lanes off, all zero):
//   per block, 8 exact int32 lane sums; lane m (0..7) over the 32-weight chunks c = 0..7:
//     L_m = sum_c sc[(32c + 4m) / G] sum_{i<4} q[32c + 4m + i] xq[32c + 4m + i]
//     Q6_K:      L_m -= 32 (sc[2m] bs[2m] + sc[2m+1] bs[2m+1])
//     Q4_K/Q5_K: M_p = mn[2p] bs[2p] + mn[2p+1] bs[2p+1] (p = 0..3)
//   acc_m = fma(dx d, float(L_m), acc_m);  off_p = fma(dx dmin, float(M_p), off_p)
//   row = tree8(acc) - ((off_0 + off_2) + (off_1 + off_3))   (Q6_K: tree8(acc))
// with tree8(a) = ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)). The integer sums are
// exact (|L_m| < 2^26; vpmaddubsw pairs stay below 2^15: 2 x 63 x 127), so the AVX2 code
// (vpmaddubsw codes x activations, vpmaddwd by the sub-block scales, one float FMA per block
// and lane) and the scalar code below give the same bits. No horizontal sum per block: the
// lanes are reduced once per row, and the weight stream is prefetched a few blocks ahead.
// ggml_kquant512.cpp computes the same definition for Q4_K and Q6_K with AVX-512 VNNI (chosen by
// kquant_int8's wide flag where the CPU has it).
//
// Legend: B = 256 weights per block, G weights per integer scale, c chunk of 32 weights.

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MERK_X86 1
#define MERK_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MERK_AVX2I __attribute__((target("avx2,fma,f16c"), always_inline)) inline
#else
#define MERK_X86 0
#endif
#define MERK_INLINE __attribute__((always_inline)) inline

#include "ggml_blocks.h"

namespace {

using mer_ggml::ActView;
using mer_ggml::Segs;

// f16 -> f32, exact (IEEE bit arithmetic).
MERK_INLINE float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t sign = uint32_t(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 0x3ff;
  uint32_t bits = sign | ((e == 31 ? 255 : e + 112) << 23) | (m << 13);
  float f;
  if (e == 0) {  // zero or subnormal: m 2^-24, exact
    f = float(m) * 0x1p-24f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  std::memcpy(&f, &bits, 4);
  return f;
}

MERK_INLINE uint32_t u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---- the scalar definition --------------------------------------------------------------

// Q4_K/Q5_K: the 6-bit scales and mins of the 12 packed bytes at b + 4.
inline void k_scales(const uint8_t* b, int32_t* sc, int32_t* mn) {
  const uint32_t w0 = u32(b + 4), w1 = u32(b + 8), w2 = u32(b + 12);
  const uint32_t v[4] = {w0 & 0x3f3f3f3fu, (w2 & 0x0f0f0f0fu) | ((w0 >> 2) & 0x30303030u),
                         w1 & 0x3f3f3f3fu, ((w2 >> 4) & 0x0f0f0f0fu) | ((w1 >> 2) & 0x30303030u)};
  uint8_t s[16];
  std::memcpy(s, v, 16);
  for (int j = 0; j < 8; ++j) sc[j] = s[j], mn[j] = s[8 + j];
}

inline int32_t code(int64_t type, const uint8_t* b, int i) {
  if (type == 12) {  // Q4_K: nibble of sub-block i / 32
    const uint8_t v = b[16 + (i / 64) * 32 + i % 32];
    return (i / 32) % 2 ? v >> 4 : v & 15;
  }
  if (type == 13) {  // Q5_K: Q4_K's nibble after 32 B of high bits
    const uint8_t v = b[48 + (i / 64) * 32 + i % 32];
    const int s = i / 32;
    return (s % 2 ? v >> 4 : v & 15) | (((b[16 + i % 32] >> s) & 1) << 4);
  }
  const int h = i / 128, qd = (i % 128) / 32, l = i % 32;  // Q6_K
  const uint8_t v = b[h * 64 + (qd & 1) * 32 + l];
  return (qd >= 2 ? v >> 4 : v & 15) | (((b[128 + h * 32 + l] >> (2 * qd)) & 3) << 4);
}

inline float tree8(const float* a) {
  float s4[4];
  for (int i = 0; i < 4; ++i) s4[i] = a[i] + a[i + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

template <int64_t kType>
float dot_scalar(const uint8_t* row, const ActView& a, int64_t nb) {
  constexpr bool q6 = kType == 14;
  constexpr int64_t NB = kType == 12 ? 144 : kType == 13 ? 176 : 210, G = q6 ? 16 : 32;
  float acc[8] = {}, off[4] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * NB;
    const int8_t* xq = a.q + b * 256;
    const int16_t* bs = a.bs + b * (256 / G);
    int32_t sc[16], mn[8];
    float d, dmin = 0.0f;
    if constexpr (q6) {
      for (int j = 0; j < 16; ++j) sc[j] = int8_t(blk[192 + j]);
      d = h2f(blk + 208);
    } else {
      k_scales(blk, sc, mn);
      d = h2f(blk);
      dmin = h2f(blk + 2);
    }
    const float dx = a.d[b];
    for (int m = 0; m < 8; ++m) {
      int32_t l = 0;
      for (int c = 0; c < 8; ++c) {
        int32_t t = 0;
        for (int i = 32 * c + 4 * m; i < 32 * c + 4 * m + 4; ++i) t += code(kType, blk, i) * xq[i];
        l += sc[(32 * c + 4 * m) / G] * t;
      }
      if constexpr (q6) l -= 32 * (sc[2 * m] * bs[2 * m] + sc[2 * m + 1] * bs[2 * m + 1]);
      acc[m] = std::fma(dx * d, float(l), acc[m]);
    }
    if constexpr (!q6)
      for (int p = 0; p < 4; ++p)
        off[p] = std::fma(dx * dmin, float(mn[2 * p] * bs[2 * p] + mn[2 * p + 1] * bs[2 * p + 1]),
                          off[p]);
  }
  const float r = tree8(acc);
  return q6 ? r : r - ((off[0] + off[2]) + (off[1] + off[3]));
}

// ---- AVX2 --------------------------------------------------------------------------------

#if MERK_X86
constexpr int kAhead = 4;  // blocks prefetched ahead of the one in use

MERK_AVX2I __m256i ld(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

MERK_AVX2I float tree8_avx2(__m256 v) {  // the same additions as tree8
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

MERK_AVX2I float tree4_avx2(__m128 s) {  // (o0 + o2) + (o1 + o3)
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

MERK_AVX2I void prefetch(const uint8_t* p, int64_t nbytes) {
  for (int64_t o = 0; o < nbytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + o), _MM_HINT_T0);
}

// int16 vector whose low half is s[lo] and high half s[hi] (s: 8 int16 in each 128-bit lane)
MERK_AVX2I __m256i pick2(__m256i s, int lo, int hi) {
  const __m256i idx = _mm256_setr_epi8(
      2 * lo, 2 * lo + 1, 2 * lo, 2 * lo + 1, 2 * lo, 2 * lo + 1, 2 * lo, 2 * lo + 1, 2 * lo,
      2 * lo + 1, 2 * lo, 2 * lo + 1, 2 * lo, 2 * lo + 1, 2 * lo, 2 * lo + 1, 2 * hi, 2 * hi + 1,
      2 * hi, 2 * hi + 1, 2 * hi, 2 * hi + 1, 2 * hi, 2 * hi + 1, 2 * hi, 2 * hi + 1, 2 * hi,
      2 * hi + 1, 2 * hi, 2 * hi + 1, 2 * hi, 2 * hi + 1);
  return _mm256_shuffle_epi8(s, idx);
}

// Q4_K/Q5_K scales and mins as int16: [sc0..sc7 | mn0..mn7] from the 12 bytes at b + 4.
MERK_AVX2I __m256i k_scales_avx2(const uint8_t* b) {
  const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4));  // w0 w1 w2 .
  __m128i p = _mm_shuffle_epi32(w, _MM_SHUFFLE(2, 1, 2, 0));                  // w0 w2 w1 w2
  p = _mm_and_si128(_mm_srlv_epi32(p, _mm_setr_epi32(0, 0, 0, 4)),
                    _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
  const __m128i q = _mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(w, _MM_SHUFFLE(1, 1, 0, 0)), 2),
                                  _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
  return _mm256_cvtepu8_epi16(_mm_or_si128(p, q));  // v0 v1 v2 v3 as 16 int16
}

// One block of one row: acc (8 lanes) and off (4 lanes) updated as the definition says.
template <int64_t kType>
MERK_AVX2I void block_avx2(const uint8_t* blk, const int8_t* xq, const int16_t* bsb, float dxs,
                           __m256& acc, __m128& off) {
  constexpr bool q6 = kType == 14, q5 = kType == 13;
  constexpr int64_t NB = kType == 12 ? 144 : q5 ? 176 : 210;
  const __m256i m4 = _mm256_set1_epi8(15);
  prefetch(blk + kAhead * NB, NB);
  const __m256 dx = _mm256_set1_ps(dxs);
  __m256i sum = _mm256_setzero_si256();
  if constexpr (q6) {
    const __m256i sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)));
    const __m256i mins = _mm256_madd_epi16(sc, ld(bsb));  // lane m: sc.bs of 2m, 2m+1
    for (int h = 0; h < 2; ++h) {
      const __m256i s = _mm256_permute4x64_epi64(sc, h ? 0xEE : 0x44);  // sc[8h..8h+7] twice
      const __m256i l0 = ld(blk + 64 * h), l1 = ld(blk + 64 * h + 32), qh = ld(blk + 128 + 32 * h);
      const __m256i m30 = _mm256_set1_epi8(0x30);
      const __m256i q[4] = {
          _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30)),
          _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(qh, m30)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                          _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30))};
      for (int k = 0; k < 4; ++k) {
        const __m256i p = _mm256_maddubs_epi16(q[k], ld(xq + 128 * h + 32 * k));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, pick2(s, 2 * k, 2 * k + 1)));
      }
    }
    sum = _mm256_sub_epi32(sum, _mm256_slli_epi32(mins, 5));
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(*reinterpret_cast<const uint16_t*>(blk + 208)));
    acc = _mm256_fmadd_ps(_mm256_mul_ps(dx, d), _mm256_cvtepi32_ps(sum), acc);
  } else {
    const __m256i sm = k_scales_avx2(blk);
    const __m256i s = _mm256_permute4x64_epi64(sm, 0x44);  // sc0..sc7 in both halves
    const __m128i mins = _mm_madd_epi16(_mm256_extracti128_si256(sm, 1),
                                        _mm_loadu_si128(reinterpret_cast<const __m128i*>(bsb)));
    const uint8_t* qs = blk + (q5 ? 48 : 16);
    __m256i qh = q5 ? ld(blk + 16) : _mm256_setzero_si256();
    for (int k = 0; k < 4; ++k) {
      const __m256i v = ld(qs + 32 * k);
      __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      if constexpr (q5) {  // bit 2k, 2k+1 of qh -> bit 4 of the codes (qh shifted right as we go)
        const __m256i m10 = _mm256_set1_epi8(0x10);
        lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(qh, 4), m10));
        hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(qh, 3), m10));
        qh = _mm256_srli_epi16(qh, 2);
      }
      const __m256i pl = _mm256_maddubs_epi16(lo, ld(xq + 64 * k));
      const __m256i ph = _mm256_maddubs_epi16(hi, ld(xq + 64 * k + 32));
      sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pl, pick2(s, 2 * k, 2 * k)));
      sum = _mm256_add_epi32(sum, _mm256_madd_epi16(ph, pick2(s, 2 * k + 1, 2 * k + 1)));
    }
    const __m128 dd = _mm_mul_ps(_mm256_castps256_ps128(dx),
                                 _mm_cvtph_ps(_mm_cvtsi32_si128(int(u32(blk)))));  // dx d, dx dmin
    acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dd), _mm256_cvtepi32_ps(sum), acc);
    off = _mm_fmadd_ps(_mm_shuffle_ps(dd, dd, 0x55), _mm_cvtepi32_ps(mins), off);
  }
}

// R rows (row + r rstride) against the same activation: out[r] = the row dot (each row's
// operations are exactly the single-row ones; the rows only share the loop).
template <int64_t kType, int R>
MERK_AVX2I void dot_avx2(const uint8_t* row, int64_t rstride, const ActView& a, int64_t nb,
                         float* out) {
  constexpr int64_t NB = kType == 12 ? 144 : kType == 13 ? 176 : 210, G = kType == 14 ? 16 : 32;
  __m256 acc[R];
  __m128 off[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), off[r] = _mm_setzero_ps();
  for (int64_t b = 0; b < nb; ++b)
    for (int r = 0; r < R; ++r)
      block_avx2<kType>(row + r * rstride + b * NB, a.q + b * 256, a.bs + b * (256 / G), a.d[b],
                        acc[r], off[r]);
  for (int r = 0; r < R; ++r)
    out[r] = kType == 14 ? tree8_avx2(acc[r]) : tree8_avx2(acc[r]) - tree4_avx2(off[r]);
}

template <int64_t kType>
MERK_AVX2 float segs_avx2(const Segs& s, float acc) {
  for (int64_t j = 0; j < s.n; ++j) {
    float p;
    dot_avx2<kType, 1>(s.row + j * s.stride, 0, s.act[j * s.astride], s.nb, &p);
    acc += p;
  }
  return acc;
}

template <int64_t kType>
MERK_AVX2 void segs4_avx2(const Segs& s, int64_t rstride, float* acc) {
  for (int64_t j = 0; j < s.n; ++j) {
    float p[4];
    dot_avx2<kType, 4>(s.row + j * s.stride, rstride, s.act[j * s.astride], s.nb, p);
    for (int r = 0; r < 4; ++r) acc[r] += p[r];
  }
}
#endif

template <int64_t kType>
float segs_scalar(const Segs& s, float acc) {
  for (int64_t j = 0; j < s.n; ++j) acc += dot_scalar<kType>(s.row + j * s.stride, s.act[j * s.astride], s.nb);
  return acc;
}

template <int64_t kType>
void segs4_scalar(const Segs& s, int64_t rstride, float* acc) {
  for (int r = 0; r < 4; ++r) {
    Segs one = s;
    one.row += r * rstride;
    acc[r] = segs_scalar<kType>(one, acc[r]);
  }
}

}  // namespace

namespace mer_ggml {

Dot kquant_int8(int64_t type, bool avx2, bool wide) {
#if MERK_X86
  if (avx2 && wide)
    if (Dot d = kquant_int8_512(type)) return d;
  if (avx2) {
    switch (type) {
      case 12: return segs_avx2<12>;
      case 13: return segs_avx2<13>;
      case 14: return segs_avx2<14>;
    }
  }
#endif
  switch (type) {
    case 12: return segs_scalar<12>;
    case 13: return segs_scalar<13>;
    case 14: return segs_scalar<14>;
  }
  return nullptr;
}

Dot4 kquant_int8_4(int64_t type, bool avx2, bool wide) {
#if MERK_X86
  if (avx2 && wide)
    if (Dot4 d = kquant_int8_4_512(type)) return d;
  if (avx2) {
    switch (type) {
      case 12: return segs4_avx2<12>;
      case 13: return segs4_avx2<13>;
      case 14: return segs4_avx2<14>;
    }
  }
#endif
  switch (type) {
    case 12: return segs4_scalar<12>;
    case 13: return segs4_scalar<13>;
    case 14: return segs4_scalar<14>;
  }
  return nullptr;
}

}  // namespace mer_ggml
