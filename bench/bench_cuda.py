"""End-to-end decode benchmark on one CUDA GPU: llama_mm's engine against transformers on the same weights, in one run.

Model: random bfloat16 weights with the exact Llama-3.2-11B-Vision shapes (text hidden 4096, 40 layers, 32 heads /
8 KV heads, MLP 14336, vocab 128256, cross-attention layers 3, 8, ..., 38; vision hidden 1280, 32 + 8 layers,
16 heads, MLP 5120, 560 px tiles, patch 14). transformers' MllamaForConditionalGeneration is built directly on the
GPU and its parameters randomised in place with a seeded CUDA generator; llama_mm's MllamaModel is assigned the
very same tensors (no copy, nothing written to disk). Inputs: a prompt with one 4-tile image (2x2).

Measured, on this GPU, in this run:
  - device copy bandwidth: a large device-to-device copy, best of N, (read + write bytes) / time
  - batch 1: time to first token, decode ms/token ((t(N tokens) - t(1 token)) / (N - 1)) and effective bandwidth
    (bytes of weights and caches read per decode step / decode time) for llama_mm, and for transformers with its
    default attention, with "sdpa" and with "eager"; also llama_mm's bare decode step (graph replay) time
  - peak GPU memory of each run; batch 8 and 32 decode throughput (tokens/s) for llama_mm and transformers
Writes bench/results/decode_cuda.json with the GPU, driver, CUDA, torch and transformers versions. Without a GPU it
exits with a message and writes nothing. Needs llama_mm._C built with CUDA kernels (tools/dev_build.sh, then
PYTHONPATH=python; or pip install --no-build-isolation .) and about 45 GiB of GPU memory (weights 21 GB, shared).

    PYTHONPATH=python python bench/bench_cuda.py [--new-tokens 64] [--repeats 3] [--batches 8 32] [--out bench/results/decode_cuda.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CROSS_LAYERS = [3, 8, 13, 18, 23, 28, 33, 38]
TEXT = dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=14336, cross_attention_layers=CROSS_LAYERS, max_position_embeddings=131072,
            rms_norm_eps=1e-5, rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                     low_freq_factor=1.0, high_freq_factor=4.0,
                                                     original_max_position_embeddings=8192),
            bos_token_id=128000, eos_token_id=128001, pad_token_id=128004, tie_word_embeddings=False)
VISION = dict(hidden_size=1280, num_hidden_layers=32, num_global_layers=8, attention_heads=16, intermediate_size=5120,
              vision_output_dim=7680, image_size=560, patch_size=14, max_num_tiles=4,
              intermediate_layers_indices=[3, 7, 15, 23, 30], norm_eps=1e-5)
VISION_TOKENS = 4 * ((560 // 14) ** 2 + 1)  # one 4-tile image: 1601 per tile


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def timed(fn, repeats: int) -> float:
    """Best of `repeats` wall times of fn() (after one warm-up call), the GPU drained before and after."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = sync_time()
        fn()
        best = min(best, sync_time() - t)
    return best


def copy_bandwidth(gib: float = 2.0, repeats: int = 10) -> float:
    """Device copy bandwidth in GB/s: (bytes read + bytes written) / time of the best of `repeats` copies."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * int(gib * 2**30) / best / 1e9


def build_models(seed: int):
    """(transformers model, llama_mm model) sharing one set of random bfloat16 weights on the GPU."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    import llama_mm.model as lm
    from checkpoints import _init_mean, _init_std  # the test checkpoints' parameter distributions
    from llama_mm.config import MllamaConfig as LlamaMMConfig
    from llama_mm.weights import assign_weights, canonical_name

    config = MllamaConfig(text_config=TEXT, vision_config=VISION, image_token_index=TEXT["vocab_size"])
    with torch.device("cuda"):
        hf = MllamaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert all(t.device.type == "cuda" for t in [*hf.parameters(), *hf.buffers()]), "transformers model not on the GPU"
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(_init_mean(name), _init_std(name, p), generator=gen)
    hf = hf.eval().requires_grad_(False)

    cfg = LlamaMMConfig.from_dict(json.loads(hf.config.to_json_string()), source="transformers config")
    with torch.device("meta"):
        model = lm.MllamaModel(cfg)
    tensors = {canonical_name(n): p.detach() for n, p in hf.named_parameters()}
    assign_weights(model, tensors, torch.device("cuda"), torch.bfloat16, source="transformers model")
    model.language_model.model.inv_freq = cfg.text.rope.inv_freq(cfg.text.head_dim).to("cuda")
    model = model.requires_grad_(False).eval()
    assert model.language_model.lm_head.weight.data_ptr() == hf.lm_head.weight.data_ptr(), "weights were copied"
    return hf, model


def make_inputs(hf, batch: int, prompt_tokens: int, seed: int) -> dict:
    """Processor-layout inputs on the GPU: each row a prompt with one 4-tile (2x2) image."""
    from checkpoints import random_inputs

    inputs = random_inputs(hf, batch=batch, seq=prompt_tokens, aspect_ratios=((2, 2),), seed=seed)
    return {k: v.to("cuda") for k, v in inputs.items()}


def measure(generate, inputs: dict, n: int, repeats: int, step_bytes: int | None) -> dict:
    """Time to first token, decode ms/token, throughput and peak memory of generate(inputs, n) -> ids [B, n]."""
    B = inputs["input_ids"].shape[0]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ttft = timed(lambda: generate(inputs, 1), repeats)
    total = timed(lambda: generate(inputs, n), repeats)
    tokens = generate(inputs, n)
    assert tokens.shape == (B, n), f"expected {n} new tokens per row, got {tuple(tokens.shape)}"
    decode = (total - ttft) / (n - 1)
    out = {"batch": B, "ttft_s": round(ttft, 4), "total_s": round(total, 4),
           "decode_ms_per_token": round(decode * 1e3, 3), "decode_tokens_per_s": round(B / decode, 1),
           "end_to_end_tokens_per_s": round(B * n / total, 1),
           "peak_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    if step_bytes is not None:
        out["effective_bandwidth_GBps"] = round(step_bytes / decode / 1e9, 1)
    return out, tokens.cpu()


def engine_step_ms(engine, inputs: dict, n: int) -> float:
    """llama_mm's bare decode step: the mean time of n graph replays after the warm-up and capture steps."""
    native = engine.native
    from llama_mm.engine import request_tensors

    logits = native.start(*request_tensors(engine, inputs), n + 4)
    token = logits.argmax(-1)
    for _ in range(3):  # eager warm-up (first use), capture, first replay
        native.step(token)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        native.step(token)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def guarded(label: str, fn):
    """Run one measurement; an out-of-memory error is recorded instead of ending the benchmark."""
    print(f"-- {label}", flush=True)
    try:
        result = fn()
    except (torch.OutOfMemoryError, RuntimeError) as e:  # the C++ engine's allocation failures are RuntimeErrors
        if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e):
            raise
        torch.cuda.empty_cache()
        print(f"   out of memory: {str(e).splitlines()[0]}", flush=True)
        return {"error": "out of memory"}, None
    print("   " + json.dumps(result[0]), flush=True)
    return result


def machine_info() -> dict:
    import transformers

    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = "unknown (nvidia-smi unavailable)"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=30).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"gpu": props.name, "gpu_memory_GiB": round(props.total_memory / 2**30, 1),
            "sm_count": props.multi_processor_count, "driver": driver, "cuda_runtime": torch.version.cuda,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "llama_mm_commit": commit}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="*", default=[8, 32], help="throughput batch sizes")
    ap.add_argument("--no-eager", action="store_true", help="skip transformers with eager attention")
    ap.add_argument("--out", default=str(ROOT / "bench/results/decode_cuda.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was written")
    from llama_mm import ops
    if not ops.CUDA_KERNELS:
        sys.exit("llama_mm._C is not built with CUDA kernels "
                 f"({ops.NATIVE_ERROR or 'built without nvcc or with a CPU-only torch'}); nothing was written")
    if args.new_tokens < 2:
        sys.exit("--new-tokens must be >= 2 (decode time is t(N) - t(1))")
    from bench_decode import decode_bytes
    from llama_mm.engine import Engine

    N = args.new_tokens
    results = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
               "machine": machine_info(), "copy_bandwidth_GBps": round(copy_bandwidth(), 1),
               "model": {"text": TEXT, "vision": VISION, "dtype": "bfloat16", "weights": "random, seeded, on the GPU",
                         "image": "one 4-tile (2x2) image per row", "prompt_tokens": args.prompt_tokens,
                         "new_tokens": N}}
    print(json.dumps(results, indent=1), flush=True)
    t = time.perf_counter()
    hf, model = build_models(seed=0)
    results["model"]["build_s"] = round(time.perf_counter() - t, 1)
    results["model"]["parameters"] = sum(p.numel() for p in model.parameters())
    results["model"]["hf_default_attention"] = hf.config._attn_implementation
    step_bytes = decode_bytes(model, VISION_TOKENS, args.prompt_tokens + N // 2)
    results["bytes_per_decode_step_batch1"] = step_bytes
    engine = Engine(model)

    def ours(inputs, n):
        return engine.run(inputs, n)

    def theirs(inputs, n):
        with torch.inference_mode():
            out = hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=TEXT["pad_token_id"])
        return out[:, inputs["input_ids"].shape[1]:]

    one = make_inputs(hf, 1, args.prompt_tokens, seed=0)
    batch1 = results["batch1"] = {}
    batch1["llama_mm"], our_tokens = guarded("llama_mm batch 1", lambda: measure(ours, one, N, args.repeats,
                                                                                 step_bytes))
    if "error" not in batch1["llama_mm"]:
        step_ms = engine_step_ms(engine, one, N)
        batch1["llama_mm"]["graph_step_ms"] = round(step_ms, 3)
        batch1["llama_mm"]["graph_step_effective_bandwidth_GBps"] = round(step_bytes / step_ms / 1e6, 1)
    default_attention = hf.config._attn_implementation
    implementations = [default_attention] + [a for a in ("sdpa", "eager") if a != default_attention]
    if args.no_eager:
        implementations.remove("eager")
    for attn in implementations:
        hf.set_attn_implementation(attn)
        key = f"transformers_{attn}" + ("_default" if attn == default_attention else "")
        batch1[key], hf_tokens = guarded(f"transformers ({attn}) batch 1",
                                         lambda: measure(theirs, one, N, args.repeats, step_bytes))
        if hf_tokens is not None and our_tokens is not None:
            same = (hf_tokens == our_tokens)[0].long().cumprod(0).sum().item()
            batch1[key]["greedy_tokens_equal_to_llama_mm_prefix"] = same  # bf16 rounding: informative only
    hf.set_attn_implementation(default_attention)

    ref = batch1[f"transformers_{default_attention}_default"]
    mine = batch1["llama_mm"]
    if "error" not in ref and "error" not in mine:
        results["summary"] = {
            "llama_mm_fraction_of_copy_bandwidth": round(mine["effective_bandwidth_GBps"]
                                                         / results["copy_bandwidth_GBps"], 3),
            "llama_mm_graph_step_fraction_of_copy_bandwidth": round(
                mine["graph_step_effective_bandwidth_GBps"] / results["copy_bandwidth_GBps"], 3),
            "decode_speedup_vs_transformers_default": round(ref["decode_ms_per_token"]
                                                            / mine["decode_ms_per_token"], 2),
            "ttft_speedup_vs_transformers_default": round(ref["ttft_s"] / mine["ttft_s"], 2),
        }

    results["throughput"] = []
    for B in args.batches:
        inputs = make_inputs(hf, B, args.prompt_tokens, seed=B)
        row = {"batch": B}
        row["llama_mm"], _ = guarded(f"llama_mm batch {B}", lambda: measure(ours, inputs, N, args.repeats, None))
        row[f"transformers_{default_attention}"], _ = guarded(
            f"transformers ({default_attention}) batch {B}", lambda: measure(theirs, inputs, N, args.repeats, None))
        results["throughput"].append(row)
        del inputs

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results.get("summary", {}), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
