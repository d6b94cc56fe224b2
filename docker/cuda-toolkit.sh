#!/usr/bin/env bash
# Lays out a CUDA 13.0 toolkit from NVIDIA's pip wheels in DIR/root, for building knots with
# --features cuda where no system toolkit (and no GPU) is: used by scripts/build_cuda.sh
# (`make cuda`) and docker/Dockerfile.cuda, so both build with the same pins.
#
#   docker/cuda-toolkit.sh DIR
#
# The wheels are downloaded with pip (--no-deps) into DIR/wheels (a no-op when there) and
# unpacked into DIR/root: bin (nvcc, ptxas), include, nvvm, lib with unversioned .so links, and
# lib/stubs/libcuda.so, a link-time stand-in for the driver library (no wheel ships it): every
# cu* name cuda.h declares, as functions that do nothing, under the real soname libcuda.so.1,
# so the GPU machine's driver is what runs. CUDA 13.0 needs a driver >= 580; a newer nvcc can
# emit PTX an older driver rejects, hence the pins. Needs python3 with pip, unzip and cc.
set -euo pipefail
CUDA_DIR="${1:?usage: docker/cuda-toolkit.sh DIR}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$CUDA_DIR/wheels"

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
    # PIP_CERT (a TLS-inspecting proxy's CA) is honoured by pip itself.
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

echo "cuda-toolkit: $ROOT"
