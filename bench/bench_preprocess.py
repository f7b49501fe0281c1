"""Preprocessing speed: llama_mm.MllamaProcessor vs transformers' MllamaProcessor (PIL image backend).

Workload: one 1411x1411 RGB photo (scikit-image's astronaut, upscaled once before timing) -> 4 tiles of 560 px,
(a) images only, (b) with a prompt (adds tokenizing and the cross-attention mask). Both processors read the same
checkpoint files (tests/tokenizer_fixture.py writes Llama-3.2-Vision-style ones). Runs interleave the
implementations in rotating order so that load from other processes hits all alike; the median of N runs is
reported. llama_mm splits its resize over threads only when cores are idle (see image_resize.py); it is also
timed on one thread and with threads forced, to show both paths whatever the machine's load.

    PYTHONPATH=python python bench/bench_preprocess.py [--runs 40] [--out bench/results/preprocess.json]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import PIL.Image
import skimage
import torch
import transformers
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from llama_mm import image_resize  # noqa: E402
from llama_mm.processor import MllamaProcessor  # noqa: E402
from tokenizer_fixture import write_tokenizer_files  # noqa: E402

PROMPT = "<|image|>Describe this image in detail."


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "preprocess.json"))
    args = parser.parse_args()

    with PIL.Image.open(Path(skimage.__file__).parent / "data" / "astronaut.png") as im:
        photo = im.convert("RGB").resize((1411, 1411), PIL.Image.Resampling.BICUBIC)

    with tempfile.TemporaryDirectory() as ckpt:
        write_tokenizer_files(ckpt, vocab_size=1000)
        ours = MllamaProcessor.from_pretrained(ckpt)
        theirs = transformers.MllamaProcessor.from_pretrained(ckpt)
        if not isinstance(theirs.image_processor, MllamaImageProcessorPil):
            theirs.image_processor = MllamaImageProcessorPil.from_pretrained(ckpt)

    threads = torch.get_num_threads()
    cases = {
        "images_only": (
            lambda: ours(images=photo),
            lambda: theirs(images=photo, return_tensors="pt"),
        ),
        "image_and_prompt": (
            lambda: ours(images=photo, text=PROMPT),
            lambda: theirs(images=photo, text=PROMPT, return_tensors="pt"),
        ),
    }

    # same output first: the comparison is only meaningful if both do the same work
    a, b = cases["image_and_prompt"][0](), cases["image_and_prompt"][1]()
    assert tuple(a["pixel_values"].shape) == (1, 1, 4, 3, 560, 560), a["pixel_values"].shape
    max_diff = (a["pixel_values"] - b["pixel_values"]).abs().max().item()
    assert max_diff <= 1e-5 and all(torch.equal(a[k], b[k]) for k in b if k != "pixel_values")

    load_before = os.getloadavg()
    results = {}
    for name, (ours_fn, theirs_fn) in cases.items():
        for fn in (ours_fn, theirs_fn):
            for _ in range(3):
                fn()
        def one_thread():
            torch.set_num_threads(1)
            try:
                ours_fn()
            finally:
                torch.set_num_threads(threads)

        def forced_threads():  # split the resize over all torch threads even when no core is idle
            saved = image_resize._spare_cores
            image_resize._spare_cores = lambda: threads
            try:
                ours_fn()
            finally:
                image_resize._spare_cores = saved

        variants = [("llama_mm", ours_fn), ("transformers_pil", theirs_fn)]
        variants += [("llama_mm_1_thread", one_thread), ("llama_mm_forced_threads", forced_threads)]
        samples = {key: [] for key, _ in variants}
        spare = []
        for i in range(args.runs):  # rotate the order so that none always runs after another
            spare.append(image_resize._spare_cores())
            for key, fn in variants[i % len(variants) :] + variants[: i % len(variants)]:
                samples[key].append(timed(fn))
        medians = {key: statistics.median(v) for key, v in samples.items()}
        base = medians["transformers_pil"]
        results[name] = {
            **{f"{key}_ms": round(m, 2) for key, m in medians.items()},
            **{f"{key}_min_ms": round(min(samples[key]), 2) for key in samples},
            "ratio_llama_mm_over_transformers": round(medians["llama_mm"] / base, 3),
            "ratio_1_thread": round(medians["llama_mm_1_thread"] / base, 3),
            "ratio_forced_threads": round(medians["llama_mm_forced_threads"] / base, 3),
            "idle_cores_seen_by_llama_mm": [min(spare), max(spare)],
        }
        print(
            f"{name}: llama_mm {medians['llama_mm']:.1f} ms (idle cores seen {min(spare)}..{max(spare)}), "
            f"1 thread {medians['llama_mm_1_thread']:.1f} ms, forced {threads} threads "
            f"{medians['llama_mm_forced_threads']:.1f} ms; transformers PIL {base:.1f} ms; "
            f"ratio {medians['llama_mm'] / base:.3f}"
        )

    report = {
        "benchmark": "preprocess a 1411x1411 RGB photo into 4 tiles of 560 px (median of runs)",
        "command": "PYTHONPATH=python python bench/bench_preprocess.py " + " ".join(sys.argv[1:]),
        "runs": args.runs,
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "note": "shared machine: other processes may run; the implementations interleave run by run",
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": threads,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
            "transformers": transformers.__version__,
        },
        "pixel_values_max_abs_diff": max_diff,
        "results": results,
        "target": "llama_mm at most half of transformers' time (ratio <= 0.5)",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
