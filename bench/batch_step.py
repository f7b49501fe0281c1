"""Steady-state decode step of the batching engine at B requests, one 560x560 image (1 tile) each, on the 450M
benchmark checkpoint (bench_serve.py's), float32, greedy: the engine alone (BatchEngine in this process, the image
encoded once and then taken from the image cache), no HTTP.

B requests are submitted together; the step time is the median gap between request 0's tokens once all B have
their first token (every step then decodes all B). The physical floor per step: the weights read once / measured
read bandwidth (the B requests' K/V come on top; at B = 16 the step is bound by the multiply-adds, not by bytes).

To compare two builds, run it once per build, alternately, with PYTHONPATH pointing at each tree's python/ and a
--label each; runs accumulate in --out under their labels:

    PYTHONPATH=python python bench/batch_step.py --label new [--batches 1 16] [--out bench/results/batch_step.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from bench_decode import decode_bytes, run_header  # noqa: E402
from bench_serve import PROMPT, images, write_bench_checkpoint  # noqa: E402
from native import read_bandwidth  # noqa: E402


def step_time(engine, inputs, B: int, new_tokens: int) -> float:
    """Median gap between request 0's tokens while all B requests decode."""
    from llama_mm.batching import TokenEvent
    from llama_mm.sampling import SamplingParams

    times = {i: [] for i in range(B)}
    done, left, lock = threading.Event(), [B], threading.Lock()

    def on_event(i):
        def f(ev):
            if isinstance(ev, TokenEvent):
                times[i].append(time.perf_counter())
            else:
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
        return f

    for i in range(B):
        engine.submit(inputs, max_new_tokens=new_tokens, params=SamplingParams(), stop_ids=[], on_event=on_event(i))
    assert done.wait(1800), "the wave did not finish"
    start = max(t[0] for t in times.values())
    gaps = sorted(b - a for a, b in zip(times[0], times[0][1:]) if a >= start)
    return gaps[len(gaps) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True, help="name of this build's runs in --out")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--out", default=str(ROOT / "bench/results/batch_step.json"))
    args = ap.parse_args()
    import llama_mm
    from llama_mm.batching import BatchEngine

    with tempfile.TemporaryDirectory() as tmp:
        write_bench_checkpoint(Path(tmp))
        gen = llama_mm.Generator(tmp, dtype="float32")
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT.format(i=0)}]}]
        inputs = gen.processor(images=[[images(1)[0]]],
                               text=[gen.processor.apply_chat_template(msgs, add_generation_prompt=True)])
        weights = decode_bytes(gen.model, 0, 0)
        engine = BatchEngine(gen.model, max_batch=max(args.batches), kv_cache_mb=2048, image_cache_mb=512)
        try:
            step_time(engine, inputs, 1, 4)  # encodes the image once (then cached) and warms up
            steps = {f"b{B}": round(step_time(engine, inputs, B, args.new_tokens) * 1e3, 1) for B in args.batches}
        finally:
            engine.close()
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {
        **run_header(__file__), "what": __doc__.split("\n\n")[0], "runs": []}
    record["command"] = "PYTHONPATH=<tree>/python python bench/batch_step.py --label <build>, builds alternated"
    bandwidth = read_bandwidth()["best_GBps"]
    record["runs"].append({"label": args.label, "llama_mm": str(Path(llama_mm.__file__).parent),
                           "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                           "read_bandwidth_GBps": bandwidth, "step_ms_p50": steps,
                           "floor_ms_weights_only": round(weights / (bandwidth * 1e9) * 1e3, 1)})
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(args.label, steps, flush=True)


if __name__ == "__main__":
    main()
