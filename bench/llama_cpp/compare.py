"""llama_mm's quantized text-only batch-1 decode against llama.cpp (the best CPU engine) on the same text stack, in one
run on one machine.

Model: the 450M benchmark checkpoint of bench/bench_decode.py (random bf16 weights) run without an image, i.e. its 8
self-attention layers + embeddings + lm_head (cross-attention layers are skipped). llama.cpp gets exactly that stack
as GGUF (bench/llama_cpp/make_gguf.py: the same weights; bf16, f16, Q8_0 and Q4_0, the last two with llama-quantize's
default per-tensor choices and with --pure). llama_mm runs bf16, int8 and int4 (group 128), each quantized width with
lm_head in bf16 and quantized, and with the opt-in int8 activations (llama.cpp's own integer arithmetic).

Rounds alternate: each round runs every llama.cpp file (`llama-bench -m FILE -p 0 -n N -t T -r R -o json`: token
generation from an empty context, R repetitions) and every llama_mm variant (a 1-token prompt, then N decode steps
through the native engine: decode time = (t(N+1) - t(1)) / N, as bench/bench_decode.py times it), so both see the
same machine load; round 0 warms up and is dropped; the best of the remaining rounds (and of llama-bench's
repetitions) is kept. Per format: tok/s and ms/token of both, their ratio, the weight bytes one step reads and that
over the machine's read bandwidth (bench/cpp/read_bandwidth.cpp, before and after). Writes
bench/results/llama_cpp_compare.json. Not run in CI. Needs: cmake, ninja, a C/C++ compiler and PyPI access on the
first run (bench/llama_cpp/build.py fetches and builds llama.cpp into --cache), ~4 GB free under --workdir.

    python bench/llama_cpp/compare.py [--threads 2] [--new-tokens 64] [--reps 5] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (ROOT / "tests", ROOT / "bench", ROOT / "python", HERE):
    sys.path.insert(0, str(path))
from bench_decode import TEXT, VISION, Clock, run_header  # noqa: E402
from build import DEFAULT_CACHE, LlamaCpp, build  # noqa: E402
from make_gguf import make_all, tensor_summary  # noqa: E402
from native import read_bandwidth  # noqa: E402

LLAMA_MM_VARIANTS = {  # name -> load_model quantization arguments (group size from --group-size)
    "bf16": {},
    "int8": dict(quantize="int8"),
    "int8 + lm_head": dict(quantize="int8", quantize_lm_head=True),
    "int4": dict(quantize="int4"),
    "int4 + lm_head": dict(quantize="int4", quantize_lm_head=True),
    # opt-in int8 activations: integer products, as llama.cpp's Q8_0 / Q4_0 do
    "int8 + lm_head, int8 activations": dict(quantize="int8", quantize_lm_head=True, activations="int8"),
    "int4 + lm_head, int8 activations": dict(quantize="int4", quantize_lm_head=True, activations="int8"),
}
COMPARISONS = [  # (llama.cpp GGUF, llama_mm variant, what differs)
    ("bf16", "bf16", "same format"),
    ("f16", "bf16", "llama.cpp f16 against llama_mm bf16 (same bytes)"),
    ("q8_0_pure", "int8 + lm_head", "like for like: every matrix 8-bit (Q8_0: 32-wide blocks, f16 scales; "
                                    "llama_mm: group 128, bf16 scales)"),
    ("q8_0", "int8 + lm_head", "llama-quantize's default Q8_0 file (see tensor_types) against int8 + lm_head"),
    ("q8_0", "int8", "llama.cpp's default Q8_0 file against llama_mm's default int8 (lm_head bf16)"),
    ("q4_0_pure", "int4 + lm_head", "like for like: every matrix 4-bit (Q4_0: 32-wide blocks, f16 scales; "
                                    "llama_mm: group 128, bf16 scales)"),
    ("q4_0", "int4 + lm_head", "llama-quantize's default Q4_0 file (output in Q6_K, see tensor_types) against "
                               "int4 + lm_head"),
    ("q4_0", "int4", "llama.cpp's default Q4_0 file against llama_mm's default int4 (lm_head bf16)"),
    ("q8_0_pure", "int8 + lm_head, int8 activations", "same arithmetic: both quantize activations to int8 per 32 "
                                                      "values and multiply in integers"),
    ("q8_0", "int8 + lm_head, int8 activations", "llama-quantize's default Q8_0 file, llama_mm int8 activations"),
    ("q4_0_pure", "int4 + lm_head, int8 activations", "same arithmetic: both quantize activations to int8 per 32 "
                                                      "values and multiply in integers"),
    ("q4_0", "int4 + lm_head, int8 activations", "llama-quantize's default Q4_0 file, llama_mm int8 activations"),
]


def cpu_flags() -> dict:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {f: f in flags for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni",
                                    "amx_tile")}


def llama_bench(llama: LlamaCpp, gguf: Path, threads: int, n_gen: int, reps: int) -> dict:
    """One llama-bench token-generation run: its JSON record (avg_ts, samples_ts, build_commit, ...)."""
    command = [str(llama.tool("llama-bench")), "-m", str(gguf), "-p", "0", "-n", str(n_gen), "-t", str(threads),
               "-r", str(reps), "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    (record,) = json.loads(done.stdout)
    return record


def text_only_bytes(model) -> int:
    """Weight bytes one text-only decode step reads in llama_mm: the self-attention layers' tensors (quantized:
    packed weight, scales, zero points), the final norm, lm_head and one embedding row; cross layers are skipped."""
    from llama_mm.engine import engine_weights

    t = model.cfg.text
    cross = tuple(f"language_model.model.layers.{i}." for i in t.cross_attention_layers)
    total = 0
    for name, w in engine_weights(model).items():
        if name.startswith(cross) or name.endswith(".weight_shape"):
            continue
        total += w.shape[1] * w.element_size() if "embed_tokens" in name else w.numel() * w.element_size()
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="llama-bench -t and torch.set_num_threads")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode steps timed (llama-bench -n)")
    ap.add_argument("--reps", type=int, default=5, help="llama-bench -r")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds after the warm-up round")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="llama.cpp source and build (build.py)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="checkpoint and GGUF files, kept and reused by later runs (delete it to remake them); "
                         "default: a temp dir under --cache, removed at the end")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/llama_cpp_compare.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llama = build(args.cache)

    from checkpoints import build_reference, write_checkpoint
    import llama_mm
    from llama_mm.engine import Engine

    load_before = os.getloadavg()
    results = {
        **run_header(__file__, flags=cpu_flags(), threads=args.threads),
        "llama_cpp": {"source": f"llama-cpp-python {llama.package_version} sdist (PyPI), vendor/llama.cpp",
                      "commit": llama.commit, "build": "cmake Release, CPU only, GGML_NATIVE=ON, LLAMA_CURL=OFF"},
        "model": {"text": TEXT, "run": "text only: the self-attention layers "
                  f"({TEXT['num_hidden_layers'] - len(TEXT['cross_attention_layers'])}) + embeddings + lm_head",
                  "batch": 1, "decode_steps_timed": args.new_tokens, "llama_mm_prompt_tokens": 1,
                  "llama_mm_group_size": args.group_size},
        "timing": {"rounds": args.rounds, "llama_bench_reps": args.reps,
                   "llama_cpp": "best over rounds of llama-bench's per-repetition tok/s (samples_ts); "
                                "avg_ts of the best round also given",
                   "llama_mm": "best over rounds of (t(N+1) - t(1)) / N, t(k) the time token k comes out"},
        "read_bandwidth": read_bandwidth(),
    }
    bandwidth = results["read_bandwidth"]["best_GBps"]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="compare-", dir=args.cache))
    checkpoint = workdir / "checkpoint"
    if not (checkpoint / "config.json").exists():
        ref = build_reference(TEXT, VISION, seed=0)
        write_checkpoint(checkpoint, ref, dtype=torch.bfloat16)
        del ref
    files = make_all(checkpoint, workdir / "gguf", llama)
    models, unavailable = {}, {}
    for name, kw in LLAMA_MM_VARIANTS.items():
        try:  # the quantized runtime may be missing from a branch: its rows say so instead of stopping the run
            models[name] = llama_mm.load_model(checkpoint, dtype=torch.bfloat16, group_size=args.group_size, **kw)
        except (TypeError, ValueError, RuntimeError, ImportError) as e:
            unavailable[name] = f"not available in this branch: {type(e).__name__}: {e}"
            print(f"llama_mm {name}: {unavailable[name]}", flush=True)
    engines = {name: Engine(m) for name, m in models.items()}
    prompt = {"input_ids": torch.tensor([[TEXT["bos_token_id"]]])}

    cpp_best: dict[str, dict] = {}
    mm_best = {name: float("inf") for name in engines}
    round_loads = []
    for r in range(args.rounds + 1):  # round 0 warms up
        for stem, gguf in files.items():
            record = llama_bench(llama, gguf, args.threads, args.new_tokens, args.reps)
            if r and max(record["samples_ts"]) > max(cpp_best.get(stem, {"samples_ts": [0]})["samples_ts"]):
                cpp_best[stem] = record
        for name, engine in engines.items():
            clock = Clock()
            engine.run(prompt, args.new_tokens + 1, on_tokens=clock.tick)
            if r:
                mm_best[name] = min(mm_best[name], clock.result()[1])
        round_loads.append(round(os.getloadavg()[0], 2))
        print(f"round {r} done, load {round_loads[-1]}", flush=True)

    any_record = next(iter(cpp_best.values()))
    results["llama_cpp"].update(build_commit=any_record["build_commit"], build_number=any_record["build_number"],
                                cpu_info=any_record["cpu_info"], backends=any_record["backends"])
    results["llama_cpp_runs"] = {}
    for stem, record in cpp_best.items():
        summary = tensor_summary(files[stem], llama)
        best_ts = max(record["samples_ts"])
        results["llama_cpp_runs"][stem] = {
            "file": files[stem].name, **summary,
            "command": f"llama-bench -m {files[stem].name} -p 0 -n {args.new_tokens} -t {args.threads} "
                       f"-r {args.reps}",
            "tok_per_s_best": round(best_ts, 2), "tok_per_s_avg": round(record["avg_ts"], 2),
            "ms_per_token": round(1e3 / best_ts, 3),
            "fraction_of_read_bandwidth": round(summary["weight_bytes_read_per_token"] * best_ts / 1e9 / bandwidth,
                                                3),
            "llama_bench": {k: record[k] for k in ("model_type", "model_size", "model_n_params", "n_threads",
                                                   "repack", "load_mode", "type_k", "type_v", "flash_attn",
                                                   "samples_ts")},
        }
    results["llama_mm_runs"] = {}
    for name, model in models.items():
        nbytes = text_only_bytes(model)
        results["llama_mm_runs"][name] = {
            "load_model": {"dtype": "bfloat16", "group_size": args.group_size, **LLAMA_MM_VARIANTS[name]},
            "ms_per_token": round(mm_best[name] * 1e3, 3), "tok_per_s": round(1 / mm_best[name], 2),
            "weight_bytes_read_per_token": nbytes,
            "fraction_of_read_bandwidth": round(nbytes / mm_best[name] / 1e9 / bandwidth, 3),
        }
    results["llama_mm_runs"].update(unavailable)
    results["comparisons"] = []
    for stem, name, note in COMPARISONS:
        if name in unavailable:
            results["comparisons"].append({"llama_cpp": stem, "llama_mm": name, "note": unavailable[name]})
            continue
        cpp_ms = results["llama_cpp_runs"][stem]["ms_per_token"]
        mm_ms = results["llama_mm_runs"][name]["ms_per_token"]
        results["comparisons"].append({
            "llama_cpp": stem, "llama_mm": name, "note": note,
            "llama_cpp_tok_per_s": results["llama_cpp_runs"][stem]["tok_per_s_best"],
            "llama_cpp_ms_per_token": cpp_ms, "llama_mm_ms_per_token": mm_ms,
            "llama_mm_speed_over_llama_cpp": round(cpp_ms / mm_ms, 3),
            "llama_cpp_model_bytes": results["llama_cpp_runs"][stem]["file_bytes"],
            "llama_mm_bytes_read_per_token": results["llama_mm_runs"][name]["weight_bytes_read_per_token"],
        })
    results["machine"]["load_average_1m"] = {"before": round(load_before[0], 2), "after_each_round": round_loads}
    results["read_bandwidth_after"] = read_bandwidth()
    if args.workdir is None:
        shutil.rmtree(workdir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for c in results["comparisons"]:
        if "llama_mm_ms_per_token" not in c:
            continue
        print(f"{c['llama_cpp']:>10} {c['llama_cpp_ms_per_token']:8.2f} ms | llama_mm {c['llama_mm']:>15} "
              f"{c['llama_mm_ms_per_token']:8.2f} ms | llama_mm speed x{c['llama_mm_speed_over_llama_cpp']}")
    print(f"read bandwidth {bandwidth} GB/s; wrote {args.out}")


if __name__ == "__main__":
    main()
