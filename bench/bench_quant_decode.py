"""Batch-1 decode with weight-only quantized text weights (int8, int4) against llama_mm bf16 and transformers bf16,
on the 450M benchmark checkpoint of bench/bench_decode.py (vocab 128256, hidden 1024, 10 layers; one 4-tile image).

Every variant is loaded side by side and run alternately (after a warm-up round), so all see the same machine
load. Per variant: decode ms/token, the bytes one decode step reads (packed weights + scales + every
unquantized text tensor, one embedding row, the image K/V and the self-attention KV cache), and that over the
machine's read bandwidth (bench/cpp/read_bandwidth.cpp): the physical limit. This VM's memory speed moves 20-50%
within seconds, so the read bandwidth is also measured right before every timed run (a shorter pass), and each run
is judged against its own: per round, the fraction of the bandwidth measured just before it and the speedup over
llama_mm bf16 in the same round; the medians over the rounds are reported next to the best-of figures (best run
over the bandwidth of one full measurement before the runs). lm_head
(128256 x 1024) is a large share of the bytes here, so each bit width runs with and without --quantize-lm-head;
the opt-in int8 activations (integer products) run too.
Writes bench/results/quant_decode_cpu.json.

    python bench/bench_quant_decode.py [--new-tokens 32] [--repeats 3] [--group-size 128]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from bench_decode import TEXT, VISION, HFStreamer, alternating_rounds, run_header  # noqa: E402
from native import read_bandwidth  # noqa: E402


def step_bytes(model, vision_tokens: int, context: int) -> int:
    """Bytes one decode step reads: the text stack's tensors (quantized layers: packed weight, scales, zero points)
    but only one row of the embedding table, plus the image K/V of each cross layer and the self-attention KV."""
    from llama_mm.quant.layers import QuantLinear

    t = model.cfg.text
    total = sum(p.shape[1] * p.element_size() if "embed_tokens" in name else p.numel() * p.element_size()
                for name, p in model.named_parameters() if name.startswith("language_model."))
    total += sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantLinear)
                 for b in (m.weight_packed, m.weight_scale, m.weight_zero) if b is not None)
    kv = 2 * t.num_key_value_heads * t.head_dim * model.dtype.itemsize
    n_cross = len(t.cross_attention_layers)
    return total + kv * (n_cross * vision_tokens + (t.num_hidden_layers - n_cross) * context)


VARIANTS = {  # name -> load_model quantization arguments
    "llama_mm bf16": {},
    "llama_mm int8": dict(quantize="int8"),
    "llama_mm int8 + lm_head": dict(quantize="int8", quantize_lm_head=True),
    "llama_mm int4": dict(quantize="int4"),
    "llama_mm int4 + lm_head": dict(quantize="int4", quantize_lm_head=True),
    # opt-in: int8 activations, integer products (not exact; llama.cpp's Q8_0 / Q4_0 arithmetic)
    "llama_mm int8 + lm_head, int8 activations": dict(quantize="int8", quantize_lm_head=True, activations="int8"),
    "llama_mm int4, int8 activations": dict(quantize="int4", activations="int8"),
    "llama_mm int4 + lm_head, int8 activations": dict(quantize="int4", quantize_lm_head=True, activations="int8"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "bench/results/quant_decode_cpu.json"))
    args = ap.parse_args()
    torch.manual_seed(0)

    from checkpoints import build_reference, random_inputs, write_checkpoint
    import llama_mm
    from llama_mm.engine import Engine
    from transformers import MllamaForConditionalGeneration

    N = args.new_tokens
    ref = build_reference(TEXT, VISION, seed=0, attn_implementation="sdpa")
    inputs = random_inputs(ref, seq=args.prompt_tokens, aspect_ratios=((2, 2),), seed=0)
    vision_tokens = 4 * (560 // 14) ** 2 + 4
    load_before = os.getloadavg()
    results = {**run_header(__file__),
               "model": {"text": TEXT, "vision": VISION, "images": "one 4-tile image (2x2)", "batch": 1,
                         "prompt_tokens": args.prompt_tokens, "new_tokens": N, "dtype": "bfloat16",
                         "group_size": args.group_size},
               "read_bandwidth": read_bandwidth()}
    bandwidth = results["read_bandwidth"]["best_GBps"]

    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, ref, dtype=torch.bfloat16)
        del ref
        hf = MllamaForConditionalGeneration.from_pretrained(tmp, dtype=torch.bfloat16).eval()
        models = {name: llama_mm.load_model(tmp, group_size=args.group_size, **kw) for name, kw in VARIANTS.items()}
        engines = {name: Engine(m) for name, m in models.items()}

        def hf_run(clock):
            with torch.inference_mode():
                hf.generate(**inputs, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                            pad_token_id=TEXT["pad_token_id"], streamer=HFStreamer(clock))

        runs = {"transformers bf16": hf_run}
        runs.update({name: (lambda c, e=e: e.run(inputs, N, on_tokens=c.tick)) for name, e in engines.items()})
        # the read bandwidth right before each timed run: a quarter-GiB pass, best of 3 per stream count (~1.5 s)
        rounds = alternating_rounds(runs, args.repeats, before=lambda: read_bandwidth(0.25, 3)["best_GBps"])
        best = {name: [min(r[name][0] for r in rounds), min(r[name][1] for r in rounds)] for name in runs}
        bf16_tokens = engines["llama_mm bf16"].run(inputs, N)
        context = args.prompt_tokens + N // 2
        base = best["llama_mm bf16"][1]
        rows = {"transformers bf16": {"ttft_s": round(best["transformers bf16"][0], 4),
                                      "decode_ms_per_token": round(best["transformers bf16"][1] * 1e3, 2)}}
        for name, model in models.items():
            ttft, decode = best[name]
            nbytes = step_bytes(model, vision_tokens, context)
            tokens = engines[name].run(inputs, N)
            rows[name] = {
                "ttft_s": round(ttft, 4), "decode_ms_per_token": round(decode * 1e3, 2),
                "bytes_per_decode_step": nbytes,
                "effective_bandwidth_GBps": round(nbytes / decode / 1e9, 2),
                "fraction_of_read_bandwidth": round(nbytes / decode / 1e9 / bandwidth, 3),
                "decode_speedup_vs_llama_mm_bf16": round(base / decode, 2),
                "decode_speedup_vs_transformers_bf16": round(best["transformers bf16"][1] / decode, 2),
                # each timed run against the bandwidth measured right before it, and against bf16 in its round
                "per_round": [{"decode_ms_per_token": round(r[name][1] * 1e3, 2), "read_bandwidth_GBps": r[name][2],
                               "fraction_of_read_bandwidth": round(nbytes / r[name][1] / 1e9 / r[name][2], 3),
                               "speedup_vs_llama_mm_bf16": round(r["llama_mm bf16"][1] / r[name][1], 2)}
                              for r in rounds],
                # quantization changes the weights: how long greedy decoding follows the bf16 model's tokens
                "leading_tokens_identical_to_bf16": int((tokens == bf16_tokens).long().cumprod(1).sum()),
            }
        for name in models:
            per_round = rows[name]["per_round"]
            rows[name]["median_fraction_of_adjacent_read_bandwidth"] = round(
                statistics.median(r["fraction_of_read_bandwidth"] for r in per_round), 3)
            rows[name]["median_speedup_vs_llama_mm_bf16_same_round"] = round(
                statistics.median(r["speedup_vs_llama_mm_bf16"] for r in per_round), 2)
        results["runs"] = rows
        print(json.dumps(rows, indent=1), flush=True)
    results["machine"]["load_average_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    results["read_bandwidth_after"] = read_bandwidth()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"read bandwidth {bandwidth} GB/s; wrote {args.out}")


if __name__ == "__main__":
    main()
