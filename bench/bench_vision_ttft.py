"""Time to first token of one fresh 4-tile image with the REAL 11B vision tower: llama_mm's engine against
transformers' MllamaForConditionalGeneration on the same weights, dtype and machine, in one run.

Model: random weights written by transformers itself (every parameter randomised, tests/checkpoints.py), the 11B
vision tower at full size (hidden 1280, 32 local + 8 global layers, 16 heads, MLP 5120, 560 px tiles, patch 14,
4 tiles, intermediate layers 3,7,15,23,30, vision_output_dim 7680) and the projector to the real text width 4096;
the text stack is cut to 2 layers (one cross-attention layer) with a small MLP and vocabulary, so the time is the
vision path's. Image: skimage's astronaut photo scaled to 1411x1411 (4 tiles, 2x2), preprocessed once by
transformers' MllamaImageProcessor; both sides get the same tensors (the time excludes preprocessing) and generate
one token greedily (no image cache). Runs alternate (transformers, llama_mm, ...) so both see the same load; best of
--repeats each. Also records the greatest difference of the vision states against transformers'.

    python bench/bench_vision_ttft.py [--dtype float32] [--repeats 2] [--local-layers 32 --global-layers 8]

Fewer layers (e.g. --local-layers 2 --global-layers 1 --intermediate 0,1) give a quick per-layer profile run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from bench_decode import run_header  # noqa: E402

TEXT = dict(vocab_size=1024, hidden_size=4096, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=1024, cross_attention_layers=[1], max_position_embeddings=131072,
            rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=8192),
            bos_token_id=1000, eos_token_id=[1001], pad_token_id=1002)
VISION = dict(hidden_size=1280, num_hidden_layers=32, num_global_layers=8, attention_heads=16, intermediate_size=5120,
              image_size=560, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[3, 7, 15, 23, 30],
              norm_eps=1e-5)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def image_inputs(prompt_tokens: int) -> dict:
    """One 1411x1411 photo -> transformers' tensors: pixel values [1, 1, 4, 3, 560, 560], a prompt starting with
    the image token, and the cross-attention mask (every text row sees the 4 tiles)."""
    from PIL import Image
    from skimage import data
    from transformers import MllamaImageProcessor

    photo = Image.fromarray(data.astronaut()).resize((1411, 1411), Image.Resampling.BICUBIC)
    px = MllamaImageProcessor(max_image_tiles=4, size={"height": 560, "width": 560})(
        images=[[photo]], return_tensors="pt")
    assert px["aspect_ratio_mask"].sum() == 4, "the photo must fill 4 tiles"
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([[TEXT["vocab_size"], TEXT["bos_token_id"]]]),
                     torch.randint(3, 1000, (1, prompt_tokens - 2), generator=gen)], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": px["pixel_values"],
            "aspect_ratio_ids": px["aspect_ratio_ids"], "aspect_ratio_mask": px["aspect_ratio_mask"],
            "cross_attention_mask": torch.ones(1, prompt_tokens, 1, 4, dtype=torch.long)}


def capture_projector(projector, captured: dict, name: str) -> None:
    projector.register_forward_hook(lambda module, args, out: captured.__setitem__(name, out.detach().clone()))


def capture_states(model, captured: dict, name: str) -> None:
    """The first projected vision states llama_mm's `model` computes, into captured[name] (a wrapper, not a hook:
    a hooked nn.Linear leaves ops.linear's widened path)."""
    original = model.vision_states

    def states(*args, **kwargs):
        out = original(*args, **kwargs)
        captured.setdefault(name, out.detach().clone())
        return out

    model.vision_states = states


def int8_path(model, engine, inputs, exact_states, repeats: int) -> dict:
    """Quantizes the vision linears (in place), times it and measures its error against the exact states."""
    from llama_mm.vision import quantize_vision_int8

    quantize_vision_int8(model)
    captured = {}
    capture_projector(model.multi_modal_projector, captured, "int8")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.run(inputs, 1)
        times.append(time.perf_counter() - start)
        print(f"llama_mm int8: {times[-1]:.2f} s", flush=True)
    err = captured["int8"].reshape(exact_states.shape) - exact_states
    return {"ttft_s": round(min(times), 3), "all_runs_s": [round(x, 3) for x in times],
            "vision_states_relative_error": float(err.norm() / exact_states.norm()),
            "vision_states_max_abs_diff_vs_exact": float(err.abs().max())}


def at_linear_run(engine, inputs):
    """engine.run with the vision tower's and projector's products in at::linear's own 16-bit GEMM and the patch
    convolution in at::conv2d (ops.widens patched to say no): llama_mm's path before it widened them."""
    from llama_mm import ops

    widens = ops.widens
    ops.widens = lambda *args, **kwargs: False
    try:
        return engine.run(inputs, 1)
    finally:
        ops.widens = widens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--local-layers", type=int, default=32)
    ap.add_argument("--global-layers", type=int, default=8)
    ap.add_argument("--intermediate", default="3,7,15,23,30")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one llama_mm run")
    ap.add_argument("--int8", action="store_true", help="then also time the opt-in approximate int8 vision path "
                    "(vision.quantize_vision_int8) and measure its error against the exact path")
    ap.add_argument("--out", default=str(ROOT / "bench/results/vision_ttft.json"))
    args = ap.parse_args()
    dtype = _DTYPES[args.dtype]

    from checkpoints import build_reference, write_checkpoint
    from transformers import MllamaForConditionalGeneration

    import llama_mm
    from llama_mm.engine import Engine

    vision = dict(VISION, num_hidden_layers=args.local_layers, num_global_layers=args.global_layers,
                  intermediate_layers_indices=[int(i) for i in args.intermediate.split(",")])
    inputs = image_inputs(args.prompt_tokens)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ref = build_reference(TEXT, vision, seed=0, attn_implementation="sdpa")
        write_checkpoint(tmp, ref)
        del ref
        hf = MllamaForConditionalGeneration.from_pretrained(tmp, dtype=dtype).eval()
        model = llama_mm.load_model(tmp, dtype=dtype)
        engine = Engine(model)

        def hf_run():
            with torch.inference_mode():
                return hf.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=TEXT["pad_token_id"])

        runs = {"transformers": hf_run, "llama_mm": lambda: engine.run(inputs, 1)}
        if dtype != torch.float32:  # llama_mm's 16-bit vision path before session 9, in the same run
            runs["llama_mm at::linear"] = lambda: at_linear_run(engine, inputs)
        captured = {}  # each side's projected vision states, taken from the timed runs (no extra pass)
        capture_projector(hf.model.multi_modal_projector, captured, "transformers")
        capture_states(model, captured, "llama_mm")
        times: dict[str, list[float]] = {name: [] for name in runs}
        tokens = {}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                tokens[name] = run()
                times[name].append(time.perf_counter() - start)
                print(f"{name}: {times[name][-1]:.2f} s (load {os.getloadavg()[0]:.1f})", flush=True)
        states, hf_states = captured["llama_mm"], captured["transformers"].reshape(captured["llama_mm"].shape)
        if args.profile:
            with torch.profiler.profile() as prof:
                engine.run(inputs, 1)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        int8 = int8_path(model, engine, inputs, states, args.repeats) if args.int8 else None
    best = {name: min(t) for name, t in times.items()}
    result = {
        **run_header(__file__, load_average_1m_before_after=[round(load_before[0], 2),
                                                            round(os.getloadavg()[0], 2)]),
        "model": {"text": TEXT, "vision": vision, "image": "skimage astronaut 1411x1411 -> 4 tiles (2x2)",
                  "dtype": args.dtype, "prompt_tokens": args.prompt_tokens},
        "ttft_s": {name: round(t, 3) for name, t in best.items()},
        "all_runs_s": {name: [round(x, 3) for x in t] for name, t in times.items()},
        "ratio_llama_mm_over_transformers": round(best["llama_mm"] / best["transformers"], 3),
        "first_token_identical": bool(torch.equal(tokens["llama_mm"][0, -1:],
                                                  tokens["transformers"][0, -1:])),
        **({"ratio_llama_mm_over_llama_mm_at_linear": round(best["llama_mm"] / best["llama_mm at::linear"], 3)}
           if "llama_mm at::linear" in best else {}),
        "vision_states_max_abs_diff_vs_transformers": float((states - hf_states).abs().max()),
        "vision_states_max_abs": float(hf_states.abs().max()),
    }
    if int8:
        int8["ratio_over_transformers"] = round(int8["ttft_s"] / best["transformers"], 3)
        result["int8_opt_in_approximate"] = int8
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
