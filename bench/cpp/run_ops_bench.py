"""Build and run the C++ CPU-op microbenchmark (CMake target llama_mm_bench); record it in bench/results/.

    python bench/cpp/run_ops_bench.py                  # writes bench/results/cpu_ops_microbench.json
    python bench/cpp/run_ops_bench.py --suite qlinear  # writes bench/results/cpu_qlinear_microbench.json
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from native import build, read_bandwidth  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def machine(load_before: tuple[float, float, float]) -> dict:
    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "platform": platform.platform(),
            "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}


def run_ops() -> None:
    bench = build("llama_mm_bench")
    load_before = os.getloadavg()
    cases = []
    for threads in (1, os.cpu_count()):
        run = subprocess.run([str(bench), str(threads)], check=True, capture_output=True, text=True)
        cases += [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    for c in cases:
        print(f"{c['op']:9s} {c['case']:8s} {c['dtype']:9s} {str(c['shape']):18s} threads {c['threads']}  "
              f"ours {c['ours_us']:9.2f} us  aten {c['aten_us']:9.2f} us  x{c['speedup']:.2f}  "
              f"(min: ours {c['ours_min_us']:.2f} aten {c['aten_min_us']:.2f})")
    record = {
        "command": "python bench/cpp/run_ops_bench.py",
        "runs": "build/bench/llama_mm_bench 1, then build/bench/llama_mm_bench <one thread per core>",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(load_before),
        "torch": torch.__version__,
        "baseline": "plain ATen composition of the same formula (aten_us), same process, same inputs, timed in "
                    "alternating batches; ours_us/aten_us/speedup are medians of 21 batches, *_min_us the fastest batch",
        "note": "threads > 1 rows need every core: on a machine shared with other jobs (see load_average) both sides "
                "stall in OpenMP waits and those rows measure the load more than the kernels; threads = 1 rows "
                "compare the kernels",
        "cases": cases,
    }
    write(RESULTS / "cpu_ops_microbench.json", record)


def run_qlinear() -> None:
    bench = build("llama_mm_bench")
    load_before = os.getloadavg()
    bandwidth = read_bandwidth()
    threads = os.cpu_count()
    run = subprocess.run([str(bench), str(threads), "qlinear"], check=True, capture_output=True, text=True)
    cases = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    for c in cases:
        v = c["variants"]
        for name in v:
            v[name]["fraction_of_read_bandwidth_at_min"] = round(v[name]["GBps_at_min"] / bandwidth["best_GBps"], 3)
        print(f"{c['case']:14s} {c['N']:6d}x{c['K']:<5d} B={c['batch']}  " + "  ".join(
            f"{name} {r['us']:9.1f} us ({r['GBps_at_min']:5.1f} GB/s)" for name, r in v.items()))
    record = {
        "command": "python bench/cpp/run_ops_bench.py --suite qlinear",
        "runs": f"build/bench/llama_mm_read_bandwidth 1 7, then build/bench/llama_mm_bench {threads} qlinear",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(load_before),
        "torch": torch.__version__,
        "read_bandwidth": bandwidth,
        "baseline": "same process, same x (bfloat16, batch rows), each variant timed in alternating batches over "
                    "its own cycled copies of the weights (>= 96 MiB, so reads come from memory): gemv_bf16 / "
                    "gemv_fp32 = llama_mm's gemv on the dense weight, linear_bf16 = at::linear, "
                    "dequant_linear_int4 = ATen-op dequantization + at::linear; us = median of 7 batches, "
                    "GBps_at_min = weight_bytes (packed + bf16 scales, or dense) / fastest batch",
        "limit": "read_bandwidth.best_GBps: a decode-step product cannot take less than weight_bytes / that",
        "cases": cases,
    }
    write(RESULTS / "cpu_qlinear_microbench.json", record)


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["ops", "qlinear"], default="ops")
    {"ops": run_ops, "qlinear": run_qlinear}[parser.parse_args().suite]()


if __name__ == "__main__":
    main()
