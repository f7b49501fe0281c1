"""Tiny random Mllama checkpoints written by transformers itself (the oracle), every parameter randomised.

Zero-initialised gates (transformers' default) would hide a broken cross-attention or positional path, so every
parameter, gates included, is drawn from a normal distribution.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)

TINY_TEXT = dict(
    vocab_size=320, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=96, rms_norm_eps=1e-5, max_position_embeddings=512, cross_attention_layers=[1, 3],
    rope_parameters=LLAMA3_ROPE, bos_token_id=3, eos_token_id=[1, 2], pad_token_id=0,
)
TINY_VISION = dict(
    hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=2, intermediate_size=48,
    vision_output_dim=32 * 3, image_size=28, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[1, 2],
    norm_eps=1e-5,
)


def tiny_config_dict(text: dict | None = None, vision: dict | None = None) -> tuple[dict, dict]:
    t, v = copy.deepcopy(TINY_TEXT), copy.deepcopy(TINY_VISION)
    t.update(text or {})
    v.update(vision or {})
    v["vision_output_dim"] = v["hidden_size"] * (len(v["intermediate_layers_indices"]) + 1)
    return t, v


def build_reference(text: dict | None = None, vision: dict | None = None, seed: int = 0,
                    attn_implementation: str = "eager"):
    """A transformers MllamaForConditionalGeneration with every parameter randomised, in fp32, eval mode."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    t, v = tiny_config_dict(text, vision)
    config = MllamaConfig(text_config=t, vision_config=v, image_token_index=t["vocab_size"])
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * _init_std(name, p) + _init_mean(name))
    return model.eval()


def _init_std(name: str, p: torch.Tensor) -> float:
    leaf = name.rsplit(".", 1)[-1]
    if "gate" in leaf:  # tanh gates: spread over the useful range, never zero
        return 1.0
    if "norm" in name:  # RMSNorm / LayerNorm weight and bias
        return 0.2
    if "embedding" in name or "embed_tokens" in name:
        return 0.5
    if p.dim() >= 2:  # linear / conv weights: unit-variance activations
        return p[0].numel() ** -0.5
    return 0.2  # biases


def _init_mean(name: str) -> float:
    return 1.0 if "norm" in name and name.endswith("weight") else 0.0


def write_checkpoint(directory: Path, model, max_shard_size: str | None = None, dtype=None,
                     in_memory_names: bool = False) -> Path:
    """Save `model` with transformers' `save_pretrained`.

    `in_memory_names=True` rewrites the key names into transformers' in-memory form (`model.language_model.*`,
    `lm_head.weight`) — the other naming found in the wild.
    """
    directory = Path(directory)
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    if in_memory_names:
        _rename_keys_to_in_memory(directory)
    return directory


def _rename_keys_to_in_memory(directory: Path) -> None:
    from safetensors.torch import load_file, save_file

    def rename(k: str) -> str:
        if k.startswith("language_model.model."):
            return "model.language_model." + k[len("language_model.model."):]
        if k == "language_model.lm_head.weight":
            return "lm_head.weight"
        if k.startswith(("vision_model.", "multi_modal_projector.")):
            return "model." + k
        return k

    index = directory / "model.safetensors.index.json"
    files = sorted(directory.glob("*.safetensors"))
    for f in files:
        tensors = load_file(f)
        save_file({rename(k): v for k, v in tensors.items()}, f, metadata={"format": "pt"})
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))


def random_inputs(model, batch: int = 1, seq: int = 12, aspect_ratios=((1, 1),), images_per_row: int = 1,
                  seed: int = 1, left_pad: tuple[int, ...] | None = None, with_image: bool = True):
    """transformers-layout inputs: input_ids with `<|image|>` tokens, pixel values, aspect ratio ids/mask and the
    cross-attention mask the processor would build (each image seen from its token on)."""
    cfg = model.config
    t, v = cfg.text_config, cfg.vision_config
    gen = torch.Generator().manual_seed(seed)
    image_id = cfg.image_token_index
    ids = torch.randint(3, t.vocab_size, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": attention_mask}
    if left_pad:
        for b, n in enumerate(left_pad):
            ids[b, :n] = t.pad_token_id
            attention_mask[b, :n] = 0
    if not with_image:
        return out
    ratios = [list(r) for r in v.supported_aspect_ratios]
    n_img, tiles = images_per_row, v.max_num_tiles
    pixel_values = torch.zeros(batch, n_img, tiles, 3, v.image_size, v.image_size)
    ar_ids = torch.zeros(batch, n_img, dtype=torch.long)
    ar_mask = torch.zeros(batch, n_img, tiles, dtype=torch.long)
    xmask = torch.zeros(batch, seq, n_img, tiles, dtype=torch.long)
    for b in range(batch):
        start = left_pad[b] if left_pad else 0
        positions = [start + 1 + i * max(1, (seq - start - 1) // n_img) for i in range(n_img)]
        for i in range(n_img):
            r = aspect_ratios[(b * n_img + i) % len(aspect_ratios)]
            n = r[0] * r[1]
            pixel_values[b, i, :n] = torch.randn(n, 3, v.image_size, v.image_size, generator=gen)
            ar_ids[b, i] = ratios.index(list(r)) + 1
            ar_mask[b, i, :n] = 1
            ids[b, positions[i]] = image_id
            end = positions[i + 1] if i + 1 < n_img else seq
            xmask[b, positions[i]:end, i, :n] = 1
    out.update(pixel_values=pixel_values, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask,
               cross_attention_mask=xmask)
    return out
