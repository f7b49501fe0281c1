#!/usr/bin/env bash
# The GPU check, in one call on a bare GPU machine (one H200 here) from a copy of the working tree:
#   1. build the extension against that machine's own torch, sm_90 only, all cores      (time box: BUILD_S, 200 s)
#   2. the CUDA tests: every cuda/*.cu and the engine compile with nvcc; tests/test_cuda.py; the CUDA tests of the
#      quantized linear, paged attention and scheduler code (nothing may be skipped)     (time box: TEST_S, 120 s)
#   3. bench/bench_cuda.py: exact 11B shapes, random bf16 weights, llama_mm vs transformers (time box: BENCH_S, 150 s)
# and prints a short table last. Logs and JSON go into the directory given as the argument (e.g. $OUT).
#
#   bash tools/gpu_check.sh "$OUT"
#
# Each stage runs under `timeout`, so the whole run ends within ~8 minutes even when a stage hangs; a stage that
# fails does not stop the later ones (the table says what happened to each).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:?usage: tools/gpu_check.sh OUT_DIR}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
declare -A STATUS SECONDS_TAKEN

stage() {  # stage NAME LIMIT_S COMMAND...: run under a time box, log to OUT_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  SECONDS_TAKEN[$name]=$((SECONDS - start))
  case $rc in
    0) STATUS[$name]=ok ;;
    124|137) STATUS[$name]="TIMED OUT" ;;
    *) STATUS[$name]="failed (rc $rc)" ;;
  esac
  tail -n 15 "$OUT_DIR/$name.log"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PYTHON" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0))"
  nvcc --version | tail -n 2
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

stage build "${BUILD_S:-200}" env PYTHON="$PYTHON" JOBS="$(nproc)" BUILD_DIR=build/gpu \
  bash tools/dev_build.sh -DCMAKE_CUDA_ARCHITECTURES=90
"$PYTHON" -c "from llama_mm import ops; assert ops.CUDA_KERNELS, ops.NATIVE_ERROR or 'built without CUDA'" \
  >> "$OUT_DIR/build.log" 2>&1 || STATUS[build]="${STATUS[build]}, no CUDA kernels"

# CUDA tests: test_cuda.py whole, and the tests with "cuda" in their name elsewhere. -rs lists skips; a skip is a
# failure here (the point of the run is that nothing is skipped).
CUDA_TESTS=(tests/test_cuda_compile.py tests/test_cuda.py)
OTHER_TESTS=$(ls tests/test_qlinear.py tests/test_paged_attention.py tests/test_scheduler.py 2>/dev/null)
stage tests "${TEST_S:-120}" "$PYTHON" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT_DIR/tests.xml" \
  "${CUDA_TESTS[@]}" ${OTHER_TESTS:+$OTHER_TESTS -k "cuda or CUDA or test_cuda"}
if grep -q 'skipped="[1-9]' "$OUT_DIR/tests.xml" 2>/dev/null; then STATUS[tests]="${STATUS[tests]}, SKIPS"; fi

stage bench "${BENCH_S:-150}" "$PYTHON" bench/bench_cuda.py --new-tokens 32 --repeats 2 --batches 8 32 --no-eager \
  --out "$OUT_DIR/decode_cuda.json"

echo
echo "=== summary"
printf '%-8s %-28s %s\n' stage status seconds
for s in build tests bench; do printf '%-8s %-28s %s\n' "$s" "${STATUS[$s]:-not run}" "${SECONDS_TAKEN[$s]:-}"; done
grep -Eo '[0-9]+ (passed|failed|skipped|error)[^,]*' "$OUT_DIR/tests.log" | tr '\n' ' '; echo
if [ -f "$OUT_DIR/decode_cuda.json" ]; then
  "$PYTHON" - "$OUT_DIR/decode_cuda.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
b = r.get("batch1", {})
print(f"copy bandwidth {r.get('copy_bandwidth_GBps')} GB/s")
for k, v in b.items():
    if "error" in v:
        print(f"{k:34s} error: {v['error'][:80]}")
    else:
        print(f"{k:34s} decode {v.get('decode_ms_per_token')} ms/token  ttft {v.get('ttft_s')} s  "
              f"{v.get('effective_bandwidth_GBps')} GB/s  peak {v.get('peak_memory_GiB')} GiB")
print("summary", json.dumps(r.get("summary", {})))
for row in r.get("throughput", []):
    print("batch", row["batch"], {k: v.get("decode_tokens_per_s", v.get("error")) for k, v in row.items() if k != "batch"})
PY
fi
