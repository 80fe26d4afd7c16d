#!/usr/bin/env bash
# Set up, start `parallax up` (embedded NATS + 2 stages + gateway on :8000), send a sample request,
# then keep serving until Ctrl-C, which stops every process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PORT="${PORT:-8000}"
parallax up --model smollm2-135m --stages 2 --port "$PORT" "$@" &
UP=$!
trap 'kill -INT $UP 2>/dev/null; wait $UP' INT TERM
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
  kill -0 $UP 2>/dev/null || { echo "parallax up exited" >&2; exit 1; }
  sleep 1
done
curl -sN "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' -d '{
  "model": "smollm2-135m", "stream": true, "max_tokens": 48, "temperature": 0,
  "messages": [{"role": "user", "content": "What is the capital of France?"}]}'
echo
echo "serving on http://127.0.0.1:$PORT/v1 - Ctrl-C to stop"
wait $UP
