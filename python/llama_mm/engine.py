"""The native engine bound to a loaded model: encodes a request's images (the vision tower in PyTorch, then every
cross layer's K/V in C++; both skipped for images the image cache holds), then the C++ prefill and decode loop
(`llama_mm._C.Engine`, GIL released) over the model's own weight tensors (no copy)."""
from __future__ import annotations

import torch

from .image_cache import ImageCache, encode_image_kv
from .model import MllamaModel, cross_attention_masks
from .sampling import SamplingParams


def native_module():
    from . import ops  # loads llama_mm._C, which registers the ops the engine calls

    if not ops.NATIVE:
        raise RuntimeError("llama_mm's native extension is not built: reinstall with "
                           "`pip install --no-build-isolation .` (see README)")
    from . import _C

    return _C


class Engine:
    def __init__(self, model: MllamaModel):
        from .quant.layers import int8_activations

        _C = native_module()
        self.model = model
        t = model.cfg.text
        weights = engine_weights(model)
        self.native = _C.Engine(weights, t.hidden_size, t.num_hidden_layers, t.num_attention_heads,
                                t.num_key_value_heads, t.vocab_size, t.rms_norm_eps, t.max_position_embeddings,
                                list(t.cross_attention_layers), model.language_model.model.inv_freq,
                                int8_activations(model))

    def run(self, inputs: dict, max_new_tokens: int, params: SamplingParams | None = None,
            stop_ids: list[int] | tuple = (), pad_id: int = 0, on_tokens=None,
            image_cache: ImageCache | None = None) -> torch.Tensor:
        """New ids [B, N]; rows that stopped are padded with pad_id. on_tokens(ids [B]) -> True stops.
        image_cache: reuse the encoded images (cross-layer K/V) seen before (see image_cache.py)."""
        params = (params or SamplingParams()).validate()
        with torch.inference_mode():
            return self.native.generate(*request_tensors(self, inputs, image_cache), max_new_tokens,
                                        to_native(params), list(stop_ids), pad_id, on_tokens)


def request_tensors(engine: Engine, inputs: dict, image_cache: ImageCache | None = None) -> tuple:
    """The processor's dict -> (input_ids, attention_mask, image_kv, cross_mask, row_mask) for the native engine
    and the scheduler: encodes the images when the inputs have any (image_kv [L, 2, B, Hkv, S, D], one image at a
    time, skipping the images `image_cache` holds; see image_cache.py)."""
    model = engine.model
    ids = inputs["input_ids"].long()
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.long()
    kv = cross = rows = None
    if inputs.get("pixel_values") is not None:
        xmask = inputs.get("cross_attention_mask")
        if xmask is None or inputs.get("aspect_ratio_ids") is None or inputs.get("aspect_ratio_mask") is None:
            raise ValueError("inputs with pixel_values need aspect_ratio_ids, aspect_ratio_mask and "
                             "cross_attention_mask")
        with torch.inference_mode():
            kv = encode_image_kv(engine, inputs["pixel_values"], inputs["aspect_ratio_ids"],
                                 inputs["aspect_ratio_mask"], image_cache)
            cross, rows = cross_attention_masks(xmask.to(model.device), model.cfg.vision.num_patches, model.dtype)
    return ids, mask, kv, cross, rows


def engine_weights(model: MllamaModel) -> dict[str, torch.Tensor]:
    """The text stack's tensors by canonical name (shared, not copied), plus each unmerged LoRA adapter's A and
    B * scaling (`<module>.lora_A.weight`, `<module>.lora_B.weight`); merged adapters are already in the weights.
    A quantized module P (quant.layers.QuantLinear) gives `P.weight_packed`, `P.weight_scale`, `P.weight_zero`
    (asymmetric only) and `P.weight_shape` int64 [2] = (out, in) in place of `P.weight`."""
    from .lora import lora_layers
    from .quant.layers import QuantLinear

    weights = {n: p.detach() for n, p in model.named_parameters()
               if n.startswith("language_model.") and ".lora_" not in n}
    for name, layer in model.named_modules():
        if name.startswith("language_model.") and isinstance(layer, QuantLinear):
            weights[name + ".weight_packed"] = layer.weight_packed
            weights[name + ".weight_scale"] = layer.weight_scale
            if layer.weight_zero is not None:
                weights[name + ".weight_zero"] = layer.weight_zero
            weights[name + ".weight_shape"] = torch.tensor([layer.out_features, layer.in_features])
    for name, layer in lora_layers(model).items():
        if name.startswith("language_model.") and not layer.merged:
            weights[name + ".lora_A.weight"] = layer.lora_A.weight.detach()
            weights[name + ".lora_B.weight"] = (layer.lora_B.weight * layer.scaling).detach()
    return weights


def to_native(p: SamplingParams):
    sp = native_module().SamplingParams()
    sp.do_sample, sp.temperature, sp.top_k, sp.top_p = p.do_sample, p.temperature, p.top_k, p.top_p
    sp.min_p, sp.repetition_penalty, sp.seed = p.min_p, p.repetition_penalty, p.seed
    return sp
