// Decode attention for one query per head over a KV cache (see kernels/attention.py).
//
// One call handles every head of one layer for one new token. Work is split over the KV heads
// (at::parallel_for); the G = H / Hk query heads that share a KV head are done together, so each
// key row and each value row is read from memory exactly once:
//   1. scores[g, s] = scale * <q_g, K[s]>        one pass over the keys
//   2. p[g, s] = exp(scores - max_g), l_g = sum_s p[g, s] (+ exp(sink_g - max_g))
//   3. out_g = sum_s p[g, s] V[s] / l_g          one pass over the values
// The cost is linear in the context; the traffic is the KV bytes of the layer (2 S Hk Dh x 2 or 4
// bytes). The cache rows are float32 or bfloat16; activations and accumulation are float32.
// Keys outside the sliding window (when window > 0) are not read.
//
// Legend: H query heads, Hk kv heads, G = H / Hk, Dh head dim, C cache capacity, S attended
// positions.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "native_common.h"  // exp_avx2, hsum8

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ATT_X86 1
#define ATT_AVX2 __attribute__((target("avx2,fma")))
#else
#define ATT_X86 0
#endif

namespace {

// A row of Dh cache values as float32 (a copy for bf16, the row itself for f32).
inline const float* row_f32(const float* r, int64_t, float*) { return r; }
inline const float* row_f32(const c10::BFloat16* r, int64_t dh, float* tmp) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(r);
  for (int64_t d = 0; d < dh; ++d) {
    uint32_t b = uint32_t(u[d]) << 16;
    std::memcpy(tmp + d, &b, 4);
  }
  return tmp;
}

#if ATT_X86
// Leaf helpers carry the target attribute; their callers do not, so the scalar path is never
// vectorised with instructions this CPU may lack. They are called once per cache row (Dh values),
// so the call costs little.
ATT_AVX2 void bf16_row_avx2(const c10::BFloat16* r, int64_t dh, float* tmp) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(r);
  int64_t d = 0;
  for (; d + 8 <= dh; d += 8) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + d)));
    _mm256_storeu_ps(tmp + d, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; d < dh; ++d) {
    uint32_t b = uint32_t(u[d]) << 16;
    std::memcpy(tmp + d, &b, 4);
  }
}

ATT_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  float s = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

ATT_AVX2 void axpy_avx2(float p, const float* x, float* y, int64_t n) {
  __m256 pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += p * x[i];
}

// ---- bf16 cache, AVX2: the whole head in registers ----------------------------------------------
// The generic head below converts each bf16 row into a buffer, reduces each dot product
// horizontally and takes std::exp per score: about 190 us per layer of 16 heads at 200
// positions, several times the KV bytes' DRAM time. Here rows are converted in registers, eight
// keys' dot products are reduced together, exp is the expert kernels' vector polynomial
// (native_common.h exp_avx2, Cephes' expf) and the values accumulate into 64 outputs held in
// registers. Other rounding order than the generic code (the tests bound both against
// float64).

ATT_AVX2 inline __m256 bf16x8(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// The sums of eight vectors, one lane each: lane j = sum of a[j]'s lanes.
ATT_AVX2 inline __m256 hsum8x8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Software prefetch: the key and value rows kAheadRows positions on (a page of 256-byte rows
// and more) are requested while the current ones are used. The hardware prefetchers stop at page
// ends, and one head's rows are only a few pages (its cache is 1 MB from the next head's).
constexpr int64_t kAheadRows = 16;
constexpr int64_t kVRows = 16;  // value rows per block in step 3: both halves read while in L1

template <typename T>  // SSE's prefetch: any x86-64, so callers of either kind inline it
inline void prefetch_rows(const T* p, int64_t count) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < count * int64_t(sizeof(T)); o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
}

// One KV head: G query heads q [G, dh] over bf16 rows [s0, s1) of k, v (dh a multiple of 64).
ATT_AVX2 void head_bf16_avx2(const float* q, const uint16_t* k, const uint16_t* v, float* out,
                             int64_t G, int64_t dh, int64_t s0, int64_t s1, float scale,
                             const float* sinks, float* sc) {
  const int64_t n = s1 - s0;
  for (int64_t g = 0; g < G; ++g) {  // 1. scores, eight keys at a time
    const float* qg = q + g * dh;
    float* r = sc + g * n;
    int64_t s = 0;
    for (; s + 8 <= n; s += 8) {
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      const uint16_t* kr = k + (s0 + s) * dh;
      if (g == 0 && s + kAheadRows < n) prefetch_rows(kr + kAheadRows * dh, 8 * dh);
      for (int64_t d = 0; d < dh; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qg + d);
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, bf16x8(kr + j * dh + d), acc[j]);
      }
      _mm256_storeu_ps(r + s, _mm256_mul_ps(hsum8x8(acc), _mm256_set1_ps(scale)));
    }
    for (; s < n; ++s) {
      __m256 acc = _mm256_setzero_ps();
      const uint16_t* kr = k + (s0 + s) * dh;
      for (int64_t d = 0; d < dh; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), bf16x8(kr + d), acc);
      r[s] = mer_native::hsum8(acc) * scale;
    }
    if (g == 0) prefetch_rows(v + s0 * dh, std::min(n, kAheadRows) * dh);  // step 3's first rows
    // 2. softmax numerators in place and their sum
    __m256 mv = _mm256_set1_ps(sinks ? sinks[g] : -std::numeric_limits<float>::infinity());
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(r + i));
    alignas(32) float mt[8];
    _mm256_store_ps(mt, mv);
    float m = mt[0];
    for (int j = 1; j < 8; ++j) m = std::max(m, mt[j]);
    for (; i < n; ++i) m = std::max(m, r[i]);
    const __m256 mm = _mm256_set1_ps(m);
    __m256 lv = _mm256_setzero_ps();
    i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 e = mer_native::exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(r + i), mm));
      _mm256_storeu_ps(r + i, e);
      lv = _mm256_add_ps(lv, e);
    }
    float l = mer_native::hsum8(lv) + (sinks ? std::exp(sinks[g] - m) : 0.f);
    for (; i < n; ++i) {
      r[i] = std::exp(r[i] - m);
      l += r[i];
    }
    // 3. weighted values: rows in blocks of kVRows, 64 outputs at a time in registers (each
    // output's sum still runs t = 0, 1, ... in order: the block only stores and reloads it)
    float* og = out + g * dh;
    std::fill(og, og + dh, 0.f);
    const uint16_t* vb = v + s0 * dh;
    for (int64_t t0 = 0; t0 < n; t0 += kVRows) {
      const int64_t t1 = std::min(n, t0 + kVRows);
      if (t1 + kAheadRows <= n) prefetch_rows(vb + (t0 + kAheadRows) * dh, (t1 - t0) * dh);
      for (int64_t d0 = 0; d0 < dh; d0 += 64) {
        __m256 o[8];
        for (int c = 0; c < 8; ++c) o[c] = _mm256_loadu_ps(og + d0 + 8 * c);
        const uint16_t* vr = vb + t0 * dh + d0;
        for (int64_t t = t0; t < t1; ++t, vr += dh) {
          const __m256 p = _mm256_set1_ps(r[t]);
          for (int c = 0; c < 8; ++c) o[c] = _mm256_fmadd_ps(p, bf16x8(vr + 8 * c), o[c]);
        }
        for (int c = 0; c < 8; ++c) _mm256_storeu_ps(og + d0 + 8 * c, o[c]);
      }
    }
    const __m256 inv = _mm256_set1_ps(1.0f / l);
    for (int64_t d = 0; d < dh; d += 8) _mm256_storeu_ps(og + d, _mm256_mul_ps(_mm256_loadu_ps(og + d), inv));
  }
}
#endif

inline float dot_scalar(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy_scalar(float p, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += p * x[i];
}

bool cpu_has_avx2() {
#if ATT_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

template <typename T, bool SIMD>
void one_head(const float* q, const T* k, const T* v, float* out, int64_t G, int64_t dh,
              int64_t s0, int64_t s1, float scale, const float* sinks) {
  const int64_t n = s1 - s0;
  std::vector<float> sc(G * n), tmp(dh);
  for (int64_t s = 0; s < n; ++s) {  // 1. scores, one pass over the keys
#if ATT_X86
    if (SIMD && s + kAheadRows < n) prefetch_rows(k + (s0 + s + kAheadRows) * dh, dh);
#endif
    const float* kr;
    if constexpr (SIMD && std::is_same<T, c10::BFloat16>::value) {
#if ATT_X86
      bf16_row_avx2(k + (s0 + s) * dh, dh, tmp.data());
      kr = tmp.data();
#endif
    } else {
      kr = row_f32(k + (s0 + s) * dh, dh, tmp.data());
    }
    for (int64_t g = 0; g < G; ++g) {
#if ATT_X86
      float d = SIMD ? dot_avx2(q + g * dh, kr, dh) : dot_scalar(q + g * dh, kr, dh);
#else
      float d = dot_scalar(q + g * dh, kr, dh);
#endif
      sc[g * n + s] = d * scale;
    }
  }
  std::vector<float> denom(G);
  for (int64_t g = 0; g < G; ++g) {  // 2. softmax numerators, per query head
    float* r = sc.data() + g * n;
    float m = sinks ? sinks[g] : -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < n; ++s) m = std::max(m, r[s]);
    float l = sinks ? std::exp(sinks[g] - m) : 0.f;
    for (int64_t s = 0; s < n; ++s) {
      r[s] = std::exp(r[s] - m);
      l += r[s];
    }
    denom[g] = l;
    std::fill(out + g * dh, out + (g + 1) * dh, 0.f);
  }
  for (int64_t s = 0; s < n; ++s) {  // 3. weighted values, one pass over the values
#if ATT_X86
    if (SIMD && s + kAheadRows < n) prefetch_rows(v + (s0 + s + kAheadRows) * dh, dh);
#endif
    const float* vr;
    if constexpr (SIMD && std::is_same<T, c10::BFloat16>::value) {
#if ATT_X86
      bf16_row_avx2(v + (s0 + s) * dh, dh, tmp.data());
      vr = tmp.data();
#endif
    } else {
      vr = row_f32(v + (s0 + s) * dh, dh, tmp.data());
    }
    for (int64_t g = 0; g < G; ++g) {
#if ATT_X86
      if (SIMD)
        axpy_avx2(sc[g * n + s], vr, out + g * dh, dh);
      else
        axpy_scalar(sc[g * n + s], vr, out + g * dh, dh);
#else
      axpy_scalar(sc[g * n + s], vr, out + g * dh, dh);
#endif
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.0f / denom[g];
    for (int64_t d = 0; d < dh; ++d) out[g * dh + d] *= inv;
  }
}

template <typename T, bool SIMD>
void run(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
         int64_t length, double scale, int64_t window, const float* sinks) {
  const int64_t H = q.size(0), dh = q.size(1), Hk = k.size(0), C = k.size(1), G = H / Hk;
  const int64_t s0 = window > 0 ? std::max<int64_t>(0, length - window) : 0;
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  at::parallel_for(0, Hk, 1, [&](int64_t h0, int64_t h1) {
#if ATT_X86
    if constexpr (SIMD && std::is_same<T, c10::BFloat16>::value) {
      if (dh % 64 == 0) {
        std::vector<float> sc(G * (length - s0));
        for (int64_t h = h0; h < h1; ++h) {
          if (h + 1 < h1)  // the next head's first keys, while this one runs
            prefetch_rows(kp + ((h + 1) * C + s0) * dh, std::min(length - s0, kAheadRows) * dh);
          head_bf16_avx2(qp + h * G * dh, reinterpret_cast<const uint16_t*>(kp + h * C * dh),
                         reinterpret_cast<const uint16_t*>(vp + h * C * dh), op + h * G * dh, G,
                         dh, s0, length, float(scale), sinks ? sinks + h * G : nullptr,
                         sc.data());
        }
        return;
      }
    }
#endif
    for (int64_t h = h0; h < h1; ++h)
      one_head<T, SIMD>(qp + h * G * dh, kp + h * C * dh, vp + h * C * dh, op + h * G * dh, G, dh,
                        s0, length, float(scale), sinks ? sinks + h * G : nullptr);
  });
}

}  // namespace

namespace mer_attn_detail {  // decode_ is also called by layer_ops.cpp's rope_attend_

// out [H, Dh] f32 = attention of q [H, Dh] f32 over rows [0, length) of k, v [Hk, C, Dh]
// (f32 or bf16, contiguous). sinks: [H] f32 logits joining each head's softmax, or empty.
// isa: 0 = scalar, 1 = AVX2+FMA when the CPU has it.
void decode_(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             int64_t length, double scale, int64_t window, const at::Tensor& sinks, int64_t isa) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "q must be a contiguous float32 [H, Dh] tensor");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == at::kFloat && out.is_contiguous(),
              "out must be a contiguous float32 tensor shaped like q");
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type() &&
                  k.is_contiguous() && v.is_contiguous(),
              "k and v must be contiguous [Hk, C, Dh] tensors of one dtype");
  TORCH_CHECK(k.size(2) == q.size(1) && q.size(0) % k.size(0) == 0,
              "head dims disagree: q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(length > 0 && length <= k.size(1), "length ", length, " outside the cache of ",
              k.size(1));
  const float* sp = nullptr;
  if (sinks.numel()) {
    TORCH_CHECK(sinks.scalar_type() == at::kFloat && sinks.is_contiguous() &&
                    sinks.numel() == q.size(0),
                "sinks must be a contiguous float32 [H] tensor");
    sp = sinks.data_ptr<float>();
  }
  const bool simd = isa != 0 && cpu_has_avx2();
  if (k.scalar_type() == at::kFloat) {
    simd ? run<float, true>(out, q, k, v, length, scale, window, sp)
         : run<float, false>(out, q, k, v, length, scale, window, sp);
  } else {
    TORCH_CHECK(k.scalar_type() == at::kBFloat16, "k and v must be float32 or bfloat16");
    simd ? run<c10::BFloat16, true>(out, q, k, v, length, scale, window, sp)
         : run<c10::BFloat16, false>(out, q, k, v, length, scale, window, sp);
  }
}

}  // namespace mer_attn_detail

TORCH_LIBRARY(mer_attn, m) {
  m.def("decode_(Tensor(a!) out, Tensor q, Tensor k, Tensor v, int length, float scale, "
        "int window, Tensor sinks, int isa) -> ()",
        &mer_attn_detail::decode_);
}
