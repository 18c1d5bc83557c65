// One decode token's attention block, and the router after it, in one native call (see
// kernels/decode_block.py). The Python forward pays a few microseconds per torch dispatch and
// wrapper; a layer's attention half was some 25 of them (norm, the fused q/k/v GEMV and its split,
// q/k norms, RoPE + cache append + attention, the o projection, the residual add, the second
// norm, the router; bench/overhead.py lists the ops per token). Here they are the same ops in the
// same order, called from C++: each quantized GEMV through the dispatcher (the mer library's
// dense_q4_linear_ / dense_q8_linear_), plain weights through at::linear, the norms, RoPE,
// attention and router by layer_ops.cpp's functions. So the bits are those of the op-by-op path.
//
//   attn_block_(x, h, ids, wts, kc, vc, w, iv, fv, pos)
//     x   [1, D] float32, the residual stream: x += o_proj(attend(rope(qkv(norm1(x)))))
//     h   [1, D] float32, out: norm2(x) (the MLP's input)
//     ids [1, K] int64, wts [1, K] float32, out: the softmax-top-k router on h (when w[13] is
//         not empty)
//     kc, vc [Hk, C, Dh] the layer's KV cache (float32 or bf16), row pos written
//     w   tensors, empty = absent: 0 norm1, 1 norm2, 2-4 q/k/v weight parts a, b and bias,
//         5 q_norm, 6 k_norm, 7-9 o weight parts a, b and bias, 10 cos, 11 sin [C', Dh]
//         (the whole RoPE tables: row pos is used),
//         12 sinks [H], 13 router weight [E, D]
//     iv  ints: 0 qkv kind, 1 o kind (0 plain: a is the weight; 1 q8: a int8, b scales; 2 q4:
//         a packed nibbles, b (scale, zero) pairs; 3 / 4: q4 in 32- / 64-row blocks with
//         each block's pairs together, as mer::q4_linear_ takes them with sz_blocked),
//         2-4 q, k, v widths, 5 H, 6 Hk, 7 Dh,
//         8 qk_norm (0 none, 1 over the whole projection, 2 per head), 9 window (0: none),
//         10 renormalize the top-k (0/1), 11 clip q/k/v (0/1)
//     fv  floats: 0 eps, 1 attention scale, 2 clip bound
//
//   layer_(x, h, ids, wts, kc, vc, w, iv, fv, pos, table, ev, y) -> bool
//     attn_block_, then the chosen experts' weighted sum (experts_combine_, experts in id order
//     from table [E]) added to x; false (attention half only) when one is not in the table
//
// Legend: D hidden, H query heads, Hk kv heads, Dh head dim, C cache capacity, E experts.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>

namespace mer_layer_detail {
void rms_norm_(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w, double eps);
void rope_attend_(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& kc, const at::Tensor& vc,
                  const at::Tensor& cos, const at::Tensor& sin, int64_t pos, double scale,
                  int64_t window, const at::Tensor& sinks, int64_t isa);
void router_topk_(const at::Tensor& ids, const at::Tensor& wts, const at::Tensor& x,
                  const at::Tensor& w, bool norm);
}  // namespace mer_layer_detail

namespace {

using DenseOp = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     int64_t);

// The mer library's dense GEMV ops, found once (the library is loaded before any block whose
// weights are quantized is built: kernels/decode_block.py checks).
const c10::TypedOperatorHandle<DenseOp>& dense_op(int64_t kind) {
  static const auto q8 = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mer::dense_q8_linear_", "")
                             .typed<DenseOp>();
  static const auto q4 = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mer::dense_q4_linear_", "")
                             .typed<DenseOp>();
  return kind == 1 ? q8 : q4;
}

using BlockedOp = void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, int64_t, int64_t, bool, int64_t, bool, bool);

// q4 in the expert kernel's row blocks (kernels/dense_quant.py Q4Blocked): mer::q4_linear_.
const c10::TypedOperatorHandle<BlockedOp>& blocked_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mer::q4_linear_", "")
                             .typed<BlockedOp>();
  return op;
}

// x [1, K] @ W^T (+ bias) as kernels/dense.py's linear computes it: at::linear for a plain
// weight, else the format's native GEMV (isa 1: the best this CPU has) and then the bias added.
at::Tensor linear(const at::Tensor& x, int64_t kind, const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& bias) {
  const bool has_bias = bias.numel() > 0;
  if (kind == 0) return has_bias ? at::linear(x, a, bias) : at::linear(x, a);
  TORCH_CHECK(kind >= 1 && kind <= 4, "attn_block_: weight kind must be 0 to 4, got ", kind);
  const int64_t n = a.size(0);
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  if (kind >= 3)  // blocks of 64 weights along K, 32 or 64 rows, split nibbles, int8 x
    blocked_op().call(y, x, a, b, 64, kind == 3 ? 32 : 64, true, 1, true, true);
  else
    dense_op(kind).call(y, x, a, b, 1);
  return has_bias ? y.add(bias) : y;
}

at::Tensor norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  at::Tensor x2 = x.contiguous();
  at::Tensor out = at::empty_like(x2);
  mer_layer_detail::rms_norm_(out, x2, w, eps);
  return out;
}

void attn_block_(const at::Tensor& x, const at::Tensor& h, const at::Tensor& ids,
                 const at::Tensor& wts, const at::Tensor& kc, const at::Tensor& vc,
                 at::TensorList w, at::IntArrayRef iv, at::ArrayRef<double> fv, int64_t pos) {
  TORCH_CHECK(w.size() == 14 && iv.size() == 12 && fv.size() == 3,
              "attn_block_: needs 14 tensors, 12 ints and 3 floats, got ", w.size(), ", ",
              iv.size(), ", ", fv.size());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.scalar_type() == at::kFloat &&
                  x.is_contiguous() && h.sizes() == x.sizes() &&
                  h.scalar_type() == at::kFloat && h.is_contiguous(),
              "attn_block_: x and h must be contiguous float32 [1, D]");
  const int64_t nq = iv[2], nk = iv[3], nv = iv[4], H = iv[5], Hk = iv[6], Dh = iv[7];
  const int64_t qk_norm = iv[8];
  const double eps = fv[0];
  TORCH_CHECK(nq == H * Dh && nk == Hk * Dh && nv == Hk * Dh,
              "attn_block_: q/k/v widths disagree with the heads");

  at::Tensor hn = norm(x, w[0], eps);                     // [1, D]
  at::Tensor qkv = linear(hn, iv[0], w[2], w[3], w[4]);  // [1, nq + nk + nv]
  TORCH_CHECK(qkv.size(1) == nq + nk + nv, "attn_block_: the q/k/v weight has ", qkv.size(1),
              " rows, not ", nq + nk + nv);
  at::Tensor q = qkv.narrow(1, 0, nq), k = qkv.narrow(1, nq, nk), v = qkv.narrow(1, nq + nk, nv);
  if (qk_norm == 1) {
    q = norm(q, w[5], eps);
    k = norm(k, w[6], eps);
  }
  if (iv[11]) {
    q = q.clamp(-fv[2], fv[2]);
    k = k.clamp(-fv[2], fv[2]);
    v = v.clamp(-fv[2], fv[2]);
  }
  q = q.contiguous().view({H, Dh});
  k = k.contiguous().view({Hk, Dh});
  v = v.contiguous().view({Hk, Dh});
  if (qk_norm == 2) {
    q = norm(q, w[5], eps);
    k = norm(k, w[6], eps);
  }
  at::Tensor o = at::empty_like(q);  // [H, Dh]
  TORCH_CHECK(w[10].dim() == 2 && pos >= 0 && pos < w[10].size(0) && w[11].sizes() == w[10].sizes(),
              "attn_block_: position ", pos, " outside the RoPE tables");
  mer_layer_detail::rope_attend_(o, q, k, v, kc, vc, w[10].select(0, pos), w[11].select(0, pos),
                                 pos, fv[1], iv[9], w[12], 1);
  at::Tensor proj = linear(o.view({1, nq}), iv[1], w[7], w[8], w[9]);  // [1, D]
  x.add_(proj);
  mer_layer_detail::rms_norm_(h, x, w[1], eps);
  if (w[13].numel() > 0) mer_layer_detail::router_topk_(ids, wts, h, w[13], iv[10] != 0);
}

using CombineOp = void(const at::Tensor&, const at::Tensor&, at::TensorList, const at::Tensor&,
                       at::IntArrayRef, int64_t, int64_t, int64_t, int64_t, at::IntArrayRef,
                       int64_t, int64_t, int64_t, bool);

// The mer library's one-call decode MoE (native.cpp experts_combine_), found once.
const c10::TypedOperatorHandle<CombineOp>& combine_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mer::experts_combine_", "")
                             .typed<CombineOp>();
  return op;
}

// A whole decode layer when its experts are in RAM: attn_block_ (the router included), then the
// routed experts' gate-weighted sum added to x, as the model's resident path computes it
// (model.py routed_one: experts_combine_ on h with the experts in id order, view k weighted by
// wts[0, order[k]]; then x += that). table [E]: each expert's whole buffer, or an empty tensor
// when it is not resident; ev: experts_combine_'s constant arguments (fmt, D, g, block,
// offs[4], per, bn, isa, int8_x). Returns false, after the attention half (x, h, ids, wts and
// the KV row written), when a chosen expert is not in the table: the caller computes the MoE.
bool layer_(const at::Tensor& x, const at::Tensor& h, const at::Tensor& ids, const at::Tensor& wts,
            const at::Tensor& kc, const at::Tensor& vc, at::TensorList w, at::IntArrayRef iv,
            at::ArrayRef<double> fv, int64_t pos, at::TensorList table, at::IntArrayRef ev,
            const at::Tensor& y) {
  TORCH_CHECK(w.size() == 14 && w[13].numel() > 0 && ev.size() == 12,
              "layer_: needs the router weight and 12 expert arguments");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.size(0) == 1 &&
                  ids.is_contiguous() && y.sizes() == x.sizes() && y.scalar_type() == at::kFloat &&
                  y.is_contiguous(),
              "layer_: ids must be int64 [1, K] and y float32 like x");
  attn_block_(x, h, ids, wts, kc, vc, w, iv, fv, pos);
  const int64_t K = ids.size(1), E = int64_t(table.size());
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<int64_t> order(K);
  for (int64_t k = 0; k < K; ++k) order[k] = k;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return id[a] < id[b]; });
  std::vector<at::Tensor> bufs;
  bufs.reserve(K);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t e = id[order[k]];
    TORCH_CHECK(e >= 0 && e < E, "layer_: expert ", e, " outside the table of ", E);
    if (!table[e].defined() || table[e].numel() == 0) return false;
    bufs.push_back(table[e]);
  }
  combine_op().call(y, h, bufs, wts, order, ev[0], ev[1], ev[2], ev[3], ev.slice(4, 4), ev[8],
                    ev[9], ev[10], ev[11] != 0);
  x.add_(y);
  return true;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mer_attn, m) {
  m.def("attn_block_(Tensor(a!) x, Tensor(b!) h, Tensor(c!) ids, Tensor(d!) wts, Tensor(e!) kc, "
        "Tensor(f!) vc, Tensor[] w, int[] iv, float[] fv, int pos) -> ()",
        &attn_block_);
  m.def("layer_(Tensor(a!) x, Tensor(b!) h, Tensor(c!) ids, Tensor(d!) wts, Tensor(e!) kc, "
        "Tensor(f!) vc, Tensor[] w, int[] iv, float[] fv, int pos, Tensor[] table, int[] ev, "
        "Tensor(g!) y) -> bool",
        &layer_);
}
