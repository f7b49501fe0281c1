"""16-bit linear layers over many rows on a CPU without 16-bit arithmetic: `torch.ops.llama_mm.widened_linear`
(blocks of weight rows widened to float32, float32 GEMM, rounded once) against at::linear's own bfloat16 / float16
product (F.linear), alternated, best of --rounds. Shapes: an image's cross K/V at 11B (6404 keys x 4096 -> 1024) and
at the 450M benchmark checkpoint (6404 x 1024 -> 256), the vision tower's MLP (6432 x 1280 -> 5120), a 512-token
prompt's MLP at 11B (4096 -> 14336). Writes bench/results/widened_linear.json.

    PYTHONPATH=python python bench/widened_linear.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))
import llama_mm.ops  # noqa: E402,F401  (registers torch.ops.llama_mm.*)
from bench_decode import run_header  # noqa: E402

SHAPES = {"image K/V, 11B": (6404, 4096, 1024), "image K/V, 450M": (6404, 1024, 256),
          "vision MLP fc1": (6432, 1280, 5120), "prompt MLP up, 11B, 512 tokens": (512, 4096, 14336)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench/results/widened_linear.json"))
    args = ap.parse_args()
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for name, (M, K, N) in SHAPES.items():
            x, w = torch.randn(M, K).to(dtype), torch.randn(N, K).to(dtype)
            best = {"widened_linear_s": float("inf"), "F_linear_s": float("inf")}
            for _ in range(args.rounds):
                for key, fn in (("widened_linear_s", torch.ops.llama_mm.widened_linear), ("F_linear_s", F.linear)):
                    t = time.perf_counter()
                    fn(x, w)
                    best[key] = min(best[key], time.perf_counter() - t)
            row = dict(dtype=str(dtype).split(".")[1], shape=name, M=M, K=K, N=N,
                       **{k: round(v, 4) for k, v in best.items()},
                       speedup=round(best["F_linear_s"] / best["widened_linear_s"], 2))
            print(row, flush=True)
            rows.append(row)
    result = {**run_header(__file__), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "method": f"best of {args.rounds} alternated calls each", "cases": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
