// Quantized linear layer with int8 activations (CPU): y = x W^T, W int4 / int8 in compressed-tensors'
// pack-quantized layout (as qlinear.h), x quantized on the fly to int8 per block of 32 values, products and their
// sums in integers. torch.ops.llama_mm.qlinear_a8: the opt-in fast path (load_model(..., activations="int8")),
// like llama.cpp's Q4_0 x Q8_0 products; qlinear keeps float32 products and matches transformers to 1e-5.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace llama_mm::cpu {

// Activation values per int8 scale.
constexpr int64_t kActivationBlock = 32;

// Arguments as qlinear's, K a multiple of kActivationBlock. Per row m of x and block b of 32 values:
//   d[m, b] = max_k |x[m, k]| / 127 (float32),  xq[m, k] = round-half-even(x[m, k] / d[m, b]) (int8; 0 when d = 0)
//   y[m, n] = sum_g scale[n, g] * sum_{b in g} d[m, b] * sum_{k in b} (q[n, k] - zero[n, g]) * xq[m, k]
// the inner sums exact in int32, the rest in float32, rounded once to x's dtype -> [..., N] contiguous, for up to
// kQlinearDecodeRows rows of x (decode steps, short prompts); more rows (a long prompt's prefill) are qlinear's
// float32 products, which dequantize a tile and multiply with a GEMM, faster there than integer products. Up to
// kQlinearDecodeRows rows, each row's result depends on that row alone (batch invariant).
at::Tensor qlinear_a8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                      const std::optional<at::Tensor>& zero, int64_t bits, int64_t group_size);

}  // namespace llama_mm::cpu
