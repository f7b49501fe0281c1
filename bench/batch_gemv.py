"""The batch-invariant gemv (cpp/kernels/gemv.cpp) per batch size M, against the version it replaced (revision BASE:
from 8 rows of float32, 6 weight rows copied panel by panel into an L1 buffer against pairs of x rows, the next
panel prefetched during the first pair) and at::linear
(MKL, not batch-invariant), timed interleaved; then the products of one decode step of the 450M benchmark checkpoint
(bench_decode.py's TEXT: every projection of its 10 layers and the lm_head, each weight read once, as the batching
engine's step does) at M rows, this kernel against BASE's, alternated.

    PYTHONPATH=python python bench/batch_gemv.py     # writes bench/results/batch_gemv.json

The previous kernel is compiled here from git (revision BASE, its namespace renamed) with the CMake build's flags,
OpenMP included (at::parallel_for runs on one thread without it).
Physical limits: one call reads the weight once, so bytes / read bandwidth (measured here: a multi-threaded sum over
a 1 GiB tensor, best of 5) bounds its time from below; at many rows the multiply-adds bound it too (M * N * K
float32 FMAs: about 44 G/s per core on the dev machine's Zen 3 at its measured 2.75 GHz, 2 FMAs of 8 per cycle).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
import llama_mm.ops  # noqa: E402,F401  (registers torch.ops.llama_mm.*)

BASE = "ef948ac"  # the last commit with the previous gemv kernel (session 7: 6 x 2 tiles over copied weight rows)
OUT = ROOT / "bench" / "results" / "batch_gemv.json"
SHAPES = [(4096, 4096)]  # 11B q/o projection (N, K)
ROWS = [1, 2, 4, 8, 16, 64]
ROUNDS, REPS = 9, 3


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def base_kernel():
    """The previous gemv, compiled from git revision BASE in namespace llama_mm::cpu::base."""
    src = subprocess.run(["git", "show", f"{BASE}:cpp/kernels/gemv.cpp"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.replace("namespace llama_mm::cpu {", "namespace llama_mm::cpu::base {")
    src += '\n#include <torch/extension.h>\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gemv", &llama_mm::cpu::base::gemv); }\n'
    isa = "AVX512" if "avx512f" in Path("/proc/cpuinfo").read_text() else "AVX2"
    return cpp_extension.load_inline(
        "llama_mm_base_gemv", [src], extra_include_paths=[str(ROOT / "cpp" / "kernels")],
        extra_cflags=["-O3", "-fopenmp", "-march=native", "-ffp-contract=off", f"-DCPU_CAPABILITY={isa}",
                      f"-DCPU_CAPABILITY_{isa}"], extra_ldflags=["-fopenmp"], verbose=False)


def read_bandwidth_gbps() -> float:
    x = torch.ones(2**28)  # 1 GiB float32
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def main() -> None:
    base = base_kernel()
    bandwidth = read_bandwidth_gbps()
    load_before = os.getloadavg()
    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        for N, K in SHAPES:
            weights = [torch.randn(N, K).to(dtype) for _ in range(2)]  # alternate: no weight stays in cache
            for M in ROWS:
                x = torch.randn(M, K).to(dtype)
                kernels = {"ours": torch.ops.llama_mm.gemv, "aten_linear": F.linear, "previous": base.gemv}
                best = {k: float("inf") for k in kernels}
                for _ in range(ROUNDS):  # interleaved: each round times every kernel
                    for name, fn in kernels.items():
                        t = time.perf_counter()
                        for r in range(REPS):
                            fn(x, weights[r % 2])
                        best[name] = min(best[name], (time.perf_counter() - t) / REPS)
                limit_us = N * K * weights[0].element_size() / (bandwidth * 1e9) * 1e6
                row = dict(dtype=str(dtype).split(".")[1], N=N, K=K, M=M, limit_us=round(limit_us, 1),
                           **{f"{k}_us": round(v * 1e6, 1) for k, v in best.items()})
                print(row)
                cases.append(row)
    # one decode step's products of the 450M benchmark checkpoint: (N, K, how many per step)
    hidden, ffn, kv = 1024, 4096, 256
    step_shapes = [(hidden, hidden, 8 * 2 + 2 * 2), (kv, hidden, 8 * 2), (ffn, hidden, 10 * 2), (hidden, ffn, 10),
                   (128256, hidden, 1)]
    steps = []
    for dtype in (torch.float32, torch.bfloat16):
        # one weight per projection, as in the model: 1.13 GB in float32, far beyond the caches (one tensor per
        # shape, reused, would sit in L3 for all but the lm_head)
        ws = {sh: [torch.randn(sh[0], sh[1]).to(dtype) for _ in range(sh[2])] for sh in step_shapes}
        step_bytes = sum(sh[0] * sh[1] * sh[2] for sh in step_shapes) * ws[step_shapes[0]][0].element_size()
        for M in ROWS:
            xs = {sh: torch.randn(M, sh[1]).to(dtype) for sh in step_shapes}
            times = {"ours": [], "previous": []}
            for _ in range(ROUNDS):
                for name, fn in (("ours", torch.ops.llama_mm.gemv), ("previous", base.gemv)):
                    t = time.perf_counter()
                    for sh in step_shapes:
                        for w in ws[sh]:
                            fn(xs[sh], w)
                    times[name].append(time.perf_counter() - t)
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            row = dict(dtype=str(dtype).split(".")[1], M=M, ours_ms=round(med["ours"] * 1e3, 1),
                       previous_ms=round(med["previous"] * 1e3, 1),
                       speedup=round(sorted(b / a for a, b in zip(times["ours"], times["previous"]))[ROUNDS // 2], 2),
                       limit_bytes_ms=round(step_bytes / (bandwidth * 1e9) * 1e3, 1))
            print(row)
            steps.append(row)
    record = {
        "command": "PYTHONPATH=python python bench/batch_gemv.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "torch": torch.__version__,
        "method": f"best of {ROUNDS} interleaved rounds of {REPS} calls each, two weight copies alternated; "
                  f"'previous' = cpp/kernels/gemv.cpp at {BASE}, 'aten_linear' = F.linear (MKL)",
        "read_bandwidth_GBps": round(bandwidth, 1),
        "limit": "limit_us = weight bytes / read_bandwidth (one read of the weight per call)",
        "cases": cases,
        "decode_step_products": {
            "what": "every projection of the 450M benchmark checkpoint's 10 layers (8 self-attention, 2 "
                    "cross-attention) and its lm_head, each a weight of its own read once (since session 8; before, "
                    "one weight per shape was reused and all but the lm_head were read from L3), at M rows; median of the rounds, speedup = median of the "
                    "per-round previous / ours; limit_bytes_ms = the step's weight bytes / read_bandwidth",
            "steps": steps,
        },
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
