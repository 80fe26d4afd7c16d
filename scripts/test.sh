#!/usr/bin/env bash
# Set up, then run the whole test suite (slow end-to-end tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One worker per core (at most 4), each taking whole test files (module fixtures are set up once): the suite
# waits on processes and servers much of the time. 2 cores: 860 s in one process, 576 s in two. `-n 0`: one process.
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 --dist loadfile "$@"
