// q4 expert weights -> the transposed float32 matrix, for the prefill path's GEMM
// (kernels/quant.py, Q4.partials). A prompt chunk gives an expert many tokens; then one
// float32 GEMM (oneDNN: about 16 multiply-adds per cycle) beats the int8 decode kernel, once the
// weights are decoded in one pass. Decoding them with torch ops (and, shift, convert, multiply,
// add: five passes) cost about as much as the GEMM itself.
//
//   in:  packed [N, K/2] in torch's int4 row blocks ([N/bn, K, bn/2] bytes; "split": byte j
//        holds rows j (low nibble) and j + bn/2 (high), else rows 2j and 2j + 1), and
//        (s, z) bf16 [K/b, N, 2]
//   out: wt [K, N] float32, wt[k, n] = fl(q s + fl(z - 8 s)) = W[n, k]; or bf16, that value
//        rounded to nearest even (torch's float -> bf16 conversion), for the bf16 GEMM of
//        AVX512_BF16 CPUs (one pass instead of the torch ops' six)
// q s is exact in float32 (a 4-bit integer times a bf16), so the fused multiply-add of the AVX2
// code and the multiply-then-add of the scalar code (and of quant._dequant4_t) round alike.
//
// Legend: N rows, K reduction length, b q4 block along K, bn rows per int4 row block.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>

#include "native_common.h"

namespace mer_native {
namespace {

// per row of a row block and its K/b blocks: s and fl(z - 8 s), as the scalar code forms them
inline void block_scales(const uint16_t* sz, int64_t N, int64_t n0, int64_t bn, int64_t kb,
                         float* s, float* zc) {
  const uint16_t* e = sz + (kb * N + n0) * 2;
  for (int64_t r = 0; r < bn; ++r) {
    s[r] = bf16_bits(e[2 * r]);
    zc[r] = bf16_bits(e[2 * r + 1]) - 8.0f * s[r];
  }
}

inline void put(float* o, float v) { *o = v; }
inline void put(c10::BFloat16* o, float v) { *o = c10::BFloat16(v); }  // round to nearest even

template <typename O>
void dequant_scalar(const uint8_t* p, const uint16_t* sz, int64_t N, int64_t K, int64_t b,
                    int64_t bn, bool split, int64_t i0, int64_t i1, O* wt) {
  const int64_t h = bn / 2;
  alignas(32) float s[64], zc[64];
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t k = 0; k < K; ++k) {
      if (k % b == 0) block_scales(sz, N, i * bn, bn, k / b, s, zc);
      const uint8_t* v = p + (i * K + k) * h;
      O* o = wt + k * N + i * bn;
      for (int64_t j = 0; j < h; ++j) {
        const int64_t rl = split ? j : 2 * j, rh = split ? j + h : 2 * j + 1;
        put(o + rl, float(v[j] & 15) * s[rl] + zc[rl]);
        put(o + rh, float(v[j] >> 4) * s[rh] + zc[rh]);
      }
    }
}

#if MER_X86
MER_AVX2 inline void put8(float* o, __m256 v) { _mm256_storeu_ps(o, v); }
// 8 floats -> bf16, rounded to nearest even (NaN -> 0x7FC0), as c10::BFloat16(float)
MER_AVX2 inline void put8(c10::BFloat16* o, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(o), packed);
}

// split layouts only: 16 bytes at a time give 16 rows (low nibbles) and the 16 rows h on (high)
template <typename O>
MER_AVX2 void dequant_avx2(const uint8_t* p, const uint16_t* sz, int64_t N, int64_t K,
                           int64_t b, int64_t bn, int64_t i0, int64_t i1, O* wt) {
  const int64_t h = bn / 2;
  const __m128i m4 = _mm_set1_epi8(15);
  alignas(32) float s[64], zc[64];
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t k = 0; k < K; ++k) {
      if (k % b == 0) block_scales(sz, N, i * bn, bn, k / b, s, zc);
      const uint8_t* v = p + (i * K + k) * h;
      O* o = wt + k * N + i * bn;
      for (int64_t c = 0; c < h; c += 16) {
        const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + c));
        const __m128i nib[2] = {_mm_and_si128(x, m4), _mm_and_si128(_mm_srli_epi16(x, 4), m4)};
        for (int hi = 0; hi < 2; ++hi)
          for (int e = 0; e < 2; ++e) {
            const int64_t r = hi * h + c + 8 * e;  // rows r .. r + 7
            const __m128i q8 = e ? _mm_srli_si128(nib[hi], 8) : nib[hi];
            const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q8));
            put8(o + r, _mm256_fmadd_ps(q, _mm256_load_ps(s + r), _mm256_load_ps(zc + r)));
          }
      }
    }
}
#endif

bool avx2_fma() {
#if MER_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

void q4_dequant_t_(const at::Tensor& wt, const at::Tensor& packed, const at::Tensor& sz,
                   int64_t block, int64_t block_n, bool split, int64_t isa) {
  const int64_t N = packed.size(0), K = packed.size(1) * 2, bn = block_n;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous() &&
                  (bn == 32 || bn == 64) && N % bn == 0 && block > 0 && K % block == 0 &&
                  sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() &&
                  sz.numel() == (K / block) * N * 2 &&
                  (wt.scalar_type() == at::kFloat || wt.scalar_type() == at::kBFloat16) &&
                  wt.is_contiguous() && wt.dim() == 2 && wt.size(0) == K && wt.size(1) == N,
              "mer: q4_dequant_t_ needs packed uint8 [N, K/2] (N a multiple of the row block "
              "32 or 64), bf16 (s, z) [K/b, N, 2] and float32 or bf16 wt [K, N]");
  TORCH_CHECK(isa == 0 || isa == 1, "mer: isa must be 0 (scalar) or 1 (best)");
  static const bool has = avx2_fma();
  const bool simd = isa == 1 && has && split;
  const auto* P = static_cast<const uint8_t*>(packed.data_ptr());
  const auto* S = static_cast<const uint16_t*>(sz.data_ptr());
  auto run = [&](auto* W) {
    at::parallel_for(0, N / bn, 1, [&](int64_t i0, int64_t i1) {
#if MER_X86
      if (simd) return dequant_avx2(P, S, N, K, block, bn, i0, i1, W);
#endif
      dequant_scalar(P, S, N, K, block, bn, split, i0, i1, W);
    });
  };
  if (wt.scalar_type() == at::kBFloat16)
    run(static_cast<c10::BFloat16*>(wt.data_ptr()));
  else
    run(static_cast<float*>(wt.data_ptr()));
}

}  // namespace
}  // namespace mer_native

TORCH_LIBRARY_FRAGMENT(mer, m) {
  m.def("q4_dequant_t_(Tensor(a!) wt, Tensor packed, Tensor sz, int block, int block_n, "
        "bool split, int isa) -> ()",
        &mer_native::q4_dequant_t_);
}
