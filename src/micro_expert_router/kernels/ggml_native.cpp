// The GGUF decode ops mer_ggml::swiglu_ (a segment of a "gguf:" expert, kernels/ggml_formats.py)
// and mer_ggml::linear_ (a dense GGUF matrix), over the row dots of ggml_blocks.cpp (the block
// algebra, the int8 and float32 activation modes and their bit-identical scalar and AVX2 paths
// are described there). Built and loaded by kernels/ggml_native.py.
//
// swiglu_ computes a whole segment (n groups) of one expert in one parallel region: gate and up
// rows of every group (split over the threads), a_j = silu(h_j) u_j, then per down row (split
// over D) y += p_j for j in order (p_j = W_down_j a_j), so each group's partial is independent of
// the call's other groups and added in group order, as kernels/formats.py requires.
//
// Legend: T tokens, D hidden, g neurons per group, n groups, N rows, K reduction length,
// B weights per block, G weights per integer scale.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "ggml_blocks.h"

namespace {

// ---- activations -------------------------------------------------------------------------

// int8 codes of one block of B activations (the definition): s = max|x| / 127 (0: codes 0),
// code = nearbyint(min(127, x / s computed as x * (1 / s))).
void quantize_scalar(const float* v, int64_t B, int8_t* q, float* d) {
  float amax = 0.0f;
  for (int64_t i = 0; i < B; ++i) amax = std::fmax(amax, std::fabs(v[i]));
  const float s = amax / 127.0f, inv = s > 0 ? 1.0f / s : 0.0f;
  *d = s;
  for (int64_t i = 0; i < B; ++i) q[i] = int8_t(std::nearbyint(std::fmin(127.0f, v[i] * inv)));
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same on 8 lanes (max is exact in any order; max_ps / min_ps with the constant second
// return it for a NaN, as fmax / fmin do; B is a multiple of 32).
__attribute__((target("avx2,fma"))) void quantize_avx2(const float* v, int64_t B, int8_t* q,
                                                       float* d) {
  const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m = _mm256_setzero_ps();
  for (int64_t i = 0; i < B; i += 8) m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(v + i), abs), m);
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float s = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1))) / 127.0f;
  const __m256 inv = _mm256_set1_ps(s > 0 ? 1.0f / s : 0.0f), top = _mm256_set1_ps(127.0f);
  *d = s;
  for (int64_t i = 0; i < B; i += 32) {
    __m256i c[4];
    for (int k = 0; k < 4; ++k) {
      const __m256 r = _mm256_min_ps(_mm256_mul_ps(_mm256_loadu_ps(v + i + 8 * k), inv), top);
      c[k] = _mm256_cvtps_epi32(r);  // round to nearest even (the default mode), as nearbyint
    }
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), b);
  }
}
#else
#define quantize_avx2 quantize_scalar
#endif

// One activation vector of length K, prepared for the row dots of one type: int8 codes per
// block of B with a float scale and code sums per G (int8 mode), or float sums per G.
struct Act {
  const float* x = nullptr;
  std::vector<float> xs;      // f32 mode: sums of x per G
  std::vector<int8_t> q;      // int8 mode: codes [K]
  std::vector<float> d;       // scales [K / B]
  std::vector<int16_t> bs;    // code sums per G (|sum| <= 32 x 127)
  bool i8 = false;
  mer_ggml::ActView view{};

  void prepare(const float* v, int64_t K, int64_t B, int64_t G, bool int8, bool avx2) {
    x = v;
    i8 = int8;
    if (i8) {
      q.resize(K);
      d.resize(K / B);
      for (int64_t b = 0; b < K / B; ++b)
        (avx2 ? quantize_avx2 : quantize_scalar)(v + b * B, B, q.data() + b * B, &d[b]);
    }
    bs.assign(i8 ? K / G : 0, 0);
    xs.assign(i8 ? 0 : K / G, 0.0f);
    for (int64_t c = 0; c < K / G; ++c) {  // in order (the float sums); no division per weight
      if (i8) {
        int32_t t = 0;
        for (int64_t i = c * G; i < (c + 1) * G; ++i) t += q[i];
        bs[c] = int16_t(t);
      } else {
        for (int64_t i = c * G; i < (c + 1) * G; ++i) xs[c] += v[i];
      }
    }
    view = {x, xs.data(), q.data(), d.data(), bs.data()};
  }
};

struct Kind {
  int64_t block, nbytes, gran;
  bool i8, avx2;
  mer_ggml::Dot dot;
  mer_ggml::Dot4 dot4;  // nullptr: one output at a time

  int64_t row_bytes(int64_t K) const { return K / block * nbytes; }
  void prepare(Act& a, const float* v, int64_t K) const {
    a.prepare(v, K, block, gran, i8, avx2);
  }
  float dot_row(const uint8_t* row, const Act& a, int64_t K) const {
    return dot(mer_ggml::Segs{row, 0, &a.view, 0, 1, K / block}, 0.0f);
  }
};

Kind kind(int64_t type, int64_t isa) {
  const mer_ggml::BlockKind k = mer_ggml::block_kind(type, isa);
  TORCH_CHECK(k.dot != nullptr, "mer_ggml: GGML type ", type, " has no native kernel");
  static const bool has = mer_ggml::cpu_has_avx2();
  return {k.block, k.nbytes, k.gran, isa >= 2, has && (isa == 1 || isa == 2 || isa == 4), k.dot,
          k.dot4};
}

inline float silu_mul(float h, float u) { return h / (1.0f + std::exp(-h)) * u; }

void check_common(const at::Tensor& y, const at::Tensor& x, const at::Tensor& w, bool bf16) {
  const auto ok = [bf16](const at::Tensor& t) {
    return t.is_contiguous() && (t.dtype() == at::kFloat || (bf16 && t.dtype() == at::kBFloat16));
  };
  TORCH_CHECK(ok(y), "mer_ggml: y must be contiguous f32", bf16 ? " or bf16" : "");
  TORCH_CHECK(ok(x) && x.dim() == 2, "mer_ggml: x must be contiguous f32", bf16 ? " or bf16" : "",
              " [T, K]");
  TORCH_CHECK(w.dtype() == at::kByte && w.is_contiguous(), "mer_ggml: weights must be uint8");
}

// A float32 tensor's data, or a float copy of a bfloat16 one in v.
float* float_data(const at::Tensor& t, std::vector<float>& v) {
  if (t.dtype() == at::kFloat) return t.data_ptr<float>();
  const auto* p = static_cast<const c10::BFloat16*>(t.data_ptr());
  v.resize(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) v[i] = float(p[i]);
  return v.data();
}

// [b, e) of [0, n) for thread id of m, boundaries multiples of q.
std::pair<int64_t, int64_t> share(int64_t n, int64_t q, int64_t id, int64_t m) {
  const int64_t c = ((n + q - 1) / q + m - 1) / m * q;
  return {std::min(n, id * c), std::min(n, (id + 1) * c)};
}

// The K-quant row dots prefetch their weights this far ahead (ggml_kquant512.cpp kAheadBytes):
// a thread prefetches the first bytes of its rows itself before it starts (else demand misses).
constexpr int64_t kWarm = 8192;

// Work sharing without a straggler: thread id owns share(n, q, id, m) and takes it in chunks of c
// units from the front (cursor[id]); done, it takes the next chunks of the other threads' ranges
// (their cursors), so the threads finish together and each one's reads stay mostly sequential.
struct alignas(64) Cursor {
  std::atomic<int64_t> v{0};
};

template <class F>
void run_shared(Cursor* cur, int64_t id, int64_t m, int64_t n, int64_t q, int64_t c, const F& f) {
  for (int64_t k = 0; k < m; ++k) {
    const int64_t o = (id + k) % m;
    const auto [b, e] = share(n, q, o, m);
    for (int64_t s = b; (s = b + cur[o].v.fetch_add(c, std::memory_order_relaxed)) < e;)
      f(s, std::min(e, s + c));
  }
}

void prefetch(const uint8_t* p, int64_t nbytes) {
  for (int64_t o = 0; o < nbytes; o += 64) __builtin_prefetch(p + o, 0, 3);
}

// x and y may be float32 or bfloat16 (y: accumulated in float32 over the call and rounded once at
// the end, as a float32 copy would be). One parallel region: (1) gate and up rows (run_shared);
// (2) a = silu(h) u and its activations, per group; (3) the down rows (run_shared). A thread done
// with (1) prefetches the start of its (3) rows while it waits at the barrier.
void swiglu_(at::Tensor y, const at::Tensor& x, const at::Tensor& buf, int64_t D, int64_t g,
             int64_t per, int64_t tg, int64_t tu, int64_t td, int64_t og, int64_t ou, int64_t od,
             int64_t isa) {
  check_common(y, x, buf, true);
  const int64_t T = x.size(0), n = buf.numel() / per;
  TORCH_CHECK(x.size(1) == D && y.numel() == T * D && buf.numel() == n * per && n > 0,
              "mer_ggml::swiglu_: shapes disagree");
  const Kind kg = kind(tg, isa), ku = kind(tu, isa), kd = kind(td, isa);
  TORCH_CHECK(D % kg.block == 0 && D % ku.block == 0 && g % kd.block == 0,
              "mer_ggml::swiglu_: rows are not whole blocks");
  const int64_t rg = kg.row_bytes(D), ru = ku.row_bytes(D), rd = kd.row_bytes(g);
  std::vector<float> xv, yv;
  const float* xp = float_data(x, xv);
  float* yp = float_data(y, yv);
  const uint8_t* bp = buf.data_ptr<uint8_t>();
  std::vector<Act> ag(T), au(T);
  const bool same = kg.block == ku.block && kg.gran == ku.gran;  // one activation for both
  for (int64_t t = 0; t < T; ++t) {
    kg.prepare(ag[t], xp + t * D, D);
    if (!same) ku.prepare(au[t], xp + t * D, D);
  }
  const std::vector<Act>& aup = same ? ag : au;
  std::vector<float> h(n * T * g), u(n * T * g), a(n * T * g);  // [n, T, g]
  std::vector<Act> ad(n * T);
  std::vector<mer_ggml::ActView> vd(n * T);
  // (1) in units of four gate (or up) rows where the types have such row dots (the same bits
  // as one by one; out starts at zero: 0 + p, as dot_row), else rows
  const bool four = kg.dot4 != nullptr && ku.dot4 != nullptr && g % 4 == 0;
  const int64_t q1 = four ? 4 : 1;
  const auto gate_up_row = [&](int64_t r) {
    const int64_t j = r / (2 * g), i = r % (2 * g);
    return bp + j * per + (i < g ? og + i * rg : ou + (i - g) * ru);
  };
  const auto gate_up = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r += q1) {
      const int64_t j = r / (2 * g), i = r % (2 * g);
      const bool gate = i < g;
      const Kind& k = gate ? kg : ku;
      const uint8_t* row = gate_up_row(r);
      for (int64_t t = 0; t < T; ++t) {
        float* out = gate ? &h[(j * T + t) * g + i] : &u[(j * T + t) * g + i - g];
        const Act& act = gate ? ag[t] : aup[t];
        if (four) {
          k.dot4(mer_ggml::Segs{row, 0, &act.view, 0, 1, D / k.block}, gate ? rg : ru, out);
        } else {
          *out = k.dot_row(row, act, D);
        }
      }
    }
  };
  const auto activate = [&](int64_t k0, int64_t k1) {  // (2) for groups x tokens [k0, k1)
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t i = 0; i < g; ++i) a[k * g + i] = silu_mul(h[k * g + i], u[k * g + i]);
      kd.prepare(ad[k], a.data() + k * g, g);
      vd[k] = ad[k].view;
    }
  };
  const auto down = [&](int64_t b, int64_t e) {  // (3) y += p_j for j in order, per row
    int64_t dr = b;
    for (; kd.dot4 != nullptr && dr + 4 <= e; dr += 4)  // four down rows share each pass
      for (int64_t t = 0; t < T; ++t) {
        const mer_ggml::Segs segs{bp + od + dr * rd, per, &vd[t], T, n, g / kd.block};
        kd.dot4(segs, rd, yp + t * D + dr);
      }
    for (; dr < e; ++dr)
      for (int64_t t = 0; t < T; ++t) {
        const mer_ggml::Segs segs{bp + od + dr * rd, per, &vd[t], T, n, g / kd.block};
        yp[t * D + dr] = kd.dot(segs, yp[t * D + dr]);
      }
  };
  const int64_t nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (nt <= 1) {
    gate_up(0, n * 2 * g);
    activate(0, n * T);
    down(0, D);
  } else {
    std::vector<Cursor> c1(nt), c3(nt);
#pragma omp parallel num_threads(int(nt))
    {
      const int64_t id = omp_get_thread_num(), m = omp_get_num_threads();
      const auto [r0, r1] = share(n * 2 * g, q1, id, m);
      if (r1 > r0) prefetch(gate_up_row(r0), kWarm);  // the row dots prefetch from kWarm on
      run_shared(c1.data(), id, m, n * 2 * g, q1, 8 * q1, gate_up);
      const auto [d0, d1] = share(D, 4, id, m);
      for (int64_t j = 0; j < n && d1 > d0; ++j)
        prefetch(bp + od + j * per + d0 * rd, std::min(kWarm, (d1 - d0) * rd));
#pragma omp barrier
      const auto [k0, k1] = share(n * T, 1, id, m);
      activate(k0, k1);
#pragma omp barrier
      run_shared(c3.data(), id, m, D, 4, 32, down);
    }
  }
  if (!yv.empty()) {  // bfloat16 y: rounded once (to nearest even)
    auto* Y = static_cast<c10::BFloat16*>(y.data_ptr());
    for (int64_t i = 0; i < T * D; ++i) Y[i] = c10::BFloat16(yv[i]);
  }
}

// y [T, N] = x [T, K] . W^T for a GGUF matrix W given as rows [N, row bytes].
void linear_(at::Tensor y, const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t isa) {
  check_common(y, x, w, false);
  const Kind k = kind(type, isa);
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % k.block == 0 && w.size(1) == k.row_bytes(K) && y.numel() == T * N,
              "mer_ggml::linear_: shapes disagree");
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t rb = w.size(1);
  std::vector<Act> acts(T);
  for (int64_t t = 0; t < T; ++t) k.prepare(acts[t], xp + t * K, K);
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t t = 0; t < T; ++t) yp[t * N + r] = k.dot_row(wp + r * rb, acts[t], K);
  });
}

}  // namespace

TORCH_LIBRARY(mer_ggml, m) {
  m.def("swiglu_(Tensor(a!) y, Tensor x, Tensor buf, int hidden, int group, int per, "
        "int tg, int tu, int td, int og, int ou, int od, int isa) -> ()", &swiglu_);
  m.def("linear_(Tensor(a!) y, Tensor x, Tensor w, int type, int isa) -> ()", &linear_);
  m.def("has_avx2() -> bool", &mer_ggml::cpu_has_avx2);
}
