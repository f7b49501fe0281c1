// Small-batch linear layer (CPU): the matrix-vector products of the decode step. torch.ops.llama_mm.gemv.
#pragma once

#include <ATen/ATen.h>

namespace llama_mm::cpu {

// x [..., K] with at most 64 rows, w [N, K] (nn.Linear layout, rows contiguous), same dtype (float32, bfloat16,
// float16) -> [..., N] in x's dtype. Accumulates in float32,
// each row in one fixed order whatever the number of rows (batch-invariant).
at::Tensor gemv(const at::Tensor& x, const at::Tensor& w);

// Whether gemv takes this product (CPU, supported dtype, few enough rows); otherwise use at::linear.
bool gemv_applies(const at::Tensor& x, const at::Tensor& w);

}  // namespace llama_mm::cpu
