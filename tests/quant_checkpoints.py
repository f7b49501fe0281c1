"""Quantized Mllama checkpoints made by compressed-tensors itself (the oracle for llama_mm's quantized format).

`write_ct_checkpoint` does what llm-compressor's round-to-nearest W4A16 / W8A16 / W4A16_ASYM recipes do, with
compressed-tensors' own API: attach a QuantizationScheme to the text decoder's Linear layers
(`apply_quantization_config`), calibrate each weight with the min-max observer (per-group / per-channel min and max,
`calculate_qparams`), compress (`ModelCompressor.compress_model`: quantize, pack into int32, pack zero points) and
save (`save_pretrained` + `ModelCompressor.update_config`).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from checkpoints import _rename_keys_to_in_memory

# llm-compressor's Mllama recipes leave these dense; the leading `.*` resolves them against both key namings.
MLLAMA_IGNORE = ["re:.*lm_head", "re:.*multi_modal_projector.*", "re:.*vision_model.*"]


def ct_scheme(bits: int, group_size: int | None, symmetric: bool, strategy: str = "group"):
    """compressed-tensors' QuantizationScheme for integer weight-only quantization of Linear layers."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=group_size if strategy == "group" else None)
    return QuantizationScheme(targets=["Linear"], weights=args)


def ct_quantization_config(bits: int, group_size: int | None, symmetric: bool, strategy: str = "group",
                           ignore: list[str] | None = None):
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig(config_groups={"group_0": ct_scheme(bits, group_size, symmetric, strategy)},
                              ignore=list(MLLAMA_IGNORE if ignore is None else ignore), format="pack-quantized")


def calibrate_minmax(module: torch.nn.Module) -> None:
    """The min-max observer on a module's weight: scale and zero point from each group's (or row's) min and max."""
    from compressed_tensors.quantization.utils import calculate_qparams

    args = module.quantization_scheme.weights
    w = module.weight.detach()  # (N, K)
    if args.strategy == "group":
        w = w.unflatten(-1, (w.shape[-1] // args.group_size, args.group_size))  # (N, G, group)
        lo, hi = w.amin(-1), w.amax(-1)  # (N, G)
    else:
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)  # (N, 1)
    scale, zero = calculate_qparams(lo, hi, args)
    module.weight_scale.data.copy_(scale)
    module.weight_zero_point.data.copy_(zero)


def write_ct_checkpoint(ref_model, out_dir, bits: int, group_size: int | None = 128, symmetric: bool = True,
                        key_naming: str = "disk", strategy: str = "group", dtype: torch.dtype | None = None) -> Path:
    """Quantize a copy of `ref_model` (a transformers MllamaForConditionalGeneration, e.g. checkpoints.build_reference)
    with compressed-tensors and save it to `out_dir` in the given key naming ("disk": `language_model.model.*`,
    "memory": `model.language_model.*`). `dtype` casts the model first (scales are stored in it)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    assert key_naming in ("disk", "memory") and strategy in ("group", "channel")
    out_dir = Path(out_dir)
    model = copy.deepcopy(ref_model)
    if dtype is not None:
        model = model.to(dtype)
    config = ct_quantization_config(bits, group_size, symmetric, strategy)
    apply_quantization_config(model, config, show_progress=False)
    quantized = [m for m in model.modules() if getattr(m, "quantization_scheme", None) is not None]
    assert quantized, "no module matched the quantization config"
    with torch.no_grad():
        for m in quantized:
            calibrate_minmax(m)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    # from_pretrained_model expands the recipe's ignore list into transformers' in-memory module names, which do not
    # resolve against Mllama's on-disk key naming (the known mismatch); keep the recipe's list, as published
    # Mllama checkpoints do.
    compressor.quantization_config.ignore = list(config.ignore)
    model.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    if key_naming == "memory":
        _rename_keys_to_in_memory(out_dir)
    return out_dir


def load_ct_reference(qdir, dtype=torch.float32):
    """transformers (with compressed-tensors) loading a quantized checkpoint, dequantized to dense weights."""
    from transformers import CompressedTensorsConfig, MllamaForConditionalGeneration

    return MllamaForConditionalGeneration.from_pretrained(
        qdir, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=dtype).eval()
