#!/usr/bin/env bash
# `make cuda`: builds knots with candle's CUDA backend (--features cuda) on a machine without a
# GPU or a system CUDA toolkit, and packs the stripped binary as target/cuda/knots.xz for a GPU
# machine (`scripts/gpu_check.sh` unpacks and checks it there).
#
# The toolkit comes from NVIDIA's pip wheels, pinned to CUDA 13.0 (docker/cuda-toolkit.sh, which
# docker/Dockerfile.cuda runs too), laid out in KNOTS_CUDA_DIR outside the repository, with a
# link-time stand-in for the driver library; the GPU machine's driver is loaded at run time. The kernels are compiled for CUDA_COMPUTE_CAP (default 90, Hopper), in their own target
# directory (KNOTS_CUDA_TARGET_DIR) so CPU builds keep theirs.
#
# Environment: KNOTS_CUDA_DIR (default ~/.cache/knots/cuda-13.0), KNOTS_CUDA_TARGET_DIR (default
# ~/.cache/knots/cuda-target), CUDA_COMPUTE_CAP (90), CARGO_BUILD_JOBS, PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

CUDA_DIR="${KNOTS_CUDA_DIR:-$HOME/.cache/knots/cuda-13.0}"
TARGET_DIR="${KNOTS_CUDA_TARGET_DIR:-$HOME/.cache/knots/cuda-target}"
PYTHON="${PYTHON:-python3}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
OUT_DIR="$REPO/target/cuda"

start=$(date +%s)
mkdir -p "$OUT_DIR"
docker/cuda-toolkit.sh "$CUDA_DIR"
ROOT="$CUDA_DIR/root"

export CUDA_ROOT="$ROOT" CUDA_HOME="$ROOT" CUDA_PATH="$ROOT"
export PATH="$ROOT/bin:$PATH"
export LIBRARY_PATH="$ROOT/lib:$ROOT/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$ROOT/lib -L native=$ROOT/lib/stubs"
nvcc --version | tail -2

# The build.
CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --locked --features cuda --bin knots
BIN="$TARGET_DIR/release/knots"

# Strip and pack: the binary carries its PTX and kernels; xz -9 shrinks it about sevenfold.
cp "$BIN" "$OUT_DIR/knots"
strip "$OUT_DIR/knots"
echo "build_cuda: needs (ldd on the GPU machine must resolve these):"
readelf -d "$OUT_DIR/knots" | awk '/NEEDED/ { print "  " $5 }' | tr -d '[]'
xz -9 -T1 -f -k "$OUT_DIR/knots"
ls -l "$OUT_DIR/knots" "$OUT_DIR/knots.xz" | awk '{ printf "  %s %.1f MiB\n", $9, $5 / 1048576 }'
echo "build_cuda: done in $(($(date +%s) - start)) s (compute capability $CUDA_COMPUTE_CAP)"
