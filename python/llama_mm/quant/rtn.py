"""Round-to-nearest weight quantization with the min-max observer, value for value what compressed-tensors computes.

For each group of `group_size` columns of a row (or the whole row, per channel), in the weight's own dtype:
  lo = min(min(w), 0), hi = max(max(w), 0)                   (0 must stay representable)
  symmetric:  scale = max(|lo|, |hi|) / ((qmax - qmin) / 2),  zero = 0
  asymmetric: scale = (hi - lo) / (qmax - qmin),              zero = round(clamp(qmin - lo / scale, qmin, qmax))
  scale == 0 -> the dtype's eps
  q = round(clamp(w / scale + zero, qmin, qmax)),  [qmin, qmax] = [-2^(bits-1), 2^(bits-1) - 1]
and back: w' = (q - zero) * scale in the scale's dtype. (compressed_tensors: quantization/utils/helpers.py
calculate_qparams; quantization/lifecycle/forward_helpers.py _quantize, _dequantize.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import pack, unpack
from .scheme import QuantScheme


@dataclass
class QuantizedWeight:
    """One quantized Linear weight [N, K].

    packed: int32 [N, K*bits/32], q + 2^(bits-1) of column k in word k*bits//32 at bit (k*bits)%32 (packing.pack);
    scale: [N, G] in the source dtype;
    zero: int8 [N, G] signed zero points (None when symmetric); group_size: columns per scale (K per channel).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]

    def q(self) -> torch.Tensor:
        """The signed integer values, int8 [N, K]."""
        return unpack(self.packed, self.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(q - zero) * scale [N, K], computed in the scale's dtype (then cast to `dtype` if given)."""
        n, k = self.shape
        groups = self.scale.shape[1]
        w = self.q().view(n, groups, k // groups).to(self.scale.dtype)  # (N, G, K/G)
        if self.zero is not None:
            w = w - self.zero.to(self.scale.dtype).unsqueeze(-1)
        w = (w * self.scale.unsqueeze(-1)).view(n, k)
        return w if dtype is None else w.to(dtype)


def qrange(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(qmin, qmax) as float32 scalars, as compressed-tensors' calculate_range gives them."""
    return torch.tensor(-(2.0 ** bits) / 2), torch.tensor(2.0 ** bits / 2 - 1)


def quantize_weight(w: torch.Tensor, scheme: QuantScheme, name: str = "weight") -> QuantizedWeight:
    """Quantize one Linear weight [N, K] (floating point) with `scheme`; `name` is used in error messages."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"tensor {name}: expected a 2-D floating-point weight, got {w.dtype} {list(w.shape)}")
    n, k = w.shape
    scheme.validate(k, name)
    groups = scheme.groups(k)
    wg = w.view(n, groups, k // groups)  # (N, G, K/G)
    scale, zero = _qparams(wg.amin(-1), wg.amax(-1), scheme)  # (N, G) each
    qmin, qmax = qrange(scheme.bits)
    x = wg / scale.unsqueeze(-1)
    if zero is not None:
        x = x + zero.to(w.dtype).unsqueeze(-1)
    q = torch.round(torch.clamp(x, qmin, qmax)).to(w.dtype).to(torch.int8).view(n, k)
    return QuantizedWeight(pack(q, scheme.bits), scale, zero, scheme.bits, k // groups, (n, k))


def _qparams(lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and (asymmetric) int8 zero point per group from the observed min and max, both (N, G)."""
    lo = torch.min(lo, torch.zeros_like(lo))
    hi = torch.max(hi, torch.zeros_like(hi))
    qmin, qmax = qrange(scheme.bits)
    span = (qmax - qmin).to(lo.dtype)
    if scheme.symmetric:
        scale = torch.max(lo.abs(), hi.abs()) / (span / 2)
        zero = None
    else:
        scale = (hi - lo) / span
        zero = torch.clamp(qmin - lo / scale, qmin, qmax)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype), scale)
    if zero is not None:
        zero = torch.round(torch.clamp(zero, -128, 127)).to(torch.int8)
    return scale, zero


def pack_zero_point(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points int8 [N, G] -> int32 [ceil(N*bits/32), G], packed along output rows as compressed-tensors stores
    them (rows padded with the value that packs to 0 bits)."""
    n, _ = zero.shape
    per_word = 32 // bits
    pad = -n % per_word
    zt = zero.t()  # (G, N)
    if pad:
        zt = torch.cat([zt, zt.new_full((zt.shape[0], pad), -(2 ** (bits - 1)))], dim=1)
    return pack(zt.contiguous(), bits).t().contiguous()


def unpack_zero_point(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of pack_zero_point: int32 [ceil(rows*bits/32), G] -> int8 [rows, G]."""
    padded = packed.shape[0] * 32 // bits
    return unpack(packed.t().contiguous(), bits, padded)[:, :rows].t().contiguous()
