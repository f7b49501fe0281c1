#!/usr/bin/env bash
# Dev build of the native module: puts python/llama_mm/_C.<abi>.so next to the sources, so that
# `PYTHONPATH=python python -c "import llama_mm._C"` works. Builds against the torch of the `python` on PATH.
# Extra arguments go to the configure step, e.g. tools/dev_build.sh -DLLAMA_MM_BUILD_BENCH=ON
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python)" "$@"
cmake --build build/dev -j2
