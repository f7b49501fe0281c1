"""Write a checkpoint with the exact shapes of Llama 3.2 11B Vision (random bf16 weights, ~21 GB), shard by shard.

The config is the Hub's Llama-3.2-11B-Vision config (text: hidden 4096, 40 layers, 32 heads / 8 KV heads, MLP 14336,
vocab 128256, cross-attention at 3, 8, ..., 38; vision: hidden 1280, 32 + 8 layers, 16 heads, MLP 5120, 560 px tiles,
patch 14). Tensor names and shapes come from llama_mm's own module tree built on the meta device (the on-disk
names), so nothing is held but the shard being written (~2 GB). Weights: normal, std 1/sqrt(fan-in) for matrices,
norms around 1, gates 0.5: random but numerically sane. NEVER commit the output (default /work/tmp_11b).

    python bench/make_11b_checkpoint.py [--out /work/tmp_11b] [--shard-gb 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

TEXT_11B = dict(
    vocab_size=128256, hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
    intermediate_size=14336, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], rms_norm_eps=1e-5,
    max_position_embeddings=131072, rope_theta=500000.0, hidden_act="silu", tie_word_embeddings=False,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    bos_token_id=128000, eos_token_id=128001, pad_token_id=128004, model_type="mllama_text_model",
)
VISION_11B = dict(
    hidden_size=1280, num_hidden_layers=32, num_global_layers=8, attention_heads=16, intermediate_size=5120,
    vision_output_dim=7680, image_size=560, patch_size=14, num_channels=3, max_num_tiles=4, norm_eps=1e-5,
    intermediate_layers_indices=[3, 7, 15, 23, 30], hidden_act="gelu", model_type="mllama_vision_model",
    supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
)
CONFIG_11B = dict(architectures=["MllamaForConditionalGeneration"], model_type="mllama", image_token_index=128256,
                  dtype="bfloat16", text_config=TEXT_11B, vision_config=VISION_11B)


def random_tensor(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    t = torch.empty(shape, dtype=torch.bfloat16)
    if "gate" in name.rsplit(".", 1)[-1] and t.numel() == 1:  # tanh gates
        return t.fill_(0.5)
    if "norm" in name or "layernorm" in name:
        return t.normal_(1.0, 0.05, generator=gen) if name.endswith("weight") else t.normal_(0.0, 0.05, generator=gen)
    std = shape[-1] ** -0.5 if len(shape) >= 2 else 0.02
    return t.normal_(0.0, std, generator=gen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/work/tmp_11b")
    ap.add_argument("--shard-gb", type=float, default=2.0)
    args = ap.parse_args()
    from safetensors.torch import save_file

    from llama_mm.config import MllamaConfig
    from llama_mm.model import MllamaModel

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = MllamaConfig.from_dict(CONFIG_11B, source="11B config")
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in MllamaModel(cfg).named_parameters()}
    limit = int(args.shard_gb * 1e9)
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * 2
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    gen = torch.Generator().manual_seed(0)
    weight_map, total, start = {}, 0, time.perf_counter()
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: random_tensor(n, shapes[n], gen) for n in names}
        save_file(tensors, out / file, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({n: file for n in names})
        del tensors
        print(f"{file}: {len(names)} tensors, {total / 1e9:.1f} GB written, {time.perf_counter() - start:.0f} s",
              flush=True)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(CONFIG_11B, indent=1))
    print(f"wrote {out}: {sum(s.numel() for s in shapes.values()) / 1e9:.2f}B parameters, {total / 1e9:.1f} GB")


if __name__ == "__main__":
    main()
