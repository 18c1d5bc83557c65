// The q4 expert rows on int8 activations with AVX-512 VNNI (vpdpbusd) and VBMI (vpermb): the
// same definition as native_int8.cpp's scalar code (q4_block_i8_scalar), the same float32
// operations in the same order, so the same bits; only the exact int32 block sums I_j are formed
// differently.
//
// The AVX2 kernel multiplies with vpmaddubsw into int16 and needs a rearranged copy of the
// activations (Acts::v), 15 or more instructions per 64 weight bytes and token. Here, per 4 k:
// one 64-byte load holds the 16 bytes of each of k..k+3 (a 16-row half of the block); one byte
// permute turns it into 16 dwords, row i's dword = its codes at k..k+3; the low and high nibbles
// are 16 rows each, and vpdpbusd adds (codes . qx[k..k+3]) into one int32 per row, the
// activations' 4 bytes broadcast. Eight steps make a 32-block (sums at most 32 * 15 * 127), which
// is scaled in float32 exactly as the definition does.
//
// Legend: see native_common.h.

#include <cstdint>

#include "native_common.h"

namespace mer_native {

#if MER_X86
#define MER_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,fma")))

bool cpu_has_avx512_vnni() {
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("avx512vbmi");
}

namespace {

constexpr int64_t kPrefetch = 8192;  // weight bytes ahead, into L2 (native_int8.cpp's measure)

// One row block of bn = 32 H rows (H = 1: torch's "n32" packing, 16 bytes per k; H = 2: "n64",
// 32 bytes per k, bytes 0-15 rows 0-15 / 32-47, bytes 16-31 rows 16-31 / 48-63), tokens
// [t0, t0 + TT). sz: the block's (s, z) pairs (row r at sz + 2 r, kb's at + kb N 2); out: row r
// of token t at out[t os + r].
template <int H, int TT>
MER_VNNI void q4_unit_vnni(const uint8_t* p, const uint16_t* sz, int64_t N, const Acts& a,
                           int64_t t0, float* out, int64_t os) {
  constexpr int KS = 16 * H, G = 2 * H, bn = 32 * H;
  const int64_t K = a.K, b = a.b, nx = b / kXB, nsx = K / kXB, nc = K / b;
  // byte 4 i + e of half h's dword vector = the code byte i of k + e (in the 4 k's KS-byte rows)
  alignas(64) uint8_t ix[H][64];
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < 16; ++i)
      for (int e = 0; e < 4; ++e) ix[h][4 * i + e] = uint8_t(KS * e + 16 * h + i);
  __m512i idx[H];
  for (int h = 0; h < H; ++h) idx[h] = _mm512_load_si512(ix[h]);
  const __m512i m4 = _mm512_set1_epi8(15), mhi = _mm512_set1_epi32(int(0xFFFF0000u));
  // group q = 2 h + nibble: its first row
  int row[G];
  for (int h = 0; h < H; ++h) row[2 * h] = 16 * h, row[2 * h + 1] = bn / 2 + 16 * h;
  __m512 o[TT][G];
  for (int t = 0; t < TT; ++t)
    for (int q = 0; q < G; ++q) o[t][q] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < nc; ++kb) {
    const uint16_t* skb = sz + kb * N * 2;
    for (int q = 0; q < G; ++q)  // the next row block's (s, z) of this kb
      _mm_prefetch(reinterpret_cast<const char*>(skb + 2 * (bn + row[q])), _MM_HINT_T1);
    for (int64_t j = 0; j < nx; ++j) {
      __m512i acc[TT][G];
      for (int t = 0; t < TT; ++t)
        for (int q = 0; q < G; ++q) acc[t][q] = _mm512_setzero_si512();
      const int64_t k0 = kb * b + j * kXB;
      const uint8_t* pk = p + k0 * KS;
      for (int st = 0; st < kXB / 4; ++st, pk += 4 * KS) {
        __m512i w[G];
        if (H == 1) {
          _mm_prefetch(reinterpret_cast<const char*>(pk + kPrefetch), _MM_HINT_T1);
          const __m512i v = _mm512_loadu_si512(pk);
          const __m512i d = _mm512_permutexvar_epi8(idx[0], v);
          w[0] = _mm512_and_si512(d, m4);
          w[1] = _mm512_and_si512(_mm512_srli_epi16(d, 4), m4);
        } else {
          _mm_prefetch(reinterpret_cast<const char*>(pk + kPrefetch), _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(pk + 64 + kPrefetch), _MM_HINT_T1);
          const __m512i v0 = _mm512_loadu_si512(pk), v1 = _mm512_loadu_si512(pk + 64);
          for (int h = 0; h < H; ++h) {
            const __m512i d = _mm512_permutex2var_epi8(v0, idx[h], v1);
            w[2 * h] = _mm512_and_si512(d, m4);
            w[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(d, 4), m4);
          }
        }
        const int64_t k = k0 + 4 * st;
        for (int t = 0; t < TT; ++t) {
          int32_t xd;
          __builtin_memcpy(&xd, a.q + (t0 + t) * K + k, 4);
          const __m512i xv = _mm512_set1_epi32(xd);
          for (int q = 0; q < G; ++q) acc[t][q] = _mm512_dpbusd_epi32(acc[t][q], w[q], xv);
        }
      }
      for (int t = 0; t < TT; ++t) {
        const __m512 d = _mm512_set1_ps(a.s[(t0 + t) * nsx + kb * nx + j]);
        for (int q = 0; q < G; ++q) {
          const __m512i e = _mm512_loadu_si512(skb + 2 * row[q]);
          const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(e, 16));
          o[t][q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][q]), _mm512_mul_ps(s, d), o[t][q]);
        }
      }
    }
    for (int q = 0; q < G; ++q) {
      const __m512i e = _mm512_loadu_si512(skb + 2 * row[q]);
      const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(e, 16));
      const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(e, mhi));
      const __m512 zc = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s, z);
      for (int t = 0; t < TT; ++t)
        o[t][q] = _mm512_fmadd_ps(zc, _mm512_set1_ps(a.c[(t0 + t) * nc + kb]), o[t][q]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int q = 0; q < G; ++q) _mm512_storeu_ps(out + t * os + row[q], o[t][q]);
}

}  // namespace

void q4_block_vnni(const uint8_t* mat, const uint16_t* sz, int64_t N, int64_t r0, int64_t bn,
                   const Acts& a, float* out, int64_t os) {
  const uint8_t* blk = mat + r0 * a.K / 2;
  const uint16_t* s = sz + r0 * 2;
  for (int64_t t0 = 0; t0 < a.T; t0 += 2) {
    float* o = out + t0 * os;
    const bool one = a.T - t0 == 1;
    if (bn == 32) {
      if (one) q4_unit_vnni<1, 1>(blk, s, N, a, t0, o, os);
      else q4_unit_vnni<1, 2>(blk, s, N, a, t0, o, os);
    } else {
      if (one) q4_unit_vnni<2, 1>(blk, s, N, a, t0, o, os);
      else q4_unit_vnni<2, 2>(blk, s, N, a, t0, o, os);
    }
  }
}

#else

bool cpu_has_avx512_vnni() { return false; }

void q4_block_vnni(const uint8_t*, const uint16_t*, int64_t, int64_t, int64_t, const Acts&,
                   float*, int64_t) {}

#endif

}  // namespace mer_native
