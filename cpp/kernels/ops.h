// CPU kernels of the llama_mm ops, callable directly from C++ (the decode engine, the microbenchmarks) without
// going through the dispatcher. The same functions are registered as the CPU implementations of
// torch.ops.llama_mm.* (op_library.cpp). Every function checks its arguments (op_common.h) and accepts
// float32, bfloat16 and float16; reduced-precision inputs are computed in float32 and rounded to the input dtype
// exactly where the Hugging Face reference rounds.
#pragma once

#include <ATen/ATen.h>

namespace llama_mm::cpu {

// RMSNorm over the last dim (HF MllamaTextRMSNorm):
//   out = weight * (x.float() * rsqrt(mean(x.float()^2, -1) + eps)).to(x.dtype)
// x [..., D] (any strides), weight [D] (same dtype as x) -> out [..., D] contiguous.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
// Same, writing into `out`: contiguous, x's shape and dtype; must not overlap x or weight.
void rms_norm_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps);

// Rotary position embedding (HF apply_rotary_pos_emb with cos/sin from MllamaRotaryEmbedding):
//   freqs = positions.float()[..., None] * inv_freq; emb = cat(freqs, freqs, -1)
//   out = x * emb.cos().to(x.dtype) + rotate_half(x) * emb.sin().to(x.dtype)
// x [B, T, H, D] (any strides), positions [B, T] int64, inv_freq [D/2] float32 -> out [B, T, H, D] contiguous.
at::Tensor rope(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq);
// Same, writing into `out`: contiguous, x's shape and dtype; must not overlap x.
void rope_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq);

// Fused SwiGLU activation: silu(gate) * up. gate, up [..., F] (same shape and dtype, any strides) -> contiguous.
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);
// Same, writing into `out`: contiguous, gate's shape and dtype; must not overlap gate or up.
void silu_mul_out(at::Tensor& out, const at::Tensor& gate, const at::Tensor& up);

}  // namespace llama_mm::cpu
