// Native GEMV/GEMM-for-small-T kernels for the quantized dense weights (kernels/dense_quant.py,
// docs/quantization.md "Dense weights"). Compiled into the same library as native.cpp.
//
// Both formats multiply int8 activations: each token's x is quantized in blocks of 32 along K
// (sx = max|x| / 127, qx = rint(x / sx), as reference.quantize_x_q8), and the weight codes are
// multiplied with qx in exact int32 arithmetic (AVX2 vpmaddubsw + vpmaddwd, 8 int32 lanes per
// 32 weights); only the per-block scaling and the final sums are float32. The scalar code
// performs the same float operations in the same order (same lanes, explicit fmaf, the same
// sum tree), so the AVX2 and scalar paths give identical bits.
//
//   q8 (int8 [N, K] row-major, bf16 scale s per row):
//     acc_j += float(sum of w qx over bytes 4j..4j+3 of block kb) * sx_kb   (j = 0..7)
//     y = tree8(acc) * s
//   q4 (row-major; per row and block of 64 weights, 32 bytes: byte i = k i (low nibble) and
//       k i + 32 (high); bf16 (s, z) per row and block; w = (q - 8) s + z):
//     acc_j += float(lo lanes) * (s sx_2kb);  acc_j += float(hi lanes) * (s sx_2kb+1)
//     off_(kb mod 8) += fl(z - 8 s) * c_kb,   c_kb = sx_2kb * sum qx_2kb + sx_2kb+1 * sum qx_2kb+1
//     y = tree8(acc) + tree8(off)        (the zero-point terms in 8 lanes too: one vector
//                                         multiply-add per 8 blocks instead of 8 scalar ones)
//
// Legend: T tokens, N output rows, K reduction length, kb block index.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "native_dense_simd.h"
#define MER_DX86 1
#define MER_AVX2 __attribute__((target("avx2,fma")))
#else
#define MER_DX86 0
#endif

namespace mer_dense {  // native_dense_vnni.cpp
bool cpu_has_vnni();
// 4 q4 rows x tt (1-4) tokens, as q4_rows_avx2<4, tt> (the same bits), with AVX-512 VNNI.
void q4_rows4_vnni(int tt, const uint8_t* p, const uint16_t* sz, int64_t K, const int8_t* qx,
                   const float* sxa, const float* sxb, const float* c, float* out, int64_t os);
}  // namespace mer_dense

namespace {

constexpr int64_t kXB = 32;  // activation block
constexpr int64_t kWB4 = 64;  // q4 weight block

inline float bf16f(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float tree8(const float* a) {
  float s4[4];
  for (int i = 0; i < 4; ++i) s4[i] = a[i] + a[i + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

#if MER_DX86
// One block of 32 activations: the scalar code's IEEE operations (max, division, round half to
// even, clip) with 8 lanes at a time, so the same bits. Returns sum(q).
MER_AVX2 int32_t quantize_block_avx2(const float* v, float s, int8_t* q) {
  const __m256 inv = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  alignas(32) int32_t qi[32];
  __m256i sum = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(v + 8 * i), inv),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256i n = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    _mm256_store_si256(reinterpret_cast<__m256i*>(qi + 8 * i), n);
    sum = _mm256_add_epi32(sum, n);
  }
  for (int i = 0; i < 32; ++i) q[i] = int8_t(qi[i]);
  alignas(32) int32_t p[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(p), sum);
  return p[0] + p[1] + p[2] + p[3] + p[4] + p[5] + p[6] + p[7];
}

MER_AVX2 float absmax32_avx2(const float* v) {
  const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 m = _mm256_and_ps(_mm256_loadu_ps(v), mask);
  for (int i = 1; i < 4; ++i) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(v + 8 * i), mask));
  alignas(32) float a[8];
  _mm256_store_ps(a, m);
  float r = 0.0f;
  for (int i = 0; i < 8; ++i) r = std::fmax(r, a[i]);
  return r;
}
#endif

bool cpu_has_avx2();

// x [T, K] -> qx int8 [T, K], sx [T, K/32]; q4 also c [T, K/64] (see the header comment).
void quantize_x(const float* x, int64_t T, int64_t K, int8_t* qx, float* sx, float* c) {
#if MER_DX86
  static const bool simd = cpu_has_avx2();
#else
  const bool simd = false;
#endif
  const int64_t nb = K / kXB;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> sums(nb);
    for (int64_t b = 0; b < nb; ++b) {
      const float* v = x + t * K + b * kXB;
      int32_t sum = 0;
#if MER_DX86
      if (simd) {
        float s = absmax32_avx2(v) / 127.0f;
        if (s > 0.0f) {
          sum = quantize_block_avx2(v, s, qx + t * K + b * kXB);
        } else {
          std::memset(qx + t * K + b * kXB, 0, kXB);
        }
        sx[t * nb + b] = s;
        sums[b] = sum;
        continue;
      }
#endif
      float m = 0.0f;
      for (int64_t k = 0; k < kXB; ++k) m = std::fmax(m, std::fabs(v[k]));
      float s = m / 127.0f;
      for (int64_t k = 0; k < kXB; ++k) {
        float q = s > 0.0f ? std::nearbyint(v[k] / s) : 0.0f;
        q = std::fmin(std::fmax(q, -127.0f), 127.0f);
        qx[t * K + b * kXB + k] = int8_t(q);
        sum += int32_t(q);
      }
      sx[t * nb + b] = s;
      sums[b] = sum;
    }
    if (c != nullptr)
      for (int64_t b = 0; b < K / kWB4; ++b) {
        const float* s = sx + t * nb + 2 * b;
        c[t * (K / kWB4) + b] = s[0] * float(sums[2 * b]) + s[1] * float(sums[2 * b + 1]);
      }
  }
}

// ---- scalar (the reference order) ------------------------------------------------------------

void q8_rows_scalar(const int8_t* w, const uint16_t* s, int64_t rows, int64_t K,
                    const int8_t* qx, const float* sx, int64_t T, float* out, int64_t os) {
  const int64_t nb = K / kXB;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < T; ++t) {
      float acc[8] = {};
      for (int64_t b = 0; b < nb; ++b)
        for (int j = 0; j < 8; ++j) {
          int32_t is = 0;
          for (int e = 0; e < 4; ++e) {
            int64_t k = b * kXB + 4 * j + e;
            is += int32_t(w[r * K + k]) * int32_t(qx[t * K + k]);
          }
          acc[j] = std::fmaf(float(is), sx[t * nb + b], acc[j]);
        }
      out[t * os + r] = tree8(acc) * bf16f(s[r]);
    }
}

void q4_rows_scalar(const uint8_t* p, const uint16_t* sz, int64_t rows, int64_t K,
                    const int8_t* qx, const float* sx, const float* c, int64_t T, float* out,
                    int64_t os) {
  const int64_t nb = K / kWB4, nbx = K / kXB;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < T; ++t) {
      float acc[8] = {}, off[8] = {};
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* v = p + r * K / 2 + b * 32;
        const int8_t* xa = qx + t * K + b * kWB4;
        float s = bf16f(sz[(r * nb + b) * 2]), z = bf16f(sz[(r * nb + b) * 2 + 1]);
        float da = s * sx[t * nbx + 2 * b], db = s * sx[t * nbx + 2 * b + 1];
        float zc = std::fmaf(-8.0f, s, z);
        int32_t ia[8], ib[8];
        for (int j = 0; j < 8; ++j) {
          ia[j] = ib[j] = 0;
          for (int e = 0; e < 4; ++e) {
            int i = 4 * j + e;
            ia[j] += int32_t(v[i] & 15) * int32_t(xa[i]);
            ib[j] += int32_t(v[i] >> 4) * int32_t(xa[32 + i]);
          }
        }
        for (int j = 0; j < 8; ++j) acc[j] = std::fmaf(float(ia[j]), da, acc[j]);
        for (int j = 0; j < 8; ++j) acc[j] = std::fmaf(float(ib[j]), db, acc[j]);
        off[b % 8] = std::fmaf(zc, c[t * nb + b], off[b % 8]);
      }
      out[t * os + r] = tree8(acc) + tree8(off);
    }
}

// ---- AVX2 ------------------------------------------------------------------------------------

#if MER_DX86
constexpr int64_t kPrefetch = 16384;  // bytes ahead in the rows' stream, into L2

using mer_dense::hsum8;

template <int R, int TT>
MER_AVX2 void q8_rows_avx2(const int8_t* w, const uint16_t* s, int64_t K, const int8_t* qx,
                           const float* sx, float* out, int64_t os) {
  const int64_t nb = K / kXB;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][TT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_setzero_ps();
  const int64_t pf = std::max<int64_t>(R * K, kPrefetch);
  for (int64_t b = 0; b < nb; ++b) {
    if ((b & 1) == 0)
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + r * K + b * kXB + pf), _MM_HINT_T1);
    __m256i xv[TT];
    __m256 sv[TT];
    for (int t = 0; t < TT; ++t) {
      xv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + t * K + b * kXB));
      sv[t] = _mm256_broadcast_ss(sx + t * nb + b);
    }
    for (int r = 0; r < R; ++r) {
      __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + b * kXB));
      __m256i aw = _mm256_abs_epi8(wv);
      for (int t = 0; t < TT; ++t) {
        __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[t], wv));
        __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
        acc[r][t] = _mm256_fmadd_ps(f, sv[t], acc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) out[t * os + r] = hsum8(acc[r][t]) * bf16f(s[r]);
}

// sxa / sxb: per token, the scales of the first and second 32-block of each 64-block ([T, K/64]
// each). Per chunk of 8 blocks the scale products s sx and fl(z - 8 s) of each row are formed 8
// at a time (the same per-element IEEE operations as the scalar code), then read back as
// broadcasts in the block loop.
template <int R, int TT>
MER_AVX2 void q4_rows_avx2(const uint8_t* p, const uint16_t* sz, int64_t K, const int8_t* qx,
                           const float* sxa, const float* sxb, const float* c, float* out,
                           int64_t os) {
  const int64_t nb = K / kWB4;
  const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(15);
  __m256 acc[R][TT];
  __m256 off[R][TT];  // lane l: the blocks b = l mod 8
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_setzero_ps(), off[r][t] = _mm256_setzero_ps();
  const int64_t pf = std::max<int64_t>(R * K / 2, kPrefetch);
  alignas(32) float da[R][TT][8], db[R][TT][8], zc[R][8];
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    const int64_t nk = std::min<int64_t>(8, nb - b0);
    for (int r = 0; r < R; ++r) {
      float* pa[TT];
      float* pb[TT];
      for (int t = 0; t < TT; ++t) pa[t] = da[r][t], pb[t] = db[r][t];
      mer_dense::chunk_scales<TT>(sz + (r * nb + b0) * 2, nk, nb, b0, sxa, sxb, zc[r], pa,
                                  pb);
    }
    for (int64_t i = 0; i < nk; ++i) {
      const int64_t b = b0 + i;
      if ((b & 1) == 0)
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(p + r * K / 2 + b * 32 + pf), _MM_HINT_T1);
      __m256i xa[TT], xb[TT];
      for (int t = 0; t < TT; ++t) {
        xa[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + t * K + b * kWB4));
        xb[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + t * K + b * kWB4 + 32));
      }
      for (int r = 0; r < R; ++r) {
        __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + r * K / 2 + b * 32));
        __m256i lo = _mm256_and_si256(v, m4);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        for (int t = 0; t < TT; ++t) {
          __m256 fa = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(lo, xa[t]), ones));
          __m256 fb = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(hi, xb[t]), ones));
          acc[r][t] = _mm256_fmadd_ps(fa, _mm256_broadcast_ss(&da[r][t][i]), acc[r][t]);
          acc[r][t] = _mm256_fmadd_ps(fb, _mm256_broadcast_ss(&db[r][t][i]), acc[r][t]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < TT; ++t)
        off[r][t] = mer_dense::zero_points(off[r][t], zc[r], c + t * nb + b0, nk);
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) out[t * os + r] = hsum8(acc[r][t]) + hsum8(off[r][t]);
}
#endif

// q4 rows -> float32 [rows, K] for the GEMM path: w = (q - 8) s + z. (q - 8) s is exact in
// float32 (a 4-bit integer times a bf16), so the fused and the unfused forms round once, alike:
// these are the bits of dense_quant.Q4Dense._decode's torch expression.
void q4_dequant_scalar(const uint8_t* p, const uint16_t* sz, int64_t rows, int64_t K, float* out) {
  const int64_t nb = K / kWB4;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* v = p + r * K / 2 + b * 32;
      const float s = bf16f(sz[(r * nb + b) * 2]), z = bf16f(sz[(r * nb + b) * 2 + 1]);
      float* o = out + r * K + b * kWB4;
      for (int i = 0; i < 32; ++i) {
        o[i] = std::fmaf(float(int(v[i] & 15) - 8), s, z);
        o[32 + i] = std::fmaf(float(int(v[i] >> 4) - 8), s, z);
      }
    }
}

#if MER_DX86
MER_AVX2 void q4_dequant_avx2(const uint8_t* p, const uint16_t* sz, int64_t rows, int64_t K,
                              float* out) {
  const int64_t nb = K / kWB4;
  const __m256i m4 = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* v = p + r * K / 2 + b * 32;
      const __m256 s = _mm256_set1_ps(bf16f(sz[(r * nb + b) * 2]));
      const __m256 z = _mm256_set1_ps(bf16f(sz[(r * nb + b) * 2 + 1]));
      float* o = out + r * K + b * kWB4;
      for (int i = 0; i < 4; ++i) {  // bytes 8i..8i+7: k = 8i.. (low), 32 + 8i.. (high)
        const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(v + 8 * i)));
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(q, m4), eight));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(q, 4), eight));
        _mm256_storeu_ps(o + 8 * i, _mm256_fmadd_ps(lo, s, z));
        _mm256_storeu_ps(o + 32 + 8 * i, _mm256_fmadd_ps(hi, s, z));
      }
    }
}
#endif

bool cpu_has_avx2() {
#if MER_DX86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// isa 0 scalar, 1 the best this CPU has, 2 AVX2 -> 0 scalar, 1 AVX2, 2 AVX-512 VNNI (q4; q8
// takes AVX2); all give the same bits.
int simd_for(int64_t isa) {
  static const bool has = cpu_has_avx2(), vnni = has && mer_dense::cpu_has_vnni();
  TORCH_CHECK(isa >= 0 && isa <= 2, "mer: dense isa must be 0 (scalar), 1 (best) or 2 (avx2)");
  if (isa == 0 || !has) return 0;
  return (isa == 1 && vnni) ? 2 : 1;
}

// Rows [r0, r1) of one matrix, all T tokens, in tiles of 4 rows x up to 4 tokens.
template <bool Q4>
void rows_range(int simd, const uint8_t* w, const uint16_t* s, int64_t r0, int64_t r1,
                int64_t K, const int8_t* qx, const float* sx, const float* sxa, const float* sxb,
                const float* c, int64_t T, float* out, int64_t N) {
  const int64_t rb = Q4 ? K / 2 : K;                   // bytes per row
  const int64_t sr = Q4 ? (K / kWB4) * 2 : 1;          // scale entries per row
  const int64_t nbx = K / kXB, nb4 = K / kWB4;
  auto scalar = [&](int64_t a, int64_t n, int64_t t0, int64_t tt) {
    if (Q4)
      q4_rows_scalar(w + a * rb, s + a * sr, n, K, qx + t0 * K, sx + t0 * nbx, c + t0 * nb4, tt,
                     out + t0 * N + a, N);
    else
      q8_rows_scalar(reinterpret_cast<const int8_t*>(w) + a * rb, s + a * sr, n, K, qx + t0 * K,
                     sx + t0 * nbx, tt, out + t0 * N + a, N);
  };
  if (!simd) return scalar(r0, r1 - r0, 0, T);
#if MER_DX86
  for (int64_t t0 = 0; t0 < T; t0 += 4) {
    const int64_t tt = std::min<int64_t>(4, T - t0);
    const int8_t* xq = qx + t0 * K;
    const float *xs = sx + t0 * nbx, *xc = Q4 ? c + t0 * nb4 : nullptr;
    const float *xa = Q4 ? sxa + t0 * nb4 : nullptr, *xb = Q4 ? sxb + t0 * nb4 : nullptr;
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
      float* o = out + t0 * N + r;
      if (Q4 && simd == 2) {
        mer_dense::q4_rows4_vnni(int(tt), w + r * rb, s + r * sr, K, xq, xa, xb, xc, o, N);
        continue;
      }
#define MER_CASE(TT)                                                                            \
  if (Q4)                                                                                       \
    q4_rows_avx2<4, TT>(w + r * rb, s + r * sr, K, xq, xa, xb, xc, o, N);                       \
  else                                                                                          \
    q8_rows_avx2<4, TT>(reinterpret_cast<const int8_t*>(w) + r * rb, s + r * sr, K, xq, xs, o, N)
      switch (tt) {
        case 1: MER_CASE(1); break;
        case 2: MER_CASE(2); break;
        case 3: MER_CASE(3); break;
        default: MER_CASE(4); break;
      }
#undef MER_CASE
    }
    for (; r < r1; ++r)
      for (int64_t t = 0; t < tt; ++t) {
        float* o = out + (t0 + t) * N + r;
        if (Q4)
          q4_rows_avx2<1, 1>(w + r * rb, s + r * sr, K, xq + t * K, xa + t * nb4,
                             xb + t * nb4, xc + t * nb4, o, N);
        else
          q8_rows_avx2<1, 1>(reinterpret_cast<const int8_t*>(w) + r * rb, s + r * sr, K,
                             xq + t * K, xs + t * nbx, o, N);
      }
  }
#endif
}

template <bool Q4>
void dense_linear(const at::Tensor& y, const at::Tensor& x, const at::Tensor& w,
                  const at::Tensor& s, int64_t isa) {
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() &&
                  y.scalar_type() == at::kFloat && y.is_contiguous() && y.dim() == 2 &&
                  y.size(0) == T && y.size(1) == N && w.is_contiguous() && w.dim() == 2 &&
                  s.scalar_type() == at::kBFloat16 && s.is_contiguous(),
              "mer: bad dense linear arguments");
  if (Q4) {
    TORCH_CHECK(w.scalar_type() == at::kByte && K % kWB4 == 0 && w.size(1) * 2 == K &&
                    s.numel() == N * (K / kWB4) * 2,
                "mer: dense q4 needs packed uint8 [N, K/2], K % 64 == 0, bf16 (s, z) [N, K/64, 2]");
  } else {
    TORCH_CHECK(w.scalar_type() == at::kChar && K % kXB == 0 && w.size(1) == K && s.numel() == N,
                "mer: dense q8 needs int8 [N, K], K % 32 == 0, bf16 scales [N]");
  }
  if (T == 0 || N == 0) return;
  const int simd = simd_for(isa);
  std::vector<int8_t> qx(T * K);
  std::vector<float> sx(T * (K / kXB)), c(Q4 ? T * (K / kWB4) : 0);
  quantize_x(static_cast<const float*>(x.data_ptr()), T, K, qx.data(), sx.data(),
             Q4 ? c.data() : nullptr);
  std::vector<float> sxa(Q4 ? T * (K / kWB4) : 0), sxb(sxa.size());  // q4: sx deinterleaved
  for (size_t i = 0; i < sxa.size(); ++i) sxa[i] = sx[2 * i], sxb[i] = sx[2 * i + 1];
  const auto* W = static_cast<const uint8_t*>(w.data_ptr());
  const auto* S = static_cast<const uint16_t*>(s.data_ptr());
  float* Y = static_cast<float*>(y.data_ptr());
  // chunks of 64 rows: whole 4-row tiles, and enough items for 2+ threads at N = 2048
  const int64_t chunks = (N + 63) / 64;
  at::parallel_for(0, chunks, 1, [&](int64_t i0, int64_t i1) {
    rows_range<Q4>(simd, W, S, i0 * 64, std::min(N, i1 * 64), K, qx.data(), sx.data(),
                   sxa.data(), sxb.data(), c.data(), T, Y, N);
  });
}

void dense_q8_linear_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& w,
                      const at::Tensor& s, int64_t isa) {
  dense_linear<false>(y, x, w, s, isa);
}

void dense_q4_linear_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& packed,
                      const at::Tensor& sz, int64_t isa) {
  dense_linear<true>(y, x, packed, sz, isa);
}

// out [R, K] float32 = the q4 rows packed [R, K/2], sz [R, K/64, 2] dequantized (isa 0 =
// scalar), in parallel over rows.
void dense_q4_dequant_(const at::Tensor& out, const at::Tensor& packed, const at::Tensor& sz,
                       int64_t isa) {
  const int64_t R = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous() &&
                  K % kWB4 == 0 && sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() &&
                  sz.numel() == R * (K / kWB4) * 2 && out.scalar_type() == at::kFloat &&
                  out.is_contiguous() && out.numel() == R * K,
              "mer: dense q4 dequantize needs packed uint8 [R, K/2], bf16 (s, z) [R, K/64, 2], "
              "float32 out [R, K]");
  const bool simd = simd_for(isa);
  const auto* P = static_cast<const uint8_t*>(packed.data_ptr());
  const auto* S = static_cast<const uint16_t*>(sz.data_ptr());
  float* O = static_cast<float*>(out.data_ptr());
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    const uint8_t* p = P + r0 * K / 2;
    const uint16_t* s = S + r0 * (K / kWB4) * 2;
#if MER_DX86
    if (simd) return q4_dequant_avx2(p, s, r1 - r0, K, O + r0 * K);
#endif
    q4_dequant_scalar(p, s, r1 - r0, K, O + r0 * K);
  });
}

// The activation quantization alone, for the tests: qx [T, K] int8, sx [T, K/32], c [T, K/64].
void dense_quantize_x_(const at::Tensor& qx, const at::Tensor& sx, const at::Tensor& c,
                       const at::Tensor& x) {
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && K % kWB4 == 0 &&
                  qx.scalar_type() == at::kChar && qx.numel() == T * K &&
                  sx.scalar_type() == at::kFloat && sx.numel() == T * (K / kXB) &&
                  c.scalar_type() == at::kFloat && c.numel() == T * (K / kWB4),
              "mer: bad dense_quantize_x arguments");
  quantize_x(static_cast<const float*>(x.data_ptr()), T, K, static_cast<int8_t*>(qx.data_ptr()),
             static_cast<float*>(sx.data_ptr()), static_cast<float*>(c.data_ptr()));
}

bool has_avx2() { return cpu_has_avx2(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(mer, m) {
  m.def("dense_q8_linear_(Tensor(a!) y, Tensor x, Tensor w, Tensor s, int isa) -> ()",
        &dense_q8_linear_);
  m.def("dense_q4_linear_(Tensor(a!) y, Tensor x, Tensor packed, Tensor sz, int isa) -> ()",
        &dense_q4_linear_);
  m.def("dense_q4_dequant_(Tensor(a!) out, Tensor packed, Tensor sz, int isa) -> ()",
        &dense_q4_dequant_);
  m.def("dense_quantize_x_(Tensor(a!) qx, Tensor(b!) sx, Tensor(c!) c, Tensor x) -> ()",
        &dense_quantize_x_);
  m.def("has_avx2() -> bool", &has_avx2);
}
