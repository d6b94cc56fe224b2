#!/usr/bin/env bash
# End-to-end check of `knots serve` on the default generation model: the README's curl examples,
# the official `openai` Python client, and a clean exit on SIGTERM. Run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${KNOTS_CHECK_PORT:-8123}"
WORK="$(mktemp -d)"
SERVER=""
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT

cargo build --quiet --bin knots
KNOTS="${CARGO_TARGET_DIR:-target}/debug/knots"

# Two SmolLM2 adapters: `shout` (trained with PEFT) and `shout-half`, a PEFT adapter that
# `knots merge` writes (task arithmetic with lambda 0.5), so requests can merge a real set.
mkdir -p "$WORK/adapters"
cp -r tests/fixtures/model-reference/smollm2/adapters/shout "$WORK/adapters/shout"
"$KNOTS" merge --method ta --lambda 0.5 --out "$WORK/adapters/shout-half" "$WORK/adapters/shout" >/dev/null

"$KNOTS" serve --model smollm2-135m-instruct --adapters "$WORK/adapters" --port "$PORT" \
    --state-db "$WORK/state.db" \
    --default-max-tokens 32 >"$WORK/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$WORK/server.log"; echo "server exited during start-up"; exit 1; }
    sleep 1
done
curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null

# The README's quick-start requests.
curl -fsS "http://127.0.0.1:$PORT/v1/models" | grep -q '"shout"'
curl -fsS "http://127.0.0.1:$PORT/v1/completions" -H 'content-type: application/json' \
    -d '{"model": "shout+shout-half", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}' \
    | grep -q '"text_completion"'
curl -fsS -D - "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' \
    -d '{"model": "shout", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8, "temperature": 0}' \
    | grep -qi '^x-knots-merge: adapter=shout'

python3 -c 'import openai' 2>/dev/null || python3 -m pip install --quiet openai
python3 tests/openai_client.py "http://127.0.0.1:$PORT/v1"

kill -TERM "$SERVER"
wait "$SERVER"
echo "serve check passed"
