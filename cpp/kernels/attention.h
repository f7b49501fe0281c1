// Single-query attention kernels of the decode step (CPU). Registered as torch.ops.llama_mm.decode_attention and
// torch.ops.llama_mm.cross_attention; callable directly from C++.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace llama_mm::cpu {

// q [B, H, D]; k_cache, v_cache [B, Hkv, S_max, D]; key_valid [B, S_max] bool (false = masked, e.g. left
// padding); length: one-element int64 tensor on the cache's device (a tensor so that a captured CUDA graph reads
// the current value); attends to cache slots [0, length). -> [B, H, D].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& key_valid, const at::Tensor& length);

// q [B, H, D]; k, v [B, Hkv, S, D] (the image's keys and values); mask [B, S] additive float or none. -> [B, H, D].
at::Tensor cross_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& mask);

}  // namespace llama_mm::cpu
