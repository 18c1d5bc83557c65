// Native decode kernels over GGUF blocks (Q4_K, Q5_K, Q6_K, Q8_0), read in place from an expert
// buffer of the "gguf:" formats (kernels/ggml_formats.py) or from a dense GGUF matrix. Built and
// loaded by kernels/ggml_native.py as the torch ops mer_ggml::swiglu_ and mer_ggml::linear_.
//
// Activations are float32 (llama.cpp instead rounds them to 8 bits: we keep the f32 path close
// to the dequantized reference). Each row dot product uses the block algebra
//   Q4_K/Q5_K:  sum_s d sc_s (sum q x) - dmin m_s (sum x)     (s: 8 sub-blocks of 32)
//   Q6_K:       sum_c d sc_c (sum q x - 32 sum x)              (c: 16 chunks of 16, q in 0..63)
//   Q8_0:       sum_b d (sum q x)                              (b: blocks of 32)
// with the sums of x per chunk computed once per activation vector. The AVX2 paths (chosen at run
// time, compiled with per-function target attributes) and the scalar paths compute the same
// algebra in a different summation order, so they agree to float rounding, not bit for bit.
//
// swiglu_: one call computes a whole segment (n groups) of one expert:
//   1. gate and up rows of every group (parallel over rows): h, u = W x
//   2. a_j = silu(h_j) u_j for every group j
//   3. per down row (parallel over D): y += p_j for j in order, p_j = W_down_j a_j
// so every group's partial is independent of the other groups of the call and added in group
// order, as kernels/formats.py requires.
//
// Legend: T tokens, D hidden, g neurons per group, n groups, N rows, K reduction length.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MERG_X86 1
#define MERG_AVX2 __attribute__((target("avx2,fma")))
#else
#define MERG_X86 0
#endif

namespace {

constexpr int64_t kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14;

inline float h2f(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return float(c10::Half(v, c10::Half::from_bits()));
}

// 6-bit scales and mins of a Q4_K/Q5_K block (ggml's get_scale_min_k4).
inline void scale_min(const uint8_t* q, float* sc, float* mn) {
  for (int j = 0; j < 8; ++j) {
    uint8_t s, m;
    if (j < 4) {
      s = q[j] & 63;
      m = q[j + 4] & 63;
    } else {
      s = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
      m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
    sc[j] = float(s);
    mn[j] = float(m);
  }
}

// ---- scalar row dots: row of K weights . x, xs = sums of x per chunk -----------------------

float dot_q4k_scalar(const uint8_t* row, const float* x, const float* xs, int64_t K) {
  float sum = 0.0f;
  for (int64_t b = 0; b < K / 256; ++b) {
    const uint8_t* blk = row + b * 144;
    float d = h2f(blk), dmin = h2f(blk + 2), sc[8], mn[8];
    scale_min(blk + 4, sc, mn);
    const uint8_t* qs = blk + 16;
    const float* xb = x + b * 256;
    for (int s = 0; s < 8; ++s) {
      float acc = 0.0f;
      for (int l = 0; l < 32; ++l) {
        uint8_t v = qs[(s / 2) * 32 + l];
        acc += float(s % 2 ? v >> 4 : v & 15) * xb[s * 32 + l];
      }
      sum += d * sc[s] * acc - dmin * mn[s] * xs[b * 8 + s];
    }
  }
  return sum;
}

float dot_q5k_scalar(const uint8_t* row, const float* x, const float* xs, int64_t K) {
  float sum = 0.0f;
  for (int64_t b = 0; b < K / 256; ++b) {
    const uint8_t* blk = row + b * 176;
    float d = h2f(blk), dmin = h2f(blk + 2), sc[8], mn[8];
    scale_min(blk + 4, sc, mn);
    const uint8_t *qh = blk + 16, *qs = blk + 48;
    const float* xb = x + b * 256;
    for (int s = 0; s < 8; ++s) {
      float acc = 0.0f;
      for (int l = 0; l < 32; ++l) {
        uint8_t v = qs[(s / 2) * 32 + l];
        int q = (s % 2 ? v >> 4 : v & 15) | (((qh[l] >> s) & 1) << 4);
        acc += float(q) * xb[s * 32 + l];
      }
      sum += d * sc[s] * acc - dmin * mn[s] * xs[b * 8 + s];
    }
  }
  return sum;
}

float dot_q6k_scalar(const uint8_t* row, const float* x, const float* xs, int64_t K) {
  float sum = 0.0f;
  for (int64_t b = 0; b < K / 256; ++b) {
    const uint8_t* blk = row + b * 210;
    const uint8_t *ql = blk, *qh = blk + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    float d = h2f(blk + 208);
    const float* xb = x + b * 256;
    for (int c = 0; c < 16; ++c) {
      float acc = 0.0f;
      for (int i = 0; i < 16; ++i) {
        int w = c * 16 + i, h = w / 128, r = w % 128, qd = r / 32, l = r % 32;
        uint8_t v = ql[h * 64 + (qd & 1) * 32 + l];
        int q = (qd >= 2 ? v >> 4 : v & 15) | (((qh[h * 32 + l] >> (2 * qd)) & 3) << 4);
        acc += float(q) * xb[w];
      }
      sum += d * float(sc[c]) * (acc - 32.0f * xs[b * 16 + c]);
    }
  }
  return sum;
}

float dot_q80_scalar(const uint8_t* row, const float* x, const float*, int64_t K) {
  float sum = 0.0f;
  for (int64_t b = 0; b < K / 32; ++b) {
    const uint8_t* blk = row + b * 34;
    const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
    float acc = 0.0f;
    for (int l = 0; l < 32; ++l) acc += float(q[l]) * x[b * 32 + l];
    sum += h2f(blk) * acc;
  }
  return sum;
}

// ---- AVX2 row dots -----------------------------------------------------------------------

#if MERG_X86
MERG_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

MERG_AVX2 inline __m256i load8u(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

MERG_AVX2 float dot_q4k_avx2(const uint8_t* row, const float* x, const float* xs, int64_t K) {
  const __m256i m15 = _mm256_set1_epi32(15);
  __m256 acc = _mm256_setzero_ps();
  float mins = 0.0f;
  for (int64_t b = 0; b < K / 256; ++b) {
    const uint8_t* blk = row + b * 144;
    _mm_prefetch(reinterpret_cast<const char*>(blk + 1024), _MM_HINT_T0);
    float d = h2f(blk), dmin = h2f(blk + 2), sc[8], mn[8];
    scale_min(blk + 4, sc, mn);
    const uint8_t* qs = blk + 16;
    const float* xb = x + b * 256;
    for (int c = 0; c < 4; ++c) {
      __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
      for (int i = 0; i < 32; i += 8) {
        __m256i v = load8u(qs + c * 32 + i);
        lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m15)),
                             _mm256_loadu_ps(xb + c * 64 + i), lo);
        hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)),
                             _mm256_loadu_ps(xb + c * 64 + 32 + i), hi);
      }
      acc = _mm256_fmadd_ps(lo, _mm256_set1_ps(d * sc[2 * c]), acc);
      acc = _mm256_fmadd_ps(hi, _mm256_set1_ps(d * sc[2 * c + 1]), acc);
    }
    for (int s = 0; s < 8; ++s) mins += dmin * mn[s] * xs[b * 8 + s];
  }
  return hsum8(acc) - mins;
}

MERG_AVX2 float dot_q6k_avx2(const uint8_t* row, const float* x, const float* xs, int64_t K) {
  const __m256i m15 = _mm256_set1_epi32(15), m3 = _mm256_set1_epi32(3);
  __m256 acc = _mm256_setzero_ps();
  float off = 0.0f;
  for (int64_t b = 0; b < K / 256; ++b) {
    const uint8_t* blk = row + b * 210;
    _mm_prefetch(reinterpret_cast<const char*>(blk + 1024), _MM_HINT_T0);
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    float d = h2f(blk + 208), ds[16];
    for (int c = 0; c < 16; ++c) {
      ds[c] = d * float(sc[c]);
      off += ds[c] * xs[b * 16 + c];
    }
    const float* xb = x + b * 256;
    for (int h = 0; h < 2; ++h) {
      const uint8_t *ql = blk + h * 64, *qh = blk + 128 + h * 32;
      for (int l = 0; l < 32; l += 8) {
        __m256i a = load8u(ql + l), bb = load8u(ql + 32 + l), hb = load8u(qh + l);
        __m256i q[4] = {
            _mm256_or_si256(_mm256_and_si256(a, m15),
                            _mm256_slli_epi32(_mm256_and_si256(hb, m3), 4)),
            _mm256_or_si256(_mm256_and_si256(bb, m15),
                            _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hb, 2), m3), 4)),
            _mm256_or_si256(_mm256_srli_epi32(a, 4),
                            _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hb, 4), m3), 4)),
            _mm256_or_si256(_mm256_srli_epi32(bb, 4), _mm256_slli_epi32(_mm256_srli_epi32(hb, 6), 4))};
        for (int qd = 0; qd < 4; ++qd) {
          int w = h * 128 + qd * 32 + l;
          __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(q[qd]), _mm256_loadu_ps(xb + w));
          acc = _mm256_fmadd_ps(p, _mm256_set1_ps(ds[w / 16]), acc);
        }
      }
    }
  }
  return hsum8(acc) - 32.0f * off;
}

MERG_AVX2 float dot_q80_avx2(const uint8_t* row, const float* x, const float*, int64_t K) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / 32; ++b) {
    const uint8_t* blk = row + b * 34;
    __m256 s = _mm256_setzero_ps();
    for (int i = 0; i < 32; i += 8) {
      __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + i)));
      s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_loadu_ps(x + b * 32 + i), s);
    }
    acc = _mm256_fmadd_ps(s, _mm256_set1_ps(h2f(blk)), acc);
  }
  return hsum8(acc);
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
bool cpu_has_avx2() { return false; }
#define dot_q4k_avx2 dot_q4k_scalar
#define dot_q6k_avx2 dot_q6k_scalar
#define dot_q80_avx2 dot_q80_scalar
#endif

// ---- int8 activations (bfloat16 mode, as llama.cpp's Q8_K): x ~ dx q per block of 256 --------
// Row dot = sum over blocks of dx * (integer sums of weight codes x q, scaled per sub-block).
// Only Q4_K and Q6_K have this path.

struct Q8Act {
  const int8_t* q;    // [K] int8 codes
  const float* d;     // [K / 256] scales
  const int32_t* bs;  // [K / 16] sums of the codes per 16
};

float dot8_q4k_scalar(const uint8_t* row, const Q8Act& a, int64_t K) {
  float sum = 0.0f;
  for (int64_t b = 0; b < K / 256; ++b) {
    const uint8_t* blk = row + b * 144;
    float d = h2f(blk), dmin = h2f(blk + 2), sc[8], mn[8];
    scale_min(blk + 4, sc, mn);
    int32_t isum = 0, msum = 0;
    for (int s = 0; s < 8; ++s) {
      int32_t acc = 0;
      for (int l = 0; l < 32; ++l) {
        uint8_t v = blk[16 + (s / 2) * 32 + l];
        acc += int32_t(s % 2 ? v >> 4 : v & 15) * a.q[b * 256 + s * 32 + l];
      }
      isum += int32_t(sc[s]) * acc;
      msum += int32_t(mn[s]) * (a.bs[b * 16 + 2 * s] + a.bs[b * 16 + 2 * s + 1]);
    }
    sum += a.d[b] * (d * float(isum) - dmin * float(msum));
  }
  return sum;
}

float dot8_q6k_scalar(const uint8_t* row, const Q8Act& a, int64_t K) {
  float sum = 0.0f;
  for (int64_t b = 0; b < K / 256; ++b) {
    const uint8_t *blk = row + b * 210, *ql = blk, *qh = blk + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    int32_t isum = 0;
    for (int c = 0; c < 16; ++c) {
      int32_t acc = 0;
      for (int i = 0; i < 16; ++i) {
        int w = c * 16 + i, h = w / 128, r = w % 128, qd = r / 32, l = r % 32;
        uint8_t v = ql[h * 64 + (qd & 1) * 32 + l];
        int q = (qd >= 2 ? v >> 4 : v & 15) | (((qh[h * 32 + l] >> (2 * qd)) & 3) << 4);
        acc += q * a.q[b * 256 + w];
      }
      isum += int32_t(sc[c]) * (acc - 32 * a.bs[b * 16 + c]);
    }
    sum += a.d[b] * h2f(blk + 208) * float(isum);
  }
  return sum;
}

#if MERG_X86
MERG_AVX2 float dot8_q4k_avx2(const uint8_t* row, const Q8Act& a, int64_t K) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m256 acc = _mm256_setzero_ps();
  float mins = 0.0f;
  for (int64_t b = 0; b < K / 256; ++b) {
    const uint8_t* blk = row + b * 144;
    _mm_prefetch(reinterpret_cast<const char*>(blk + 1024), _MM_HINT_T0);
    float d = h2f(blk), dmin = h2f(blk + 2), sc[8], mn[8];
    scale_min(blk + 4, sc, mn);
    const int8_t* xq = a.q + b * 256;
    __m256i isum = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + c * 32));
      __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      __m256i plo = _mm256_maddubs_epi16(
          lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + c * 64)));
      __m256i phi = _mm256_maddubs_epi16(
          hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + c * 64 + 32)));
      isum = _mm256_add_epi32(isum, _mm256_madd_epi16(plo, _mm256_set1_epi16(int16_t(sc[2 * c]))));
      isum = _mm256_add_epi32(isum,
                              _mm256_madd_epi16(phi, _mm256_set1_epi16(int16_t(sc[2 * c + 1]))));
    }
    int32_t msum = 0;
    for (int s = 0; s < 8; ++s)
      msum += int32_t(mn[s]) * (a.bs[b * 16 + 2 * s] + a.bs[b * 16 + 2 * s + 1]);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(a.d[b] * d), acc);
    mins += a.d[b] * dmin * float(msum);
  }
  return hsum8(acc) - mins;
}

MERG_AVX2 float dot8_q6k_avx2(const uint8_t* row, const Q8Act& a, int64_t K) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / 256; ++b) {
    const uint8_t *blk = row + b * 210, *ql = blk, *qh = blk + 128;
    _mm_prefetch(reinterpret_cast<const char*>(blk + 1024), _MM_HINT_T0);
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    const int8_t* xq = a.q + b * 256;
    __m256i isum = _mm256_setzero_si256();
    int32_t off = 0;
    for (int c = 0; c < 16; ++c) off += int32_t(sc[c]) * a.bs[b * 16 + c];
    for (int h = 0; h < 2; ++h) {
      __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + h * 64));
      __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + h * 64 + 32));
      __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + h * 32));
      __m256i nib[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                        _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                        _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
      for (int qd = 0; qd < 4; ++qd) {
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(hb, 2 * qd), m2);
        __m256i q = _mm256_or_si256(nib[qd], _mm256_slli_epi16(hi, 4));
        const int w = h * 128 + qd * 32;
        __m256i p = _mm256_maddubs_epi16(
            q, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + w)));
        __m256i s = _mm256_set_m128i(_mm_set1_epi16(sc[w / 16 + 1]), _mm_set1_epi16(sc[w / 16]));
        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, s));
      }
    }
    const float dd = a.d[b] * h2f(blk + 208);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(dd), acc);
    acc = _mm256_sub_ps(acc, _mm256_setr_ps(dd * 32.0f * float(off), 0, 0, 0, 0, 0, 0, 0));
  }
  return hsum8(acc);
}
#else
#define dot8_q4k_avx2 dot8_q4k_scalar
#define dot8_q6k_avx2 dot8_q6k_scalar
#endif

// ---- dispatch and activations -----------------------------------------------------------

using Dot = float (*)(const uint8_t*, const float*, const float*, int64_t);
using Dot8 = float (*)(const uint8_t*, const Q8Act&, int64_t);

struct Kind {
  int64_t block, nbytes, chunk;  // chunk: length of the x sums the f32 dot needs (0: none)
  Dot dot;
  Dot8 dot8;  // nullptr: no int8-activation path
};

// isa: 0 scalar f32, 1 AVX2 f32, 2 AVX2 with int8 activations (Q4_K/Q6_K), 3 scalar int8
Kind kind(int64_t type, int64_t isa) {
  static const bool avx2 = cpu_has_avx2();
  const bool v = avx2 && (isa == 1 || isa == 2);
  switch (type) {
    case kQ4_K: return {256, 144, 32, v ? dot_q4k_avx2 : dot_q4k_scalar,
                        v ? dot8_q4k_avx2 : dot8_q4k_scalar};
    case kQ5_K: return {256, 176, 32, dot_q5k_scalar, nullptr};
    case kQ6_K: return {256, 210, 16, v ? dot_q6k_avx2 : dot_q6k_scalar,
                        v ? dot8_q6k_avx2 : dot8_q6k_scalar};
    case kQ8_0: return {32, 34, 0, v ? dot_q80_avx2 : dot_q80_scalar, nullptr};
  }
  TORCH_CHECK(false, "mer_ggml: GGML type ", type, " has no native kernel");
}

// One activation vector of length K, prepared for the dots of one Kind.
struct Act {
  std::vector<float> xs;   // f32 path: sums per chunk
  std::vector<int8_t> q;   // int8 path
  std::vector<float> d;
  std::vector<int32_t> bs;
  const float* x = nullptr;
  bool i8 = false;

  void prepare(const float* v, int64_t K, const Kind& k, bool int8) {
    x = v;
    i8 = int8 && k.dot8 != nullptr;
    if (i8) {
      q.resize(K);
      d.resize(K / 256);
      bs.resize(K / 16);
      for (int64_t b = 0; b < K / 256; ++b) {
        float amax = 0.0f;
        for (int i = 0; i < 256; ++i) amax = std::fmax(amax, std::fabs(v[b * 256 + i]));
        const float s = amax / 127.0f, inv = s > 0 ? 1.0f / s : 0.0f;
        d[b] = s;
        for (int i = 0; i < 256; ++i)
          q[b * 256 + i] = int8_t(std::nearbyint(std::fmin(127.0f, v[b * 256 + i] * inv)));
      }
      for (int64_t c = 0; c < K / 16; ++c) {
        int32_t t = 0;
        for (int i = 0; i < 16; ++i) t += q[c * 16 + i];
        bs[c] = t;
      }
    } else if (k.chunk) {
      xs.resize(K / k.chunk);
      for (int64_t c = 0; c < K / k.chunk; ++c) {
        float t = 0.0f;
        for (int64_t i = 0; i < k.chunk; ++i) t += v[c * k.chunk + i];
        xs[c] = t;
      }
    }
  }

  float dot(const Kind& k, const uint8_t* row, int64_t K) const {
    if (i8) return k.dot8(row, Q8Act{q.data(), d.data(), bs.data()}, K);
    return k.dot(row, x, xs.data(), K);
  }
};

inline float silu_mul(float h, float u) { return h / (1.0f + std::exp(-h)) * u; }

void check_common(const at::Tensor& y, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(y.dtype() == at::kFloat && y.is_contiguous(), "mer_ggml: y must be contiguous f32");
  TORCH_CHECK(x.dtype() == at::kFloat && x.is_contiguous() && x.dim() == 2,
              "mer_ggml: x must be contiguous f32 [T, K]");
  TORCH_CHECK(w.dtype() == at::kByte && w.is_contiguous(), "mer_ggml: weights must be uint8");
}

void swiglu_(at::Tensor y, const at::Tensor& x, const at::Tensor& buf, int64_t D, int64_t g,
             int64_t per, int64_t tg, int64_t tu, int64_t td, int64_t og, int64_t ou, int64_t od,
             int64_t isa) {
  check_common(y, x, buf);
  const int64_t T = x.size(0), n = buf.numel() / per;
  TORCH_CHECK(x.size(1) == D && y.numel() == T * D && buf.numel() == n * per && n > 0,
              "mer_ggml::swiglu_: shapes disagree");
  const Kind kg = kind(tg, isa), ku = kind(tu, isa), kd = kind(td, isa);
  const bool i8 = isa >= 2;
  TORCH_CHECK(D % kg.block == 0 && D % ku.block == 0 && g % kd.block == 0,
              "mer_ggml::swiglu_: rows are not whole blocks");
  const int64_t rg = D / kg.block * kg.nbytes, ru = D / ku.block * ku.nbytes;
  const int64_t rd = g / kd.block * kd.nbytes;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* bp = buf.data_ptr<uint8_t>();
  std::vector<Act> ag(T), au(T);
  for (int64_t t = 0; t < T; ++t) {
    ag[t].prepare(xp + t * D, D, kg, i8);
    au[t].prepare(xp + t * D, D, ku, i8);
  }
  std::vector<float> h(n * T * g), u(n * T * g);  // [n, T, g]
  at::parallel_for(0, n * 2 * g, 8, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t j = r / (2 * g), i = r % (2 * g);
      const bool gate = i < g;
      const uint8_t* row = bp + j * per + (gate ? og + i * rg : ou + (i - g) * ru);
      for (int64_t t = 0; t < T; ++t) {
        if (gate)
          h[(j * T + t) * g + i] = ag[t].dot(kg, row, D);
        else
          u[(j * T + t) * g + i - g] = au[t].dot(ku, row, D);
      }
    }
  });
  std::vector<float> a(n * T * g);
  std::vector<Act> ad(n * T);
  for (int64_t k = 0; k < n * T; ++k) {
    for (int64_t i = 0; i < g; ++i) a[k * g + i] = silu_mul(h[k * g + i], u[k * g + i]);
    ad[k].prepare(a.data() + k * g, g, kd, i8);
  }
  at::parallel_for(0, D, 16, [&](int64_t b, int64_t e) {
    for (int64_t dr = b; dr < e; ++dr)
      for (int64_t t = 0; t < T; ++t) {
        float acc = yp[t * D + dr];
        for (int64_t j = 0; j < n; ++j)
          acc += ad[j * T + t].dot(kd, bp + j * per + od + dr * rd, g);
        yp[t * D + dr] = acc;
      }
  });
}

// y [T, N] = x [T, K] . W^T for a GGUF matrix W given as rows [N, row bytes].
void linear_(at::Tensor y, const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t isa) {
  check_common(y, x, w);
  const Kind k = kind(type, isa);
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % k.block == 0 && w.size(1) == K / k.block * k.nbytes && y.numel() == T * N,
              "mer_ggml::linear_: shapes disagree");
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t rb = w.size(1);
  std::vector<Act> acts(T);
  for (int64_t t = 0; t < T; ++t) acts[t].prepare(xp + t * K, K, k, isa >= 2);
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t t = 0; t < T; ++t) yp[t * N + r] = acts[t].dot(k, wp + r * rb, K);
  });
}

bool has_avx2() { return cpu_has_avx2(); }

}  // namespace

TORCH_LIBRARY(mer_ggml, m) {
  m.def("swiglu_(Tensor(a!) y, Tensor x, Tensor buf, int hidden, int group, int per, "
        "int tg, int tu, int td, int og, int ou, int od, int isa) -> ()", &swiglu_);
  m.def("linear_(Tensor(a!) y, Tensor x, Tensor w, int type, int isa) -> ()", &linear_);
  m.def("has_avx2() -> bool", &has_avx2);
}
