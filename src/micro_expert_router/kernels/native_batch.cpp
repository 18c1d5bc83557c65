// The batched decode ops (kernels/experts.py `experts_rows`, model's batched MoE step): several
// experts of one layer, each on its own subset of a batch's token rows, in one call, and the
// gate-weighted sum of each token's expert outputs. Compiled into the same library as native.cpp
// (kernels/native.py lists the sources).
//
// In a decode step of B sequences, expert i of the layer's union runs on the T_i tokens routed to
// it. Each token's x is quantized to int8 once for the whole call (quantize_acts, native_int8.cpp)
// and its rows are copied into each expert's activation set; then, as in native.cpp's
// q4/q8_experts_swiglu_, phase 1 spreads the gate/up row blocks of every group of every expert
// over the threads, phase 2 the (expert, output row block) pairs, each adding its groups'
// partials in group order. Pair p of expert i (its rows [off_i, off_(i+1)) of Y) gets
// Y[p] += SwiGLU_i(x[tok[p]]).
//
// Bit-exactness: a token's quantization, its int8 row kernels (q4_block_i8, q8_rows_i8: every
// token is computed by the same float operations whatever its tile), silu and the partials'
// order are those of the single-expert ops, so Y[p] has the bits of q4/q8_experts_swiglu_ on
// x[tok[p]] alone. The tests check it.
//
// moe_combine_: out[t] = sum over k of w[t, k] Y[idx[t, k]], in k order, each product and sum
// rounded once (acc = w0 y0; acc = acc + wk yk: no fused multiply-add, -ffp-contract=off), in
// float32 (bf16 Y and out are widened and rounded once at the end). A token's sum depends only on
// its own rows, so one token alone and the same token in a batch give the same bits.
//
// Only int8 activations (the formats' default; D, g and the q4 block multiples of 32); the caller
// uses the per-expert path otherwise. Legend: see native_common.h; P pairs (token, expert), n
// groups of an expert.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "native_common.h"

namespace {

using namespace mer_native;

constexpr int64_t kAlign = 64;
constexpr int64_t kRows8 = 64;  // q8 rows per work item (as native.cpp)

inline int64_t up(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Aligned scratch memory (the int8 kernels load activations with aligned 32-byte loads).
struct Scratch {
  std::vector<uint8_t> mem;
  uint8_t* get(int64_t n) {
    mem.resize(n + kAlign);
    const auto a = reinterpret_cast<uintptr_t>(mem.data()) % kAlign;
    return mem.data() + (a ? kAlign - a : 0);
  }
};

// Bytes of `n` token rows of an activation set shaped like `all` (see gather_acts).
int64_t rows_nbytes(const Acts& all, int64_t n) {
  const int64_t K = all.K;
  int64_t m = up(n * K) + up(n * (K / kXB) * 4);
  if (all.c != nullptr) m += up(n * (K / all.b) * 4);
  if (all.v != nullptr) m += up(n * (K / 4) * 32);
  return m;
}

// Token rows rows[0..n) of `all`, copied into `mem` (rows_nbytes bytes, aligned). Acts' fields are
// per-token rows (native_common.h: q [T, K], s [T, K/32], c [T, K/b], v [T, K/4, 32]), so the copy
// is what quantize_acts would give for those tokens alone.
Acts gather_acts(const Acts& all, const int64_t* rows, int64_t n, uint8_t* mem) {
  const int64_t K = all.K, ns = K / kXB, nc = all.b ? K / all.b : 0, nv = (K / 4) * 32;
  Acts a;
  a.T = n, a.K = K, a.b = all.b;
  a.q = reinterpret_cast<int8_t*>(mem);
  a.s = reinterpret_cast<float*>(mem + up(n * K));
  uint8_t* next = mem + up(n * K) + up(n * ns * 4);
  if (all.c != nullptr) a.c = reinterpret_cast<float*>(next), next += up(n * nc * 4);
  if (all.v != nullptr) a.v = reinterpret_cast<int8_t*>(next);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t r = rows[t];
    std::memcpy(a.q + t * K, all.q + r * K, K);
    std::memcpy(a.s + t * ns, all.s + r * ns, ns * 4);
    if (a.c != nullptr) std::memcpy(a.c + t * nc, all.c + r * nc, nc * 4);
    if (a.v != nullptr) std::memcpy(a.v + t * nv, all.v + r * nv, nv);
  }
  return a;
}

// isa 0: the portable scalar code; 1: the best this CPU has (the int8 kernels' SIMD is AVX2).
int simd_for(int64_t isa) {  // q4_block_i8's simd: the best this CPU has (the same bits)
  TORCH_CHECK(isa == 0 || isa == 1, "mer: isa must be 0 (scalar) or 1 (best)");
  static const int best = !cpu_has_avx2_fma() ? 0 : cpu_has_avx512_vnni() ? 2 : 1;
  return isa == 1 ? best : 0;
}

int silu_for(int64_t isa) {  // silu_mul_rows' isa codes give the same bits
  static const int best = cpu_has_avx512() ? 1 : cpu_has_avx2_fma() ? 2 : 0;
  return isa == 0 ? 0 : best;
}

// The experts of one call: buffers, groups, their pairs and the offsets of their scratch parts.
struct Batch {
  int64_t E = 0, P = 0, T = 0, items1 = 0, gu_size = 0, max_n = 0, max_t = 0;
  std::vector<const uint8_t*> base;
  std::vector<int64_t> n, off, gu_off, start1;
  const int64_t* tok = nullptr;
};

Batch batch(const at::Tensor& y, const at::Tensor& x, at::TensorList bufs, const at::Tensor& tok,
            at::IntArrayRef offs, int64_t D, int64_t per, int64_t N1, int64_t nb1) {
  Batch B;
  B.E = int64_t(bufs.size());
  B.T = x.size(0);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() &&
                  x.size(1) == D,
              "mer: x must be contiguous float32 [T, D]");
  TORCH_CHECK(tok.scalar_type() == at::kLong && tok.dim() == 1 && tok.is_contiguous(),
              "mer: tokens must be a contiguous int64 [P] tensor");
  B.P = tok.size(0);
  TORCH_CHECK((y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16) &&
                  y.dim() == 2 && y.is_contiguous() && y.size(0) == B.P && y.size(1) == D,
              "mer: y must be contiguous float32 or bfloat16 [P, D]");
  TORCH_CHECK(int64_t(offs.size()) == B.E + 1 && B.E > 0 && offs[0] == 0 && offs[B.E] == B.P,
              "mer: offsets must be [E + 1], from 0 to the number of pairs");
  B.tok = tok.data_ptr<int64_t>();
  for (int64_t p = 0; p < B.P; ++p)
    TORCH_CHECK(B.tok[p] >= 0 && B.tok[p] < B.T, "mer: a pair's token is out of range");
  for (int64_t i = 0; i < B.E; ++i) {
    const at::Tensor& buf = bufs[i];
    TORCH_CHECK(buf.scalar_type() == at::kByte && buf.dim() == 1 && buf.is_contiguous() &&
                    buf.numel() > 0 && buf.numel() % per == 0,
                "mer: buf must be a contiguous uint8 buffer of whole groups");
    const int64_t ti = offs[i + 1] - offs[i];
    TORCH_CHECK(ti >= 0, "mer: offsets must not decrease");
    const int64_t n = buf.numel() / per;
    B.base.push_back(static_cast<const uint8_t*>(buf.data_ptr()));
    B.n.push_back(n);
    B.off.push_back(offs[i]);
    B.gu_off.push_back(B.gu_size);
    B.start1.push_back(B.items1);
    B.gu_size += n * ti * N1;
    B.items1 += ti ? n * nb1 : 0;
    B.max_n = std::max(B.max_n, n);
    B.max_t = std::max(B.max_t, ti);
  }
  B.off.push_back(B.P);
  B.start1.push_back(B.items1);
  return B;
}

// phase-1 item -> (expert, group, row block)
inline void locate1(const Batch& B, int64_t it, int64_t nb1, int64_t& i, int64_t& j,
                    int64_t& rb) {
  i = std::upper_bound(B.start1.begin(), B.start1.end(), it) - B.start1.begin() - 1;
  const int64_t local = it - B.start1[i];
  j = local / nb1, rb = local % nb1;
}

// Each expert's activation set: its tokens' rows of the quantized batch.
std::vector<Acts> expert_acts(const Batch& B, const Acts& all, Scratch& mem) {
  std::vector<int64_t> at(B.E + 1, 0);
  for (int64_t i = 0; i < B.E; ++i) at[i + 1] = at[i] + rows_nbytes(all, B.off[i + 1] - B.off[i]);
  uint8_t* m = mem.get(at[B.E]);
  std::vector<Acts> acts(B.E);
  for (int64_t i = 0; i < B.E; ++i)
    acts[i] = gather_acts(all, B.tok + B.off[i], B.off[i + 1] - B.off[i], m + at[i]);
  return acts;
}

// Y[off + t, r0 + r] += p[t * ps + r] for the expert's T_i rows (bf16: the sum in float32,
// rounded to nearest even, as native.cpp's add_rows).
void add_rows(const at::Tensor& y, int64_t D, int64_t off, int64_t T, int64_t r0, int64_t rows,
              const float* p, int64_t ps) {
  if (y.scalar_type() == at::kFloat) {
    float* Y = static_cast<float*>(y.data_ptr()) + off * D;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t r = 0; r < rows; ++r) Y[t * D + r0 + r] += p[t * ps + r];
  } else {
    auto* Y = static_cast<c10::BFloat16*>(y.data_ptr()) + off * D;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t r = 0; r < rows; ++r)
        Y[t * D + r0 + r] = c10::BFloat16(float(Y[t * D + r0 + r]) + p[t * ps + r]);
  }
}

void q4_experts_rows_(const at::Tensor& y, const at::Tensor& x, at::TensorList bufs,
                      const at::Tensor& tok, at::IntArrayRef offs, int64_t D, int64_t g, int64_t b,
                      at::IntArrayRef sec, int64_t per, int64_t bn, bool split, int64_t isa) {
  TORCH_CHECK(sec.size() == 4 && D % b == 0 && g % b == 0 && (2 * g) % bn == 0 &&
                  D % kXB == 0 && g % kXB == 0 && b % kXB == 0,
              "mer: bad q4 dimensions for the int8 batch op");
  const int s8 = simd_for(isa);
  const int silu = silu_for(isa);
  const int64_t N1 = 2 * g, nb1 = N1 / bn;
  const Batch B = batch(y, x, bufs, tok, offs, D, per, N1, nb1);
  if (B.P == 0) return;
  Scratch xm, em;
  const Acts all = quantize_acts(static_cast<const float*>(x.data_ptr()), D, B.T, D, b, s8,
                                 xm.get(acts_nbytes(B.T, D, b, s8)));
  const std::vector<Acts> acts = expert_acts(B, all, em);
  std::vector<float> gu(B.gu_size);  // per expert [n, T_i, 2g]
  at::parallel_for(0, B.items1, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      int64_t i, j, rb;
      locate1(B, it, nb1, i, j, rb);
      const uint8_t* grp = B.base[i] + j * per;
      const int64_t ti = B.off[i + 1] - B.off[i];
      q4_block_i8(s8, grp + sec[0], reinterpret_cast<const uint16_t*>(grp + sec[1]), N1, rb * bn,
                  bn, bn, split, acts[i], gu.data() + B.gu_off[i] + j * ti * N1 + rb * bn, N1);
    }
  });
  const int64_t nb2 = (D + bn - 1) / bn, ma = acts_nbytes(B.max_t, g, b, s8);
  at::parallel_for(0, B.E * nb2, 1, [&](int64_t i0, int64_t i1) {
    // a = silu(h) * u of every group of the current expert (recomputed per thread)
    std::vector<float> a(B.max_n * B.max_t * g), p(B.max_t * bn);
    std::vector<Acts> qa(B.max_n);
    Scratch am;
    uint8_t* mem = am.get(B.max_n * up(ma));
    int64_t cur = -1;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t i = it / nb2, r0 = (it % nb2) * bn, rows = std::min(bn, D - r0);
      const int64_t ti = B.off[i + 1] - B.off[i];
      if (ti == 0) continue;
      if (i != cur) {
        cur = i;
        for (int64_t j = 0; j < B.n[i]; ++j) {
          const float* h = gu.data() + B.gu_off[i] + j * ti * N1;
          float* aj = &a[j * ti * g];
          for (int64_t t = 0; t < ti; ++t)
            silu_mul_rows(silu, h + t * N1, h + t * N1 + g, aj + t * g, g);
          qa[j] = quantize_acts(aj, g, ti, g, b, s8, mem + j * up(ma));
        }
      }
      for (int64_t j = 0; j < B.n[i]; ++j) {
        const uint8_t* grp = B.base[i] + j * per;
        q4_block_i8(s8, grp + sec[2], reinterpret_cast<const uint16_t*>(grp + sec[3]), D, r0,
                    rows, bn, split, qa[j], p.data(), bn);
        add_rows(y, D, B.off[i], ti, r0, rows, p.data(), bn);
      }
    }
  });
}

void q8_experts_rows_(const at::Tensor& y, const at::Tensor& x, at::TensorList bufs,
                      const at::Tensor& tok, at::IntArrayRef offs, int64_t D, int64_t g,
                      at::IntArrayRef sec, int64_t per, int64_t isa) {
  TORCH_CHECK(sec.size() == 4 && D % kXB == 0 && g % kXB == 0,
              "mer: bad q8 dimensions for the int8 batch op");
  const int s8 = simd_for(isa);
  const int silu = silu_for(isa);
  const int64_t N1 = 2 * g, nb1 = (N1 + kRows8 - 1) / kRows8;
  const Batch B = batch(y, x, bufs, tok, offs, D, per, N1, nb1);
  if (B.P == 0) return;
  Scratch xm, em;
  const Acts all = quantize_acts(static_cast<const float*>(x.data_ptr()), D, B.T, D, 0, false,
                                 xm.get(acts_nbytes(B.T, D, 0, false)));
  const std::vector<Acts> acts = expert_acts(B, all, em);
  std::vector<float> gu(B.gu_size);  // per expert [n, T_i, 2g]
  at::parallel_for(0, B.items1, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      int64_t i, j, rb;
      locate1(B, it, nb1, i, j, rb);
      const int64_t r0 = rb * kRows8, rows = std::min(kRows8, N1 - r0);
      const int64_t ti = B.off[i + 1] - B.off[i];
      const uint8_t* grp = B.base[i] + j * per;
      q8_rows_i8(s8, reinterpret_cast<const int8_t*>(grp + sec[0]) + r0 * D,
                 reinterpret_cast<const uint16_t*>(grp + sec[2]) + r0, rows, acts[i],
                 gu.data() + B.gu_off[i] + j * ti * N1 + r0, N1);
    }
  });
  const int64_t nb2 = (D + kRows8 - 1) / kRows8, ma = acts_nbytes(B.max_t, g, 0, false);
  at::parallel_for(0, B.E * nb2, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> a(B.max_n * B.max_t * g), p(B.max_t * kRows8);
    std::vector<Acts> qa(B.max_n);
    Scratch am;
    uint8_t* mem = am.get(B.max_n * up(ma));
    int64_t cur = -1;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t i = it / nb2, r0 = (it % nb2) * kRows8, rows = std::min(kRows8, D - r0);
      const int64_t ti = B.off[i + 1] - B.off[i];
      if (ti == 0) continue;
      if (i != cur) {
        cur = i;
        for (int64_t j = 0; j < B.n[i]; ++j) {
          const float* h = gu.data() + B.gu_off[i] + j * ti * N1;
          for (int64_t t = 0; t < ti; ++t)
            silu_mul_rows(silu, h + t * N1, h + t * N1 + g, &a[(j * ti + t) * g], g);
          qa[j] = quantize_acts(&a[j * ti * g], g, ti, g, 0, false, mem + j * up(ma));
        }
      }
      for (int64_t j = 0; j < B.n[i]; ++j) {
        const uint8_t* grp = B.base[i] + j * per;
        q8_rows_i8(s8, reinterpret_cast<const int8_t*>(grp + sec[1]) + r0 * g,
                   reinterpret_cast<const uint16_t*>(grp + sec[3]) + r0, rows, qa[j], p.data(),
                   kRows8);
        add_rows(y, D, B.off[i], ti, r0, rows, p.data(), kRows8);
      }
    }
  });
}

template <typename V>
void combine(V* out, const V* Y, const int64_t* idx, const float* w, int64_t T, int64_t K,
             int64_t D) {
  std::vector<float> acc(D);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const V* yk = Y + idx[t * K + k] * D;
      const float wk = w[t * K + k];
      if (k == 0)
        for (int64_t d = 0; d < D; ++d) acc[d] = wk * float(yk[d]);
      else
        for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] + wk * float(yk[d]);
    }
    for (int64_t d = 0; d < D; ++d) out[t * D + d] = V(acc[d]);
  }
}

void moe_combine_(const at::Tensor& out, const at::Tensor& y, const at::Tensor& idx,
                  const at::Tensor& w) {
  const int64_t T = out.size(0), D = out.size(1), K = idx.size(1), P = y.size(0);
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && y.dim() == 2 && y.is_contiguous() &&
                  y.size(1) == D && y.scalar_type() == out.scalar_type() &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "mer: out [T, D] and y [P, D] must be contiguous, both float32 or both bfloat16");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.is_contiguous() &&
                  idx.size(0) == T && K > 0 && w.scalar_type() == at::kFloat &&
                  w.is_contiguous() && w.dim() == 2 && w.size(0) == T && w.size(1) == K,
              "mer: idx must be int64 [T, K] and w float32 [T, K], contiguous");
  const int64_t* I = idx.data_ptr<int64_t>();
  for (int64_t p = 0; p < T * K; ++p)
    TORCH_CHECK(I[p] >= 0 && I[p] < P, "mer: a row index of moe_combine_ is out of range");
  if (out.scalar_type() == at::kFloat)
    combine(out.data_ptr<float>(), y.data_ptr<float>(), I, w.data_ptr<float>(), T, K, D);
  else
    combine(static_cast<c10::BFloat16*>(out.data_ptr()),
            static_cast<const c10::BFloat16*>(y.data_ptr()), I, w.data_ptr<float>(), T, K, D);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mer, m) {
  m.def("q4_experts_rows_(Tensor(a!) y, Tensor x, Tensor[] bufs, Tensor tokens, int[] pair_offsets, "
        "int hidden, int group, int block, int[] offsets, int per, int block_n, bool split, "
        "int isa) -> ()",
        &q4_experts_rows_);
  m.def("q8_experts_rows_(Tensor(a!) y, Tensor x, Tensor[] bufs, Tensor tokens, int[] pair_offsets, "
        "int hidden, int group, int[] offsets, int per, int isa) -> ()",
        &q8_experts_rows_);
  m.def("moe_combine_(Tensor(a!) out, Tensor y, Tensor idx, Tensor w) -> ()", &moe_combine_);
}
