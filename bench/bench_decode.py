"""End-to-end decode benchmark on the CPU: llama_mm's engine against transformers on the same weights, dtype and
machine, in one run.

Model: a random checkpoint shaped like the real text stack at reduced width (vocab 128256, hidden 1024, 16 heads /
4 KV heads, MLP 4096, 10 layers, cross-attention at 3 and 8; ~450M parameters) with a small vision tower at the
real image geometry (560 px tiles, patch 14: 1601 tokens per tile), one 4-tile image, batch 1.

Both implementations are loaded side by side and run alternately (best of N each), so both see the same machine
load. Each run timestamps every token (transformers through its streamer, llama_mm through the step callback):
time to first token, and decode ms/token = (last - first) / (tokens - 1). Also reports effective bandwidth (bytes of weights read per decode step /
step time) next to the machine's memory read bandwidth, measured before and after by bench/cpp/read_bandwidth.cpp
(every core reading 1-8 sequential streams; the best is the limit). Writes bench/results/decode_cpu.json.

    python bench/bench_decode.py [--new-tokens 32] [--repeats 3] [--out bench/results/decode_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from native import read_bandwidth  # noqa: E402

TEXT = dict(vocab_size=128256, hidden_size=1024, num_hidden_layers=10, num_attention_heads=16, num_key_value_heads=4,
            intermediate_size=4096, cross_attention_layers=[3, 8], max_position_embeddings=131072,
            rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=8192),
            bos_token_id=128000, eos_token_id=[128001, 128008, 128009], pad_token_id=128004)
VISION = dict(hidden_size=256, num_hidden_layers=4, num_global_layers=2, attention_heads=4, intermediate_size=1024,
              image_size=560, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[1, 3])


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def run_header(script: str, **machine) -> dict:
    """The start of every bench record: the command that reproduces it, when it started, and the machine (with
    `machine` adding or overriding fields, e.g. the load average)."""
    return {"command": "python " + " ".join([os.path.relpath(script, ROOT)] + sys.argv[1:]),
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__, "python": platform.python_version(), **machine}}


class Clock:
    """Token timestamps: time to first token and decode seconds per token from a single run."""

    def __init__(self):
        self.start, self.stamps = time.perf_counter(), []

    def tick(self, *_):
        self.stamps.append(time.perf_counter())
        return False

    def result(self) -> tuple[float, float]:
        ttft = self.stamps[0] - self.start
        return ttft, (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1)


class HFStreamer:
    """transformers' streamer protocol: put() gets the prompt once, then each new token."""

    def __init__(self, clock: Clock):
        self.clock, self.prompt_seen = clock, False

    def put(self, value):
        if self.prompt_seen:
            self.clock.tick()
        self.prompt_seen = True

    def end(self):
        pass


def alternating_rounds(runs: dict, repeats: int, before=None) -> list[dict]:
    """runs: name -> callable(Clock). Runs them in turn, a warm-up round then `repeats` timed rounds, so all see the
    same load; before() (if given) runs right before each timed run and its value is kept with it (e.g. the read
    bandwidth at that moment). One dict per timed round: name -> (time to first token, decode s/token, before())."""
    rounds = []
    for r in range(repeats + 1):
        row = {}
        for name, run in runs.items():
            value = before() if before is not None and r else None
            clock = Clock()
            run(clock)
            row[name] = (*clock.result(), value)
        if r:  # the first round warms up
            rounds.append(row)
    return rounds


def best_of_alternating(runs: dict, repeats: int) -> dict:
    """Best time to first token and best decode time per token of each run over alternating_rounds."""
    rounds = alternating_rounds(runs, repeats)
    return {name: [min(r[name][0] for r in rounds), min(r[name][1] for r in rounds)] for name in runs}


def decode_bytes(model, vision_tokens: int, context: int) -> int:
    """Bytes read per decode step: every text weight but the embedding table (one row of it), the image K/V of each
    cross layer, and the self-attention KV cache."""
    t = model.cfg.text
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("language_model."):
            total += p.shape[1] * p.element_size() if "embed_tokens" in name else p.numel() * p.element_size()
    kv = 2 * t.num_key_value_heads * t.head_dim * model.language_model.lm_head.weight.element_size()
    n_cross = len(t.cross_attention_layers)
    return total + kv * (n_cross * vision_tokens + (t.num_hidden_layers - n_cross) * context)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "bench/results/decode_cpu.json"))
    args = ap.parse_args()
    torch.manual_seed(0)

    from checkpoints import build_reference, random_inputs, write_checkpoint
    import llama_mm
    from llama_mm.engine import Engine

    N = args.new_tokens
    ref = build_reference(TEXT, VISION, seed=0, attn_implementation="sdpa")
    inputs = random_inputs(ref, seq=args.prompt_tokens, aspect_ratios=((2, 2),), seed=0)
    vision_tokens = 4 * (560 // 14) ** 2 + 4
    load_before = os.getloadavg()
    results = {**run_header(__file__),
               "model": {"text": TEXT, "vision": VISION, "images": "one 4-tile image (2x2)", "batch": 1,
                         "prompt_tokens": args.prompt_tokens, "new_tokens": N},
               "read_bandwidth": read_bandwidth(), "runs": []}
    results["read_bandwidth_GBps"] = results["read_bandwidth"]["best_GBps"]

    def hf_run(model, n, streamer=None):
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=TEXT["pad_token_id"], streamer=streamer)

    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, ref)
        del ref
        from transformers import MllamaForConditionalGeneration
        for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            hf = MllamaForConditionalGeneration.from_pretrained(tmp, dtype=dtype).eval()
            model = llama_mm.load_model(tmp, dtype=dtype)
            engine = Engine(model)
            best = best_of_alternating({
                "transformers": lambda c: hf_run(hf, N, HFStreamer(c)),
                "llama_mm": lambda c: engine.run(inputs, N, on_tokens=c.tick),
            }, args.repeats)
            (hf_ttft, hf_decode), (ttft, decode) = best["transformers"], best["llama_mm"]
            hf_tokens = hf_run(hf, N)[:, inputs["input_ids"].shape[1]:]
            tokens = engine.run(inputs, N)
            step_bytes = decode_bytes(model, vision_tokens, args.prompt_tokens + N // 2)
            del hf, model, engine
            run = {
                "dtype": dtype_name,
                "transformers": {"ttft_s": round(hf_ttft, 4), "decode_ms_per_token": round(hf_decode * 1e3, 2),
                                 "effective_bandwidth_GBps": round(step_bytes / hf_decode / 1e9, 2)},
                "llama_mm": {"ttft_s": round(ttft, 4), "decode_ms_per_token": round(decode * 1e3, 2),
                             "effective_bandwidth_GBps": round(step_bytes / decode / 1e9, 2)},
                "bytes_per_decode_step": step_bytes,
                "decode_speedup_vs_transformers_same_dtype": round(hf_decode / decode, 2),
                "fraction_of_read_bandwidth": round(step_bytes / decode / 1e9 / results["read_bandwidth_GBps"], 3),
                "greedy_tokens_identical_to_transformers": bool(torch.equal(tokens, hf_tokens)),
                # bf16 rounds in a different order than transformers' kernels: near-ties can flip a token
                "leading_tokens_identical": int((tokens == hf_tokens).long().cumprod(1).sum()),
            }
            results["runs"].append(run)
            print(json.dumps(run, indent=1), flush=True)
    results["machine"]["load_average_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    results["read_bandwidth_after"] = read_bandwidth()
    fp32 = next(r for r in results["runs"] if r["dtype"] == "float32")
    bf16 = next(r for r in results["runs"] if r["dtype"] == "bfloat16")
    results["bf16_decode_speedup_vs_transformers_fp32"] = round(
        fp32["transformers"]["decode_ms_per_token"] / bf16["llama_mm"]["decode_ms_per_token"], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"read bandwidth {results['read_bandwidth_GBps']} GB/s; bf16 llama_mm vs fp32 transformers: "
          f"{results['bf16_decode_speedup_vs_transformers_fp32']}x; wrote {args.out}")


if __name__ == "__main__":
    main()
