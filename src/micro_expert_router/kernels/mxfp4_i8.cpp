// The int8-activation dots of the mxfp4 kernel (the bfloat16 mode; mxfp4.cpp has the ops;
// llama.cpp's vec_dot_mxfp4_q8_0 idea).
//
// Activations: x rounded to int8 per block of 32 (sx = max|x| / 127, nearest, ties to even) and
// laid out per quad of blocks (4Q .. 4Q+3) as 128 bytes: [even elements of the 4 blocks (16
// each, block order) | odd elements of the 4 blocks]; absent blocks past the end are zeros with
// scale 0. So one 64-byte load holds the codes of a quad (byte k of block h: element 2k low,
// 2k + 1 high) and its low / high nibbles meet their activations in order.
//
// Lane 4h + m (h, m = 0..3) of quad Q is the exact int32 sum over elements 8m..8m+7 of block
// 4Q + h of v(code) x (v: the doubled e2m1 values). The SIMD code gets it as
// sum (v + 12) x - 12 sum x: codes through a table of v + 12 (0..24, unsigned, as vpdpbusd and
// vpmaddubsw take them), the -12 sum x of each lane precomputed per activation (Act::c).
// Then, with d_b = 2^(e_b - 128) sx_b (one float rounding) and 16 float lanes:
//   acc_l = fma(float(lane_l of quad Q), d_(4Q + l/4), acc_l)   for every quad, in order
//   dot = finish(acc lanes 0-7, acc lanes 8-15)
// AVX-512: one quad per zmm (vpermb lookup, 2 vpdpbusd), 4 rows at a time sharing the quad's
// activations and offsets, one reduction for the 4; AVX2: a quad as two ymm halves (lanes 0-7,
// 8-15); the scalar code does the same float operations in the same order
// (-ffp-contract=off), so all three give identical bits.

#include "mxfp4.h"

namespace mer_mxfp4 {

namespace {

// x block [32] -> int8 codes (evens at pq[0..15], odds at pq[64..79]) and its scale:
// sc = max|x| / 127, code = x / sc rounded to the nearest (ties to even), clamped to +-127.
void quantize32_scalar(const float* v, int8_t* pq, float* scale) {
  float m = 0.0f;
  for (int k = 0; k < 32; ++k) m = std::fmax(m, std::fabs(v[k]));
  const float sc = m / 127.0f;
  // |v / sc| <= 127: adding and subtracting 1.5 * 2^23 rounds to the nearest integer, ties
  // to even, exactly (as nearbyint in the default mode, without a libm call)
  const float magic = 12582912.0f;
  for (int k = 0; k < 32; ++k) {
    const float r = sc > 0.0f ? (v[k] / sc + magic) - magic : 0.0f;
    pq[(k % 2) * 64 + k / 2] = int8_t(std::fmin(std::fmax(r, -127.0f), 127.0f));
  }
  *scale = sc;
}

#if MX_X86
// The same operations on 8 lanes (max is exact in any order; max_ps / min_ps with the constant
// second return it for a NaN, as fmax / fmin do).
MX_AVX2 void quantize32_avx2(const float* v, int8_t* pq, float* scale) {
  const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 x[4], m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    x[i] = _mm256_loadu_ps(v + 8 * i);
    m = _mm256_max_ps(_mm256_and_ps(x[i], abs), m);
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float sc = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1))) / 127.0f;
  const __m256 vs = _mm256_set1_ps(sc), magic = _mm256_set1_ps(12582912.0f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) {
    __m256 r = _mm256_sub_ps(_mm256_add_ps(_mm256_div_ps(x[i], vs), magic), magic);
    if (!(sc > 0.0f)) r = _mm256_setzero_ps();
    r = _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
    q[i] = _mm256_cvttps_epi32(r);
  }
  // int32 -> int8 (packs keep 4-element groups in lane order), back to element order, then
  // evens | odds
  __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  b = _mm256_shuffle_epi8(b, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                              0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  b = _mm256_permute4x64_epi64(b, _MM_SHUFFLE(3, 1, 2, 0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(pq), _mm256_castsi256_si128(b));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(pq + 64), _mm256_extracti128_si256(b, 1));
  *scale = sc;
}
#else
#define quantize32_avx2 quantize32_scalar
#endif

}  // namespace

void Act::prepare_i8(const float* x, int64_t K, bool simd) {
  const int64_t nb = K / 32, nq = (nb + 3) / 4;
  q.assign(nq * 128, 0);
  s.assign((nb + 15) / 16 * 16, 0.0f);  // padded: the AVX-512 dot reads 16 scales at a time
  c.assign(nq * 16, 0);
  for (int64_t b = 0; b < nb; ++b) {
    int8_t* pq = q.data() + (b / 4) * 128 + (b % 4) * 16;
    (simd ? quantize32_avx2 : quantize32_scalar)(x + b * 32, pq, &s[b]);
    for (int m = 0; m < 4; ++m) {
      int32_t t = 0;
      for (int k = 4 * m; k < 4 * m + 4; ++k) t += pq[k] + pq[64 + k];
      c[(b / 4) * 16 + (b % 4) * 4 + m] = -12 * t;
    }
  }
}

// ---- scalar (the reference order) ------------------------------------------------------------

namespace {

float dot_i8_scalar(const uint8_t* q, const uint8_t* e, const int8_t* xq, const float* xs,
                    int64_t nb) {
  float acc[16] = {};
  for (int64_t Q = 0; Q < (nb + 3) / 4; ++Q) {
    const int8_t* xe = xq + Q * 128;
    for (int h = 0; h < 4; ++h) {
      const int64_t b = 4 * Q + h;
      const float d = b < nb ? half_scale(e[b]) * xs[b] : 0.0f;
      for (int m = 0; m < 4; ++m) {
        int32_t sum = 0;
        for (int k = 4 * m; k < 4 * m + 4 && b < nb; ++k) {
          const uint8_t byte = q[b * 16 + k];
          sum += int32_t(kValues[byte & 15]) * xe[16 * h + k] +
                 int32_t(kValues[byte >> 4]) * xe[64 + 16 * h + k];
        }
        acc[4 * h + m] = std::fmaf(float(sum), d, acc[4 * h + m]);
      }
    }
  }
  return finish(acc, acc + 8);
}

}  // namespace

void rows_i8_scalar(const uint8_t* q, const uint8_t* e, int64_t rows, int64_t nb,
                    const int8_t* xq, const float* xs, const int32_t*, float* out) {
  for (int64_t r = 0; r < rows; ++r) out[r] = dot_i8_scalar(q + r * nb * 16, e + r * nb, xq, xs, nb);
}

#if MX_X86

// software prefetch distance along the codes, bytes. One thread, GB/s per CPU-second of the
// 4-expert decode call: 1024: 14.6 (down rows 0.147 s of the run), 4096: 23.7, 8192: 24.2-24.7,
// 16384: 22.5 (MXFP4 rows alone from DRAM: 4096: 25, 8192-16384: 28-30, torch.sum 38)
constexpr int64_t kAhead = 8192;

// ---- AVX2 ------------------------------------------------------------------------------------

namespace {

// The block scales of blocks b..b+7: half_scale(e) sx, as the scalar code.
MX_AVX2 inline __m256 scales8(const uint8_t* e, const float* xs) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(e)));
  const __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(v, _mm256_set1_epi32(1)), 23);
  const __m256i tiny = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), v);  // e < 2
  const __m256i small = _mm256_cmpgt_epi32(_mm256_set1_epi32(2), v);
  const __m256 d = _mm256_castsi256_ps(_mm256_blendv_epi8(normal, tiny, small));
  return _mm256_mul_ps(d, _mm256_loadu_ps(xs));
}

// Half a quad (two blocks: 32 code bytes v; 8 lanes) into acc: lookups of v + 12, vpmaddubsw of
// the low and the high nibbles (|int16| <= 2 x 24 x 127 each, their sum <= 12192), vpmaddwd by
// ones, plus the precomputed -12 sum x, to float, times the lanes' block scales dv.
MX_AVX2 inline __m256 half_quad(__m256i v, const int8_t* xe, const int32_t* nc, __m256 dv,
                                __m256 acc, __m256i lut12) {
  const __m256i m4 = _mm256_set1_epi8(15);
  const __m256i wl = _mm256_shuffle_epi8(lut12, _mm256_and_si256(v, m4));
  const __m256i wh = _mm256_shuffle_epi8(lut12, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
  const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xe));
  const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xe + 64));
  const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(wl, xl), _mm256_maddubs_epi16(wh, xh));
  const __m256i l = _mm256_add_epi32(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)),
                                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(nc)));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(l), dv, acc);
}

// lanes 0-7 / 8-15 of quad k of 8 scales: blocks (2k, 2k+1 | 2k+2, 2k+3) x 4
MX_AVX2 __attribute__((always_inline)) inline float dot_i8_avx2(
    const uint8_t* q, const uint8_t* e, const int8_t* xq, const float* xs, const int32_t* nc,
    int64_t nb, __m256i lut, __m256i i0, __m256i i1, __m256i i2, __m256i i3) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {  // two whole quads
    _mm_prefetch(reinterpret_cast<const char*>(q + b * 16 + kAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(q + b * 16 + kAhead + 64), _MM_HINT_T0);
    const __m256 dv = scales8(e + b, xs + b);
    const uint8_t* c = q + b * 16;
    const int8_t* xe = xq + b * 32;
    const int32_t* cp = nc + b * 4;
    a0 = half_quad(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)), xe, cp,
                   _mm256_permutevar8x32_ps(dv, i0), a0, lut);
    a1 = half_quad(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32)), xe + 32, cp + 8,
                   _mm256_permutevar8x32_ps(dv, i1), a1, lut);
    a0 = half_quad(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 64)), xe + 128, cp + 16,
                   _mm256_permutevar8x32_ps(dv, i2), a0, lut);
    a1 = half_quad(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 96)), xe + 160, cp + 24,
                   _mm256_permutevar8x32_ps(dv, i3), a1, lut);
  }
  if (b < nb) {  // the last 1-7 blocks: codes copied into zeros, scale 0 for absent blocks
    const int64_t left = nb - b;
    _mm_prefetch(reinterpret_cast<const char*>(q + b * 16 + kAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(q + b * 16 + kAhead + 64), _MM_HINT_T0);
    alignas(32) uint8_t c[128] = {};
    alignas(32) float d[8] = {};
    std::memcpy(c, q + b * 16, left * 16);
    for (int k = 0; k < left; ++k) d[k] = half_scale(e[b + k]) * xs[b + k];
    const __m256 dv = _mm256_load_ps(d);
    const int8_t* xe = xq + b * 32;
    const int32_t* cp = nc + b * 4;
    a0 = half_quad(_mm256_load_si256(reinterpret_cast<const __m256i*>(c)), xe, cp,
                   _mm256_permutevar8x32_ps(dv, i0), a0, lut);
    a1 = half_quad(_mm256_load_si256(reinterpret_cast<const __m256i*>(c + 32)), xe + 32, cp + 8,
                   _mm256_permutevar8x32_ps(dv, i1), a1, lut);
    if (left > 4) {
      a0 = half_quad(_mm256_load_si256(reinterpret_cast<const __m256i*>(c + 64)), xe + 128,
                     cp + 16, _mm256_permutevar8x32_ps(dv, i2), a0, lut);
      a1 = half_quad(_mm256_load_si256(reinterpret_cast<const __m256i*>(c + 96)), xe + 160,
                     cp + 24, _mm256_permutevar8x32_ps(dv, i3), a1, lut);
    }
  }
  alignas(32) float r0[8], r1[8];
  _mm256_store_ps(r0, a0);
  _mm256_store_ps(r1, a1);
  return finish(r0, r1);
}

}  // namespace

MX_AVX2 void rows_i8_avx2(const uint8_t* q, const uint8_t* e, int64_t rows, int64_t nb,
                          const int8_t* xq, const float* xs, const int32_t* nc, float* out) {
  const __m256i lut = _mm256_add_epi8(
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kValues))),
      _mm256_set1_epi8(12));
  const __m256i i0 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), i1 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                i2 = _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), i3 = _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7);
  for (int64_t r = 0; r < rows; ++r)
    out[r] = dot_i8_avx2(q + r * nb * 16, e + r * nb, xq, xs, nc, nb, lut, i0, i1, i2, i3);
}

// ---- AVX-512 (F, BW, VBMI, VNNI) -------------------------------------------------------------

namespace {

// d_b = 2^(e_b - 128) sx_b for 16 blocks (mask: the blocks present; absent ones give 0):
// vscalefps rounds x 2^k once, as the scalar product half_scale(e) * sx does.
MX_AVX512 inline __m512 scales16(const uint8_t* e, const float* xs, __mmask16 m) {
  const __m512 ef = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, e)));
  return _mm512_scalef_ps(_mm512_maskz_loadu_ps(m, xs), _mm512_sub_ps(ef, _mm512_set1_ps(128.0f)));
}

// One quad (64 code bytes v, 16 lanes) into acc: vpermb looks the nibbles up in the table of
// v + 12 (replicated 4 times, so bits 4-5 of an index do not matter: no masking), two vpdpbusd
// on top of the precomputed -12 sum x, to float, times the lanes' block scales dq.
MX_AVX512 inline __m512 quad512(__m512i v, const int8_t* xe, const int32_t* nc, __m512 dq,
                                __m512 acc, __m512i lut) {
  const __m512i wl = _mm512_permutexvar_epi8(v, lut);
  const __m512i wh = _mm512_permutexvar_epi8(_mm512_srli_epi16(v, 4), lut);
  __m512i l = _mm512_loadu_si512(nc);
  l = _mm512_dpbusd_epi32(l, wl, _mm512_loadu_si512(xe));
  l = _mm512_dpbusd_epi32(l, wh, _mm512_loadu_si512(xe + 64));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(l), dq, acc);
}

// idx[k]: lanes of quad k of 16 scales
MX_AVX512 __attribute__((always_inline)) inline float dot_i8_avx512(
    const uint8_t* q, const uint8_t* e, const int8_t* xq, const float* xs, const int32_t* nc,
    int64_t nb, __m512i lut, const __m512i* idx) {
  __m512 acc = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 16 <= nb; b += 16) {  // four whole quads
    const __m512 d = scales16(e + b, xs + b, 0xffff);
    for (int k = 0; k < 4; ++k) _mm_prefetch(reinterpret_cast<const char*>(q + (b + 4 * k) * 16 + kAhead), _MM_HINT_T0);
    for (int k = 0; k < 4; ++k)
      acc = quad512(_mm512_loadu_si512(q + (b + 4 * k) * 16), xq + (b + 4 * k) * 32,
                    nc + (b + 4 * k) * 4, _mm512_permutexvar_ps(idx[k], d), acc, lut);
  }
  if (b < nb) {  // the last 1-15 blocks: masked loads (absent codes 0, their scales 0)
    const int64_t left = nb - b;
    const __m512 d = scales16(e + b, xs + b, __mmask16((1u << left) - 1));
    for (int k = 0; 4 * k < left; ++k) {
      const int64_t n = left - 4 * k < 4 ? left - 4 * k : 4;
      const __mmask64 m = n == 4 ? ~__mmask64(0) : (__mmask64(1) << (16 * n)) - 1;
      _mm_prefetch(reinterpret_cast<const char*>(q + (b + 4 * k) * 16 + kAhead), _MM_HINT_T0);
      acc = quad512(_mm512_maskz_loadu_epi8(m, q + (b + 4 * k) * 16), xq + (b + 4 * k) * 32,
                    nc + (b + 4 * k) * 4, _mm512_permutexvar_ps(idx[k], d), acc, lut);
    }
  }
  // finish(): lanes l + l+8, then the tree of 8
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 t = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));  // s4[0] + s4[2], s4[1] + s4[3]
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}


// Four rows (codes q + r rs, exponents e + r es) on blocks b .. b + n - 1 (n <= 16) into acc[r]:
// each quad's activations and offsets are loaded once for the four rows. A short quad's codes
// are a whole 64-byte load with the absent bytes zeroed when `over` (the bytes past it are
// readable: following rows), else a masked load (which is much slower from DRAM on Zen 5).
MX_AVX512 __attribute__((always_inline)) inline void chunk4(
    const uint8_t* q, int64_t rs, const uint8_t* e, int64_t es, const int8_t* xq, const float* xs,
    const int32_t* nc, int64_t b, int64_t n, bool over, __m512i lut, const __m512i* idx,
    __m512* acc) {
  const __mmask16 m16 = __mmask16((1u << n) - 1);
  __m512 d[4];
  for (int r = 0; r < 4; ++r) d[r] = scales16(e + r * es + b, xs + b, m16);
  for (int k = 0; 4 * k < n; ++k) {
    const int64_t bb = b + 4 * k, left = n - 4 * k;
    const __mmask64 m = left >= 4 ? ~__mmask64(0) : (__mmask64(1) << (16 * left)) - 1;
    const __m512i xl = _mm512_loadu_si512(xq + bb * 32), xh = _mm512_loadu_si512(xq + bb * 32 + 64);
    const __m512i c = _mm512_loadu_si512(nc + bb * 4);
    for (int r = 0; r < 4; ++r) {
      const uint8_t* cr = q + r * rs + bb * 16;
      _mm_prefetch(reinterpret_cast<const char*>(cr + kAhead), _MM_HINT_T0);
      const __m512i v = over ? _mm512_maskz_mov_epi8(m, _mm512_loadu_si512(cr))
                             : _mm512_maskz_loadu_epi8(m, cr);
      const __m512i wl = _mm512_permutexvar_epi8(v, lut);
      const __m512i wh = _mm512_permutexvar_epi8(_mm512_srli_epi16(v, 4), lut);
      const __m512i l = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c, wl, xl), wh, xh);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l), _mm512_permutexvar_ps(idx[k], d[r]), acc[r]);
    }
  }
}

// finish() of four accumulators at once (the same additions, rows side by side) into out[0..3].
MX_AVX512 inline void finish4(const __m512* a, float* out) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x44),   // lanes 0-7
                                  _mm512_shuffle_f32x4(a[0], a[1], 0xEE));  // + lanes 8-15
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], 0x44),
                                  _mm512_shuffle_f32x4(a[2], a[3], 0xEE));
  // s4 of each row: its 8 sums' first half + second half
  const __m512 s4 = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 t = _mm512_add_ps(s4, _mm512_permute_ps(s4, _MM_SHUFFLE(1, 0, 3, 2)));
  const __m512 u = _mm512_add_ps(t, _mm512_permute_ps(t, _MM_SHUFFLE(2, 3, 0, 1)));
  const __m512 r = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                           0, 0, 0), u);
  _mm_storeu_ps(out, _mm512_castps512_ps128(r));
}

}  // namespace

MX_AVX512 void rows_i8_avx512(const uint8_t* q, const uint8_t* e, int64_t rows, int64_t nb,
                              const int8_t* xq, const float* xs, const int32_t* nc, float* out) {
  const __m512i lut = _mm512_add_epi8(
      _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kValues))),
      _mm512_set1_epi8(12));
  const __m512i idx[4] = {
      _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
      _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7),
      _mm512_setr_epi32(8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11),
      _mm512_setr_epi32(12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15)};
  const int64_t rs = nb * 16;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    const uint8_t* qr = q + r * rs;
    const uint8_t* er = e + r * nb;
    int64_t b = 0;
    for (; b + 16 <= nb; b += 16) chunk4(qr, rs, er, nb, xq, xs, nc, b, 16, true, lut, idx, acc);
    // a short last quad reads at most 48 bytes past row r + 3: the rows of this call
    if (b < nb)
      chunk4(qr, rs, er, nb, xq, xs, nc, b, nb - b, (r + 4) * rs + 48 <= rows * rs, lut, idx, acc);
    finish4(acc, out + r);
  }
  for (; r < rows; ++r)
    out[r] = dot_i8_avx512(q + r * rs, e + r * nb, xq, xs, nc, nb, lut, idx);
}

#else
void rows_i8_avx2(const uint8_t* q, const uint8_t* e, int64_t rows, int64_t nb, const int8_t* xq,
                  const float* xs, const int32_t* nc, float* out) {
  rows_i8_scalar(q, e, rows, nb, xq, xs, nc, out);
}
void rows_i8_avx512(const uint8_t* q, const uint8_t* e, int64_t rows, int64_t nb,
                    const int8_t* xq, const float* xs, const int32_t* nc, float* out) {
  rows_i8_scalar(q, e, rows, nb, xq, xs, nc, out);
}
#endif

}  // namespace mer_mxfp4
