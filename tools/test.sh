#!/usr/bin/env bash
# Install llama_mm with its test dependencies (CPU torch, the native module compiled against it) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# The chat-page test drives Debian's Chromium through Playwright (never `playwright install`: no browser downloads).
if [ ! -x /usr/bin/chromium ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
fi
python -m pip install -q "torch==2.13.0" scikit-build-core pybind11
python -m pip install -q --no-build-isolation ".[test]" "torch==2.13.0"
python -m pytest -q tests
