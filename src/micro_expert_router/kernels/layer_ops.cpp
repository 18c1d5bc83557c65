// Small per-layer ops of a decode step, fused so that one token does not pay a dozen torch
// dispatches for a few thousand floats of arithmetic (see kernels/layer_ops.py).
//
//   rms_norm_      out[r] = w * (x[r] * (1 / sqrt(mean(x[r]^2) + eps)))       [R, D] rows
//   rope_attend_   rotate q and k (rotate-half RoPE at one position), append k and v to the
//                  layer's cache, then decode attention over the cache (attention.cpp's kernel)
//   router_topk_   the softmax-then-top-k router of OLMoE / Qwen-MoE / Mixtral for T tokens:
//                  logits x w^T, softmax over the E experts, the K largest (ties: the lower
//                  id first), optionally renormalized over the K
//
// The RoPE arithmetic is the same sequence of float32 roundings as the torch expression
// q * cos + rotate_half(q) * sin (two products, one sum; the build turns FMA contraction off),
// so a cache row written here has the bits the torch path writes, and a prompt (torch path)
// followed by decode steps (this path) matches a run that does everything one way.
//
// Legend: R rows, D row length, H query heads, Hk kv heads, Dh head dim, C cache capacity.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LAYER_X86 1
#define LAYER_AVX2 __attribute__((target("avx2,fma")))
#else
#define LAYER_X86 0
#endif

namespace mer_attn_detail {
void decode_(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             int64_t length, double scale, int64_t window, const at::Tensor& sinks, int64_t isa);
}

// Named (not anonymous): decode_block.cpp calls these within one fused call.
namespace mer_layer_detail {

template <typename W>
void norm_rows(float* out, const float* x, const W* w, int64_t R, int64_t D, float eps) {
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * D;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // eight lanes, then a fixed tree: vectorisable
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      for (int j = 0; j < 8; ++j) acc[j] += xr[d + j] * xr[d + j];
    float ss = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; d < D; ++d) ss += xr[d] * xr[d];
    const float inv = 1.0f / std::sqrt(ss / float(D) + eps);
    float* o = out + r * D;
    for (d = 0; d < D; ++d) o[d] = static_cast<float>(w[d]) * (xr[d] * inv);
  }
}

void rms_norm_(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "rms_norm_: x must be a contiguous float32 [R, D] tensor");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == at::kFloat && out.is_contiguous(),
              "rms_norm_: out must be a contiguous float32 tensor shaped like x");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous(),
              "rms_norm_: w must be a contiguous [D] tensor");
  const int64_t R = x.size(0), D = x.size(1);
  if (w.scalar_type() == at::kFloat)
    norm_rows(out.data_ptr<float>(), x.data_ptr<float>(), w.data_ptr<float>(), R, D, float(eps));
  else if (w.scalar_type() == at::kBFloat16)
    norm_rows(out.data_ptr<float>(), x.data_ptr<float>(), w.data_ptr<c10::BFloat16>(), R, D,
              float(eps));
  else
    TORCH_CHECK(false, "rms_norm_: w must be float32 or bfloat16");
}

// In place: x[r] <- x[r] * cos + rotate_half(x[r]) * sin, rotate_half(a, b) = (-b, a).
void rope_rows(float* x, int64_t R, int64_t dh, const float* c, const float* s) {
  const int64_t h = dh / 2;
  for (int64_t r = 0; r < R; ++r) {
    float* a = x + r * dh;
    for (int64_t d = 0; d < h; ++d) {
      const float lo = a[d], hi = a[d + h];
      const float plo = lo * c[d], qlo = (-hi) * s[d];
      const float phi = hi * c[d + h], qhi = lo * s[d + h];
      a[d] = plo + qlo;
      a[d + h] = phi + qhi;
    }
  }
}

template <typename T>
void append_rows(const at::Tensor& cache, const float* src, int64_t Hk, int64_t dh, int64_t pos) {
  const int64_t C = cache.size(1);
  T* base = cache.data_ptr<T>();
  for (int64_t h = 0; h < Hk; ++h) {
    T* dst = base + (h * C + pos) * dh;
    for (int64_t d = 0; d < dh; ++d) dst[d] = static_cast<T>(src[h * dh + d]);  // bf16: RNE
  }
}

void rope_attend_(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& kc, const at::Tensor& vc,
                  const at::Tensor& cos, const at::Tensor& sin, int64_t pos, double scale,
                  int64_t window, const at::Tensor& sinks, int64_t isa) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && v.sizes() == k.sizes(),
              "rope_attend_: q must be [H, Dh], k and v [Hk, Dh]");
  for (const at::Tensor* t : {&q, &k, &v, &cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(),
                "rope_attend_: q, k, v, cos and sin must be contiguous float32");
  const int64_t H = q.size(0), dh = q.size(1), Hk = k.size(0);
  TORCH_CHECK(k.size(1) == dh && dh % 2 == 0 && cos.numel() == dh && sin.numel() == dh,
              "rope_attend_: head dims disagree");
  TORCH_CHECK(kc.dim() == 3 && kc.sizes() == vc.sizes() && kc.size(0) == Hk &&
                  kc.size(2) == dh && kc.is_contiguous() && vc.is_contiguous() &&
                  kc.scalar_type() == vc.scalar_type(),
              "rope_attend_: caches must be contiguous [Hk, C, Dh] of one dtype");
  TORCH_CHECK(pos >= 0 && pos < kc.size(1), "rope_attend_: position ", pos,
              " outside the cache of ", kc.size(1));
  TORCH_CHECK(H % Hk == 0, "rope_attend_: heads ", H, " not a multiple of kv heads ", Hk);
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  rope_rows(q.data_ptr<float>(), H, dh, c, s);
  rope_rows(k.data_ptr<float>(), Hk, dh, c, s);
  if (kc.scalar_type() == at::kFloat) {
    append_rows<float>(kc, k.data_ptr<float>(), Hk, dh, pos);
    append_rows<float>(vc, v.data_ptr<float>(), Hk, dh, pos);
  } else {
    TORCH_CHECK(kc.scalar_type() == at::kBFloat16, "rope_attend_: cache must be f32 or bf16");
    append_rows<c10::BFloat16>(kc, k.data_ptr<float>(), Hk, dh, pos);
    append_rows<c10::BFloat16>(vc, v.data_ptr<float>(), Hk, dh, pos);
  }
  mer_attn_detail::decode_(out, q, kc, vc, pos + 1, scale, window, sinks, isa);
}

// logits[e] = sum_d x[d] w[e, d] in eight lanes and a fixed tree (the compiler vectorises it)
template <typename W>
float dot_row(const float* x, const W* w, int64_t D) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) acc[j] += x[d + j] * static_cast<float>(w[d + j]);
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; d < D; ++d) s += x[d] * static_cast<float>(w[d]);
  return s;
}

#if LAYER_X86
// dot_row with the eight lanes in one register: the same products, sums and tree, so the same
// bits (mul and add stay separate: the build turns FMA contraction off).
LAYER_AVX2 inline __m256 lanes8(const float* w) { return _mm256_loadu_ps(w); }
LAYER_AVX2 inline __m256 lanes8(const c10::BFloat16* w) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <typename W>
LAYER_AVX2 float dot_row_avx2(const float* x, const W* w, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(x + d), lanes8(w + d)));
  float a[8];
  _mm256_storeu_ps(a, acc);
  float s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
  for (; d < D; ++d) s += x[d] * static_cast<float>(w[d]);
  return s;
}
#endif

// The T x E logits, experts in parallel (a router is E x D weights read once per token: 512 KB
// per OLMoE layer in float32, which one core read at a third of DRAM speed).
template <typename W>
void logits(const float* x, const W* w, int64_t T, int64_t E, int64_t D, float* out) {
#if LAYER_X86
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  constexpr bool avx2 = false;
#endif
  at::parallel_for(0, E, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D)),
                   [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e)
      for (int64_t t = 0; t < T; ++t) {
#if LAYER_X86
        if (avx2) {
          out[t * E + e] = dot_row_avx2(x + t * D, w + e * D, D);
          continue;
        }
#endif
        out[t * E + e] = dot_row(x + t * D, w + e * D, D);
      }
  });
}

template <typename W>
void route_rows(const float* x, const W* w, int64_t T, int64_t E, int64_t D, int64_t K,
                bool norm, int64_t* ids, float* wts) {
  std::vector<float> p(E), lg(T * E);
  std::vector<int64_t> order(E);
  logits(x, w, T, E, D, lg.data());
  for (int64_t t = 0; t < T; ++t) {
    float m = -INFINITY;
    for (int64_t e = 0; e < E; ++e) m = std::max(m, p[e] = lg[t * E + e]);
    float sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(p[e] - m));
    for (int64_t e = 0; e < E; ++e) p[e] /= sum;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + K, order.end(),
                      [&](int64_t a, int64_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    float top = 0.0f;
    for (int64_t j = 0; j < K; ++j) top += p[order[j]];
    for (int64_t j = 0; j < K; ++j) {
      ids[t * K + j] = order[j];
      wts[t * K + j] = norm ? p[order[j]] / top : p[order[j]];
    }
  }
}

void router_topk_(const at::Tensor& ids, const at::Tensor& wts, const at::Tensor& x,
                  const at::Tensor& w, bool norm) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "router_topk_: x must be a contiguous float32 [T, D] tensor");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1) && w.is_contiguous(),
              "router_topk_: w must be a contiguous [E, D] tensor");
  const int64_t T = x.size(0), D = x.size(1), E = w.size(0), K = ids.dim() == 2 ? ids.size(1) : 0;
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.dim() == 2 &&
                  ids.size(0) == T && K >= 1 && K <= E && wts.scalar_type() == at::kFloat &&
                  wts.is_contiguous() && wts.sizes() == ids.sizes(),
              "router_topk_: ids must be int64 [T, K] (1 <= K <= E), wts float32 [T, K]");
  if (w.scalar_type() == at::kFloat)
    route_rows(x.data_ptr<float>(), w.data_ptr<float>(), T, E, D, K, norm,
               ids.data_ptr<int64_t>(), wts.data_ptr<float>());
  else if (w.scalar_type() == at::kBFloat16)
    route_rows(x.data_ptr<float>(), w.data_ptr<c10::BFloat16>(), T, E, D, K, norm,
               ids.data_ptr<int64_t>(), wts.data_ptr<float>());
  else
    TORCH_CHECK(false, "router_topk_: w must be float32 or bfloat16");
}

}  // namespace mer_layer_detail

TORCH_LIBRARY_FRAGMENT(mer_attn, m) {
  using namespace mer_layer_detail;
  m.def("rms_norm_(Tensor(a!) out, Tensor x, Tensor w, float eps) -> ()", &rms_norm_);
  m.def("rope_attend_(Tensor(a!) out, Tensor(b!) q, Tensor(c!) k, Tensor v, Tensor(d!) kc, "
        "Tensor(e!) vc, Tensor cos, Tensor sin, int pos, float scale, int window, Tensor sinks, "
        "int isa) -> ()",
        &rope_attend_);
  m.def("router_topk_(Tensor(a!) ids, Tensor(b!) wts, Tensor x, Tensor w, bool norm) -> ()",
        &router_topk_);
}
