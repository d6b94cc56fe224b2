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

"$KNOTS" serve --model smollm2-135m-instruct,all-minilm-l6-v2 --adapters "$WORK/adapters" --port "$PORT" \
    --state-db "$WORK/state.db" \
    --default-max-tokens 32 >"$WORK/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$WORK/server.log"; echo "server exited during start-up"; exit 1; }
    sleep 1
done
curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null

# The README's quick-start requests. `grep` reads all of curl's output (no `-q`): exiting at the
# first match would fail curl's write of the rest, and with it the pipeline.
curl -fsS "http://127.0.0.1:$PORT/v1/models" | grep '"shout"' >/dev/null
curl -fsS "http://127.0.0.1:$PORT/v1/completions" -H 'content-type: application/json' \
    -d '{"model": "shout+shout-half", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}' \
    | grep '"text_completion"' >/dev/null
curl -fsS -D - "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' \
    -d '{"model": "shout", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8, "temperature": 0}' \
    | grep -i '^x-knots-merge: adapter=shout' >/dev/null

python3 -c 'import openai' 2>/dev/null || python3 -m pip install --quiet openai
python3 tests/openai_client.py "http://127.0.0.1:$PORT/v1"

# The metrics contract: promtool's lint is clean, and a Prometheus text-format parser reads
# exactly one knots_lora_requests_info series whose value is the scrape time.
command -v promtool >/dev/null || apt-get install -y -qq --no-install-recommends prometheus >/dev/null
python3 -c 'import prometheus_client' 2>/dev/null || python3 -m pip install --quiet prometheus-client
curl -fsS "http://127.0.0.1:$PORT/metrics" >"$WORK/metrics.txt"
promtool check metrics <"$WORK/metrics.txt"
python3 - "$WORK/metrics.txt" <<'PY'
import sys, time
from prometheus_client.parser import text_string_to_metric_families
families = {f.name: f for f in text_string_to_metric_families(open(sys.argv[1]).read())}
info = families["knots_lora_requests_info"]
assert len(info.samples) == 1, info.samples
sample = info.samples[0]
assert abs(sample.value - time.time()) < 60, sample
assert set(sample.labels) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}, sample
for name in ("knots_engine_waiting_requests", "knots_engine_running_requests", "knots_engine_kv_cache_usage_ratio"):
    assert name in families, name
print("metrics: promtool clean,", len(families), "families parsed")
PY

kill -TERM "$SERVER"
wait "$SERVER"
echo "serve check passed"
