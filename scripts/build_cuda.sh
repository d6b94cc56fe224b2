#!/usr/bin/env bash
# `make cuda`: builds knots with candle's CUDA backend (--features cuda) on a machine without a
# GPU or a system CUDA toolkit, and packs the stripped binary as target/cuda/knots.xz for a GPU
# machine (`scripts/gpu_check.sh` unpacks and checks it there).
#
# The toolkit comes from NVIDIA's pip wheels, pinned to CUDA 13.0 (a newer nvcc can emit PTX that
# an older driver rejects): they are downloaded with pip (--no-deps) into KNOTS_CUDA_DIR, outside
# the repository, and laid out as a CUDA tree (bin, include, nvvm, lib with unversioned .so
# links). No wheel ships the driver library libcuda.so: the link gets a stub with the same soname
# (libcuda.so.1) exporting the driver API's names, and the GPU machine's driver is loaded at run
# time. The kernels are compiled for CUDA_COMPUTE_CAP (default 90, Hopper), in their own target
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

# The pins: CUDA 13.0 throughout (driver >= 580).
WHEELS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-nvrtc==13.0.88
    nvidia-curand==10.4.0.35
    nvidia-cublas==13.0.2.14
)

start=$(date +%s)
mkdir -p "$CUDA_DIR/wheels" "$OUT_DIR"

# 1. The wheels (a no-op when all are there).
missing=()
for w in "${WHEELS[@]}"; do
    name="${w%%==*}"
    version="${w##*==}"
    file_prefix="$(echo "$name" | tr - _)-$version-"
    compgen -G "$CUDA_DIR/wheels/${file_prefix}*.whl" >/dev/null || missing+=("$w")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "build_cuda: downloading ${missing[*]}"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
        --dest "$CUDA_DIR/wheels" "${missing[@]}"
fi

# 2. The CUDA tree. unzip keeps the executables' modes (nvcc, ptxas, cicc).
ROOT="$CUDA_DIR/root"
stamp="$ROOT/.knots-wheels"
want="$(printf '%s\n' "${WHEELS[@]}")"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    rm -rf "$CUDA_DIR/unpacked" "$ROOT"
    mkdir -p "$CUDA_DIR/unpacked"
    for f in "$CUDA_DIR"/wheels/*.whl; do
        unzip -q -o "$f" 'nvidia/*' -d "$CUDA_DIR/unpacked"
    done
    mv "$CUDA_DIR/unpacked/nvidia/cu13" "$ROOT"
    rm -rf "$CUDA_DIR/unpacked"
    chmod +x "$ROOT"/bin/* "$ROOT"/nvvm/bin/* 2>/dev/null || true
    # Unversioned names for the linker (the wheels ship only libX.so.N).
    for lib in "$ROOT"/lib/lib*.so.*; do
        base="${lib##*/}"
        stem="${base%%.so.*}"
        [ -e "$ROOT/lib/$stem.so" ] || ln -s "$base" "$ROOT/lib/$stem.so"
    done
    ln -sfn lib "$ROOT/lib64"
    # The driver stub: every cu* name cuda.h declares or maps (cuFoo and its cuFoo_v2 aliases),
    # as functions that do nothing, under the real library's soname. Only the link sees it.
    mkdir -p "$ROOT/lib/stubs"
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$ROOT/include/cuda.h" | sort -u \
        | awk '{ print "void " $1 "(void) {}" }' >"$ROOT/lib/stubs/cuda_stub.c"
    cc -shared -fPIC -O0 -w -Wl,-soname,libcuda.so.1 -o "$ROOT/lib/stubs/libcuda.so" \
        "$ROOT/lib/stubs/cuda_stub.c"
    echo "$want" >"$stamp"
fi

export CUDA_ROOT="$ROOT" CUDA_HOME="$ROOT" CUDA_PATH="$ROOT"
export PATH="$ROOT/bin:$PATH"
export LIBRARY_PATH="$ROOT/lib:$ROOT/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$ROOT/lib -L native=$ROOT/lib/stubs"
nvcc --version | tail -2

# 3. The build.
CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --locked --features cuda --bin knots
BIN="$TARGET_DIR/release/knots"

# 4. Strip and pack: the binary carries its PTX and kernels; xz -9 shrinks it about sevenfold.
cp "$BIN" "$OUT_DIR/knots"
strip "$OUT_DIR/knots"
echo "build_cuda: needs (ldd on the GPU machine must resolve these):"
readelf -d "$OUT_DIR/knots" | awk '/NEEDED/ { print "  " $5 }' | tr -d '[]'
xz -9 -T1 -f -k "$OUT_DIR/knots"
ls -l "$OUT_DIR/knots" "$OUT_DIR/knots.xz" | awk '{ printf "  %s %.1f MiB\n", $9, $5 / 1048576 }'
echo "build_cuda: done in $(($(date +%s) - start)) s (compute capability $CUDA_COMPUTE_CAP)"
