// CUDA kernels of the llama_mm ops, callable directly from C++ (the decode engine) without the dispatcher.
// Same contracts as the CPU kernels in cpp/ops.h; each cuda/<op>.cu also registers its function as the CUDA
// implementation of torch.ops.llama_mm.<op>. Kernels run on the current CUDA stream of x's device.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace llama_mm::cuda {

// x [..., D] (any strides), weight [D] -> [..., D] contiguous
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
void rms_norm_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps);

// x [B, T, H, D] (any strides), positions [B, T] int64, inv_freq [D/2] float32 -> [B, T, H, D] contiguous
at::Tensor rope(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq);
void rope_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq);

// gate, up [..., F] (any strides) -> silu(gate) * up, contiguous
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);
void silu_mul_out(at::Tensor& out, const at::Tensor& gate, const at::Tensor& up);

// q [B, H, D]; k_cache, v_cache [B, Hkv, S_max, D]; key_valid [B, >= S_max] bool; length: one-element int64 tensor
// on q's device, read by the kernel (never on the host: the call can be captured in a CUDA graph), clamped to
// [1, S_max]; attends to slots [0, length). -> [B, H, D] contiguous.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& key_valid, const at::Tensor& length);

// q [B, H, D]; k, v [B, Hkv, S, D]; mask [B, S] additive float or none. -> [B, H, D] contiguous.
at::Tensor cross_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& mask);

// x [..., K] (any strides); packed int32 [N, K*bits/32]; scale [N, K/group_size]; zero int8 [N, K/group_size] or
// none; bits 4 or 8 -> [..., N] in x's dtype, contiguous (see cpp/kernels/qlinear.h).
at::Tensor qlinear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                   const std::optional<at::Tensor>& zero, int64_t bits, int64_t group_size);

}  // namespace llama_mm::cuda
