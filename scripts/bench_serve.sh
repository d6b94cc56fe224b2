#!/usr/bin/env bash
# `make bench-serve`: starts a release `knots serve` on the default models and the committed
# adapters, runs scripts/bench_serve.py against it (anchors last, with the server idle), stops it.
# Extra arguments go to bench_serve.py. Run on an idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${KNOTS_BENCH_PORT:-8123}"
LOG="$(mktemp)"
target/release/knots serve --model smollm2-135m-instruct,all-minilm-l6-v2 \
    --adapters models/adapters --port "$PORT" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 1 120); do
    curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$LOG"; echo "server exited during start-up"; exit 1; }
    sleep 1
done
python3 scripts/bench_serve.py --url "http://127.0.0.1:$PORT" "$@"
