#!/usr/bin/env bash
# Builds llama-cpp-python (the llama.cpp side of bench/side_by_side.py) in the benchmark's own venv.
# Never a test dependency. Usage: bench/llamacpp.sh [VENV_DIR]   (default ~/.cache/parallax/bench/llamacpp-venv)
# The venv sees this machine's packages (--system-site-packages), so `VENV/bin/python -m bench.side_by_side`
# runs everything. About 7 min on 2 cores; CMAKE_BUILD_PARALLEL_LEVEL sets the build jobs (default: nproc).
set -euo pipefail
VERSION=0.3.36
VENV="${1:-${PARALLAX_CACHE:-$HOME/.cache/parallax}/bench/llamacpp-venv}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    echo "llama-cpp-python $VERSION already in $VENV"
    exit 0
fi
python3 -m venv --system-site-packages "$VENV"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# GGML_NATIVE: tuned for this CPU (AVX2 / AVX-512 as it has), as llama.cpp users build it.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}"
start=$(date +%s)
"$VENV/bin/pip" install --no-cache-dir "llama-cpp-python==$VERSION"
echo "built llama-cpp-python $VERSION in $VENV in $(( $(date +%s) - start )) s"
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
