// Weight-only quantized linear layer (CPU): y = x W^T with W stored int4 / int8 in compressed-tensors'
// "pack-quantized" layout. torch.ops.llama_mm.qlinear.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace llama_mm::cpu {

// Rows of x up to which the decode kernel runs (each row's result independent of the others, bitwise); past it
// the prefill path dequantizes tiles of W to float32 and multiplies with at::mm.
constexpr int64_t kQlinearDecodeRows = 64;

// x [..., K] float32 / bfloat16 / float16 (any strides); packed int32 [N, K*bits/32]: value k of row n (signed,
// stored as q + 2^(bits-1)) in word k*bits/32 at bit (k*bits)%32; scale [N, K/group_size] float32 / bfloat16 /
// float16; zero int8 [N, K/group_size] (signed zero points) or none (symmetric); bits 4 or 8.
//   y[m, n] = sum_g scale[n, g] * sum_{k in group g} (q[n, k] - zero[n, g]) * x[m, k]
// in float32, rounded once to x's dtype -> [..., N] contiguous.
at::Tensor qlinear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                   const std::optional<at::Tensor>& zero, int64_t bits, int64_t group_size);

}  // namespace llama_mm::cpu
