"""LoRA on the built-in model: teach it a caption style it has never seen (counting shapes by colour).

1. Writes a JSONL training set (llama_mm.train's format) of count images from seeds TRAIN_SEED0.. with
   `demo.COUNT_PROMPT` and the answer `demo.count_caption(spec)`, e.g. "3 shapes: 2 red, 1 blue".
2. Measures the built-in model's exact accuracy on fresh count images (seeds EVAL_SEED0..) before fine-tuning.
3. Fine-tunes a LoRA adapter with `llama_mm.train.finetune` (base weights frozen) on the CPU.
4. Measures again with `Generator(adapter=...)` and writes both numbers, the settings and the machine.

    PYTHONPATH=python python bench/lora_count.py [--train 6000] [--eval 100] [--out bench/results/lora_count.json]
"""
import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from llama_mm import Generator, demo
from llama_mm.lora import ALL_TARGETS
from llama_mm.train import finetune

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SEED0, EVAL_SEED0 = 3_000_000, 4_000_000  # disjoint from each other and from the built-in model's training


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def user_turn(prompt: str) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}


def write_jsonl(directory: Path, seeds: range) -> Path:
    """count images as PNG files next to train.jsonl, one row per image."""
    (directory / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in seeds:
        spec = demo.random_count_spec(random.Random(s))
        demo.draw(spec).save(directory / "img" / f"{s}.png")
        answer = {"role": "assistant", "content": [{"type": "text", "text": demo.count_caption(spec)}]}
        rows.append({"images": [f"img/{s}.png"], "messages": [user_turn(demo.COUNT_PROMPT), answer]})
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def accuracy(gen: Generator, seeds: range) -> tuple[float, list[dict]]:
    answers = []
    for s in seeds:
        spec = demo.random_count_spec(random.Random(s))
        got = gen.chat([user_turn(demo.COUNT_PROMPT)], images=[demo.draw(spec)], max_new_tokens=32, temperature=0)
        answers.append({"seed": s, "truth": demo.count_caption(spec), "answer": got.strip()})
    correct = sum(a["truth"] == a["answer"] for a in answers)
    return correct / len(answers), answers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=6000, help="training images")
    ap.add_argument("--eval", type=int, default=100, help="fresh evaluation images")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is robust on a shared CPU)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora_count.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, r=args.r, alpha=args.alpha,
                    dropout=0.0, target_modules=ALL_TARGETS, warmup_steps=20, seed=0, device="cpu", progress=False,
                    log_every=20)
    eval_seeds = range(EVAL_SEED0, EVAL_SEED0 + args.eval)

    before, before_answers = accuracy(Generator(), eval_seeds)
    print(f"before fine-tuning: {before:.1%} exact on {args.eval} fresh count images "
          f"(e.g. truth {before_answers[0]['truth']!r}, model {before_answers[0]['answer']!r})", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        data = write_jsonl(Path(tmp) / "data", range(TRAIN_SEED0, TRAIN_SEED0 + args.train))
        start = time.perf_counter()
        result = finetune(demo.BUILTIN_DIR, data, Path(tmp) / "adapter", **settings)
        train_s = time.perf_counter() - start
        for h in result.history:
            print(f"  step {h['step']:4d}  loss {h['loss']:.4f}  {h['tokens_per_s']:.0f} tokens/s", flush=True)
        after, after_answers = accuracy(Generator(adapter=Path(tmp) / "adapter"), eval_seeds)
    print(f"after {result.steps} LoRA steps ({train_s:.0f} s): {after:.1%} exact", flush=True)

    report = {
        "task": "exact accuracy of count captions (demo.COUNT_PROMPT -> demo.count_caption), greedy, before and "
                "after LoRA fine-tuning of the built-in model",
        "eval_images": args.eval,
        "eval_seeds": [eval_seeds.start, eval_seeds.stop - 1],
        "train_images": args.train,
        "train_seeds": [TRAIN_SEED0, TRAIN_SEED0 + args.train - 1],
        "accuracy_before": before,
        "accuracy_after": after,
        "settings": {**settings, "target_modules": list(ALL_TARGETS), "steps": result.steps},
        "train_seconds": round(train_s, 1),
        "loss_history": result.history,
        "wrong_after": [a for a in after_answers if a["truth"] != a["answer"]],
        "examples_before": before_answers[:5],
        "command": "PYTHONPATH=python python " + " ".join([f"bench/{Path(__file__).name}"] + sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
