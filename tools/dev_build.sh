#!/usr/bin/env bash
# Dev build of the native module: puts python/llama_mm/_C.<abi>.so next to the sources, so that
# `PYTHONPATH=python python -c "import llama_mm._C"` works. Builds against the torch of $PYTHON (default: the
# `python` on PATH, else python3) with $JOBS parallel jobs (default 2) in $BUILD_DIR (default build/dev).
# Extra arguments go to the configure step, e.g. tools/dev_build.sh -DLLAMA_MM_BUILD_BENCH=ON
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
cmake -S . -B "${BUILD_DIR:-build/dev}" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$PYTHON" "$@"
cmake --build "${BUILD_DIR:-build/dev}" -j"${JOBS:-2}"
