// Shared declarations of the mxfp4 kernel (kernels/mxfp4.py builds mxfp4.cpp and mxfp4_i8.cpp
// into one library):
//
//   mxfp4.cpp      the ops (swiglu_, swiglu_many_, linear_)
//   mxfp4_f32.cpp  the float32-activation dots: scalar, AVX2, AVX-512
//   mxfp4_i8.cpp   the int8-activation dots: activation rounding, scalar, AVX2, AVX-512 VNNI
//
// Every SIMD function carries its own target attribute and is chosen at run time (a function
// compiled for AVX-512 never runs on a CPU without it); the scalar code defines the bits.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MX_X86 1
#define MX_AVX2 __attribute__((target("avx2,fma")))
#define MX_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vnni,avx2,fma")))
#else
#define MX_X86 0
#endif

namespace mer_mxfp4 {

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
inline const HalfScales kHalf;
inline float half_scale(uint8_t e) { return kHalf.v[e]; }

inline float tree8(const float* a) {
  float s4[4];
  for (int i = 0; i < 4; ++i) s4[i] = a[i] + a[i + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// Two 8-lane accumulators, lane by lane, then the sum tree.
inline float finish(const float* a0, const float* a1) {
  float a[8];
  for (int l = 0; l < 8; ++l) a[l] = a0[l] + a1[l];
  return tree8(a);
}

// CPU features (mxfp4.cpp): AVX2 + FMA; AVX-512 F/BW/VL/DQ + VBMI + VNNI.
bool cpu_has_avx2();
bool cpu_has_avx512();

// One activation vector of length K in the form a mode's dots read.
struct Act {
  std::vector<float> xp;   // f32 modes: x per block, [evens | odds] (mxfp4_f32.cpp)
  std::vector<int8_t> q;   // int8 modes: codes in the quad layout [quads, 128] (mxfp4_i8.cpp)
  std::vector<float> s;    // int8 modes: per-block scales (0 past the last block, 16-padded)
  std::vector<int32_t> c;  // int8 modes: per quad, lane 4h + m: -12 x the codes' sum over
                           // elements 8m..8m+7 of block 4Q + h (the SIMD dots' offset)

  void prepare(const float* x, int64_t K, bool i8, bool simd);  // mxfp4_f32.cpp
  void prepare_i8(const float* x, int64_t K, bool simd);  // mxfp4_i8.cpp
};

// float32 dots of `rows` consecutive MXFP4 rows (nb blocks each: codes q [rows, nb, 16],
// exponents e [rows, nb]) with an Act's xp into out [rows] (mxfp4_f32.cpp; the same bits).
using RowsF32 = void (*)(const uint8_t* q, const uint8_t* e, int64_t rows, int64_t nb,
                         const float* xp, float* out);
void rows_f32_scalar(const uint8_t* q, const uint8_t* e, int64_t rows, int64_t nb,
                     const float* xp, float* out);
void rows_f32_avx2(const uint8_t* q, const uint8_t* e, int64_t rows, int64_t nb, const float* xp,
                   float* out);
void rows_f32_avx512(const uint8_t* q, const uint8_t* e, int64_t rows, int64_t nb,
                     const float* xp, float* out);

// int8 dots of `rows` consecutive MXFP4 rows (nb blocks each: codes q [rows, nb, 16], exponents
// e [rows, nb]) with an Act's q, s, c into out [rows] (mxfp4_i8.cpp); all three give the same
// bits.
using RowsI8 = void (*)(const uint8_t* q, const uint8_t* e, int64_t rows, int64_t nb,
                        const int8_t* xq, const float* xs, const int32_t* nc, float* out);
void rows_i8_scalar(const uint8_t* q, const uint8_t* e, int64_t rows, int64_t nb,
                    const int8_t* xq, const float* xs, const int32_t* nc, float* out);
void rows_i8_avx2(const uint8_t* q, const uint8_t* e, int64_t rows, int64_t nb, const int8_t* xq,
                  const float* xs, const int32_t* nc, float* out);
void rows_i8_avx512(const uint8_t* q, const uint8_t* e, int64_t rows, int64_t nb,
                    const int8_t* xq, const float* xs, const int32_t* nc, float* out);

}  // namespace mer_mxfp4
