// Row dots over GGUF blocks for the ops of ggml_native.cpp (compiled into the same library).
//
// One small decoder per type (struct Q4K, ...): a block of B weights is
//   w_i = f1 sc_c q_i - f2 mn_c        (integer codes q_i, integer sc_c and mn_c per G weights)
// (Q4_K: f1, f2 = d, dmin; Q6_K: d, 32 d, mn = sc, codes 0..63; Q4_0: d, d, mn = 8; Q8_0 and
// MXFP4: d, 0). Two generic row dots use the decoders:
//   int8 activations (bfloat16 mode, as llama.cpp always does): x rounded per block of B to int8
//     codes xq with one float scale dx = max|x| / 127; a block is dx (f1 I1 - f2 I2) with
//     I1 = sum_c sc_c sum_{i in c} q_i xq_i and I2 = sum_c mn_c sum xq_c, exact int32 (AVX2:
//     vpmaddubsw + vpmaddwd, sign trick for signed codes); then sum = fma(dx f1, I1, sum);
//     sum = fma(-(dx f2), I2, sum). 32-weight blocks skip the per-block reduction: 8 float
//     lanes, lane l = fma(dx f1, exact sum over weights 4l..4l+3, lane), minus the mn terms.
//   float32 activations (float32 mode): 8 float lanes; per 16-weight chunk c, lane l
//       p_l = q_l x_l;  p_l = fma(q_{l+8}, x_{l+8}, p_l);  acc_l = fma(f1 sc_c, p_l, acc_l)
//     and off = fma(f2 mn_c, sum of x over the G weights of c, off); the row is tree8(acc) - off.
// The scalar code performs the same float operations in the same order (same lanes, std::fma,
// the same sum tree; the integer sums are exact): AVX2 and scalar give identical bits.
//
// Legend: B weights per block, G weights per integer scale (16 or 32), c chunk of 16 weights,
// K reduction length.

#include <cmath>
#include <cstdint>
#include <cstring>

// Helpers called from the AVX2 functions are always inlined: an out-of-line call would run
// SSE-encoded code with dirty upper ymm halves, which costs hundreds of cycles here.
#define MERG_INLINE __attribute__((always_inline)) inline

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MERG_X86 1
#define MERG_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MERG_AVX2I __attribute__((target("avx2,fma,f16c"), always_inline)) inline
#else
#define MERG_X86 0
#define MERG_AVX2
#define MERG_AVX2I inline
#endif

#include "ggml_blocks.h"

namespace {

using mer_ggml::ActView;
using mer_ggml::Dot;
using mer_ggml::Segs;

constexpr int64_t kQ4_0 = 2, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kMXFP4 = 39;
constexpr int8_t kMXFP4Values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// f16 -> f32, exact (IEEE bit arithmetic; inlined into the AVX2 code too).
MERG_INLINE float h2f(const uint8_t* p) {
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

MERG_INLINE uint32_t u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// A decoded block header: the float scales and the integer scales/mins per G weights.
struct Scales {
  float f1, f2;
  int8_t sc[16], mn[16];  // B / G entries used
};

// ---- decoders: scales(blk, s), codes(blk, q) (scalar, all B codes), and avx2(blk, k)
// (AVX2, the codes of weights 32k..32k+31 as 32 int8). Codes are 0..63 unless kSigned.

struct Q4K {
  static constexpr int64_t kType = 12;
  static constexpr int B = 256, NB = 144, G = 32; static constexpr bool kSigned = false;
  MERG_INLINE static void scales(const uint8_t* b, Scales& s) {
    s.f1 = h2f(b);
    s.f2 = h2f(b + 2);
    const uint32_t w0 = u32(b + 4), w1 = u32(b + 8), w2 = u32(b + 12);
    const uint32_t v[4] = {w0 & 0x3f3f3f3fu, (w2 & 0x0f0f0f0fu) | ((w0 >> 2) & 0x30303030u),
                           w1 & 0x3f3f3f3fu, ((w2 >> 4) & 0x0f0f0f0fu) | ((w1 >> 2) & 0x30303030u)};
    std::memcpy(s.sc, v, 8);
    std::memcpy(s.mn, v + 2, 8);
  }
  static int8_t code(const uint8_t* b, int i) {  // weight i: nibble of sub-block i / 32
    const uint8_t v = b[16 + (i / 64) * 32 + i % 32];
    return int8_t((i / 32) % 2 ? v >> 4 : v & 15);
  }
#if MERG_X86
  MERG_AVX2I static __m256i avx2(const uint8_t* b, int k) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 + (k / 2) * 32));
    return _mm256_and_si256(k % 2 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(15));
  }
#endif
};

struct Q5K {
  static constexpr int64_t kType = 13;
  static constexpr int B = 256, NB = 176, G = 32; static constexpr bool kSigned = false;
  MERG_INLINE static void scales(const uint8_t* b, Scales& s) { Q4K::scales(b, s); }
  static int8_t code(const uint8_t* b, int i) {  // Q4_K's nibble after 32 B of high bits
    const uint8_t v = b[48 + (i / 64) * 32 + i % 32];
    const int s = i / 32;
    return int8_t((s % 2 ? v >> 4 : v & 15) | (((b[16 + i % 32] >> s) & 1) << 4));
  }
#if MERG_X86
  MERG_AVX2I static __m256i avx2(const uint8_t* b, int k) {
    const __m256i m15 = _mm256_set1_epi8(15);
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 48 + (k / 2) * 32));
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
    h = _mm256_and_si256(_mm256_srli_epi16(h, k), _mm256_set1_epi8(1));
    return _mm256_or_si256(_mm256_and_si256(k % 2 ? _mm256_srli_epi16(v, 4) : v, m15),
                           _mm256_slli_epi16(h, 4));
  }
#endif
};

struct Q6K {  // w = d sc (q - 32): f1 = d, f2 = 32 d, mn = sc
  static constexpr int64_t kType = 14;
  static constexpr int B = 256, NB = 210, G = 16; static constexpr bool kSigned = false;
  MERG_INLINE static void scales(const uint8_t* b, Scales& s) {
    s.f1 = h2f(b + 208);
    s.f2 = 32.0f * s.f1;
    std::memcpy(s.sc, b + 192, 16);
    std::memcpy(s.mn, b + 192, 16);
  }
  static int8_t code(const uint8_t* b, int i) {
    const int h = i / 128, qd = (i % 128) / 32, l = i % 32;
    const uint8_t v = b[h * 64 + (qd & 1) * 32 + l];
    return int8_t((qd >= 2 ? v >> 4 : v & 15) | (((b[128 + h * 32 + l] >> (2 * qd)) & 3) << 4));
  }
#if MERG_X86
  MERG_AVX2I static __m256i avx2(const uint8_t* b, int k) {
    const int h = k / 4, qd = k % 4;
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + h * 64 + (qd & 1) * 32));
    __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + h * 32));
    v = _mm256_and_si256(qd >= 2 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(15));
    hb = _mm256_and_si256(_mm256_srli_epi16(hb, 2 * qd), _mm256_set1_epi8(3));
    return _mm256_or_si256(v, _mm256_slli_epi16(hb, 4));
  }
#endif
};

// 32-weight blocks: one integer scale of 1 per block (G = 32).
MERG_INLINE void unit_scales(Scales& s, float f1, float f2, int8_t mn) {
  s.f1 = f1;
  s.f2 = f2;
  s.sc[0] = 1;
  s.mn[0] = mn;
}

struct Q80 {
  static constexpr int B = 32, NB = 34, G = 32; static constexpr bool kSigned = true;
  MERG_INLINE static void scales(const uint8_t* b, Scales& s) { unit_scales(s, h2f(b), 0, 0); }
  static int8_t code(const uint8_t* b, int i) { return int8_t(b[2 + i]); }
#if MERG_X86
  MERG_AVX2I static __m256i avx2(const uint8_t* b, int) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
  }
#endif
};

#if MERG_X86
// 16 bytes of nibbles -> 32 codes: low nibbles are weights 0..15, high ones 16..31.
MERG_AVX2I __m256i nibbles32(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(15));
}
#endif

struct Q40 {  // w = d (q - 8): f1 = f2 = d, mn = 8
  static constexpr int B = 32, NB = 18, G = 32; static constexpr bool kSigned = false;
  MERG_INLINE static void scales(const uint8_t* b, Scales& s) {
    unit_scales(s, h2f(b), h2f(b), 8);
  }
  static int8_t code(const uint8_t* b, int i) {
    return int8_t(i < 16 ? b[2 + i] & 15 : b[2 + i - 16] >> 4);
  }
#if MERG_X86
  MERG_AVX2I static __m256i avx2(const uint8_t* b, int) { return nibbles32(b + 2); }
#endif
};

struct MXFP4 {  // w = 2^(e - 128) kvalue[q] (the table holds doubled e2m1 values)
  static constexpr int B = 32, NB = 17, G = 32; static constexpr bool kSigned = true;
  MERG_INLINE static void scales(const uint8_t* b, Scales& s) {
    const uint32_t e = b[0], bits = e < 2 ? 0x00200000u << e : (e - 1) << 23;
    float d;
    std::memcpy(&d, &bits, 4);
    unit_scales(s, d, 0, 0);
  }
  static int8_t code(const uint8_t* b, int i) {
    return kMXFP4Values[i < 16 ? b[1 + i] & 15 : b[1 + i - 16] >> 4];
  }
#if MERG_X86
  MERG_AVX2I static __m256i avx2(const uint8_t* b, int) {
    const __m256i table = _mm256_broadcastsi128_si256(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(kMXFP4Values)));
    return _mm256_shuffle_epi8(table, nibbles32(b + 1));
  }
#endif
};

inline float tree8(const float* a) {
  float s4[4];
  for (int i = 0; i < 4; ++i) s4[i] = a[i] + a[i + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// The float combination of one block's exact integer sums (both int8 paths).
MERG_INLINE float combine8(float sum, float dx, const Scales& s, int32_t i1, int32_t i2) {
  sum = std::fma(dx * s.f1, float(i1), sum);
  return std::fma(-(dx * s.f2), float(i2), sum);
}

// I2 = sum over the block's scales of mn . (code sums): exact, any order.
template <class T>
MERG_INLINE int32_t min_sum(const Scales& s, const int16_t* bs) {
  int32_t t = 0;
  for (int j = 0; j < T::B / T::G; ++j) t += int32_t(s.mn[j]) * bs[j];
  return t;
}

// ---- scalar row dots (the reference for the AVX2 ones: same bits) -----------------------

// 32-weight blocks (int8 mode): no integer reduction per block; 8 float lanes, lane l taking
// the exact int32 sum over weights 4l..4l+3 of each block: acc_l = fma(dx f1, L_l, acc_l).
template <class T>
inline float dot8_lanes_scalar(const uint8_t* row, const ActView& a, int64_t nb) {
  float acc[8] = {}, off = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * T::NB;
    Scales s;
    T::scales(blk, s);
    for (int l = 0; l < 8; ++l) {
      int32_t t = 0;
      for (int i = 4 * l; i < 4 * l + 4; ++i) t += int32_t(T::code(blk, i)) * a.q[b * 32 + i];
      acc[l] = std::fma(a.d[b] * s.f1, float(t), acc[l]);
    }
    off = std::fma(a.d[b] * s.f2, float(int32_t(s.mn[0]) * a.bs[b]), off);
  }
  return tree8(acc) - off;
}

template <class T>
inline float dot8_scalar(const uint8_t* row, const ActView& a, int64_t nb) {
  if constexpr (T::B == 32) return dot8_lanes_scalar<T>(row, a, nb);
  float sum = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * T::NB;
    const int8_t* xq = a.q + b * T::B;
    Scales s;
    T::scales(blk, s);
    int32_t i1 = 0;
    for (int j = 0; j < T::B / T::G; ++j) {
      int32_t t = 0;
      for (int i = j * T::G; i < (j + 1) * T::G; ++i) t += int32_t(T::code(blk, i)) * xq[i];
      i1 += int32_t(s.sc[j]) * t;
    }
    sum = combine8(sum, a.d[b], s, i1, min_sum<T>(s, a.bs + b * (T::B / T::G)));
  }
  return sum;
}

template <class T>
inline float dotf_scalar(const uint8_t* row, const ActView& a, int64_t nb) {
  float acc[8] = {}, off = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * T::NB;
    const float* xb = a.x + b * T::B;
    Scales s;
    T::scales(blk, s);
    for (int c = 0; c < T::B / 16; ++c) {
      const float f = s.f1 * float(s.sc[c * 16 / T::G]);
      for (int l = 0; l < 8; ++l) {
        float p = float(T::code(blk, c * 16 + l)) * xb[c * 16 + l];
        p = std::fma(float(T::code(blk, c * 16 + 8 + l)), xb[c * 16 + 8 + l], p);
        acc[l] = std::fma(f, p, acc[l]);
      }
    }
    for (int j = 0; j < T::B / T::G; ++j)
      off = std::fma(s.f2 * float(s.mn[j]), a.xs[b * (T::B / T::G) + j], off);
  }
  return tree8(acc) - off;
}

// ---- AVX2 row dots -----------------------------------------------------------------------

#if MERG_X86
// The 16 int16 pair sums of 32 codes times 32 activation codes.
template <class T>
MERG_AVX2I __m256i pairs(__m256i w, __m256i x) {
  if constexpr (T::kSigned)
    return _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_maddubs_epi16(w, x);
}

// tree8 of the 8 lanes, the same additions in the same order (no SSE call with dirty ymm).
MERG_AVX2I float tree8_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // a_i + a_i+4
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));  // (s0 + s2), (s1 + s3)
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// The block's integer scales as int16: G = 32, the 8 scales in both 128-bit lanes; G = 16, all
// 16 (low lane 0..7).
template <class T>
MERG_AVX2I __m256i scale_vector(const Scales& s) {
  if constexpr (T::G == 16)
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s.sc)));
  else
    return _mm256_broadcastsi128_si256(
        _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s.sc))));
}

// int16 multipliers of the 32 weights 32k..32k+31 (low 128 bits: weights 0..15 of them).
template <class T>
MERG_AVX2I __m256i scale16(__m256i v, int k) {
  if constexpr (T::B == 32) return _mm256_set1_epi16(1);  // one scale of 1 (sc[0])
  if constexpr (T::G == 32) return _mm256_shuffle_epi8(v, _mm256_set1_epi16(0x0100 + 0x0202 * k));
  const __m256i pair = _mm256_permutevar8x32_epi32(v, _mm256_set1_epi32(k));  // sc 2k, 2k+1
  return _mm256_shuffle_epi8(pair, _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0,
                                                    1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3,
                                                    2, 3));  // fmt: skip
}

// I2 = sum of mn . (code sums) of the block, as 4 int32 to add up.
template <class T>
MERG_AVX2I __m128i min_sum4(const Scales& s, const int16_t* bs) {
  if constexpr (T::B == 32) return _mm_cvtsi32_si128(int32_t(s.mn[0]) * bs[0]);
  if constexpr (T::G == 32)
    return _mm_madd_epi16(
        _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s.mn))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(bs)));
  const __m256i m = _mm256_madd_epi16(
      _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s.mn))),
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bs)));
  return _mm_add_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
}

template <class T>
MERG_AVX2I float dot8_lanes_avx2(const uint8_t* row, const ActView& a, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  float off = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * T::NB;
    Scales s;
    T::scales(blk, s);
    const __m256i w = T::avx2(blk, 0);
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + b * 32));
    const __m256i p = pairs<T>(w, x);
    const __m256 lanes = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(a.d[b] * s.f1), lanes, acc);
    off = std::fma(a.d[b] * s.f2, float(int32_t(s.mn[0]) * a.bs[b]), off);
  }
  return tree8_avx2(acc) - off;
}

template <class T>
MERG_AVX2I float dot8_avx2(const uint8_t* row, const ActView& a, int64_t nb) {
  if constexpr (T::B == 32) return dot8_lanes_avx2<T>(row, a, nb);
  float sum = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * T::NB;
    const int8_t* xq = a.q + b * T::B;
    Scales s;
    T::scales(blk, s);
    const __m256i sv = scale_vector<T>(s);
    __m256i acc = _mm256_setzero_si256();
    for (int k = 0; k < T::B / 32; ++k) {
      const __m256i w = T::avx2(blk, k);
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * k));
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs<T>(w, x), scale16<T>(sv, k)));
    }
    __m128i h = _mm_hadd_epi32(
        _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1)),
        min_sum4<T>(s, a.bs + b * (T::B / T::G)));
    h = _mm_hadd_epi32(h, h);  // I1, I2, I1, I2
    sum = combine8(sum, a.d[b], s, _mm_cvtsi128_si32(h), _mm_extract_epi32(h, 1));
  }
  return sum;
}

template <class T>
MERG_AVX2I float dotf_avx2(const uint8_t* row, const ActView& a, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  float off = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * T::NB;
    const float* xb = a.x + b * T::B;
    Scales s;
    T::scales(blk, s);
    for (int k = 0; k < T::B / 32; ++k) {
      const __m256i w = T::avx2(blk, k);
      for (int h = 0; h < 2; ++h) {
        const int c = 2 * k + h;
        const __m128i w16 = h ? _mm256_extracti128_si256(w, 1) : _mm256_castsi256_si128(w);
        const __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w16));
        const __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(w16, 8)));
        __m256 p = _mm256_mul_ps(q0, _mm256_loadu_ps(xb + c * 16));
        p = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xb + c * 16 + 8), p);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(s.f1 * float(s.sc[c * 16 / T::G])), p, acc);
      }
    }
    for (int j = 0; j < T::B / T::G; ++j)
      off = std::fma(s.f2 * float(s.mn[j]), a.xs[b * (T::B / T::G) + j], off);
  }
  return tree8_avx2(acc) - off;
}

bool cpu_has_avx2_impl() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
#else
bool cpu_has_avx2_impl() { return false; }
#endif

// ---- dispatch ----------------------------------------------------------------------------

#define MERG_SEGMENTS(NAME, ROW, ATTR)                                       \
  template <class T>                                                         \
  ATTR float NAME(const Segs& s, float acc) {                                \
    for (int64_t j = 0; j < s.n; ++j)                                        \
      acc += ROW<T>(s.row + j * s.stride, s.act[j * s.astride], s.nb);       \
    return acc;                                                              \
  }
MERG_SEGMENTS(segs8_scalar, dot8_scalar, )
MERG_SEGMENTS(segsf_scalar, dotf_scalar, )
#if MERG_X86
MERG_SEGMENTS(segs8_avx2, dot8_avx2, MERG_AVX2)
MERG_SEGMENTS(segsf_avx2, dotf_avx2, MERG_AVX2)
#else
MERG_SEGMENTS(segs8_avx2, dot8_scalar, )
MERG_SEGMENTS(segsf_avx2, dotf_scalar, )
#endif

template <class T>
mer_ggml::BlockKind make_kind(bool avx2, bool i8, bool wide) {
  Dot d = i8 ? (avx2 ? segs8_avx2<T> : segs8_scalar<T>) : (avx2 ? segsf_avx2<T> : segsf_scalar<T>);
  mer_ggml::Dot4 d4 = nullptr;
  if constexpr (T::B == 256)
    if (i8)
      d = mer_ggml::kquant_int8(T::kType, avx2, wide), d4 = mer_ggml::kquant_int8_4(T::kType, avx2, wide);
  return {T::B, T::NB, T::G, d, d4};
}

}  // namespace

namespace mer_ggml {

bool cpu_has_avx2() { return ::cpu_has_avx2_impl(); }

BlockKind block_kind(int64_t type, int64_t isa) {
  static const bool has = cpu_has_avx2();
  const bool v = has && (isa == 1 || isa == 2 || isa == 4), i8 = isa >= 2, w = isa == 2;
  switch (type) {
    case kQ4_0: return make_kind<Q40>(v, i8, w);
    case kQ8_0: return make_kind<Q80>(v, i8, w);
    case kQ4_K: return make_kind<Q4K>(v, i8, w);
    case kQ5_K: return make_kind<Q5K>(v, i8, w);
    case kQ6_K: return make_kind<Q6K>(v, i8, w);
    case kMXFP4: return make_kind<MXFP4>(v, i8, w);
  }
  return {0, 0, 0, nullptr, nullptr};
}

}  // namespace mer_ggml
