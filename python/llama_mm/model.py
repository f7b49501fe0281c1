"""The whole Mllama model (vision -> projector -> text) as a plain PyTorch module, and `load_model`.

This is the reference path: exact against transformers' `MllamaForConditionalGeneration`, differentiable (LoRA
training uses it), and the owner of the weight tensors the native engine reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import ops
from .config import MllamaConfig
from .quant.checkpoint import split_quantized
from .quant.layers import check_activations, install_quantized, set_activations, text_linear_names
from .quant.rtn import QuantizedWeight, quantize_weight
from .quant.scheme import QuantScheme
from .text import CrossAttentionLayer, LanguageModel
from .vision import VisionModel
from .weights import assign_weights, load_checkpoint, release_pages


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, vocab_size]


def causal_mask(attention_mask: torch.Tensor | None, B: int, T: int, dtype, device, past: int = 0) -> torch.Tensor:
    """Additive mask [B, 1, T, past + T]: query i (at position past + i) sees keys j <= past + i whose
    attention_mask [B, past + T] is 1."""
    S = past + T
    q = torch.arange(past, S, device=device)[:, None]
    k = torch.arange(S, device=device)[None, :]
    allowed = (k <= q)[None]  # (1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :S].bool()  # (B, T, S)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min).expand(B, T, S)[:, None]


def cross_attention_masks(cross_attention_mask: torch.Tensor, num_patches: int, dtype):
    """cross_attention_mask [B, T, N, tiles] (1 = this text row sees this image tile) ->
    (additive mask [B, 1, T, N * tiles * num_patches], row_mask [B, T, 1]).

    As in transformers: a text row that sees no tile at all gets an all-zero additive row (it attends uniformly
    to every vision token), and its row_mask is 0 so the cross layer's MLP output is dropped there.
    """
    B, T = cross_attention_mask.shape[:2]
    seen = cross_attention_mask.repeat_interleave(num_patches, dim=3).reshape(B, T, -1).to(dtype)  # (B, T, S)
    additive = (1.0 - seen).masked_fill((1.0 - seen).bool(), torch.finfo(dtype).min)
    row_mask = (additive != torch.finfo(dtype).min).any(dim=-1, keepdim=True).to(dtype)  # (B, T, 1)
    return (additive * row_mask)[:, None], row_mask


class MllamaModel(nn.Module):
    """Parameter names are the checkpoints' own: `vision_model.*`, `multi_modal_projector.*`,
    `language_model.model.*`, `language_model.lm_head.weight`."""

    def __init__(self, cfg: MllamaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionModel(cfg.vision)
        self.multi_modal_projector = nn.Linear(cfg.vision.vision_output_dim, cfg.text.hidden_size, bias=True)
        self.language_model = LanguageModel(cfg.text)

    @property
    def dtype(self) -> torch.dtype:  # the embedding's: lm_head may be quantized
        return self.language_model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    def vision_states(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> torch.Tensor:
        """Projected image features [B, N * tiles * num_patches, text hidden]: what cross-attention reads."""
        features = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)  # (B, N, T, P, Dv)
        B = features.shape[0]
        return ops.apply_linear(self.multi_modal_projector, features).reshape(B, -1, self.cfg.text.hidden_size)

    def cross_kv(self, vision_states: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per cross-attention layer index, its (k, v) [B, Hkv, S, D]: computed once per request."""
        return {i: layer.cross_attn.project_kv(vision_states)
                for i, layer in enumerate(self.language_model.model.layers) if isinstance(layer, CrossAttentionLayer)}

    def forward(self, input_ids, attention_mask=None, pixel_values=None, aspect_ratio_ids=None,
                aspect_ratio_mask=None, cross_attention_mask=None, position_ids=None) -> ModelOutput:
        """transformers' argument names and layouts; returns logits [B, T, vocab_size].

        Without `position_ids`, positions are 0..T-1 for every row, as transformers' forward does (generation
        passes positions that skip left padding)."""
        B, T = input_ids.shape
        dtype, device = self.dtype, input_ids.device
        if position_ids is None:
            position_ids = torch.arange(T, device=device).expand(B, T)
        self_mask = causal_mask(attention_mask, B, T, dtype, device)
        cross_kv = cross_mask = row_mask = None
        if pixel_values is not None:
            if aspect_ratio_ids is None or aspect_ratio_mask is None:
                raise ValueError("pixel_values needs aspect_ratio_ids and aspect_ratio_mask")
            cross_kv = self.cross_kv(self.vision_states(pixel_values, aspect_ratio_ids, aspect_ratio_mask))
            if cross_attention_mask is not None:
                cross_mask, row_mask = cross_attention_masks(cross_attention_mask, self.cfg.vision.num_patches, dtype)
            else:
                row_mask = torch.ones(B, T, 1, dtype=dtype, device=device)
        hidden = self.language_model.model(input_ids, position_ids, self_mask, cross_kv, cross_mask, row_mask)
        return ModelOutput(logits=self.language_model.lm_head(hidden))


def resolve_device(device) -> torch.device:
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported (use 'cpu' or 'cuda')")
    return dev


_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype, default: torch.dtype | None) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default or torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype]
    raise ValueError(f"unknown dtype {dtype!r} (use one of auto, float32, bfloat16, float16)")


QUANTIZE_BITS = {"int8": 8, "int4": 4}


def quantize_scheme(quantize: str | None, group_size: int | None) -> QuantScheme | None:
    """`load_model`'s quantize/group_size arguments -> a symmetric scheme (None: no quantization)."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE_BITS:
        raise ValueError(f"quantize={quantize!r} is not supported (use one of {sorted(QUANTIZE_BITS)} or None)")
    return QuantScheme(bits=QUANTIZE_BITS[quantize], group_size=group_size, symmetric=True)


def load_model(model_dir: str | Path, device=None, dtype=None, progress: bool = False, quantize: str | None = None,
               group_size: int | None = 128, quantize_lm_head: bool = False,
               activations: str = "float") -> MllamaModel:
    """Load a Hugging Face Mllama checkpoint directory (config.json + safetensors) as an `MllamaModel`.

    dtype: None/"auto" keeps the checkpoint's dtype (config.json's `dtype`/`torch_dtype`, else float32).
    The model is built on the meta device and its parameters assigned from memory-mapped tensors: no weight is
    held twice. Parameters are frozen (requires_grad=False); training unfreezes what it trains. Raises `ConfigError` / `CheckpointError` naming the field, file or tensors at fault.

    quantize: "int8" / "int4" quantizes every text-decoder Linear on load (symmetric round-to-nearest, one scale
    per `group_size` inputs, None = one per row; lm_head too with quantize_lm_head), tensor by tensor from the
    memory-mapped checkpoint, each source tensor's pages dropped once quantized. A compressed-tensors checkpoint
    (config.json with a `quantization_config`) loads its quantized layers as they are; quantize= is then an error.
    Quantized layers are `quant.layers.QuantLinear`; everything else stays in `dtype`.

    activations: "float" (default) multiplies the quantized weights by the activations as they are, in float32
    (matches transformers + compressed-tensors to 1e-5); "int8" quantizes each quantized layer's input to int8 per
    32 values and multiplies in integers, as llama.cpp's Q4_0 / Q8_0 do, in products of up to 64 rows (decode steps,
    short prompts; longer prefills keep float32 products): faster on the CPU, not exact (CPU only)."""
    cfg = MllamaConfig.from_pretrained(model_dir)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, cfg.dtype)
    scheme = quantize_scheme(quantize, group_size)
    source = str(model_dir)
    if scheme is not None and cfg.quant_scheme is not None:
        raise ValueError(f"quantize={quantize!r} asked for {source}, which is already quantized "
                         f"(config.json quantization_config: {cfg.quant_scheme}); load it without quantize=")
    if quantize_lm_head and scheme is None:
        raise ValueError("quantize_lm_head=True needs quantize='int8' or 'int4'")
    check_activations(activations)  # before the weights load (minutes for an 11B)
    if activations == "int8" and ((scheme is None and cfg.quant_scheme is None) or dev.type != "cpu"):
        raise ValueError("activations='int8' needs quantized weights (quantize='int8' / 'int4' or a "
                         f"compressed-tensors checkpoint) on the CPU; got quantize={quantize!r}, device {dev}")
    tensors = load_checkpoint(model_dir)
    with torch.device("meta"):
        model = MllamaModel(cfg)
    if cfg.quant_scheme is not None:
        quantized, tensors = split_quantized(tensors, cfg.quant_scheme, cfg.quant_ignore, source)
    elif scheme is not None:
        quantized = quantize_on_load(model, tensors, scheme, quantize_lm_head, source, progress)
    else:
        quantized = {}
    install_quantized(model, quantized, dev, dt, source)
    assign_weights(model, tensors, dev, dt, source=source, progress=progress)
    model.language_model.model.inv_freq = cfg.text.rope.inv_freq(cfg.text.head_dim).to(dev)
    set_activations(model, activations)
    return model.requires_grad_(False).eval()


def quantize_on_load(model: MllamaModel, tensors: dict[str, torch.Tensor], scheme: QuantScheme, lm_head: bool,
                     source: str, progress: bool = False) -> dict[str, QuantizedWeight]:
    """Quantize the text decoder's Linear weights (and lm_head's when asked), popping each from `tensors` and
    dropping its source pages as soon as it is quantized: the full-precision text stack is never held. A weight the
    checkpoint lacks stays in the model for `assign_weights` to report."""
    names = [n for n in text_linear_names(model, lm_head) if n + ".weight" in tensors]
    bad = []
    for n in names:
        try:
            scheme.validate(tensors[n + ".weight"].shape[-1], n + ".weight")
        except ValueError as e:
            bad.append(str(e))
    if bad:
        raise ValueError(f"{source}: cannot quantize {len(bad)} weight(s) with {scheme}: {bad[0]}"
                         f"{' (and more)' if len(bad) > 1 else ''}")
    if progress:
        from tqdm import tqdm

        names = tqdm(names, desc=f"quantizing to int{scheme.bits}", leave=False)
    quantized = {}
    for name in names:
        weight = tensors.pop(name + ".weight")
        quantized[name] = quantize_weight(weight, scheme, name + ".weight")
        release_pages(weight)
    return quantized
