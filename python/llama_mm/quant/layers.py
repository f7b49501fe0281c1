"""QuantLinear: a Linear layer whose weight is stored weight-only quantized (int4 / int8, per group), and the
helpers that put such layers into a model.

Buffers carry compressed-tensors' names, so a quantized module `P` holds `P.weight_packed` int32 [N, K*bits/32],
`P.weight_scale` [N, K/group] (model dtype) and `P.weight_zero` int8 [N, K/group] (asymmetric schemes; None when
symmetric). bits and group size follow from the shapes (`quant_geometry`), one rule shared with the engine:

    bits = 32 * packed.size(1) / K,     group_size = K / scale.size(1)

forward is `ops.qlinear` (native kernel, or its pure-PyTorch reference): y = x W^T (+ b) with
W = (q - zero) * scale, products and sums in float32, in x's dtype; or, with `activations = "int8"` (load_model's
opt-in), `ops.qlinear_a8`: x quantized to int8 per 32 values, integer products (up to 64 rows; more rows take the
float32 products).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .checkpoint import TEXT_LINEAR
from .rtn import QuantizedWeight, quantize_weight
from .scheme import SUPPORTED_BITS, QuantScheme

ACTIVATIONS = ("float", "int8")  # how a QuantLinear takes its input: as is, or quantized to int8 per 32 values


def quant_geometry(packed: torch.Tensor, scale: torch.Tensor, in_features: int, where: str) -> tuple[int, int]:
    """(bits, group_size) of a packed weight of `in_features` columns; ValueError naming `where` when the shapes
    do not describe a supported layout."""
    if packed.dim() != 2 or scale.dim() != 2 or packed.size(0) != scale.size(0):
        raise ValueError(f"{where}: weight_packed {list(packed.shape)} and weight_scale {list(scale.shape)} must be "
                         f"2-D with the same number of rows")
    words, groups = packed.size(1), scale.size(1)
    if packed.dtype != torch.int32:
        raise ValueError(f"{where}: weight_packed must be int32, got {packed.dtype}")
    if words == 0 or (32 * words) % in_features or (32 * words) // in_features not in SUPPORTED_BITS:
        raise ValueError(f"{where}: weight_packed has {words} int32 words per row for {in_features} inputs: "
                         f"not a {SUPPORTED_BITS}-bit packing")
    if groups == 0 or in_features % groups:
        raise ValueError(f"{where}: weight_scale has {groups} groups per row, which does not divide the "
                         f"{in_features} inputs")
    return 32 * words // in_features, in_features // groups


class QuantLinear(nn.Module):
    """y = x W^T (+ bias) with W stored quantized. Built from a `QuantizedWeight`; `bias` (a float tensor, kept in
    the module's dtype) only for layers that have one (Mllama's text linears do not)."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = (int(s) for s in qweight.shape)
        self.bits, self.group_size = quant_geometry(qweight.packed, qweight.scale, self.in_features, "QuantLinear")
        if qweight.zero is not None and qweight.zero.shape != qweight.scale.shape:
            raise ValueError(f"QuantLinear: weight_zero {list(qweight.zero.shape)} must match weight_scale "
                             f"{list(qweight.scale.shape)}")
        self.register_buffer("weight_packed", qweight.packed)  # (N, K * bits / 32) int32
        self.register_buffer("weight_scale", qweight.scale)  # (N, K / group)
        self.register_buffer("weight_zero", None if qweight.zero is None else qweight.zero.to(torch.int8))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.activations = "float"  # or "int8" (set_activations)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme) -> "QuantLinear":
        """Round-to-nearest quantization of a dense Linear (compressed-tensors' min-max observer)."""
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(quantize_weight(linear.weight.detach(), scheme), bias)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.weight_packed, self.weight_scale, self.weight_zero, self.bits, self.group_size,
                               (self.out_features, self.in_features))

    def dequantize(self) -> torch.Tensor:
        """The dense weight [N, K] these buffers stand for, in the scale's dtype."""
        return self.quantized_weight().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = ops.qlinear_a8 if self.activations == "int8" else ops.qlinear
        y = fn(x, self.weight_packed, self.weight_scale, self.weight_zero, self.bits, self.group_size)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.weight_zero is None}, bias={self.bias is not None}, "
                f"activations={self.activations}")


def text_linear_names(model: nn.Module, lm_head: bool = False) -> list[str]:
    """The modules quantize-on-load replaces: every Linear of the text decoder (self- and cross-attention q/k/v/o,
    MLP gate/up/down), plus lm_head when asked."""
    names = [n for n, m in model.named_modules() if TEXT_LINEAR.match(n + ".weight") and isinstance(m, nn.Linear)]
    return names + (["language_model.lm_head"] if lm_head else [])


def install_quantized(model: nn.Module, quantized: dict[str, QuantizedWeight], device, dtype,
                      source: str = "checkpoint") -> None:
    """Replace each named Linear of `model` with a QuantLinear holding its quantized weight (moved to `device`,
    scales cast to `dtype`). A bias stays a (meta) parameter for `assign_weights` to fill. Raises
    `CheckpointError` naming every module that is not a Linear of the model or whose shape disagrees."""
    from ..weights import CheckpointError

    modules = dict(model.named_modules())
    not_linear = sorted(n for n in quantized if not isinstance(modules.get(n), nn.Linear))
    wrong = sorted(f"{n}: checkpoint {list(q.shape)} vs model {[modules[n].out_features, modules[n].in_features]}"
                   for n, q in quantized.items() if n not in not_linear
                   and tuple(q.shape) != (modules[n].out_features, modules[n].in_features))
    if not_linear or wrong:
        problems = ([f"quantized tensors for modules that are not Linear layers of the model: {not_linear}"]
                    if not_linear else []) + ([f"shape mismatches: {wrong}"] if wrong else [])
        raise CheckpointError(f"{source} does not match the model config:\n  " + "\n  ".join(problems))
    for name, q in quantized.items():
        linear = modules[name]
        qw = QuantizedWeight(q.packed.to(device), q.scale.to(device=device, dtype=dtype),
                             None if q.zero is None else q.zero.to(device), q.bits, q.group_size, q.shape)
        try:
            layer = QuantLinear(qw, None if linear.bias is None else torch.empty_like(linear.bias, device="meta"))
        except ValueError as e:
            raise CheckpointError(f"{source}: {name}: {e}") from None
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, layer)


def check_activations(activations: str) -> None:
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations={activations!r} is not supported (use one of {list(ACTIVATIONS)})")


def set_activations(model: nn.Module, activations: str) -> None:
    """How every QuantLinear of `model` takes its input: "float" (as is: products in float32, the default) or
    "int8" (quantized per 32 values, integer products: faster on CPUs, not exact). ValueError when `model` has no
    quantized layer, a layer is not on the CPU (the int8 kernel is CPU-only) or its inputs are not a multiple of 32."""
    check_activations(activations)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if activations == "int8":
        if not layers:
            raise ValueError("activations='int8' needs quantized layers: quantize='int8' / 'int4' or a "
                             "compressed-tensors checkpoint")
        for name, layer in layers.items():
            if layer.weight_packed.device.type != "cpu":
                raise ValueError(f"activations='int8' runs on the CPU only; {name} is on {layer.weight_packed.device}")
            if layer.in_features % ops.ACTIVATION_BLOCK:
                raise ValueError(f"activations='int8': {name} has {layer.in_features} inputs, not a multiple of "
                                 f"{ops.ACTIVATION_BLOCK} (activations are quantized per {ops.ACTIVATION_BLOCK})")
    for layer in layers.values():
        layer.activations = activations


def int8_activations(model: nn.Module) -> bool:
    """Whether `model`'s quantized layers take int8 activations (set_activations)."""
    return any(isinstance(m, QuantLinear) and m.activations == "int8" for m in model.modules())
