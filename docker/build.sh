#!/usr/bin/env bash
# Builds the knots image from a minimal build context (Cargo.toml, Cargo.lock, src/, docker/,
# models/manifest.toml), so target/, models/cache/ and data/ are never sent to the daemon.
#
#   docker/build.sh [--cuda] [-t TAG] [extra `docker build` arguments...]
#
# CPU image (docker/Dockerfile, tag `knots` by default). Base images, in this order:
#   - DOCKER_RUST_IMAGE / DOCKER_RUNTIME_IMAGE when set (passed as RUST_IMAGE / RUNTIME_IMAGE);
#   - the Dockerfile's public defaults when they are present or can be pulled;
#   - otherwise the local stand-ins of docker/make_local_bases.sh, built first if missing
#     (needs root and debootstrap). DOCKER_LOCAL_BASES=never makes that an error instead.
# CUDA image (--cuda: docker/Dockerfile.cuda, tag `knots:cuda`): the same base images (its CUDA
# toolkit comes from pip wheels, docker/cuda-toolkit.sh); CUDA_COMPUTE_CAP is passed on when set.
#
# CA bundle: cargo in the build trusts DOCKER_BUILD_CA, else CARGO_HTTP_CAINFO, else
# SSL_CERT_FILE, else /etc/ssl/certs/ca-certificates.crt (this machine's bundle, so a
# TLS-inspecting proxy's CA works in the build too); DOCKER_BUILD_CA=none passes none. It goes
# into the build context as docker/build-ca.crt and only the build stage copies it.
# DOCKER_BUILD_NETWORK (e.g. host) is passed as --network.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "docker/build.sh: $*" >&2; exit 1; }

DOCKERFILE=docker/Dockerfile
TAG=knots
CUDA=0
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --cuda) CUDA=1; DOCKERFILE=docker/Dockerfile.cuda; TAG=knots:cuda ;;
        -t|--tag) [ $# -ge 2 ] || die "$1 needs a tag"; TAG="$2"; shift ;;
        *) EXTRA+=("$1") ;;
    esac
    shift
done

docker info >/dev/null 2>&1 || die "no Docker daemon answers (docker info failed)"

# The default of `ARG NAME=...` in the Dockerfile.
arg_default() { sed -n "s/^ARG $1=//p" "$DOCKERFILE" | head -n 1; }

# Present locally, or pulled now.
available() { docker image inspect "$1" >/dev/null 2>&1 || docker pull -q "$1" >/dev/null 2>&1; }

ARGS=()
if [ "$CUDA" = 1 ] && [ -n "${CUDA_COMPUTE_CAP:-}" ]; then
    ARGS+=(--build-arg "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP")
fi
rust_image="${DOCKER_RUST_IMAGE:-}"
runtime_image="${DOCKER_RUNTIME_IMAGE:-}"
if [ -z "$rust_image" ] || [ -z "$runtime_image" ]; then
    public_rust="$(arg_default RUST_IMAGE)"
    public_runtime="$(arg_default RUNTIME_IMAGE)"
    if available "${rust_image:-$public_rust}" && available "${runtime_image:-$public_runtime}"; then
        rust_image="${rust_image:-$public_rust}"
        runtime_image="${runtime_image:-$public_runtime}"
    else
        [ "${DOCKER_LOCAL_BASES:-auto}" != never ] \
            || die "cannot pull $public_rust / $public_runtime (DOCKER_LOCAL_BASES=never)"
        echo "cannot pull $public_rust / $public_runtime: using local base images"
        export LOCAL_RUST_IMAGE="${LOCAL_RUST_IMAGE:-knots-local/rust:bookworm}"
        export LOCAL_RUNTIME_IMAGE="${LOCAL_RUNTIME_IMAGE:-knots-local/debian:bookworm-slim}"
        docker/make_local_bases.sh
        rust_image="${rust_image:-$LOCAL_RUST_IMAGE}"
        runtime_image="${runtime_image:-$LOCAL_RUNTIME_IMAGE}"
    fi
fi
ARGS+=(--build-arg "RUST_IMAGE=$rust_image" --build-arg "RUNTIME_IMAGE=$runtime_image")
echo "base images: $rust_image (build), $runtime_image (runtime)"

CA="${DOCKER_BUILD_CA:-${CARGO_HTTP_CAINFO:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}"
[ -n "${DOCKER_BUILD_NETWORK:-}" ] && ARGS+=(--network "$DOCKER_BUILD_NETWORK")

CONTEXT="$(mktemp -d "${TMPDIR:-/tmp}/knots-docker-context.XXXXXX")"
trap 'rm -rf "$CONTEXT"' EXIT
mkdir -p "$CONTEXT/models"
cp -a Cargo.toml Cargo.lock src docker "$CONTEXT/"
cp -a models/manifest.toml "$CONTEXT/models/"
rm -f "$CONTEXT/docker/build-ca.crt"
if [ "$CA" != none ] && [ -f "$CA" ]; then
    cp "$CA" "$CONTEXT/docker/build-ca.crt"
    echo "CA bundle for cargo: $CA"
elif [ "$CA" != none ]; then
    echo "no CA bundle at $CA: cargo uses the build image's own"
fi

echo "docker build -f $DOCKERFILE -t $TAG ${ARGS[*]} ${EXTRA[*]}"
docker build -f "$DOCKERFILE" -t "$TAG" "${ARGS[@]}" "${EXTRA[@]}" "$CONTEXT"
