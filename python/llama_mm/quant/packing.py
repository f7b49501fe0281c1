"""The compressed-tensors "pack-quantized" bit layout: the one place it is written down.

A row of K signed `bits`-bit values q[k] in [-2^(bits-1), 2^(bits-1) - 1] is stored as K*bits/32 int32 words:
the unsigned value q[k] + 2^(bits-1) sits in word k*bits // 32 at bit offset (k*bits) % 32, the first value of a
word in its lowest bits. Only bits 4 and 8 are used here (a value never straddles two words), so K must be a
multiple of 32 // bits.
"""

from __future__ import annotations

import torch

__all__ = ["BITS", "pack", "unpack", "packed_width"]

BITS = (4, 8)


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"pack-quantized: bits must be 4 or 8, got {bits}")


def packed_width(K: int, bits: int) -> int:
    """int32 words per row of K `bits`-bit values; K must be a multiple of 32 // bits."""
    _check_bits(bits)
    per_word = 32 // bits
    if K % per_word != 0:
        raise ValueError(f"pack-quantized: K = {K} is not a multiple of {per_word} (32 // bits for bits = {bits})")
    return K // per_word


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integer values q [N, K] -> packed int32 [N, K*bits//32]."""
    if q.dim() != 2 or q.dtype.is_floating_point or q.dtype == torch.bool:
        raise ValueError(f"pack: q must be a 2-D integer tensor [N, K], got {q.dtype} {tuple(q.shape)}")
    N, K = q.shape
    W = packed_width(K, bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"pack: values must lie in [{lo}, {hi}] for bits = {bits}, "
                         f"got [{int(q.min())}, {int(q.max())}]")
    per_word = 32 // bits
    u = (q.to(torch.int64) + (1 << (bits - 1))).view(N, W, per_word)  # (N, W, values per word), unsigned
    shifts = torch.arange(per_word, device=q.device, dtype=torch.int64) * bits  # (values per word,)
    words = (u << shifts).sum(-1)  # (N, W) in [0, 2^32): disjoint bit fields, so the sum is an OR
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Packed int32 [N, W] with W = K*bits//32 -> signed int8 values [N, K]."""
    W = packed_width(K, bits)
    if packed.dim() != 2 or packed.dtype != torch.int32 or packed.shape[1] != W:
        raise ValueError(f"unpack: packed must be int32 [N, {W}] (K*bits/32 for K = {K}, bits = {bits}), "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int64) * bits  # (values per word,)
    u = (packed.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)  # (N, W, values per word)
    return (u.reshape(packed.shape[0], K) - (1 << (bits - 1))).to(torch.int8)
