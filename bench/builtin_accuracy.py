"""Exact-caption accuracy of the built-in model on freshly drawn images, through the user path.

Draws N images from per-image seeds SEED0.. (training used seeds below 1_000_000, see tools/train_builtin.py),
asks `llama_mm.Generator().chat(...)` (the built-in model, greedy) to describe each, and counts answers equal to
`demo.caption(spec)`. Baseline in the same run: the same requests with a blank white image (what the model says
without seeing the shapes), which shows the answers come from the image.

    PYTHONPATH=python python bench/builtin_accuracy.py [--n 200] [--out bench/results/builtin_accuracy.json]
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
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "builtin_accuracy.json"))
    args = ap.parse_args()

    gen = Generator()
    seeds = range(SEED0, SEED0 + args.n)
    specs = [demo.random_spec(random.Random(s)) for s in seeds]
    start = time.perf_counter()
    answers = [describe(gen, demo.draw(spec)) for spec in specs]
    seconds = time.perf_counter() - start
    truths = [demo.caption(spec) for spec in specs]
    correct = sum(a == t for a, t in zip(answers, truths))

    blank = Image.new("RGB", (demo.IMAGE_SIZE, demo.IMAGE_SIZE), demo.BACKGROUND)
    blank_answer = describe(gen, blank)
    blank_correct = sum(blank_answer == t for t in truths)

    result = {
        "task": "exact-caption accuracy of the built-in model (llama_mm.Generator() with no directory), greedy",
        "images": args.n,
        "seeds": [seeds.start, seeds.stop - 1],
        "prompt": demo.PROMPT,
        "accuracy": correct / args.n,
        "correct": correct,
        "baseline_blank_image": {"answer": blank_answer, "accuracy": blank_correct / args.n},
        "wrong": [{"seed": s, "truth": t, "answer": a} for s, t, a in zip(seeds, truths, answers) if a != t],
        "seconds": round(seconds, 2),
        "model": json.loads((demo.BUILTIN_DIR / "config.json").read_text()),
        "command": "PYTHONPATH=python python " + " ".join([f"bench/{Path(__file__).name}"] + sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
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
