"""Load the 11B-shaped checkpoint of bench/make_11b_checkpoint.py with quantize="int4" and generate a few tokens with
one image: load time, peak resident memory (target < 10 GB on a 24 GB machine: the full-precision text stack, ~19.6
GB in bf16, must never be resident) and decode seconds per token. Writes bench/results/11b_memory_cpu.json.

Peak memory is the process's ru_maxrss (resident pages, the memory-mapped checkpoint's included), sampled after
loading and at the end; the bytes the quantized model holds are reported next to it.

    python bench/bench_11b_memory.py [--model /work/tmp_11b] [--quantize int4] [--new-tokens 4] [--tiles 1]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from bench_decode import Clock, run_header  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def current_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def held_bytes(model) -> dict:
    """Bytes of the model's tensors by kind: quantized buffers, dense text tensors, the vision side."""
    from llama_mm.quant.layers import QuantLinear

    quant = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantLinear)
                for b in (m.weight_packed, m.weight_scale, m.weight_zero) if b is not None)
    text = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.startswith("language_model."))
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if not n.startswith("language_model."))
    return {"quantized_text_GB": round(quant / 1e9, 3), "dense_text_GB": round(text / 1e9, 3),
            "vision_and_projector_GB": round(other / 1e9, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/work/tmp_11b")
    ap.add_argument("--quantize", default="int4", choices=["int4", "int8"])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--tiles", type=int, default=1, choices=[1, 2, 4], help="tiles of the one image")
    ap.add_argument("--out", default=str(ROOT / "bench/results/11b_memory_cpu.json"))
    args = ap.parse_args()

    import llama_mm
    from llama_mm.engine import Engine

    load_before = os.getloadavg()
    start = time.perf_counter()
    model = llama_mm.load_model(args.model, quantize=args.quantize, group_size=args.group_size)
    load_s = time.perf_counter() - start
    after_load = {"peak_rss_GB": round(peak_rss_gb(), 2), "rss_GB": round(current_rss_gb(), 2)}
    print(f"loaded in {load_s:.1f} s; {after_load}", flush=True)
    engine = Engine(model)

    t, v = model.cfg.text, model.cfg.vision
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, t.vocab_size, (1, args.prompt_tokens), generator=gen)
    ids[0, 0] = model.cfg.image_token_index
    ratio = {1: (1, 1), 2: (1, 2), 4: (2, 2)}[args.tiles]
    pixel_values = torch.zeros(1, 1, v.max_num_tiles, 3, v.image_size, v.image_size, dtype=model.dtype)
    pixel_values[0, 0, :args.tiles] = torch.randn(args.tiles, 3, v.image_size, v.image_size, generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel_values,
              "aspect_ratio_ids": torch.tensor([[[list(r) for r in v.supported_aspect_ratios].index(list(ratio)) + 1]]),
              "aspect_ratio_mask": (torch.arange(v.max_num_tiles) < args.tiles).long()[None, None],
              "cross_attention_mask": (torch.arange(v.max_num_tiles) < args.tiles).long().expand(
                  1, args.prompt_tokens, 1, v.max_num_tiles).clone()}
    clock = Clock()
    tokens = engine.run(inputs, args.new_tokens, on_tokens=clock.tick)
    ttft, per_token = clock.result()
    result = {
        **run_header(__file__, memory_GB=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
                     load_average_1m_before_after=[round(load_before[0], 2), round(os.getloadavg()[0], 2)]),
        "checkpoint": {"dir": args.model, "bytes_on_disk_GB": round(sum(
            f.stat().st_size for f in Path(args.model).glob("*.safetensors")) / 1e9, 2)},
        "quantize": {"weights": args.quantize, "group_size": args.group_size},
        "load_s": round(load_s, 1),
        "after_load": after_load,
        "held": held_bytes(model),
        "request": {"prompt_tokens": args.prompt_tokens, "image_tiles": args.tiles, "new_tokens": args.new_tokens},
        "time_to_first_token_s": round(ttft, 2),
        "decode_s_per_token": round(per_token, 3),
        "peak_rss_GB": round(peak_rss_gb(), 2),
        "target_peak_rss_GB": 10,
        "tokens": tokens[0].tolist(),
    }
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
