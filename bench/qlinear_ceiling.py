"""What bounds the CPU's one-row quantized product, memory or arithmetic? torch.ops.llama_mm.qlinear (int4 and int8,
group 128, bf16 x and scales, float32 products), torch.ops.llama_mm.qlinear_a8 (the same weights times int8
activations, integer products) and torch.ops.llama_mm.gemv (bf16) at one row of x, K = 4096, timed twice:

- streamed: N = 14336 rows (the 11B MLP's gate/up shape), copies cycled so that every call reads its weight from
  memory (the copies together are 4x the L3 cache);
- in cache: N = 2048 rows (4 MiB of int4, 8 MiB of int8, 16 MiB of bf16: inside the 32 MiB L3), one weight reused.

Values per second in cache is the kernel's arithmetic ceiling (a lower bound of it: a call's fixed costs weigh more
on the smaller matrix); streamed, the bytes per second are compared with the machine's read bandwidth
(bench/cpp/read_bandwidth.cpp). A kernel that processes as many values per second from memory as from cache, and
the same number whether a value is 4 or 8 bits, is bound by arithmetic, not by memory. Variants interleaved, best of
rounds.

    PYTHONPATH=python python bench/qlinear_ceiling.py    # writes bench/results/qlinear_ceiling.json
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))
import llama_mm.ops  # noqa: E402,F401  (registers torch.ops.llama_mm.*)
from bench_decode import run_header  # noqa: E402
from native import read_bandwidth  # noqa: E402

K, GROUP = 4096, 128
N_STREAMED, N_CACHED = 14336, 2048
L3_BYTES = 32 * 2**20
ROUNDS, REPS = 7, 5


def make(kind: str, N: int) -> tuple:
    """(weight tensors for one call, bytes one call reads)."""
    if kind == "gemv_bf16":
        return (torch.randn(N, K).bfloat16(),), N * K * 2
    bits = 4 if kind.endswith("int4") else 8
    packed = torch.randint(-2**31, 2**31 - 1, (N, K * bits // 32), dtype=torch.int32)
    scale = torch.rand(N, K // GROUP).bfloat16()
    return (packed, scale, bits), N * K * bits // 8 + scale.numel() * 2


def call(kind: str, x: torch.Tensor, w: tuple) -> None:
    if kind == "gemv_bf16":
        torch.ops.llama_mm.gemv(x, w[0])
    elif kind.startswith("qlinear_a8"):
        torch.ops.llama_mm.qlinear_a8(x, w[0], w[1], None, w[2], GROUP)
    else:
        torch.ops.llama_mm.qlinear(x, w[0], w[1], None, w[2], GROUP)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, K).bfloat16()
    kinds = ["qlinear_int4", "qlinear_int8", "qlinear_a8_int4", "qlinear_a8_int8", "gemv_bf16"]
    setups = {}
    for kind in kinds:
        one, nbytes = make(kind, N_STREAMED)
        copies = [one] + [make(kind, N_STREAMED)[0] for _ in range(max(1, 4 * L3_BYTES // nbytes))]
        setups[(kind, "streamed")] = (copies, nbytes, N_STREAMED)
        cached, cbytes = make(kind, N_CACHED)
        setups[(kind, "in_cache")] = ([cached], cbytes, N_CACHED)
    bandwidth = read_bandwidth()
    best = {key: float("inf") for key in setups}
    for _ in range(ROUNDS):
        for key, (weights, _, _) in setups.items():
            call(key[0], x, weights[0])  # warm
            t = time.perf_counter()
            for r in range(REPS):
                call(key[0], x, weights[r % len(weights)])
            best[key] = min(best[key], (time.perf_counter() - t) / REPS)
    results = {}
    for (kind, where), (weights, nbytes, N) in setups.items():
        s = best[(kind, where)]
        results.setdefault(kind, {})[where] = {"N": N, "K": K, "us": round(s * 1e6, 1),
                                               "G_values_per_s": round(N * K / s / 1e9, 2),
                                               "GB_per_s": round(nbytes / s / 1e9, 2)}
    for kind, r in results.items():
        r["streamed_fraction_of_read_bandwidth"] = round(r["streamed"]["GB_per_s"] / bandwidth["best_GBps"], 3)
        r["in_cache_ceiling_fraction_of_read_bandwidth"] = round(r["in_cache"]["GB_per_s"] / bandwidth["best_GBps"], 3)
    record = {**run_header(__file__), "read_bandwidth": bandwidth, "after_read_bandwidth": read_bandwidth(),
              "method": f"best of {ROUNDS} interleaved rounds of {REPS} calls; x [1, {K}] bf16; group {GROUP}",
              "results": results}
    out = ROOT / "bench" / "results" / "qlinear_ceiling.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
