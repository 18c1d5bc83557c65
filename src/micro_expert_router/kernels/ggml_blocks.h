// The interface between ggml_native.cpp (activations, ops) and ggml_blocks.cpp (one decoder and
// row dot per GGUF block type). Local headers are part of the native build's cache key
// (native.library_path), so a change here rebuilds the library.
#pragma once

#include <cstdint>

namespace mer_ggml {

// One activation vector prepared for a type's row dots (ggml_native.cpp's Act owns the memory):
// f32 mode x and the sums of x per G; int8 mode codes q [K], scales d [K / B], code sums bs per G.
struct ActView {
  const float *x, *xs;
  const int8_t* q;
  const float* d;
  const int16_t* bs;
};

// The n segments of one output: acc + dot_0 + dot_1 + ... in order (segment j: the rows at
// row + j stride against act[j astride], nb blocks). One call per output keeps the call overhead
// off the one-block down rows.
struct Segs {
  const uint8_t* row;
  int64_t stride;
  const ActView* act;
  int64_t astride, n, nb;
};
using Dot = float (*)(const Segs&, float);
// Four outputs at once: acc[r] as Dot on the segments shifted by r rstride bytes (the same bits
// as four Dot calls; the rows share the loop, which hides the latency of one-block rows).
using Dot4 = void (*)(const Segs&, int64_t rstride, float* acc);

struct BlockKind {
  int64_t block, nbytes, gran;  // B, bytes per block, G
  Dot dot;                      // nullptr: the type has no kernel
  Dot4 dot4;                    // nullptr: call dot per output
};
// isa: 0 scalar f32, 1 AVX2 f32, 2 SIMD with int8 activations (AVX-512 VNNI where the CPU has
// it and the type has such a kernel, else AVX2), 3 scalar int8, 4 AVX2 int8 (no AVX-512)
BlockKind block_kind(int64_t type, int64_t isa);
// The K-quants' int8-activation row dots (ggml_kquant.cpp); nullptr for other types. wide: the
// AVX-512 ones (ggml_kquant512.cpp) where the CPU and the type have them.
Dot kquant_int8(int64_t type, bool avx2, bool wide);
Dot4 kquant_int8_4(int64_t type, bool avx2, bool wide);
Dot kquant_int8_512(int64_t type);    // nullptr: no AVX-512 VNNI or no such kernel
Dot4 kquant_int8_4_512(int64_t type);
bool cpu_has_avx2();
bool cpu_has_avx512();  // F, BW, VL, DQ, VNNI

}  // namespace mer_ggml
