// Native decode kernel for the "mxfp4" expert format (kernels/mxfp4.py): GPT-OSS experts read in
// place from a segment of MXFP4 groups, with the per-neuron gate/up biases, the clamped SwiGLU and
// the down-bias slot of each group. Built and loaded by kernels/mxfp4.py as mer_mxfp4::swiglu_.
//
// MXFP4 (OCP MX v1.0), as in the GPT-OSS checkpoints: a row of K weights is K/32 blocks; block b
// has 16 bytes of e2m1 codes (byte k: element 2k in the low nibble, 2k+1 in the high one) and one
// e8m0 exponent e. w = v(code) 2^(e-127). We keep ggml's arithmetic: codes map to doubled integer
// values (0 1 2 3 4 6 8 12, sign in bit 3) and the block scale is d = 2^(e-128) as a float32.
//
// Two activation modes (isa):
//   1 AVX2 f32 / 0 scalar f32: x in float32, permuted once per block into [even | odd] order so a
//     low-nibble vector and a high-nibble vector each meet their 16 activations in order;
//       s_l = sum over 4 chunks c of v(c, l) x(c, l)   (8 lanes l, mul then 3 fma)
//       acc_l = fma(s_l, d_b, acc_l);   dot = tree8(acc even blocks + acc odd blocks)
//   2 AVX2 int8 / 3 scalar int8: x rounded to int8 per block of 32 (sx = max|x| / 127) and laid
//     out per pair of blocks (2p, 2p+1) as [even elements of 2p | of 2p+1 | odd of 2p | of 2p+1]
//     (an odd last block pairs with an absent block: codes 0, scale 0), so one 32-byte load holds
//     the codes of both blocks and its low / high nibbles meet their activations in order. Lane
//     4h + m (h = 0, 1; m = 0..3) of pair p holds the exact int32 sum over elements 8m..8m+7 of
//     block 2p + h (vpshufb to doubled values, vpmaddubsw with the sign trick for the low and the
//     high nibbles, vpaddw, vpmaddwd), and acc_l = fma(float(lane_l), d_b sx_b, acc_l) with two
//     accumulators (even pairs, odd pairs), summed lane by lane, then tree8
// The scalar code does the same float operations in the same order (explicit fmaf, the same
// lanes and sum tree; -ffp-contract=off), so the SIMD and scalar paths give identical bits.
//
// swiglu_many_ computes one segment (n groups) of each of several experts on the same x (the K
// experts of a decode step share each parallel phase); swiglu_ is it for one expert. Per token t:
//   1. per neuron i of every group (parallel): its gate and up rows 2i, 2i+1,
//      h_r = dot(row r, x) + bias_r, then
//   2. a_i = (clamp(h_2i+1, -L, L) + 1) * g sigmoid(alpha g),  g = min(h_2i, L)
//   3. per (expert, down row) (parallel): y += p_j for j in order, p_j = dot(down_j row, a_j) + bd_j
// so each group's partial is independent of the other groups of the call and added in group
// order, as kernels/formats.py requires. With bf16 set (bfloat16 activations), y is rounded to
// bfloat16 after every group, as adding bfloat16 partials one at a time would: then a split
// expert (top segment, then bottom) has the same bits as one call.
//
// Legend: T tokens, D hidden, g neurons per group, n groups, K reduction length.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MX_X86 1
#define MX_AVX2 __attribute__((target("avx2,fma")))
#else
#define MX_X86 0
#endif

namespace {

constexpr int8_t kValues[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// 2^(e-128) (half the e8m0 scale: the values are doubled); ggml's ggml_e8m0_to_fp32_half.
struct HalfScales {
  float v[256];
  HalfScales() {
    for (int e = 0; e < 256; ++e) {
      uint32_t bits = e < 2 ? (0x00200000u << e) : (uint32_t(e - 1) << 23);
      std::memcpy(&v[e], &bits, 4);
    }
  }
};
const HalfScales kHalf;
inline float half_scale(uint8_t e) { return kHalf.v[e]; }


// float32 -> the nearest bfloat16 (ties to even), kept as a float32 (finite inputs).
inline float round_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float tree8(const float* a) {
  float s4[4];
  for (int i = 0; i < 4; ++i) s4[i] = a[i] + a[i + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// The two accumulators (even blocks, odd blocks) of a dot, lane by lane, then the sum tree.
inline float finish(const float* a0, const float* a1) {
  float a[8];
  for (int l = 0; l < 8; ++l) a[l] = a0[l] + a1[l];
  return tree8(a);
}

// The code of element (chunk c, lane l) of a block: chunks 0/1 are the low nibbles of bytes
// 0-7 / 8-15 (even elements), chunks 2/3 the high nibbles (odd elements).
inline int code(const uint8_t* q, int c, int l) {
  const uint8_t b = q[(c & 1) * 8 + l];
  return c < 2 ? (b & 15) : (b >> 4);
}

// x block [32] -> permuted [32]: even elements, then odd ones (position c*8+l holds the element
// that code(c, l) multiplies; the int8 path's position p likewise).
template <typename V>
inline void permute32(const V* x, V* p) {
  for (int l = 0; l < 8; ++l) {
    p[l] = x[2 * l];
    p[8 + l] = x[16 + 2 * l];
    p[16 + l] = x[2 * l + 1];
    p[24 + l] = x[16 + 2 * l + 1];
  }
}

// x block [32] -> int8 codes in the pair layout (evens at pq, odds at pq + 32) and its scale:
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
    pq[(k % 2) * 32 + k / 2] = int8_t(std::fmin(std::fmax(r, -127.0f), 127.0f));
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
  _mm_storeu_si128(reinterpret_cast<__m128i*>(pq + 32), _mm256_extracti128_si256(b, 1));
  *scale = sc;
}
#else
#define quantize32_avx2 quantize32_scalar
#endif

// One activation vector of length K in the form a mode's dots read.
struct Act {
  std::vector<float> xp;  // f32 modes: permuted x
  std::vector<int8_t> q;  // int8 modes: codes in the pair layout [pairs, 64]
  std::vector<float> s;   // int8 modes: per-block scales (0 past the last block)
  std::vector<int32_t> c;  // int8 modes: per pair, lane 4h + m: 12 x the codes' sum over
                           // elements 8m..8m+7 of block 2p + h (the AVX2 dot's offset)

  void prepare(const float* x, int64_t K, bool i8, bool avx2) {
    const int64_t nb = K / 32;
    if (!i8) {
      xp.resize(K);
      for (int64_t b = 0; b < nb; ++b) permute32(x + b * 32, xp.data() + b * 32);
      return;
    }
    const int64_t np = (nb + 1) / 2;  // pairs of blocks
    q.assign(np * 64, 0);
    s.assign((nb + 7) / 8 * 8, 0.0f);  // padded: the AVX2 dot reads 8 scales at a time
    c.assign(np * 8, 0);
    for (int64_t b = 0; b < nb; ++b) {
      int8_t* pq = q.data() + (b / 2) * 64 + (b % 2) * 16;
      (avx2 ? quantize32_avx2 : quantize32_scalar)(x + b * 32, pq, &s[b]);
      for (int m = 0; m < 4; ++m) {
        int32_t t = 0;
        for (int k = 4 * m; k < 4 * m + 4; ++k) t += pq[k] + pq[32 + k];
        c[(b / 2) * 8 + (b % 2) * 4 + m] = 12 * t;
      }
    }
  }
};

// ---- scalar (the reference order) ------------------------------------------------------------

float dot_f32_scalar(const uint8_t* q, const uint8_t* e, const float* xp, int64_t nb) {
  float acc[2][8] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* qb = q + b * 16;
    const float* xb = xp + b * 32;
    const float d = half_scale(e[b]);
    for (int l = 0; l < 8; ++l) {
      float s = float(kValues[code(qb, 0, l)]) * xb[l];
      for (int c = 1; c < 4; ++c) s = std::fmaf(float(kValues[code(qb, c, l)]), xb[c * 8 + l], s);
      acc[b & 1][l] = std::fmaf(s, d, acc[b & 1][l]);
    }
  }
  return finish(acc[0], acc[1]);
}

// One pair's 8 lane sums (block 2p in lanes 0-3, 2p+1 in 4-7; nb2 blocks present: 1 or 2).
inline void pair_i8_scalar(const uint8_t* q, const int8_t* xp, int nb2, int32_t* lanes) {
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < 4; ++m) {
      int32_t sum = 0;
      for (int e = 8 * m; e < 8 * m + 8 && h < nb2; ++e) {
        const int k = e / 2;  // code byte; x: evens at 16h + k, odds at 32 + 16h + k
        const int c = e % 2 ? q[16 * h + k] >> 4 : q[16 * h + k] & 15;
        sum += int32_t(kValues[c]) * int32_t(xp[(e % 2) * 32 + 16 * h + k]);
      }
      lanes[4 * h + m] = sum;
    }
}

float dot_i8_scalar(const uint8_t* q, const uint8_t* e, const int8_t* xq, const float* xs,
                    const int32_t*, int64_t nb) {
  float acc[2][8] = {};
  for (int64_t p = 0; p < (nb + 1) / 2; ++p) {
    const int nb2 = 2 * p + 1 < nb ? 2 : 1;
    int32_t lanes[8];
    pair_i8_scalar(q + p * 32, xq + p * 64, nb2, lanes);
    for (int l = 0; l < 8; ++l) {
      const int64_t b = 2 * p + l / 4;
      const float d = b < nb ? half_scale(e[b]) * xs[b] : 0.0f;
      acc[p & 1][l] = std::fmaf(float(lanes[l]), d, acc[p & 1][l]);
    }
  }
  return finish(acc[0], acc[1]);
}

#if MX_X86
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

MX_AVX2 inline float finish_avx2(__m256 a0, __m256 a1) {
  alignas(32) float a[8], c[8];
  _mm256_store_ps(a, a0);
  _mm256_store_ps(c, a1);
  return finish(a, c);
}

// One block's 8-lane float sum (before its scale): mul, then 3 fma, as the scalar code.
MX_AVX2 inline __m256 block_f32(const uint8_t* q, const float* xb, __m128i lut, __m128i m4) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(v, m4));
  const __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(v, 4), m4));
  __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), _mm256_loadu_ps(xb));
  s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))),
                      _mm256_loadu_ps(xb + 8), s);
  s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), _mm256_loadu_ps(xb + 16), s);
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))),
                         _mm256_loadu_ps(xb + 24), s);
}

// The block scales of blocks b..b+7: half_scale(e) (times xs when given), as the scalar code.
MX_AVX2 inline void scales8(const uint8_t* e, const float* xs, float* out) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(e)));
  const __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(v, _mm256_set1_epi32(1)), 23);
  const __m256i tiny = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), v);  // e < 2
  const __m256i small = _mm256_cmpgt_epi32(_mm256_set1_epi32(2), v);
  __m256 d = _mm256_castsi256_ps(_mm256_blendv_epi8(normal, tiny, small));
  if (xs != nullptr) d = _mm256_mul_ps(d, _mm256_loadu_ps(xs));
  _mm256_store_ps(out, d);
}

MX_AVX2 float dot_f32_avx2(const uint8_t* q, const uint8_t* e, const float* xp, int64_t nb) {
  const __m128i lut = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kValues));
  const __m128i m4 = _mm_set1_epi8(15);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  alignas(32) float d[8];
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    scales8(e + b, nullptr, d);
    for (int k = 0; k < 8; k += 2) {
      const __m256 s0 = block_f32(q + (b + k) * 16, xp + (b + k) * 32, lut, m4);
      const __m256 s1 = block_f32(q + (b + k) * 16 + 16, xp + (b + k) * 32 + 32, lut, m4);
      a0 = _mm256_fmadd_ps(s0, _mm256_broadcast_ss(d + k), a0);
      a1 = _mm256_fmadd_ps(s1, _mm256_broadcast_ss(d + k + 1), a1);
    }
  }
  for (; b < nb; ++b) {
    const __m256 s = block_f32(q + b * 16, xp + b * 32, lut, m4);
    if (b & 1)
      a1 = _mm256_fmadd_ps(s, _mm256_set1_ps(half_scale(e[b])), a1);
    else
      a0 = _mm256_fmadd_ps(s, _mm256_set1_ps(half_scale(e[b])), a0);
  }
  return finish_avx2(a0, a1);
}

// One pair's 8 exact int32 lane sums as floats (codes v: block 2p low 128 bits, 2p+1 high):
// codes through the table of doubled values plus 12 (0..24, unsigned: vpmaddubsw takes them
// as they are, no sign trick), times the activation codes, the low- and high-nibble int16 sums
// added (|.| <= 4 x 24 x 127), pairs of int16 in vpmaddwd, minus 12 x the lanes' activation sums
// (corr): exactly the lane sums of the definition.
MX_AVX2 inline __m256 pair_i8(__m256i v, const int8_t* xp, const int32_t* corr, __m256i lut12) {
  const __m256i m4 = _mm256_set1_epi8(15);
  const __m256i wl = _mm256_shuffle_epi8(lut12, _mm256_and_si256(v, m4));
  const __m256i wh = _mm256_shuffle_epi8(lut12, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
  const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp));
  const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 32));
  const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(wl, xl), _mm256_maddubs_epi16(wh, xh));
  const __m256i l = _mm256_sub_epi32(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)),
                                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr)));
  return _mm256_cvtepi32_ps(l);
}

MX_AVX2 float dot_i8_avx2(const uint8_t* q, const uint8_t* e, const int8_t* xq, const float* xs,
                          const int32_t* corr, int64_t nb) {
  const __m256i lut = _mm256_add_epi8(
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kValues))),
      _mm256_set1_epi8(12));
  const __m256i i0 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), i1 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                i2 = _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), i3 = _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  alignas(32) float d[8];
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {  // 4 whole pairs: even pairs into a0, odd ones into a1
    _mm_prefetch(reinterpret_cast<const char*>(q + b * 16 + 1024), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(q + b * 16 + 1088), _MM_HINT_T0);
    scales8(e + b, xs + b, d);
    const __m256 dv = _mm256_load_ps(d);
    const uint8_t* c = q + b * 16;
    const int8_t* xp = xq + b * 32;
    const int32_t* cp = corr + b * 4;
    const __m256 s0 = pair_i8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)), xp, cp, lut);
    const __m256 s1 = pair_i8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32)), xp + 64, cp + 8, lut);
    const __m256 s2 = pair_i8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 64)), xp + 128, cp + 16, lut);
    const __m256 s3 = pair_i8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 96)), xp + 192, cp + 24, lut);
    a0 = _mm256_fmadd_ps(s0, _mm256_permutevar8x32_ps(dv, i0), a0);
    a1 = _mm256_fmadd_ps(s1, _mm256_permutevar8x32_ps(dv, i1), a1);
    a0 = _mm256_fmadd_ps(s2, _mm256_permutevar8x32_ps(dv, i2), a0);
    a1 = _mm256_fmadd_ps(s3, _mm256_permutevar8x32_ps(dv, i3), a1);
  }
  if (b < nb) {  // the last, short chunk (scale 0 for an absent block, as the scalar code)
    const int64_t left = nb - b;
    for (int k = 0; k < 8; ++k) d[k] = k < left ? half_scale(e[b + k]) * xs[b + k] : 0.0f;
    for (int k = 0; 2 * k < left; ++k) {
      const uint8_t* c = q + (b + 2 * k) * 16;
      const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c));
      const __m128i hi = 2 * k + 1 < left ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16))
                                          : _mm_setzero_si128();
      const __m256 s = pair_i8(_mm256_set_m128i(hi, lo), xq + (b + 2 * k) * 32, corr + (b + 2 * k) * 4, lut);
      const __m256 sc = _mm256_set_m128(_mm_set1_ps(d[2 * k + 1]), _mm_set1_ps(d[2 * k]));
      if (k & 1)
        a1 = _mm256_fmadd_ps(s, sc, a1);
      else
        a0 = _mm256_fmadd_ps(s, sc, a0);
    }
  }
  return finish_avx2(a0, a1);
}
#else
bool cpu_has_avx2() { return false; }
#define dot_f32_avx2 dot_f32_scalar
#define dot_i8_avx2 dot_i8_scalar
#endif

struct Dot {
  bool i8, avx2;
  float (*f)(const uint8_t*, const uint8_t*, const float*, int64_t);
  float (*q)(const uint8_t*, const uint8_t*, const int8_t*, const float*, const int32_t*, int64_t);

  float operator()(const uint8_t* blocks, const uint8_t* scales, const Act& a,
                   int64_t nb) const {
    return i8 ? q(blocks, scales, a.q.data(), a.s.data(), a.c.data(), nb)
              : f(blocks, scales, a.xp.data(), nb);
  }
};

// isa: 0 scalar f32, 1 AVX2 f32, 2 AVX2 int8, 3 scalar int8 (AVX2 falls back to scalar on a CPU
// without it: same bits)
Dot dot_for(int64_t isa) {
  static const bool avx2 = cpu_has_avx2();
  TORCH_CHECK(isa >= 0 && isa <= 3, "mer_mxfp4: isa must be 0..3, got ", isa);
  const bool v = avx2 && (isa == 1 || isa == 2);
  const bool i8 = isa >= 2;
  return {i8, v, v ? dot_f32_avx2 : dot_f32_scalar, v ? dot_i8_avx2 : dot_i8_scalar};
}

// offs: gate/up blocks, gate/up scales, down blocks, down scales, gate/up bias, down bias.
// ys[e] += the segment bufs[e] of expert e on the same x (decode: the K experts of a layer share
// each parallel phase); every expert's groups are added to its y in group order.
void swiglu_many_(at::TensorList ys, const at::Tensor& x, at::TensorList bufs, int64_t D,
                  int64_t g, int64_t per, at::IntArrayRef offs, double alpha, double limit,
                  int64_t isa, bool bf16) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.is_contiguous() && x.dim() == 2,
              "mer_mxfp4: x must be contiguous f32 [T, D]");
  TORCH_CHECK(offs.size() == 6, "mer_mxfp4: 6 section offsets expected");
  TORCH_CHECK(D % 32 == 0 && g % 32 == 0 && per > 0, "mer_mxfp4: D and g must be multiples of 32");
  TORCH_CHECK(ys.size() == bufs.size() && !bufs.empty(), "mer_mxfp4: one y per buffer");
  const int64_t T = x.size(0), E = int64_t(bufs.size());
  TORCH_CHECK(x.size(1) == D && T > 0 && T < 16, "mer_mxfp4::swiglu_: x is not [T < 16, D]");
  std::vector<float*> yp(E);
  std::vector<int64_t> first(E + 1, 0);  // groups of expert e: [first[e], first[e + 1])
  std::vector<const uint8_t*> grp;  // every group's bytes, experts in order
  for (int64_t e = 0; e < E; ++e) {
    const at::Tensor &y = ys[e], &buf = bufs[e];
    TORCH_CHECK(y.dtype() == at::kFloat && y.is_contiguous() && y.numel() == T * D,
                "mer_mxfp4: y must be contiguous f32 [T, D]");
    TORCH_CHECK(buf.dtype() == at::kByte && buf.is_contiguous() && buf.numel() % per == 0 &&
                    buf.numel() > 0,
                "mer_mxfp4: a buffer is not whole uint8 groups");
    yp[e] = y.data_ptr<float>();
    for (int64_t j = 0; j < buf.numel() / per; ++j) grp.push_back(buf.data_ptr<uint8_t>() + j * per);
    first[e + 1] = int64_t(grp.size());
  }
  const int64_t n = int64_t(grp.size());
  const Dot dot = dot_for(isa);
  const float al = float(alpha), lim = float(limit);
  const int64_t og = offs[0], os = offs[1], odb = offs[2], ods = offs[3], ob = offs[4],
                obd = offs[5];
  const float* xp = x.data_ptr<float>();
  std::vector<Act> ax(T);
  for (int64_t t = 0; t < T; ++t) ax[t].prepare(xp + t * D, D, dot.i8, dot.avx2);
  const int64_t nbx = D / 32, nba = g / 32;
  // gate/up rows and the clamped SwiGLU, parallel over neurons (rows 2i and 2i+1 of a group)
  std::vector<float> a(n * T * g);  // [groups, T, g]
  at::parallel_for(0, n * g, 4, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t j = r / g, i = r % g;
      float hv[2][16];  // [gate, up][T] (T < 16: decode)
      for (int u = 0; u < 2; ++u) {
        const int64_t row = 2 * i + u;
        float bias;
        std::memcpy(&bias, grp[j] + ob + row * 4, 4);
        for (int64_t t = 0; t < T; ++t)
          hv[u][t] = dot(grp[j] + og + row * nbx * 16, grp[j] + os + row * nbx, ax[t], nbx) + bias;
      }
      for (int64_t t = 0; t < T; ++t) {
        const float gt = std::fmin(hv[0][t], lim);
        const float up = std::fmin(std::fmax(hv[1][t], -lim), lim);
        const float glu = gt * (1.0f / (1.0f + std::exp(-(gt * al))));
        a[(j * T + t) * g + i] = (up + 1.0f) * glu;
      }
    }
  });
  std::vector<Act> aa(n * T);
  at::parallel_for(0, n * T, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) aa[k].prepare(a.data() + k * g, g, dot.i8, dot.avx2);
  });
  at::parallel_for(0, E * D, 16, [&](int64_t b, int64_t e) {
    for (int64_t idx = b; idx < e; ++idx) {
      const int64_t ex = idx / D, dr = idx % D;
      for (int64_t t = 0; t < T; ++t) {
        float acc = yp[ex][t * D + dr];
        for (int64_t j = first[ex]; j < first[ex + 1]; ++j) {
          float bias;
          std::memcpy(&bias, grp[j] + obd + dr * 4, 4);
          acc += dot(grp[j] + odb + dr * nba * 16, grp[j] + ods + dr * nba, aa[j * T + t], nba) +
                 bias;
          if (bf16) acc = round_bf16(acc);  // y is bfloat16: rounded after every group
        }
        yp[ex][t * D + dr] = acc;
      }
    }
  });
}

void swiglu_(at::Tensor y, const at::Tensor& x, const at::Tensor& buf, int64_t D, int64_t g,
             int64_t per, at::IntArrayRef offs, double alpha, double limit, int64_t isa,
             bool bf16) {
  swiglu_many_({y}, x, {buf}, D, g, per, offs, alpha, limit, isa, bf16);
}

// y [T, N] = x [T, K] . W^T for MXFP4 rows W: blocks [N, K/32, 16], scales [N, K/32] (tests and
// the bandwidth benchmark: the same dots as swiglu_).
void linear_(at::Tensor y, const at::Tensor& x, const at::Tensor& blocks, const at::Tensor& scales,
             int64_t isa) {
  TORCH_CHECK(y.dtype() == at::kFloat && y.is_contiguous() && x.dtype() == at::kFloat &&
                  x.is_contiguous() && x.dim() == 2,
              "mer_mxfp4::linear_: x and y must be contiguous f32");
  TORCH_CHECK(blocks.dtype() == at::kByte && blocks.is_contiguous() && blocks.dim() == 3 &&
                  blocks.size(2) == 16 && scales.dtype() == at::kByte && scales.is_contiguous(),
              "mer_mxfp4::linear_: blocks must be uint8 [N, K/32, 16], scales uint8 [N, K/32]");
  const int64_t T = x.size(0), K = x.size(1), N = blocks.size(0), nb = blocks.size(1);
  TORCH_CHECK(K == nb * 32 && scales.numel() == N * nb && y.numel() == T * N,
              "mer_mxfp4::linear_: shapes disagree");
  const Dot dot = dot_for(isa);
  std::vector<Act> ax(T);
  for (int64_t t = 0; t < T; ++t) ax[t].prepare(x.data_ptr<float>() + t * K, K, dot.i8, dot.avx2);
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  const uint8_t* sp = scales.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t t = 0; t < T; ++t) yp[t * N + r] = dot(bp + r * nb * 16, sp + r * nb, ax[t], nb);
  });
}

bool has_avx2() { return cpu_has_avx2(); }

}  // namespace

TORCH_LIBRARY(mer_mxfp4, m) {
  m.def("swiglu_(Tensor(a!) y, Tensor x, Tensor buf, int hidden, int group, int per, int[] offs, "
        "float alpha, float limit, int isa, bool bf16) -> ()", &swiglu_);
  m.def("swiglu_many_(Tensor(a!)[] ys, Tensor x, Tensor[] bufs, int hidden, int group, int per, "
        "int[] offs, float alpha, float limit, int isa, bool bf16) -> ()", &swiglu_many_);
  m.def("linear_(Tensor(a!) y, Tensor x, Tensor blocks, Tensor scales, int isa) -> ()", &linear_);
  m.def("has_avx2() -> bool", &has_avx2);
}
