// AVX-512 (F/BW/VL/VNNI) row dots of Q4_K and Q6_K with int8 activations: the definition of
// ggml_kquant.cpp's header (8 exact int32 lane sums per block, one float FMA per block and lane,
// the lanes reduced once per row by tree8), computed with 512-bit integer ops, so these give the
// same bits as the scalar and AVX2 code. Chosen at run time (kquant_int8_512) when the CPU has
// AVX-512 VNNI; kernels/ggml_native.py's isa 4 forces the AVX2 code instead (tested).
//
// Per block, 64 weights per vector: vpmaddubsw (codes x activation codes -> 32 int16 pair sums)
// then vpdpwssd by the sub-block scales as 32 int16 lanes (a vpermw of the block's scales):
// int32 lane l of the accumulator collects weights 4l..4l+3 of each 64-weight vector, so lane m
// of the definition is lanes m and m + 8 added (exact). Q4_K's 64-byte load holds the nibbles
// of sub-blocks (4k, 4k+2) low and (4k+1, 4k+3) high, so its activation vectors are two 32-byte
// halves joined (built once per block for all rows of the pass); Q6_K's low nibbles are weights
// 128h..128h+63 and its high ones the next 64, in order, their two high bits from the 32 qh bytes
// broadcast to both halves and shifted per 64-bit lane. Several rows share each pass over the
// activation (4 for the down rows and for gate/up rows), and four rows' tree8 reductions are done
// together with the same additions.
//
// Legend: B = 256 weights per block, G weights per integer scale, R rows per pass.

#include <cstdint>
#include <cstring>

#include "ggml_blocks.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MERZ_X86 1
#define MERZ_T "avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c"
#define MERZ __attribute__((target(MERZ_T)))
#define MERZ_I __attribute__((target(MERZ_T), always_inline)) inline
#else
#define MERZ_X86 0
#endif

#if MERZ_X86
namespace {

using mer_ggml::ActView;
using mer_ggml::Segs;

constexpr int64_t kAheadBytes = 8192;  // at least this far ahead in the weight stream

// The prefetch distance of R contiguous rows of rstride bytes read together (block b of each):
// whole passes ahead (the same block of a later pass's rows), at least kAheadBytes; one row
// (rstride 0): kAheadBytes ahead in the row (the next rows follow it in memory).
MERZ_I int64_t ahead(int R, int64_t rstride) {
  const int64_t pass = R * rstride;
  return pass == 0 ? kAheadBytes : pass * ((kAheadBytes + pass - 1) / pass);
}

MERZ_I __m256i ld256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
MERZ_I __m128i ld128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
MERZ_I __m512i join(const int8_t* a, const int8_t* b) {  // 32 bytes at a, then 32 at b
  return _mm512_inserti64x4(_mm512_castsi256_si512(ld256(a)), ld256(b), 1);
}

MERZ_I void prefetch(const uint8_t* p, int64_t nbytes) {
  for (int64_t o = 0; o < nbytes; o += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + o), _MM_HINT_T0);
}

// vpermw indices: int16 lanes 0..15 take scale a, lanes 16..31 scale b (two 32-weight halves);
// q6 (G = 16): lanes 8i..8i+7 take scale a + i.
MERZ_I __m512i pick_halves(int a, int b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16(short(a))),
                            _mm256_set1_epi16(short(b)), 1);
}
MERZ_I __m512i pick_quarters(int a) {
  return _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_setr_m128i(_mm_set1_epi16(short(a)), _mm_set1_epi16(short(a + 1)))),
      _mm256_setr_m128i(_mm_set1_epi16(short(a + 2)), _mm_set1_epi16(short(a + 3))), 1);
}

// Q4_K scales and mins as int16: [sc0..sc7 | mn0..mn7] from the 12 bytes at b + 4.
MERZ_I __m256i k_scales(const uint8_t* b) {
  const __m128i w = ld128(b + 4);                              // w0 w1 w2 .
  __m128i p = _mm_shuffle_epi32(w, _MM_SHUFFLE(2, 1, 2, 0));  // w0 w2 w1 w2
  p = _mm_and_si128(_mm_srlv_epi32(p, _mm_setr_epi32(0, 0, 0, 4)),
                    _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
  const __m128i q = _mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(w, _MM_SHUFFLE(1, 1, 0, 0)), 2),
                                  _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
  return _mm256_cvtepu8_epi16(_mm_or_si128(p, q));
}

// The exact int32 lane sums L_m (m = 0..7) of a 16-lane accumulator.
MERZ_I __m256i fold(__m512i s) {
  return _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
}

// tree8 of four rows' lanes, [row0, row1, row2, row3], the same additions as tree8.
MERZ_I __m128 tree8x4(const __m256* a) {
  const __m256 s01 = _mm256_add_ps(_mm256_permute2f128_ps(a[0], a[1], 0x20),
                                   _mm256_permute2f128_ps(a[0], a[1], 0x31));  // a_i + a_i+4
  const __m256 s23 = _mm256_add_ps(_mm256_permute2f128_ps(a[2], a[3], 0x20),
                                   _mm256_permute2f128_ps(a[2], a[3], 0x31));
  const __m256 t = _mm256_add_ps(_mm256_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));  // s0+s2, s1+s3
  const __m256 u = _mm256_add_ps(_mm256_shuffle_ps(t, t, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm256_shuffle_ps(t, t, _MM_SHUFFLE(3, 1, 3, 1)));  // r0 r2 . . | r1 r3
  return _mm_unpacklo_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

// (o0 + o2) + (o1 + o3) of four rows' 4 lanes.
MERZ_I __m128 tree4x4(const __m128* o) {
  __m128 a = o[0], b = o[1], c = o[2], d = o[3];
  _MM_TRANSPOSE4_PS(a, b, c, d);  // a: lane 0 of each row, ...
  return _mm_add_ps(_mm_add_ps(a, c), _mm_add_ps(b, d));
}

MERZ_I float tree8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
MERZ_I float tree4(__m128 s) {
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// R rows (row + r rstride) of nb Q4_K blocks against one activation: p[r] = the row dot.
template <int R>
MERZ_I void q4k_rows(const uint8_t* row, int64_t rstride, const ActView& a, int64_t nb, float* p) {
  constexpr int64_t NB = 144;
  const __m512i m4 = _mm512_set1_epi8(15);
  const int64_t dist = ahead(R, rstride);
  const __m512i ix[4] = {pick_halves(0, 2), pick_halves(1, 3), pick_halves(4, 6), pick_halves(5, 7)};
  __m256 acc[R];
  __m128 off[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), off[r] = _mm_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* xq = a.q + b * 256;
    __m512i x[4];
    for (int k = 0; k < 2; ++k) {  // lo k: sub-blocks 4k, 4k+2; hi k: 4k+1, 4k+3
      x[2 * k] = join(xq + 128 * k, xq + 128 * k + 64);
      x[2 * k + 1] = join(xq + 128 * k + 32, xq + 128 * k + 96);
    }
    const __m128i bs = ld128(a.bs + b * 8);
    const __m128 dx = _mm_set1_ps(a.d[b]);
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = row + r * rstride + b * NB;
      prefetch(blk + dist, NB);
      const __m256i sm = k_scales(blk);
      const __m512i s = _mm512_castsi256_si512(sm);
      __m512i sum = _mm512_setzero_si512();
      for (int k = 0; k < 2; ++k) {
        const __m512i v = _mm512_loadu_si512(blk + 16 + 64 * k);
        const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        sum = _mm512_dpwssd_epi32(sum, _mm512_maddubs_epi16(lo, x[2 * k]),
                                  _mm512_permutexvar_epi16(ix[2 * k], s));
        sum = _mm512_dpwssd_epi32(sum, _mm512_maddubs_epi16(hi, x[2 * k + 1]),
                                  _mm512_permutexvar_epi16(ix[2 * k + 1], s));
      }
      const __m128i mins = _mm_madd_epi16(_mm256_extracti128_si256(sm, 1), bs);
      uint32_t h;
      std::memcpy(&h, blk, 4);
      const __m128 dd = _mm_mul_ps(dx, _mm_cvtph_ps(_mm_cvtsi32_si128(int(h))));  // dx d, dx dmin
      acc[r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(dd), _mm256_cvtepi32_ps(fold(sum)), acc[r]);
      off[r] = _mm_fmadd_ps(_mm_shuffle_ps(dd, dd, 0x55), _mm_cvtepi32_ps(mins), off[r]);
    }
  }
  if constexpr (R == 4) {
    _mm_storeu_ps(p, _mm_sub_ps(tree8x4(acc), tree4x4(off)));
  } else {
    for (int r = 0; r < R; ++r) p[r] = tree8(acc[r]) - tree4(off[r]);
  }
}

// R rows of nb Q6_K blocks: p[r] = the row dot.
template <int R>
MERZ_I void q6k_rows(const uint8_t* row, int64_t rstride, const ActView& a, int64_t nb, float* p) {
  constexpr int64_t NB = 210;
  const __m512i m4 = _mm512_set1_epi8(15), m30 = _mm512_set1_epi8(0x30);
  const __m512i shl = _mm512_setr_epi64(4, 4, 4, 4, 2, 2, 2, 2);  // qh bits 0-1 | 2-3 -> 4-5
  const __m512i shr = _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2);  // qh bits 4-5 | 6-7 -> 4-5
  const int64_t dist = ahead(R, rstride);
  const __m512i ix[4] = {pick_quarters(0), pick_quarters(4), pick_quarters(8), pick_quarters(12)};
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* xq = a.q + b * 256;
    __m512i x[4];
    for (int k = 0; k < 4; ++k) x[k] = _mm512_loadu_si512(xq + 64 * k);
    const __m256i bs = ld256(a.bs + b * 16);
    const __m256 dx = _mm256_set1_ps(a.d[b]);
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = row + r * rstride + b * NB;
      prefetch(blk + dist, NB);
      const __m256i sc = _mm256_cvtepi8_epi16(ld128(blk + 192));
      const __m512i s = _mm512_castsi256_si512(sc);
      __m512i sum = _mm512_setzero_si512();
      for (int h = 0; h < 2; ++h) {
        const __m512i l = _mm512_loadu_si512(blk + 64 * h);
        const __m512i qh = _mm512_broadcast_i64x4(ld256(blk + 128 + 32 * h));
        const __m512i hl = _mm512_and_si512(_mm512_sllv_epi64(qh, shl), m30);
        const __m512i hh = _mm512_and_si512(_mm512_srlv_epi64(qh, shr), m30);
        const __m512i lo = _mm512_ternarylogic_epi32(l, m4, hl, 0xEA);  // (l & 15) | hl
        const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(l, 4), m4, hh, 0xEA);
        sum = _mm512_dpwssd_epi32(sum, _mm512_maddubs_epi16(lo, x[2 * h]),
                                  _mm512_permutexvar_epi16(ix[2 * h], s));
        sum = _mm512_dpwssd_epi32(sum, _mm512_maddubs_epi16(hi, x[2 * h + 1]),
                                  _mm512_permutexvar_epi16(ix[2 * h + 1], s));
      }
      const __m256i mins = _mm256_madd_epi16(sc, bs);  // lane m: sc.bs of 2m, 2m+1
      const __m256i l8 = _mm256_sub_epi32(fold(sum), _mm256_slli_epi32(mins, 5));
      const __m256 d = _mm256_set1_ps(_cvtsh_ss(*reinterpret_cast<const uint16_t*>(blk + 208)));
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dx, d), _mm256_cvtepi32_ps(l8), acc[r]);
    }
  }
  if constexpr (R == 4) {
    _mm_storeu_ps(p, tree8x4(acc));
  } else {
    for (int r = 0; r < R; ++r) p[r] = tree8(acc[r]);
  }
}

template <int64_t kType, int R>
MERZ_I void rows(const uint8_t* row, int64_t rstride, const ActView& a, int64_t nb, float* p) {
  if constexpr (kType == 12) q4k_rows<R>(row, rstride, a, nb, p);
  else q6k_rows<R>(row, rstride, a, nb, p);
}

template <int64_t kType>
MERZ float segs(const Segs& s, float acc) {
  for (int64_t j = 0; j < s.n; ++j) {
    float p;
    rows<kType, 1>(s.row + j * s.stride, 0, s.act[j * s.astride], s.nb, &p);
    acc += p;
  }
  return acc;
}

template <int64_t kType>
MERZ void segs4(const Segs& s, int64_t rstride, float* acc) {
  __m128 v = _mm_loadu_ps(acc);
  for (int64_t j = 0; j < s.n; ++j) {
    alignas(16) float p[4];
    rows<kType, 4>(s.row + j * s.stride, rstride, s.act[j * s.astride], s.nb, p);
    v = _mm_add_ps(v, _mm_load_ps(p));  // acc[r] += p[r], segment by segment
  }
  _mm_storeu_ps(acc, v);
}

bool has_avx512_impl() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

}  // namespace
#endif

namespace mer_ggml {

bool cpu_has_avx512() {
#if MERZ_X86
  static const bool has = has_avx512_impl();
  return has;
#else
  return false;
#endif
}

Dot kquant_int8_512(int64_t type) {
#if MERZ_X86
  if (cpu_has_avx512()) {
    if (type == 12) return segs<12>;
    if (type == 14) return segs<14>;
  }
#endif
  (void)type;
  return nullptr;
}

Dot4 kquant_int8_4_512(int64_t type) {
#if MERZ_X86
  if (cpu_has_avx512()) {
    if (type == 12) return segs4<12>;
    if (type == 14) return segs4<14>;
  }
#endif
  (void)type;
  return nullptr;
}

}  // namespace mer_ggml
