// Single-query attention over a paged KV cache (CPU): the batched decode step of the scheduler, where each row's
// keys sit in fixed-size blocks of a shared pool. Registered as torch.ops.llama_mm.paged_attention.
#pragma once

#include <ATen/ATen.h>

namespace llama_mm::cpu {

// q [B, H, D]; k_pool, v_pool [num_blocks, Hkv, block_size, D]; block_tables [B, max_blocks] int32/int64 (row b's
// key j sits in block block_tables[b, j / block_size] at slot j % block_size); lengths [B] int32/int64 in
// [1, max_blocks * block_size]: row b attends to its keys [0, lengths[b]). GQA: query head h reads KV head
// h / (H / Hkv). -> [B, H, D]. Each row's result depends on its own inputs only (batch-invariant).
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                           const at::Tensor& block_tables, const at::Tensor& lengths);

}  // namespace llama_mm::cpu
