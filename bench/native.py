"""The C++ benchmark programs (CMake option LLAMA_MM_BUILD_BENCH, build dir build/bench): build and run them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "bench"


def build(target: str) -> Path:
    """Configure build/bench (Release, benchmarks on) and build `target`; returns the executable's path."""
    configure = ["cmake", "-S", str(ROOT), "-B", str(BUILD), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                 "-DLLAMA_MM_BUILD_BENCH=ON", f"-DPython_EXECUTABLE={sys.executable}"]
    for command in (configure, ["cmake", "--build", str(BUILD), "-j2", "--target", target]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    return BUILD / target


def read_bandwidth(gib: float = 1.0, repeats: int = 7) -> dict:
    """This machine's memory read bandwidth in GB/s, every core reading 1-8 sequential streams (best of `repeats`
    passes each): {"best_GBps": ..., "by_streams": {streams_per_thread: GB/s}}."""
    run = subprocess.run([str(build("llama_mm_read_bandwidth")), str(gib), str(repeats)], check=True,
                         capture_output=True, text=True)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {"best_GBps": rows[-1]["best_GBps"],
            "by_streams": {r["streams_per_thread"]: r["GBps"] for r in rows[:-1]}}
