#!/usr/bin/env bash
# End-to-end check of the CPU Docker image (`make docker-check`): builds it with docker/build.sh
# (local base images when the public ones cannot be pulled: see that script), runs its default
# command with models/cache/ and models/adapters/ mounted as the README shows, waits for /ready,
# and sends one merged-set completion. The container is always removed.
#
# Environment: DOCKER_IMAGE (tag, default knots), DOCKER_CHECK_PORT (loopback port, default a
# free one), DOCKER_CHECK_READY_TIMEOUT (seconds, default 300), DOCKER_CHECK_SKIP_BUILD=1 (check
# an image already built), and docker/build.sh's variables.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${DOCKER_IMAGE:-knots}"
TIMEOUT="${DOCKER_CHECK_READY_TIMEOUT:-300}"
MODEL="sentiment-lm+news-lm@knots-ties"
START=$(date +%s)

fail() { echo "docker check FAILED: $*" >&2; exit 1; }

docker info >/dev/null 2>&1 || fail "no Docker daemon answers (docker info failed)"
[ -f models/cache/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf ] \
    && [ -f models/cache/all-minilm-l6-v2/model.safetensors ] \
    || fail "models/cache/ is incomplete: run \`make models\` first"

if [ "${DOCKER_CHECK_SKIP_BUILD:-0}" != 1 ]; then
    docker/build.sh -t "$IMAGE"
fi

# Bind mounts need real paths (models/cache may be a symlink).
CACHE="$(cd models/cache && pwd -P)"
ADAPTERS="$(cd models/adapters && pwd -P)"
PORT="${DOCKER_CHECK_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
NAME="knots-docker-check-$$"
WORK="$(mktemp -d)"
cleanup() {
    docker rm -f "$NAME" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

logs() {
    echo "--- container logs ($NAME) ---" >&2
    docker logs --tail 100 "$NAME" >&2 2>&1 || true
    echo "--- end of container logs ---" >&2
}

# The image's default command, with the README's volume layout.
docker run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" \
    -v "$CACHE:/models/cache:ro" -v "$ADAPTERS:/adapters:ro" "$IMAGE" >/dev/null
RUN_START=$(date +%s)
echo "started $IMAGE as $NAME on 127.0.0.1:$PORT; waiting for /ready (up to ${TIMEOUT}s)"

deadline=$((RUN_START + TIMEOUT))
until curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1; do
    if [ "$(docker inspect -f '{{.State.Running}}' "$NAME" 2>/dev/null)" != true ]; then
        logs
        fail "the container exited during start-up (exit code $(docker inspect -f '{{.State.ExitCode}}' "$NAME" 2>/dev/null || echo '?'))"
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        logs
        fail "not ready after ${TIMEOUT}s"
    fi
    sleep 2
done
echo "ready $(($(date +%s) - RUN_START))s after the container started"

code=$(curl -sS -o "$WORK/body.json" -w '%{http_code}' --max-time 120 \
    "http://127.0.0.1:$PORT/v1/completions" -H 'content-type: application/json' \
    -d "{\"model\": \"$MODEL\", \"prompt\": \"The capital of France is\", \"max_tokens\": 8, \"temperature\": 0}") \
    || { logs; fail "the completion request failed"; }
if [ "$code" != 200 ]; then
    cat "$WORK/body.json" >&2 || true
    echo >&2
    logs
    fail "POST /v1/completions ($MODEL) answered $code"
fi
python3 - "$WORK/body.json" <<'EOF' || { logs; fail "the completion has no choices"; }
import json, sys
body = json.load(open(sys.argv[1]))
choices = body.get("choices") or []
assert choices and isinstance(choices[0].get("text"), str), body
print(f"completion from {body.get('model')}: {choices[0]['text']!r}")
EOF
echo "docker check passed in $(($(date +%s) - START))s"
