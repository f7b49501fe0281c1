#!/usr/bin/env bash
# Install llama_mm (CPU torch, the native module compiled against it) and run the built-in demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" scikit-build-core pybind11
python -m pip install -q --no-build-isolation .
llama-mm demo
