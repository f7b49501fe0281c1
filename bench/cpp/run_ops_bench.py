"""Build and run the C++ CPU-op microbenchmark (CMake target llama_mm_bench); record it in bench/results/.

    python bench/cpp/run_ops_bench.py        # writes bench/results/cpu_ops_microbench.json
"""

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
from native import build  # noqa: E402

OUT = ROOT / "bench" / "results" / "cpu_ops_microbench.json"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
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
        "machine": {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "torch": torch.__version__,
        "baseline": "plain ATen composition of the same formula (aten_us), same process, same inputs, timed in "
                    "alternating batches; ours_us/aten_us/speedup are medians of 21 batches, *_min_us the fastest batch",
        "note": "threads > 1 rows need every core: on a machine shared with other jobs (see load_average) both sides "
                "stall in OpenMP waits and those rows measure the load more than the kernels; threads = 1 rows "
                "compare the kernels",
        "cases": cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
