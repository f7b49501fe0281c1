// Linear layer over many rows with 16-bit weights on a CPU without 16-bit arithmetic (CPU).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace llama_mm::cpu {

// Whether widened_linear should take x [..., K] @ w [N, K]^T: CPU tensors of one dtype, bfloat16 on a CPU without
// AVX512-BF16 or float16 on one without AVX512-FP16 (there at::linear runs ~5-8x slower than a float32 GEMM).
bool widened_linear_applies(const at::Tensor& x, const at::Tensor& w);

// x [..., K] @ w [N, K]^T (+ bias [N]) -> [..., N] in x's dtype: blocks of weight rows widened to float32 (exact),
// float32 GEMM (at::linear, the bias added in float32), each output rounded once to the dtype, as at::linear's own
// 16-bit GEMM does (float32 sums of exact products); only the order of the sums differs.
at::Tensor widened_linear(const at::Tensor& x, const at::Tensor& w,
                          const std::optional<at::Tensor>& bias = std::nullopt);

}  // namespace llama_mm::cpu
