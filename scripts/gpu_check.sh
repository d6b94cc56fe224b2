#!/usr/bin/env bash
# The GPU check: one prepared run (about 8 minutes on a GPU machine) of what `--device cuda` must
# give. It unpacks the binary `make cuda` packed (target/cuda/knots.xz), checks that its libraries
# resolve (ldd), makes random-weight models with the real architectures (SmolLM2-135M's config,
# a Llama-3.2-1B-shaped one) and random PEFT adapters with transformers and peft, then reports
# (scripts/gpu_check.py): logits and 64 greedy tokens of knots against transformers on the same
# device and against knots on the CPU, f32 and bf16, for the base, one adapter, a knots-ties and
# a ties set; single-stream decode speed and the serving engine's mixed-set throughput; merge
# times of the SmolLM2 set and of a Llama-3-8B-shaped set. Report: $OUT/report.json.
#
#   scripts/gpu_check.sh [--device cuda|cpu] [--quick] [--knots PATH] [--knots-cpu PATH]
#                        [--budget SECONDS] [--models smollm2,llama3-1b]
#                        [--sections cases,serving,merge,merge-8b]
#
# --device cpu runs the same checks with knots on the CPU (against transformers on the CPU); with
# --quick (4-layer SmolLM2 shapes, 16 greedy tokens, no 1B model, small serving and merge runs)
# it finishes in minutes on 2 cores, which is how the script is checked without a GPU
# (`make gpu-check`). Without --knots it uses target/cuda/knots.xz for cuda and builds knots
# (cargo build --release) for cpu; the CPU comparison uses --knots-cpu, by default the same binary.
# Python: torch, transformers, peft (PYTHON, default python3; for cuda, the environment whose
# nvidia/cu13/lib holds libcudart.so.13, libcublas.so.13 and libcurand.so.10).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
QUICK=()
PASS=()
KNOTS=""
KNOTS_CPU=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --quick) QUICK=(--quick); shift ;;
        --knots) KNOTS="$2"; shift 2 ;;
        --knots-cpu) KNOTS_CPU="$2"; shift 2 ;;
        --budget|--models|--sections) PASS+=("$1" "$2"); shift 2 ;;
        *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
    esac
done
OUT="${OUT:-target/gpu-check}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
started=$(date +%s)
"$PYTHON" -c 'import torch, transformers, peft, safetensors, tokenizers' || {
    echo "gpu_check: $PYTHON lacks torch, transformers, peft, safetensors or tokenizers" >&2
    exit 1
}

if [ -z "$KNOTS" ]; then
    if [ "${DEVICE%%:*}" = cuda ]; then
        [ -f target/cuda/knots.xz ] || { echo "gpu_check: no target/cuda/knots.xz (make cuda)" >&2; exit 1; }
        KNOTS="$OUT/knots"
        # Python's lzma, so the GPU machine needs no xz.
        "$PYTHON" -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)' target/cuda/knots.xz "$KNOTS"
        chmod +x "$KNOTS"
    else
        cargo build --release --quiet --bin knots
        KNOTS="${CARGO_TARGET_DIR:-target}/release/knots"
    fi
fi

if [ "${DEVICE%%:*}" = cuda ]; then
    # The CUDA libraries of the Python environment's NVIDIA wheels; libcuda.so.1 is the driver's.
    LIBS="$("$PYTHON" -c 'import os, nvidia
for p in nvidia.__path__:
    d = os.path.join(p, "cu13", "lib")
    if os.path.isdir(d):
        print(d)
        break' 2>/dev/null || true)"
    [ -n "$LIBS" ] && export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    ldd "$KNOTS" | tee "$OUT/ldd.txt"
    if grep -q "not found" "$OUT/ldd.txt"; then
        echo "gpu_check: unresolved libraries (LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-})" >&2
        exit 1
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    if [ -z "$KNOTS_CPU" ]; then KNOTS_CPU="$KNOTS"; fi
fi

status=0
"$PYTHON" scripts/gpu_check.py --device "$DEVICE" --knots "$KNOTS" \
    ${KNOTS_CPU:+--knots-cpu "$KNOTS_CPU"} --out "$OUT" "${QUICK[@]}" "${PASS[@]}" || status=$?
echo "gpu_check: $(($(date +%s) - started)) s; report in $OUT/report.json"
exit $status
