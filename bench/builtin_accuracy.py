"""Exact-caption accuracy of the built-in model on freshly drawn images, through the user path.

Draws N images from per-image seeds SEED0.. (training used seeds below 1_000_000, see tools/train_builtin.py),
asks `llama_mm.Generator().chat(...)` (the built-in model, greedy) to describe each, and counts answers equal to
`demo.caption(spec)`. Baseline in the same run: the same requests with a blank white image (what the model says
without seeing the shapes), which shows the answers come from the image.

With --quantize int8|int4 the built-in model's text decoder is quantized on load (`Generator(quantize=...,
group_size=...)`); the unquantized model's accuracy on the same images is measured in the same run for comparison,
and the result goes to bench/results/builtin_accuracy_<quantize>.json; --activations int8 adds the opt-in int8
activations (integer products) to the quantized layers (..._<quantize>_int8_activations.json).

    PYTHONPATH=python python bench/builtin_accuracy.py [--n 200] [--quantize int8|int4 [--group-size 128]
                                                       [--activations int8]]
"""
import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from llama_mm import Generator, demo

ROOT = Path(__file__).resolve().parents[1]
SEED0 = 1_000_000


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def describe(gen: Generator, image) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": demo.PROMPT}]}]
    return gen.chat(messages, images=[image], max_new_tokens=32, temperature=0).strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--quantize", default=None, choices=["int8", "int4"])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--activations", default="float", choices=["float", "int8"])
    ap.add_argument("--out", default=None, help="default: bench/results/builtin_accuracy[_<quantize>].json")
    args = ap.parse_args()
    suffix = ("_" + args.quantize if args.quantize else "") + \
        ("_int8_activations" if args.activations == "int8" else "")
    args.out = args.out or str(ROOT / "bench" / "results" / f"builtin_accuracy{suffix}.json")

    gen = Generator(quantize=args.quantize, group_size=args.group_size, activations=args.activations)
    seeds = range(SEED0, SEED0 + args.n)
    specs = [demo.random_spec(random.Random(s)) for s in seeds]
    truths = [demo.caption(spec) for spec in specs]
    start = time.perf_counter()
    answers = [describe(gen, demo.draw(spec)) for spec in specs]
    seconds = time.perf_counter() - start
    correct = sum(a == t for a, t in zip(answers, truths))
    unquantized = None
    if args.quantize:
        dense = Generator()
        dense_answers = [describe(dense, demo.draw(spec)) for spec in specs]
        unquantized = {"accuracy": sum(a == t for a, t in zip(dense_answers, truths)) / args.n,
                       "same_answer_as_quantized": sum(a == b for a, b in zip(answers, dense_answers)) / args.n}

    blank = Image.new("RGB", (demo.IMAGE_SIZE, demo.IMAGE_SIZE), demo.BACKGROUND)
    blank_answer = describe(gen, blank)
    blank_correct = sum(blank_answer == t for t in truths)

    result = {
        "task": "exact-caption accuracy of the built-in model (llama_mm.Generator() with no directory), greedy",
        "quantize": args.quantize and {"weights": args.quantize, "group_size": args.group_size,
                                       "scope": "text decoder linears (lm_head, vision, embeddings unquantized)",
                                       "activations": args.activations},
        "images": args.n,
        "seeds": [seeds.start, seeds.stop - 1],
        "prompt": demo.PROMPT,
        "accuracy": correct / args.n,
        "correct": correct,
        "baseline_blank_image": {"answer": blank_answer, "accuracy": blank_correct / args.n},
        "unquantized_same_run": unquantized,
        "wrong": [{"seed": s, "truth": t, "answer": a} for s, t, a in zip(seeds, truths, answers) if a != t],
        "seconds": round(seconds, 2),
        "model": json.loads((demo.BUILTIN_DIR / "config.json").read_text()),
        "command": "PYTHONPATH=python python " + " ".join([f"bench/{Path(__file__).name}"] + sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "load_average_1m": round(os.getloadavg()[0], 2)},
    }
    print(f"exact-caption accuracy: {correct}/{args.n} = {correct / args.n:.1%} "
          f"(blank-image baseline {blank_correct / args.n:.1%}: {blank_answer!r}); {seconds:.1f} s")
    for w in result["wrong"][:10]:
        print(f"  seed {w['seed']}: truth {w['truth']!r}, model {w['answer']!r}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
