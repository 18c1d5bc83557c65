// The native q4 and q8 expert decode ops (see kernels/native.py and docs/quantization.md): the
// argument checks, the two parallel phases and the bindings; the row kernels are in native_q4.cpp,
// native_q8.cpp (float32 activations) and native_int8.cpp (int8 activations). One call computes
// a whole segment of an expert (all its groups) in two parallel regions of torch's own thread
// pool (at::parallel_for):
//   1. gate+up rows of every group: h, u = W_gu x               (parallel over row blocks)
//   2. per output row block of down, for each group j in order: a_j = silu(h_j) * u_j (each
//      thread computes it), p_j = W_dn_j a_j, y += p_j              (parallel over D)
// Every group's partial p_j is computed by code that does not depend on the other groups of the
// call, and added to y in group order, so an expert computed in one call or as a top segment
// followed by a bottom segment into the same y gives the same bits.
//
// Activations: with int8_x (the default of the formats, when D and g are multiples of 32), x and
// each a_j are quantized to int8 in blocks of 32 (native_int8.cpp) and multiplied in integer
// arithmetic, which keeps the AVX2 kernels at memory speed; else they stay float32. Either way
// the SIMD kernels and the portable scalar code perform the same float operations in the same
// order (explicit fmaf, the same reduction trees, the same exp polynomial), so they give
// identical bits; the tests check it. The one exception is the float32 q4 path on CPUs with
// AVX512_BF16 (mode 2): it multiplies bf16 splits of x and rounds differently, within the bound
// stated in docs/quantization.md and checked by the tests.
//
// Legend: see native_common.h; n groups.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "native_common.h"

namespace mer_native {

bool cpu_has_avx2_fma() {
#if MER_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#if MER_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if MER_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace mer_native

namespace {

using namespace mer_native;

// Sums of x over blocks of b along K, in order: xs[t * (K/b) + kb].
void block_sums(const float* x, int64_t T, int64_t K, int64_t b, float* xs) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t kb = 0; kb < K / b; ++kb) {
      float s = 0.0f;
      for (int64_t k = kb * b; k < (kb + 1) * b; ++k) s += x[t * K + k];
      xs[t * (K / b) + kb] = s;
    }
}

// x [T, K] -> per token and k pair, the dwords of bf16 (hi_k, hi_k+1) and (lo_k, lo_k+1) with
// hi = bf16(x), lo = bf16(x - hi); and the block sums of x~ = hi + lo (exact in f32), in order.
void bf16_pairs(const float* x, int64_t T, int64_t K, int64_t b, uint32_t* xp, float* xs) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t kb = 0; kb < K / b; ++kb) {
      float s = 0.0f;
      for (int64_t k = kb * b; k < (kb + 1) * b; k += 2) {
        uint16_t h[2], l[2];
        for (int e = 0; e < 2; ++e) {
          float v = x[t * K + k + e];
          c10::BFloat16 hv(v), lv(v - float(hv));
          h[e] = hv.x, l[e] = lv.x;
          s += float(hv) + float(lv);
        }
        xp[(t * (K / 2) + k / 2) * 2] = uint32_t(h[0]) | uint32_t(h[1]) << 16;
        xp[(t * (K / 2) + k / 2) * 2 + 1] = uint32_t(l[0]) | uint32_t(l[1]) << 16;
      }
      xs[t * (K / b) + kb] = s;
    }
}

void add_rows(const at::Tensor& y, int64_t D, int64_t T, int64_t r0, int64_t rows,
              const float* p, int64_t ps) {
  if (y.scalar_type() == at::kFloat) {
    float* Y = static_cast<float*>(y.data_ptr());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t r = 0; r < rows; ++r) Y[t * D + r0 + r] += p[t * ps + r];
  } else {  // bf16: the sum in f32, rounded to nearest even, as torch's add_
    auto* Y = static_cast<c10::BFloat16*>(y.data_ptr());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t r = 0; r < rows; ++r)
        Y[t * D + r0 + r] = c10::BFloat16(float(Y[t * D + r0 + r]) + p[t * ps + r]);
  }
}

// isa: 0 scalar, 1 the best this CPU has, 2 AVX-512 without BF16 dot products, 3 AVX2 + FMA
// -> kernel mode
int kernel_mode(int64_t isa) {
  static const bool has = cpu_has_avx512(), bf16 = has && cpu_has_avx512_bf16(),
                    avx2 = cpu_has_avx2_fma();
  TORCH_CHECK(isa >= 0 && isa <= 3,
              "mer: isa must be 0 (scalar), 1 (best), 2 (avx512 f32) or 3 (avx2)");
  TORCH_CHECK(isa != 2 || has, "mer: isa=2 asked for AVX-512, which this CPU lacks");
  TORCH_CHECK(isa != 3 || avx2, "mer: isa=3 asked for AVX2 + FMA, which this CPU lacks");
  TORCH_CHECK(isa != 1 || has || avx2, "mer: this CPU has neither AVX-512 nor AVX2 + FMA");
  if (isa == 0) return 0;
  if (isa == 3 || (isa == 1 && !has)) return 3;
  return (isa == 1 && bf16) ? 2 : 1;
}

void check_common(const at::Tensor& y, const at::Tensor& x, const at::Tensor& buf, int64_t D,
                  int64_t per) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() &&
                  x.size(1) == D,
              "mer: x must be contiguous float32 [T, D]");
  TORCH_CHECK((y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16) &&
                  y.dim() == 2 && y.is_contiguous() && y.size(0) == x.size(0) && y.size(1) == D,
              "mer: y must be contiguous float32 or bfloat16 [T, D]");
  TORCH_CHECK(buf.scalar_type() == at::kByte && buf.dim() == 1 && buf.is_contiguous() &&
                  per > 0 && buf.numel() % per == 0 && buf.numel() > 0,
              "mer: buf must be a contiguous uint8 buffer of whole groups");
}

// The int8 kernels (q4_block_i8's simd): the scalar code for isa 0, AVX2 for isa 3 (every
// AVX-512 CPU has AVX2), else the q4 kernel of AVX-512 VNNI where the CPU has it (with VBMI).
int int8_simd(int mode) {
  static const bool avx2 = cpu_has_avx2_fma(), vnni = cpu_has_avx512_vnni();
  if (mode == 0 || !avx2) return 0;
  return (mode != 3 && vnni) ? 2 : 1;
}

// The silu code for a kernel mode (all give the same bits): AVX-512, AVX2 or scalar.
int silu_isa(int mode) { return (mode == 1 || mode == 2) ? 1 : mode == 3 ? 2 : 0; }

// 32-byte aligned scratch memory (quantize_acts' layout wants it).
struct Scratch {
  std::vector<uint8_t> mem;
  uint8_t* get(int64_t n) {
    mem.resize(n + 32);
    const auto a = reinterpret_cast<uintptr_t>(mem.data()) % 32;
    return mem.data() + (a ? 32 - a : 0);
  }
};

// ---- the ops ---------------------------------------------------------------------------------
//
// One call computes several segments (bufs[i], its own group count) of one or more experts on
// the same x, segment i adding into ys[i]: phase 1 is one parallel region over the gate/up row
// blocks of every group of every segment, phase 2 one region over (segment, span of output
// rows). Each (segment, span) adds its groups' partials in group order, and a group's partial
// does not depend on the other work of the call, so the result is bit-identical to one call per
// segment (the single-segment ops below are this with one segment).
//
// A down matrix is [D, g] per group, so one q4 row block of it is only bn * g / 2 bytes (2 KB at
// g = 128); a span of several row blocks makes each group's read one longer contiguous run,
// which the prefetches keep ahead of (docs/quantization.md: the q4 experts ran faster with 256
// rows than with one row block on the AVX2 box; q8's 64-row items were already 8 KB).
constexpr int64_t kSpanRows = 256;

// Row blocks per phase-2 span: up to `most`, fewer when the items would not keep every thread
// busy (at least 4 items per thread); the bits do not depend on it.
int64_t phase2_blocks(int64_t blocks, int64_t most) {
  const int64_t per = blocks / (4 * std::max<int64_t>(1, at::get_num_threads()));
  return std::max<int64_t>(1, std::min(most, per));
}

struct Segs {
  std::vector<const uint8_t*> base;
  std::vector<int64_t> n, gu_off, start1;  // groups, offset into gu, first phase-1 item
  int64_t items1 = 0, gu_size = 0, max_n = 0;
};

Segs segments(at::TensorList ys, const at::Tensor& x, at::TensorList bufs, int64_t D,
              int64_t per, int64_t N1, int64_t nb1) {
  TORCH_CHECK(ys.size() == bufs.size() && !bufs.empty(), "mer: one y per segment buffer");
  Segs S;
  const int64_t T = x.size(0);
  for (size_t i = 0; i < bufs.size(); ++i) {
    check_common(ys[i], x, bufs[i], D, per);
    int64_t n = bufs[i].numel() / per;
    S.base.push_back(static_cast<const uint8_t*>(bufs[i].data_ptr()));
    S.n.push_back(n);
    S.gu_off.push_back(S.gu_size);
    S.start1.push_back(S.items1);
    S.gu_size += n * T * N1;
    S.items1 += n * nb1;
    S.max_n = std::max(S.max_n, n);
  }
  S.start1.push_back(S.items1);
  return S;
}

// phase-1 item -> (segment, group, row block)
inline void locate1(const Segs& S, int64_t it, int64_t nb1, int64_t& i, int64_t& j, int64_t& rb) {
  i = std::upper_bound(S.start1.begin(), S.start1.end(), it) - S.start1.begin() - 1;
  int64_t local = it - S.start1[i];
  j = local / nb1, rb = local % nb1;
}

// Activations of one matrix product in the form its kernels take: float32 x with its q4 block
// sums (and bf16 pairs, mode 2), or int8 (Acts).
struct X4 {
  const float* x = nullptr;
  int64_t xst = 0;
  std::vector<float> xs, xps;
  std::vector<uint32_t> xp;
  Acts q;
};

void prepare4(X4& p, const float* x, int64_t T, int64_t K, int64_t b, int mode, bool i8,
              int s8, uint8_t* mem) {
  p.x = x, p.xst = K;
  if (i8) {
    p.q = quantize_acts(x, K, T, K, b, s8, mem);
    return;
  }
  p.xs.resize(T * (K / b));
  block_sums(x, T, K, b, p.xs.data());
  if (mode == 2) {
    p.xp.resize(T * K), p.xps.resize(T * (K / b));
    bf16_pairs(x, T, K, b, p.xp.data(), p.xps.data());
  }
}

void rows4(int mode, bool i8, int s8, const X4& p, const uint8_t* mat, const uint16_t* sz,
           int64_t N, int64_t K, int64_t b, int64_t r0, int64_t rows, int64_t bn, bool split,
           int64_t T, float* out, int64_t os) {
  if (i8) return q4_block_i8(s8, mat, sz, N, r0, rows, bn, split, p.q, out, os);
  q4_block(mode, mat, sz, N, K, b, r0, rows, bn, split, p.x, p.xst, p.xs.data(), K / b,
           p.xp.data(), p.xps.data(), T, out, os);
}

void q4_experts_swiglu_(at::TensorList ys, const at::Tensor& x, at::TensorList bufs, int64_t D,
                        int64_t g, int64_t b, at::IntArrayRef offs, int64_t per, int64_t bn,
                        bool split, int64_t isa, bool int8_x) {
  TORCH_CHECK(offs.size() == 4 && D % b == 0 && g % b == 0 && (2 * g) % bn == 0 && b % 2 == 0,
              "mer: bad q4 dimensions");
  const int mode = kernel_mode(isa);
  const int silu = silu_isa(mode);
  const bool i8 = int8_x && D % kXB == 0 && g % kXB == 0 && b % kXB == 0;
  const int s8 = i8 ? int8_simd(mode) : 0;
  const int64_t T = x.size(0), N1 = 2 * g, nb1 = N1 / bn, K = bufs.size();
  const Segs S = segments(ys, x, bufs, D, per, N1, nb1);
  if (T == 0) return;
  std::vector<float> gu(S.gu_size);  // per segment [n, T, 2g]
  Scratch xm;
  X4 px;
  prepare4(px, static_cast<const float*>(x.data_ptr()), T, D, b, mode, i8, s8,
           i8 ? xm.get(acts_nbytes(T, D, b, s8)) : nullptr);
  at::parallel_for(0, S.items1, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      int64_t i, j, rb;
      locate1(S, it, nb1, i, j, rb);
      const uint8_t* grp = S.base[i] + j * per;
      rows4(mode, i8, s8, px, grp + offs[0], reinterpret_cast<const uint16_t*>(grp + offs[1]),
            N1, D, b, rb * bn, bn, bn, split, T, gu.data() + S.gu_off[i] + j * T * N1 + rb * bn,
            N1);
    }
  });
  const int64_t nb2 = (D + bn - 1) / bn, m = S.max_n, ma = i8 ? acts_nbytes(T, g, b, s8) : 0;
  const int64_t span = phase2_blocks(K * nb2, kSpanRows / bn) * bn, ni = (D + span - 1) / span;
  at::parallel_for(0, K * ni, 1, [&](int64_t i0, int64_t i1) {
    // a = silu(h) * u of every group of the current segment (recomputed per thread)
    std::vector<float> a(m * T * g), p(T * span);
    std::vector<X4> pa(m);
    Scratch am;
    uint8_t* mem = i8 ? am.get(m * ma) : nullptr;
    int64_t cur = -1;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t i = it / ni, r0 = (it % ni) * span, rows = std::min(span, D - r0);
      if (i != cur) {
        cur = i;
        for (int64_t j = 0; j < S.n[i]; ++j) {
          const float* h = gu.data() + S.gu_off[i] + j * T * N1;
          float* aj = &a[j * T * g];
          for (int64_t t = 0; t < T; ++t)
            silu_mul_rows(silu, h + t * N1, h + t * N1 + g, aj + t * g, g);
          prepare4(pa[j], aj, T, g, b, mode, i8, s8, i8 ? mem + j * ma : nullptr);
        }
      }
      for (int64_t j = 0; j < S.n[i]; ++j) {
        const uint8_t* grp = S.base[i] + j * per;
        for (int64_t q = 0; q < rows; q += bn)
          rows4(mode, i8, s8, pa[j], grp + offs[2],
                reinterpret_cast<const uint16_t*>(grp + offs[3]), D, g, b, r0 + q,
                std::min(bn, rows - q), bn, split, T, p.data() + q, span);
        add_rows(ys[i], D, T, r0, rows, p.data(), span);
      }
    }
  });
}

constexpr int64_t kRows = 64;  // q8 rows per work item

void rows8(int mode, bool i8, int s8, const float* x, const Acts& q, const int8_t* w,
           const uint16_t* s, int64_t rows, int64_t K, int64_t T, float* out, int64_t os) {
  if (i8) return q8_rows_i8(s8, w, s, rows, q, out, os);
  q8_rows(mode, w, s, rows, K, x, K, T, out, os);
}

void q8_experts_swiglu_(at::TensorList ys, const at::Tensor& x, at::TensorList bufs, int64_t D,
                        int64_t g, at::IntArrayRef offs, int64_t per, int64_t isa, bool int8_x) {
  TORCH_CHECK(offs.size() == 4 && D % 16 == 0 && g % 16 == 0, "mer: bad q8 dimensions");
  const int mode = kernel_mode(isa);
  const int silu = silu_isa(mode);
  const bool i8 = int8_x && D % kXB == 0 && g % kXB == 0;
  const int s8 = i8 ? int8_simd(mode) : 0;
  const int64_t T = x.size(0), N1 = 2 * g, nb1 = (N1 + kRows - 1) / kRows, K = bufs.size();
  const Segs S = segments(ys, x, bufs, D, per, N1, nb1);
  if (T == 0) return;
  const float* X = static_cast<const float*>(x.data_ptr());
  std::vector<float> gu(S.gu_size);  // per segment [n, T, 2g]
  Scratch xm;
  const Acts qx = i8 ? quantize_acts(X, D, T, D, 0, false, xm.get(acts_nbytes(T, D, 0, false)))
                     : Acts();
  at::parallel_for(0, S.items1, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      int64_t i, j, rb;
      locate1(S, it, nb1, i, j, rb);
      const int64_t r0 = rb * kRows, rows = std::min(kRows, N1 - r0);
      const uint8_t* grp = S.base[i] + j * per;
      rows8(mode, i8, s8, X, qx, reinterpret_cast<const int8_t*>(grp + offs[0]) + r0 * D,
            reinterpret_cast<const uint16_t*>(grp + offs[2]) + r0, rows, D, T,
            gu.data() + S.gu_off[i] + j * T * N1 + r0, N1);
    }
  });
  const int64_t nb2 = (D + kRows - 1) / kRows, m = S.max_n;
  const int64_t ma = i8 ? acts_nbytes(T, g, 0, false) : 0;
  const int64_t span = phase2_blocks(K * nb2, kSpanRows / kRows) * kRows;
  const int64_t ni = (D + span - 1) / span;
  at::parallel_for(0, K * ni, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> a(m * T * g), p(T * span);
    std::vector<Acts> qa(m);
    Scratch am;
    uint8_t* mem = i8 ? am.get(m * ma) : nullptr;
    int64_t cur = -1;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t i = it / ni, r0 = (it % ni) * span, rows = std::min(span, D - r0);
      if (i != cur) {
        cur = i;
        for (int64_t j = 0; j < S.n[i]; ++j) {
          const float* h = gu.data() + S.gu_off[i] + j * T * N1;
          for (int64_t t = 0; t < T; ++t)
            silu_mul_rows(silu, h + t * N1, h + t * N1 + g, &a[(j * T + t) * g], g);
          if (i8) qa[j] = quantize_acts(&a[j * T * g], g, T, g, 0, false, mem + j * ma);
        }
      }
      for (int64_t j = 0; j < S.n[i]; ++j) {
        const uint8_t* grp = S.base[i] + j * per;
        rows8(mode, i8, s8, &a[j * T * g], qa[j],
              reinterpret_cast<const int8_t*>(grp + offs[1]) + r0 * g,
              reinterpret_cast<const uint16_t*>(grp + offs[3]) + r0, rows, g, T, p.data(), span);
        add_rows(ys[i], D, T, r0, rows, p.data(), span);
      }
    }
  });
}

void q4_swiglu_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& buf, int64_t D,
                int64_t g, int64_t b, at::IntArrayRef offs, int64_t per, int64_t bn, bool split,
                int64_t isa, bool int8_x) {
  q4_experts_swiglu_({y}, x, {buf}, D, g, b, offs, per, bn, split, isa, int8_x);
}

void q8_swiglu_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& buf, int64_t D,
                int64_t g, at::IntArrayRef offs, int64_t per, int64_t isa, bool int8_x) {
  q8_experts_swiglu_({y}, x, {buf}, D, g, offs, per, isa, int8_x);
}

// One decode token's experts and their gate-weighted sum in one call (model.py routed_one, every
// expert resident): ys [K, 1, D] = the experts' SwiGLU outputs exactly as q4/q8_experts_swiglu_
// computes them, then out [1, D] = moe_combine_'s sum with weight w[0, order[k]] for ys[k]
// (acc = w0 y0; acc = acc + wk yk, each rounded once: -ffp-contract=off), so the bits of
// experts_stack + moe_combine; one dispatch instead of a dozen small ops. fmt: 4 (q4) or 8 (q8).
void experts_combine_(const at::Tensor& out, const at::Tensor& x, at::TensorList bufs,
                      const at::Tensor& w, at::IntArrayRef order, int64_t fmt, int64_t D,
                      int64_t g, int64_t b, at::IntArrayRef offs, int64_t per, int64_t bn,
                      int64_t isa, bool int8_x) {
  const int64_t K = bufs.size();
  TORCH_CHECK(K > 0 && int64_t(order.size()) == K && (fmt == 4 || fmt == 8),
              "mer: experts_combine_ needs one order entry per expert buffer and fmt 4 or 8");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(0) == 1 &&
                  x.size(1) == D && x.is_contiguous() && out.scalar_type() == at::kFloat &&
                  out.is_contiguous() && out.numel() == D && w.scalar_type() == at::kFloat &&
                  w.is_contiguous() && w.dim() == 2 && w.size(0) == 1,
              "mer: experts_combine_ takes float32 x and out [1, D] and weights [1, K]");
  for (int64_t k = 0; k < K; ++k)
    TORCH_CHECK(order[k] >= 0 && order[k] < w.size(1), "mer: experts_combine_ order out of range");
  at::Tensor ys = x.new_zeros({K, 1, D});
  std::vector<at::Tensor> yl;
  for (int64_t k = 0; k < K; ++k) yl.push_back(ys.select(0, k));
  if (fmt == 4)
    q4_experts_swiglu_(yl, x, bufs, D, g, b, offs, per, bn, true, isa, int8_x);
  else
    q8_experts_swiglu_(yl, x, bufs, D, g, offs, per, isa, int8_x);
  const float* Y = ys.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t d = 0; d < D; ++d) {
    float acc = W[order[0]] * Y[d];
    for (int64_t k = 1; k < K; ++k) acc = acc + W[order[k]] * Y[k * D + d];
    o[d] = acc;
  }
}

// Single matrices: y [T, N] float32 = x [T, K] @ W.T (int8_x: K % 32 == 0); row blocks in
// parallel (each row's bits do not depend on the split). sz_blocked: the (s, z) pairs are
// [N/bn, K/b, bn, 2], each row block's contiguous (dense_quant.Q4Blocked), else [K/b, N, 2];
// a row block is then run as an N = bn matrix of its own, which every kernel takes (N is only
// the pairs' row stride).
void q4_linear_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& packed,
                const at::Tensor& sz, int64_t b, int64_t bn, bool split, int64_t isa,
                bool int8_x, bool sz_blocked) {
  const int64_t T = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && y.scalar_type() == at::kFloat &&
                  y.is_contiguous() && y.size(0) == T && y.size(1) == N &&
                  packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(1) * 2 == K && sz.scalar_type() == at::kBFloat16 &&
                  sz.is_contiguous() && sz.numel() == (K / b) * N * 2 && K % b == 0 &&
                  (!int8_x || b % kXB == 0) && (!sz_blocked || N % bn == 0),
              "mer: bad q4_linear arguments");
  const int mode = kernel_mode(isa);
  const int s8 = int8_x ? int8_simd(mode) : 0;
  Scratch xm;
  X4 px;
  prepare4(px, static_cast<const float*>(x.data_ptr()), T, K, b, mode, int8_x, s8,
           int8_x ? xm.get(acts_nbytes(T, K, b, s8)) : nullptr);
  const int64_t nblk = (N + bn - 1) / bn;
  const auto* mat = static_cast<const uint8_t*>(packed.data_ptr());
  const auto* pairs = static_cast<const uint16_t*>(sz.data_ptr());
  float* out = static_cast<float*>(y.data_ptr());
  at::parallel_for(0, nblk, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r0 = i * bn, rows = std::min(bn, N - r0);
      if (sz_blocked)
        rows4(mode, int8_x, s8, px, mat + r0 * (K / 2), pairs + r0 * (K / b) * 2, bn, K, b, 0,
              rows, bn, split, T, out + r0, N);
      else
        rows4(mode, int8_x, s8, px, mat, pairs, N, K, b, r0, rows, bn, split, T, out + r0, N);
    }
  });
}

void q8_linear_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& w,
                const at::Tensor& s, int64_t isa, bool int8_x) {
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && y.scalar_type() == at::kFloat &&
                  y.is_contiguous() && y.size(0) == T && y.size(1) == N &&
                  w.scalar_type() == at::kChar && w.is_contiguous() && w.size(1) == K &&
                  s.scalar_type() == at::kBFloat16 && s.numel() == N && K % 16 == 0 &&
                  (!int8_x || K % kXB == 0),
              "mer: bad q8_linear arguments");
  const int mode = kernel_mode(isa);
  const float* X = static_cast<const float*>(x.data_ptr());
  Scratch xm;
  const Acts qx = int8_x ? quantize_acts(X, K, T, K, 0, false, xm.get(acts_nbytes(T, K, 0, false)))
                         : Acts();
  rows8(mode, int8_x, int8_x ? int8_simd(mode) : 0, X, qx, static_cast<const int8_t*>(w.data_ptr()),
        static_cast<const uint16_t*>(s.data_ptr()), N, K, T, static_cast<float*>(y.data_ptr()),
        N);
}

// The activation quantization alone, for the tests: qx [T, K] int8, sx [T, K/32], c [T, K/b]
// (b = 0: c empty), as the kernels get them (reference.quantize_acts).
void quantize_acts_(const at::Tensor& qx, const at::Tensor& sx, const at::Tensor& c,
                    const at::Tensor& x, int64_t b) {
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() &&
                  K % kXB == 0 && b >= 0 && (b == 0 || (b % kXB == 0 && K % b == 0)) &&
                  qx.scalar_type() == at::kChar && qx.is_contiguous() && qx.numel() == T * K &&
                  sx.scalar_type() == at::kFloat && sx.is_contiguous() &&
                  sx.numel() == T * (K / kXB) && c.scalar_type() == at::kFloat &&
                  c.is_contiguous() && c.numel() == (b ? T * (K / b) : 0),
              "mer: bad quantize_acts arguments");
  Scratch m;
  const Acts a = quantize_acts(static_cast<const float*>(x.data_ptr()), K, T, K, b, false,
                               m.get(acts_nbytes(T, K, b, false)));
  std::copy(a.q, a.q + T * K, static_cast<int8_t*>(qx.data_ptr()));
  std::copy(a.s, a.s + T * (K / kXB), static_cast<float*>(sx.data_ptr()));
  if (b) std::copy(a.c, a.c + T * (K / b), static_cast<float*>(c.data_ptr()));
}

bool has_avx512() { return cpu_has_avx512(); }
bool has_avx2_fma() { return cpu_has_avx2_fma(); }
bool has_avx512_bf16() { return cpu_has_avx512() && cpu_has_avx512_bf16(); }

}  // namespace

// int8_x: quantize the activations to int8 (native_int8.cpp) where D and g allow it; the
// formats pass their `int8_activations` (True by default), a direct call defaults to float32.
TORCH_LIBRARY(mer, m) {
  m.def("q4_swiglu_(Tensor(a!) y, Tensor x, Tensor buf, int hidden, int group, int block, "
        "int[] offsets, int per, int block_n, bool split, int isa, bool int8_x=False) -> ()",
        &q4_swiglu_);
  m.def("q8_swiglu_(Tensor(a!) y, Tensor x, Tensor buf, int hidden, int group, int[] offsets, "
        "int per, int isa, bool int8_x=False) -> ()",
        &q8_swiglu_);
  m.def("q4_experts_swiglu_(Tensor(a!)[] ys, Tensor x, Tensor[] bufs, int hidden, int group, "
        "int block, int[] offsets, int per, int block_n, bool split, int isa, "
        "bool int8_x=False) -> ()",
        &q4_experts_swiglu_);
  m.def("q8_experts_swiglu_(Tensor(a!)[] ys, Tensor x, Tensor[] bufs, int hidden, int group, "
        "int[] offsets, int per, int isa, bool int8_x=False) -> ()",
        &q8_experts_swiglu_);
  m.def("q4_linear_(Tensor(a!) y, Tensor x, Tensor packed, Tensor sz, int block, int block_n, "
        "bool split, int isa, bool int8_x=False, bool sz_blocked=False) -> ()",
        &q4_linear_);
  m.def("q8_linear_(Tensor(a!) y, Tensor x, Tensor w, Tensor s, int isa, bool int8_x=False) -> ()",
        &q8_linear_);
  m.def("experts_combine_(Tensor(a!) out, Tensor x, Tensor[] bufs, Tensor w, int[] order, "
        "int fmt, int hidden, int group, int block, int[] offsets, int per, int block_n, int isa, "
        "bool int8_x) -> ()",
        &experts_combine_);
  m.def("quantize_acts_(Tensor(a!) qx, Tensor(b!) sx, Tensor(c!) c, Tensor x, int block) -> ()",
        &quantize_acts_);
  m.def("has_avx512() -> bool", &has_avx512);
  m.def("has_avx2_fma() -> bool", &has_avx2_fma);
  m.def("has_avx512_bf16() -> bool", &has_avx512_bf16);
}
