// Native decode kernel for the "mxfp4" expert format (kernels/mxfp4.py): GPT-OSS experts read in
// place from a segment of MXFP4 groups, with the per-neuron gate/up biases, the clamped SwiGLU and
// the down-bias slot of each group. Built with mxfp4_f32.cpp and mxfp4_i8.cpp (the dots; shared
// declarations in mxfp4.h) and loaded by kernels/mxfp4.py as mer_mxfp4::swiglu_.
//
// MXFP4 (OCP MX v1.0), as in the GPT-OSS checkpoints: a row of K weights is K/32 blocks; block b
// has 16 bytes of e2m1 codes (byte k: element 2k in the low nibble, 2k+1 in the high one) and one
// e8m0 exponent e. w = v(code) 2^(e-127). We keep ggml's arithmetic: codes map to doubled integer
// values (0 1 2 3 4 6 8 12, sign in bit 3) and the block scale is d = 2^(e-128) as a float32.
//
// Activation modes (isa; SIMD takes the best the CPU has: AVX-512 (F/BW/VL/DQ + VBMI + VNNI),
// else AVX2 + FMA, else the scalar code, all with the same bits; 4 and 5 force AVX2, for tests):
//   1 SIMD f32 / 0 scalar f32 / 4 AVX2 f32: x in float32, 16 lanes per block, float products
//     (definition in mxfp4_f32.cpp)
//   2 SIMD int8 / 3 scalar int8 / 5 AVX2 int8: x rounded to int8 per block of 32, exact int32
//     sums of 8 weights per lane, 16 lanes per quad of blocks, one float FMA per lane and quad
//     with the block's scale (definition in mxfp4_i8.cpp)
// The dots take runs of consecutive rows (the AVX-512 code works on 4 rows at a time, sharing the
// activations); every row's arithmetic is the same whatever the run.
//
// swiglu_many_ computes one segment (n groups) of each of several experts on the same x (the K
// experts of a decode step share each parallel phase); swiglu_ is it for one expert. Per token t:
//   1. per neuron i of every group (parallel): its gate and up rows 2i, 2i+1,
//      h_r = dot(row r, x) + bias_r, then
//   2. a_i = (clamp(h_2i+1, -L, L) + 1) * g sigmoid(alpha g),  g = min(h_2i, L)
//   3. per (expert, down row) (parallel over tiles of kTile rows of an expert, each group's rows
//      of a tile one contiguous run): y += p_j for j in order, p_j = dot(down_j row, a_j) + bd_j
// so each group's partial is independent of the other groups of the call and added in group
// order, as kernels/formats.py requires. With bf16 set (bfloat16 activations), y is rounded to
// bfloat16 after every group, as adding bfloat16 partials one at a time would: then a split
// expert (top segment, then bottom) has the same bits as one call.
//
// Legend: T tokens, D hidden, g neurons per group, n groups, K reduction length.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "mxfp4.h"

namespace mer_mxfp4 {

#if MX_X86
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vbmi") &&
         __builtin_cpu_supports("avx512vnni");
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
#endif

}  // namespace mer_mxfp4

namespace {

using namespace mer_mxfp4;

// float32 -> the nearest bfloat16 (ties to even), kept as a float32 (finite inputs).
inline float round_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Dot {
  bool i8, simd;
  RowsF32 f;
  RowsI8 q;

  // out[r] = dot(row r, a) for `rows` consecutive rows of nb blocks
  void operator()(const uint8_t* blocks, const uint8_t* scales, int64_t rows, int64_t nb,
                  const Act& a, float* out) const {
    if (i8) return q(blocks, scales, rows, nb, a.q.data(), a.s.data(), a.c.data(), out);
    f(blocks, scales, rows, nb, a.xp.data(), out);
  }
};

// isa: 0 scalar f32, 1 SIMD f32, 2 SIMD int8, 3 scalar int8, 4 AVX2 f32, 5 AVX2 int8 (SIMD: the
// best of AVX-512 and AVX2 the CPU has; scalar on a CPU without AVX2: the same bits)
Dot dot_for(int64_t isa) {
  static const bool avx2 = cpu_has_avx2(), avx512 = cpu_has_avx512();
  TORCH_CHECK(isa >= 0 && isa <= 5, "mer_mxfp4: isa must be 0..5, got ", isa);
  const bool i8 = isa == 2 || isa == 3 || isa == 5;
  const bool v = avx2 && isa != 0 && isa != 3;
  const bool wide = v && avx512 && isa < 4;
  const RowsI8 q = wide ? rows_i8_avx512 : v ? rows_i8_avx2 : rows_i8_scalar;
  const RowsF32 f = wide ? rows_f32_avx512 : v ? rows_f32_avx2 : rows_f32_scalar;
  return {i8, v, f, q};
}

// offs: gate/up blocks, gate/up scales, down blocks, down scales, gate/up bias, down bias.
// ys[e] += the segment bufs[e] of expert e on the same x (decode: the K experts of a layer share
// each parallel phase); every expert's groups are added to its y in group order.
void swiglu_many_(at::TensorList ys, const at::Tensor& x, at::TensorList bufs, int64_t D,
                  int64_t g, int64_t per, at::IntArrayRef offs, double alpha, double limit,
                  int64_t isa, bool bf16) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.is_contiguous() && x.dim() == 2,
              "mer_mxfp4: x must be contiguous f32 [T, D]");
  TORCH_CHECK(offs.size() == 6, "mer_mxfp4: 6 section offsets expected");
  TORCH_CHECK(D % 32 == 0 && g % 32 == 0 && per > 0, "mer_mxfp4: D and g must be multiples of 32");
  TORCH_CHECK(ys.size() == bufs.size() && !bufs.empty(), "mer_mxfp4: one y per buffer");
  const int64_t T = x.size(0), E = int64_t(bufs.size());
  TORCH_CHECK(x.size(1) == D && T > 0 && T < 16, "mer_mxfp4::swiglu_: x is not [T < 16, D]");
  std::vector<float*> yp(E);
  std::vector<int64_t> first(E + 1, 0);  // groups of expert e: [first[e], first[e + 1])
  std::vector<const uint8_t*> grp;  // every group's bytes, experts in order
  for (int64_t e = 0; e < E; ++e) {
    const at::Tensor &y = ys[e], &buf = bufs[e];
    TORCH_CHECK(y.dtype() == at::kFloat && y.is_contiguous() && y.numel() == T * D,
                "mer_mxfp4: y must be contiguous f32 [T, D]");
    TORCH_CHECK(buf.dtype() == at::kByte && buf.is_contiguous() && buf.numel() % per == 0 &&
                    buf.numel() > 0,
                "mer_mxfp4: a buffer is not whole uint8 groups");
    yp[e] = y.data_ptr<float>();
    for (int64_t j = 0; j < buf.numel() / per; ++j) grp.push_back(buf.data_ptr<uint8_t>() + j * per);
    first[e + 1] = int64_t(grp.size());
  }
  const int64_t n = int64_t(grp.size());
  const Dot dot = dot_for(isa);
  const float al = float(alpha), lim = float(limit);
  const int64_t og = offs[0], os = offs[1], odb = offs[2], ods = offs[3], ob = offs[4],
                obd = offs[5];
  const float* xp = x.data_ptr<float>();
  std::vector<Act> ax(T);
  for (int64_t t = 0; t < T; ++t) ax[t].prepare(xp + t * D, D, dot.i8, dot.simd);
  const int64_t nbx = D / 32, nba = g / 32;
  // gate/up rows and the clamped SwiGLU, parallel over neurons (rows 2i and 2i+1 of a group)
  std::vector<float> a(n * T * g);  // [groups, T, g]
  at::parallel_for(0, n * g, 4, [&](int64_t b, int64_t e) {
    constexpr int64_t kRun = 16;  // neurons per dot call (32 consecutive rows)
    float h[16][2 * kRun];        // [T][rows] (T < 16: decode)
    for (int64_t r = b; r < e;) {
      const int64_t j = r / g, i = r % g;
      const int64_t m = std::min({e - r, g - i, kRun});  // neurons i..i+m-1 of group j
      for (int64_t t = 0; t < T; ++t)
        dot(grp[j] + og + 2 * i * nbx * 16, grp[j] + os + 2 * i * nbx, 2 * m, nbx, ax[t], h[t]);
      for (int64_t k = 0; k < m; ++k) {
        float bias[2];
        std::memcpy(bias, grp[j] + ob + (2 * (i + k)) * 4, 8);
        for (int64_t t = 0; t < T; ++t) {
          const float gt = std::fmin(h[t][2 * k] + bias[0], lim);
          const float up = std::fmin(std::fmax(h[t][2 * k + 1] + bias[1], -lim), lim);
          const float glu = gt * (1.0f / (1.0f + std::exp(-(gt * al))));
          a[(j * T + t) * g + i + k] = (up + 1.0f) * glu;
        }
      }
      r += m;
    }
  });
  std::vector<Act> aa(n * T);  // in this thread: about 1 % of the call, one parallel region less
  for (int64_t k = 0; k < n * T; ++k) aa[k].prepare(a.data() + k * g, g, dot.i8, dot.simd);
  // down rows in tiles of kTile rows of one expert: each group's rows of a tile are one
  // contiguous run of bytes (a row at a time over the groups would be many short strided streams,
  // latency-bound: 2x slower from DRAM); each (row, token) still adds its groups in order. Up to
  // 720 rows (GPT-OSS: 170 KB a group), at least 4 tiles per thread.
  const int64_t want = (E * D + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads());
  const int64_t kTile = std::min<int64_t>(720, std::max<int64_t>(32, (want + 3) / 4 * 4));
  const int64_t tiles = (D + kTile - 1) / kTile;
  at::parallel_for(0, E * tiles, 1, [&](int64_t b, int64_t e) {
    std::vector<float> bufv(2 * kTile * T);
    float* acc = bufv.data();          // [row in tile, token]
    float* p = acc + kTile * T;        // [token, row]
    for (int64_t idx = b; idx < e; ++idx) {
      const int64_t ex = idx / tiles, r0 = idx % tiles * kTile;
      const int64_t rows = D - r0 < kTile ? D - r0 : kTile;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t t = 0; t < T; ++t) acc[r * T + t] = yp[ex][t * D + r0 + r];
      for (int64_t j = first[ex]; j < first[ex + 1]; ++j) {
        for (int64_t t = 0; t < T; ++t)
          dot(grp[j] + odb + r0 * nba * 16, grp[j] + ods + r0 * nba, rows, nba, aa[j * T + t],
              p + t * kTile);
        for (int64_t r = 0; r < rows; ++r) {
          float bias;
          std::memcpy(&bias, grp[j] + obd + (r0 + r) * 4, 4);
          for (int64_t t = 0; t < T; ++t) {
            float& v = acc[r * T + t];
            v += p[t * kTile + r] + bias;
            if (bf16) v = round_bf16(v);  // y is bfloat16: rounded after every group
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t t = 0; t < T; ++t) yp[ex][t * D + r0 + r] = acc[r * T + t];
    }
  });
}

void swiglu_(at::Tensor y, const at::Tensor& x, const at::Tensor& buf, int64_t D, int64_t g,
             int64_t per, at::IntArrayRef offs, double alpha, double limit, int64_t isa,
             bool bf16) {
  swiglu_many_({y}, x, {buf}, D, g, per, offs, alpha, limit, isa, bf16);
}

// y [T, N] = x [T, K] . W^T for MXFP4 rows W: blocks [N, K/32, 16], scales [N, K/32] (tests and
// the bandwidth benchmark: the same dots as swiglu_).
void linear_(at::Tensor y, const at::Tensor& x, const at::Tensor& blocks, const at::Tensor& scales,
             int64_t isa) {
  TORCH_CHECK(y.dtype() == at::kFloat && y.is_contiguous() && x.dtype() == at::kFloat &&
                  x.is_contiguous() && x.dim() == 2,
              "mer_mxfp4::linear_: x and y must be contiguous f32");
  TORCH_CHECK(blocks.dtype() == at::kByte && blocks.is_contiguous() && blocks.dim() == 3 &&
                  blocks.size(2) == 16 && scales.dtype() == at::kByte && scales.is_contiguous(),
              "mer_mxfp4::linear_: blocks must be uint8 [N, K/32, 16], scales uint8 [N, K/32]");
  const int64_t T = x.size(0), K = x.size(1), N = blocks.size(0), nb = blocks.size(1);
  TORCH_CHECK(K == nb * 32 && scales.numel() == N * nb && y.numel() == T * N,
              "mer_mxfp4::linear_: shapes disagree");
  const Dot dot = dot_for(isa);
  std::vector<Act> ax(T);
  for (int64_t t = 0; t < T; ++t) ax[t].prepare(x.data_ptr<float>() + t * K, K, dot.i8, dot.simd);
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  const uint8_t* sp = scales.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = 0; t < T; ++t) dot(bp + b * nb * 16, sp + b * nb, e - b, nb, ax[t], yp + t * N + b);
  });
}

bool has_avx2() { return cpu_has_avx2(); }
bool has_avx512() { return cpu_has_avx512(); }

}  // namespace

TORCH_LIBRARY(mer_mxfp4, m) {
  m.def("swiglu_(Tensor(a!) y, Tensor x, Tensor buf, int hidden, int group, int per, int[] offs, "
        "float alpha, float limit, int isa, bool bf16) -> ()", &swiglu_);
  m.def("swiglu_many_(Tensor(a!)[] ys, Tensor x, Tensor[] bufs, int hidden, int group, int per, "
        "int[] offs, float alpha, float limit, int isa, bool bf16) -> ()", &swiglu_many_);
  m.def("linear_(Tensor(a!) y, Tensor x, Tensor blocks, Tensor scales, int isa) -> ()", &linear_);
  m.def("has_avx2() -> bool", &has_avx2);
  m.def("has_avx512() -> bool", &has_avx512);
}
