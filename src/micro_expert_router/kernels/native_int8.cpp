// Expert rows on int8 activations (declared in native_common.h; reference.py's
// `quantize_acts` / `linear_int8_ref` is the NumPy specification, docs/quantization.md the
// measurements). Decode reads every weight once per token, so the kernels must run at memory
// speed; converting each weight to float and multiplying it in float32 (native_q4.cpp) is
// compute-bound on AVX2. Here each token's activations are quantized once to int8 and the weight
// codes are multiplied with them in exact integer arithmetic (vpmaddubsw: unsigned q4 codes or
// |q8| times signed activations); only the per-block scaling and the final sums are float32.
//
// Activations, per token, in blocks of 32 along K: sx = max|x| / 127, qx = rint(x / sx) (0 when
// sx = 0; sx = NaN when the block holds a NaN or an infinity, so the output is NaN, as in the
// float path). q4 also needs, per weight block kb of b = 32 or 64, c = the sum over its 32-blocks
// j of fl(sx_j * sum qx_j), in order.
//
//   q4 (row r, torch's int4 packing; w = (q - 8) s + z = q s + zc, zc = fl(z - 8 s)):
//     o = 0; per kb: per 32-block j of kb: o = fma(I_j, fl(s sx_j), o);  o = fma(zc, c_kb, o)
//     with I_j = sum over the block of q qx (exact int32)
//   q8 (row r, int8 row-major, bf16 scale s):
//     acc_l (l = 0..7) = fma(I_jl, sx_j, acc_l) over blocks j in order, I_jl = sum of w qx over
//     bytes 4l..4l+3 of block j; y = tree8(acc) * s   (the lanes of vpmaddwd; native_dense.cpp's
//     q8 rule)
// The scalar code is the definition; the AVX2 kernels perform the same float32 operations in
// the same order (the integer sums are exact in any order), so they give identical bits.
//
// Legend: see native_common.h.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "native_common.h"

namespace mer_native {
namespace {

constexpr int64_t kAlign = 32;

inline int64_t up(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

inline float tree8(const float* a) {
  float s4[4];
  for (int i = 0; i < 4; ++i) s4[i] = a[i] + a[i + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// ---- scalar (the definition) ------------------------------------------------------------------

// q4 rows [r0, r0 + rows) in any of torch's int4 packings (see native_q4.cpp's scalar code).
void q4_block_i8_scalar(const uint8_t* mat, const uint16_t* sz, int64_t N, int64_t r0,
                        int64_t rows, int64_t bn, bool split, const Acts& a, float* out,
                        int64_t os) {
  const int64_t K = a.K, b = a.b, nx = b / kXB, nsx = K / kXB, nc = K / b;
  const uint8_t* blk = mat + r0 * K / 2;
  const bool full_split = split && rows == bn;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t byte = full_split ? r % (bn / 2) : r / 2;
    const int shift = (full_split ? r >= bn / 2 : r % 2) ? 4 : 0;
    for (int64_t t = 0; t < a.T; ++t) {
      float o = 0.0f;
      for (int64_t kb = 0; kb < nc; ++kb) {
        const uint16_t* p = sz + (kb * N + r0 + r) * 2;
        const float s = bf16_bits(p[0]), z = bf16_bits(p[1]);
        const float zc = std::fmaf(-8.0f, s, z);
        for (int64_t j = 0; j < nx; ++j) {
          int32_t I = 0;
          for (int64_t k = kb * b + j * kXB; k < kb * b + (j + 1) * kXB; ++k)
            I += int32_t((blk[k * (rows / 2) + byte] >> shift) & 15) * int32_t(a.q[t * K + k]);
          o = std::fmaf(float(I), s * a.s[t * nsx + kb * nx + j], o);
        }
        o = std::fmaf(zc, a.c[t * nc + kb], o);
      }
      out[t * os + r] = o;
    }
  }
}

void q8_rows_i8_scalar(const int8_t* w, const uint16_t* s, int64_t rows, const Acts& a,
                       float* out, int64_t os) {
  const int64_t K = a.K, nb = K / kXB;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < a.T; ++t) {
      float acc[8] = {};
      for (int64_t j = 0; j < nb; ++j)
        for (int l = 0; l < 8; ++l) {
          int32_t I = 0;
          for (int e = 0; e < 4; ++e) {
            const int64_t k = j * kXB + 4 * l + e;
            I += int32_t(w[r * K + k]) * int32_t(a.q[t * K + k]);
          }
          acc[l] = std::fmaf(float(I), a.s[t * nb + j], acc[l]);
        }
      out[t * os + r] = tree8(acc) * bf16_bits(s[r]);
    }
}

// ---- AVX2 -------------------------------------------------------------------------------------

#if MER_X86
constexpr int64_t kPrefetch8 = 16384;  // q8: bytes ahead in the rows' stream, into L2
// q4: weights prefetched kPrefetch4 bytes ahead into L2 (one line per step), and each kb's
// (s, z) lines of the next row block. Measured on this AVX2 machine (1 thread, loaded, CPU
// time, 8 olmoe-like experts from DRAM, bench/expert_kernels.py): none 0.45 of torch.sum's
// bandwidth, weights only ~0.5, both ~0.6-0.7 (the (s, z) lines, 1 KB apart, were demand
// misses at every block).
constexpr int64_t kPrefetch4 = 8192;

// 32 rows of an int4 row block, tokens [t0, t0 + TT): 16 bytes per k at a stride of KS bytes
// (16: a whole "n32" block; 32: one half of an "n64" block), whose low nibbles are 16 rows with
// (s, z) at szl and outputs at outl, and high nibbles 16 rows at szh / outh.
//
// Four k at a time: v0 = bytes of (k | k+1) (one per 128-bit lane), v1 = (k+2 | k+3);
// unpacking their bytes pairs row r's codes at k and k+2 (lane 0) and at k+1 and k+3 (lane 1),
// which vpmaddubsw multiplies with the activations arranged the same way (Acts::v) and sums into
// one int16 per row and lane. Eight steps (one 32-block) stay below 2^15 (16 products of at most
// 15 * 127); then the two lanes are widened, added and scaled.
template <int KS, int TT>
MER_AVX2 void q4_unit_i8_avx2(const uint8_t* p, const uint16_t* szl, const uint16_t* szh,
                              int64_t N, const Acts& a, int64_t t0, float* outl, float* outh,
                              int64_t os) {
  const int64_t K = a.K, b = a.b, nx = b / kXB, nsx = K / kXB, nc = K / b;
  const __m256i m4 = _mm256_set1_epi8(15), mhi = _mm256_set1_epi32(int(0xFFFF0000u));
  __m256 o[TT][4];  // rows: low nibbles 0-7, 8-15; high nibbles 0-7, 8-15
  for (int t = 0; t < TT; ++t)
    for (int i = 0; i < 4; ++i) o[t][i] = _mm256_setzero_ps();
  for (int64_t kb = 0; kb < nc; ++kb) {
    const uint16_t* sp[4] = {szl + kb * N * 2, szl + kb * N * 2 + 16, szh + kb * N * 2,
                             szh + kb * N * 2 + 16};  // 8 dwords (s | z << 16) each
    // the next row block's (s, z) of this kb (2 KS rows on): one line for low, one for high rows
    _mm_prefetch(reinterpret_cast<const char*>(sp[0] + 4 * KS), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(sp[2] + 4 * KS), _MM_HINT_T1);
    for (int64_t j = 0; j < nx; ++j) {
      __m256i acc[TT][4];
      for (int t = 0; t < TT; ++t)
        for (int i = 0; i < 4; ++i) acc[t][i] = _mm256_setzero_si256();
      const int64_t k0 = kb * b + j * kXB;
      const uint8_t* pk = p + k0 * KS;
      const int8_t* xk = a.v + (t0 * (K >> 2) + (k0 >> 2)) * 32;
      // Not unrolled: GCC unrolls the eight steps, sums the 32 products as a tree and spills
      // them to the stack, which made the kernel slower from DRAM (docs/quantization.md).
#pragma GCC unroll 1
      for (int st = 0; st < kXB / 4; ++st, pk += 4 * KS, xk += 32) {
        _mm_prefetch(reinterpret_cast<const char*>(pk + kPrefetch4), _MM_HINT_T1);
        if (KS == 32) _mm_prefetch(reinterpret_cast<const char*>(pk + 64 + kPrefetch4), _MM_HINT_T1);
        __m256i v0, v1;
        if (KS == 16) {
          v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pk));
          v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pk + 32));
        } else {
          const __m128i* q = reinterpret_cast<const __m128i*>(pk);
          v0 = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(q)),
                                       _mm_loadu_si128(q + KS / 16), 1);
          v1 = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(q + KS / 8)),
                                       _mm_loadu_si128(q + 3 * KS / 16), 1);
        }
        const __m256i u0 = _mm256_unpacklo_epi8(v0, v1), u1 = _mm256_unpackhi_epi8(v0, v1);
        const __m256i w[4] = {_mm256_and_si256(u0, m4), _mm256_and_si256(u1, m4),
                              _mm256_and_si256(_mm256_srli_epi16(u0, 4), m4),
                              _mm256_and_si256(_mm256_srli_epi16(u1, 4), m4)};
        for (int t = 0; t < TT; ++t) {
          const __m256i xv =
              _mm256_load_si256(reinterpret_cast<const __m256i*>(xk + t * (K >> 2) * 32));
          for (int i = 0; i < 4; ++i)
            acc[t][i] = _mm256_add_epi16(acc[t][i], _mm256_maddubs_epi16(w[i], xv));
        }
      }
      for (int t = 0; t < TT; ++t) {
        const __m256 d = _mm256_broadcast_ss(a.s + (t0 + t) * nsx + kb * nx + j);
        for (int i = 0; i < 4; ++i) {
          const __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc[t][i]));
          const __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc[t][i], 1));
          const __m256 f = _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi));
          const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp[i]));
          const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(e, 16));
          o[t][i] = _mm256_fmadd_ps(f, _mm256_mul_ps(s, d), o[t][i]);
        }
      }
    }
    for (int i = 0; i < 4; ++i) {
      const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp[i]));
      const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(e, 16));
      const __m256 z = _mm256_castsi256_ps(_mm256_and_si256(e, mhi));
      const __m256 zc = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, z);
      for (int t = 0; t < TT; ++t)
        o[t][i] = _mm256_fmadd_ps(zc, _mm256_broadcast_ss(a.c + (t0 + t) * nc + kb), o[t][i]);
    }
  }
  for (int t = 0; t < TT; ++t) {
    _mm256_storeu_ps(outl + t * os, o[t][0]);
    _mm256_storeu_ps(outl + t * os + 8, o[t][1]);
    _mm256_storeu_ps(outh + t * os, o[t][2]);
    _mm256_storeu_ps(outh + t * os + 8, o[t][3]);
  }
}

// R int8 rows, tokens [t0, t0 + TT): |w| (unsigned) times sign(w) qx (signed) with vpmaddubsw
// (pairs at most 2 * 127^2 < 2^15), then vpmaddwd into the 8 int32 lanes of the definition.
template <int R, int TT>
MER_AVX2 void q8_rows_i8_avx2(const int8_t* w, const uint16_t* s, const Acts& a, int64_t t0,
                              float* out, int64_t os) {
  const int64_t K = a.K, nb = K / kXB;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][TT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_setzero_ps();
  const int64_t pf = std::max<int64_t>(R * K, kPrefetch8);
  for (int64_t j = 0; j < nb; ++j) {
    if ((j & 1) == 0)  // the rows are one contiguous stream
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + r * K + j * kXB + pf), _MM_HINT_T1);
    __m256i xv[TT];
    __m256 sv[TT];
    for (int t = 0; t < TT; ++t) {
      xv[t] = _mm256_load_si256(reinterpret_cast<const __m256i*>(a.q + (t0 + t) * K + j * kXB));
      sv[t] = _mm256_broadcast_ss(a.s + (t0 + t) * nb + j);
    }
    for (int r = 0; r < R; ++r) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + j * kXB));
      const __m256i aw = _mm256_abs_epi8(wv);
      for (int t = 0; t < TT; ++t) {
        const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[t], wv));
        const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
        acc[r][t] = _mm256_fmadd_ps(f, sv[t], acc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) out[t * os + r] = hsum8(acc[r][t]) * bf16_bits(s[r]);
}
#endif

}  // namespace

// ---- activations -----------------------------------------------------------------------------

int64_t acts_nbytes(int64_t T, int64_t K, int64_t b, int simd) {
  int64_t n = up(T * K) + up(T * (K / kXB) * 4);
  if (b > 0) n += up(T * (K / b) * 4) + (simd == 1 ? T * (K / 4) * 32 : 0);
  return n;
}

#if MER_X86
// One 32-block of quantize_acts with AVX2, the same arithmetic lane by lane: max |v| (its order
// does not matter), s = m / 127 (or NaN when a value is not finite), v / s rounded to even by
// the same 1.5 * 2^23 add and subtract, clamped to [-127, 127]; s <= 0 or NaN gives zeros.
MER_AVX2 float quantize32_avx2(const float* v, int8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(3.40282347e38f);
  __m256 x[4], m = _mm256_setzero_ps(), fin = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int i = 0; i < 4; ++i) {
    x[i] = _mm256_loadu_ps(v + 8 * i);
    const __m256 a = _mm256_andnot_ps(sign, x[i]);
    fin = _mm256_and_ps(fin, _mm256_cmp_ps(a, big, _CMP_LE_OQ));  // false for NaN, infinities
    m = _mm256_max_ps(m, a);
  }
  alignas(32) float mt[8];
  _mm256_store_ps(mt, m);
  float mx = mt[0];
  for (int j = 1; j < 8; ++j) mx = mt[j] > mx ? mt[j] : mx;
  const float s = _mm256_movemask_ps(fin) == 0xFF ? mx / 127.0f : NAN;
  if (!(s > 0.0f)) {
    std::memset(q, 0, kXB);
    return s;
  }
  const __m256 sv = _mm256_set1_ps(s), rc = _mm256_set1_ps(12582912.0f);
  const __m256 hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
  __m256i r[4];
  for (int i = 0; i < 4; ++i) {
    __m256 f = _mm256_sub_ps(_mm256_add_ps(_mm256_div_ps(x[i], sv), rc), rc);
    f = _mm256_max_ps(_mm256_min_ps(f, hi), lo);
    r[i] = _mm256_cvtps_epi32(f);  // integral already: any rounding mode gives it
  }
  const __m256i w01 = _mm256_packs_epi32(r[0], r[1]), w23 = _mm256_packs_epi32(r[2], r[3]);
  const __m256i b = _mm256_packs_epi16(w01, w23);  // lanes interleaved by the packs: undo
  const __m256i o = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), o);
  return s;
}

// quantize_acts' layout for the AVX2 q4 kernel: each 4 codes (q0..q3) become 32 bytes, lane 0
// (q0, q2) x 8 and lane 1 (q1, q3) x 8; n4 groups of 4 (rows of K are whole groups).
MER_AVX2 void spread4_avx2(const int8_t* q, int8_t* d, int64_t n4) {
  const __m256i pat = _mm256_setr_epi8(0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2,
                                       1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3);
  for (int64_t i = 0; i < n4; ++i) {
    int32_t w;
    std::memcpy(&w, q + 4 * i, 4);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 32 * i),
                        _mm256_shuffle_epi8(_mm256_set1_epi32(w), pat));
  }
}
#endif

Acts quantize_acts(const float* x, int64_t xst, int64_t T, int64_t K, int64_t b, int simd,
                   uint8_t* mem) {
  Acts a;
  a.T = T, a.K = K, a.b = b;
  a.q = reinterpret_cast<int8_t*>(mem);
  a.s = reinterpret_cast<float*>(mem + up(T * K));
  uint8_t* next = mem + up(T * K) + up(T * (K / kXB) * 4);
  const int64_t nb = K / kXB;
#if MER_X86
  static const bool avx2 = cpu_has_avx2_fma();
#else
  constexpr bool avx2 = false;
#endif
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < nb; ++j) {
      const float* v = x + t * xst + j * kXB;
      int8_t* q = a.q + t * K + j * kXB;
#if MER_X86
      if (avx2) {
        a.s[t * nb + j] = quantize32_avx2(v, q);
        continue;
      }
#endif
      float m = 0.0f;
      bool finite = true;
      for (int64_t k = 0; k < kXB; ++k) {
        const float f = std::fabs(v[k]);
        finite = finite && f <= 3.40282347e38f;  // false for NaN and infinities
        m = f > m ? f : m;
      }
      const float s = finite ? m / 127.0f : NAN;
      for (int64_t k = 0; k < kXB; ++k) {  // |v / s| <= 127, or a little more if s is subnormal
        float r = s > 0.0f ? round_even(v[k] / s) : 0.0f;  // NaN s: 0
        r = r < 127.0f ? r : 127.0f;
        q[k] = int8_t(r > -127.0f ? r : -127.0f);
      }
      a.s[t * nb + j] = s;
    }
  if (b > 0) {
    a.c = reinterpret_cast<float*>(next);
    next += up(T * (K / b) * 4);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t kb = 0; kb < K / b; ++kb) {
        float c = 0.0f;
        for (int64_t j = kb * (b / kXB); j < (kb + 1) * (b / kXB); ++j) {
          int32_t sum = 0;
          for (int64_t k = 0; k < kXB; ++k) sum += a.q[t * K + j * kXB + k];
          const float p = a.s[t * nb + j] * float(sum);
          c = j == kb * (b / kXB) ? p : c + p;
        }
        a.c[t * (K / b) + kb] = c;
      }
    if (simd == 1) {  // per 4 k: lane 0 = (qx_k, qx_k+2) x 8, lane 1 = (qx_k+1, qx_k+3) x 8
      a.v = reinterpret_cast<int8_t*>(next);
#if MER_X86
      if (avx2) {
        spread4_avx2(a.q, a.v, T * K / 4);
        return a;
      }
#endif
      for (int64_t t = 0; t < T; ++t)
        for (int64_t k = 0; k < K; k += 4) {
          int8_t* d = a.v + (t * (K / 4) + k / 4) * 32;
          const int8_t* q = a.q + t * K + k;
          for (int i = 0; i < 8; ++i) {
            d[2 * i] = q[0], d[2 * i + 1] = q[2];
            d[16 + 2 * i] = q[1], d[16 + 2 * i + 1] = q[3];
          }
        }
    }
  }
  return a;
}

// ---- dispatch ---------------------------------------------------------------------------------

void q4_block_i8(int simd, const uint8_t* mat, const uint16_t* sz, int64_t N, int64_t r0,
                 int64_t rows, int64_t bn, bool split, const Acts& a, float* out, int64_t os) {
#if MER_X86
  if (simd == 2 && split && rows == bn && (bn == 32 || bn == 64))
    return q4_block_vnni(mat, sz, N, r0, bn, a, out, os);
  if (simd && a.v != nullptr && split && rows == bn && (bn == 32 || bn == 64)) {
    const uint8_t* blk = mat + r0 * a.K / 2;
    const uint16_t* s = sz + r0 * 2;
    for (int64_t t0 = 0; t0 < a.T; t0 += 2) {
      float* o = out + t0 * os;
      const bool one = a.T - t0 == 1;
      if (bn == 32) {
        if (one)
          q4_unit_i8_avx2<16, 1>(blk, s, s + 32, N, a, t0, o, o + 16, os);
        else
          q4_unit_i8_avx2<16, 2>(blk, s, s + 32, N, a, t0, o, o + 16, os);
      } else {  // two halves: bytes 0-15 (rows 0-15, 32-47), bytes 16-31 (rows 16-31, 48-63)
        for (int h = 0; h < 2; ++h) {
          const uint16_t *sl = s + 32 * h, *sh = s + 64 + 32 * h;
          if (one)
            q4_unit_i8_avx2<32, 1>(blk + 16 * h, sl, sh, N, a, t0, o + 16 * h, o + 32 + 16 * h,
                                   os);
          else
            q4_unit_i8_avx2<32, 2>(blk + 16 * h, sl, sh, N, a, t0, o + 16 * h, o + 32 + 16 * h,
                                   os);
        }
      }
    }
    return;
  }
#endif
  q4_block_i8_scalar(mat, sz, N, r0, rows, bn, split, a, out, os);
}

void q8_rows_i8(int simd, const int8_t* w, const uint16_t* s, int64_t rows, const Acts& a,
                float* out, int64_t os) {
#if MER_X86
  if (simd) {
    const int64_t K = a.K;
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4)
      for (int64_t t0 = 0; t0 < a.T; t0 += 4) {
        const int8_t* wr = w + r * K;
        float* o = out + t0 * os + r;
        switch (std::min<int64_t>(4, a.T - t0)) {
          case 1: q8_rows_i8_avx2<4, 1>(wr, s + r, a, t0, o, os); break;
          case 2: q8_rows_i8_avx2<4, 2>(wr, s + r, a, t0, o, os); break;
          case 3: q8_rows_i8_avx2<4, 3>(wr, s + r, a, t0, o, os); break;
          default: q8_rows_i8_avx2<4, 4>(wr, s + r, a, t0, o, os); break;
        }
      }
    for (; r < rows; ++r)
      for (int64_t t = 0; t < a.T; ++t)
        q8_rows_i8_avx2<1, 1>(w + r * K, s + r, a, t, out + t * os + r, os);
    return;
  }
#endif
  q8_rows_i8_scalar(w, s, rows, a, out, os);
}

}  // namespace mer_native
