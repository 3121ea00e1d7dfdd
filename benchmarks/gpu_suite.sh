#!/usr/bin/env bash
# carnet's GPU suite: benchmarks/gpu.py --end-to-end for tf_efficientnet_b6 at 448 px, bf16 (fp16 on cards without
# it), channels_last, batches 32 and 64: model-only vs loader alone vs carnet's train(), and GPU predict (plain and
# TTA) vs the raw forward pass. Ends with Markdown tables for README "Performance". Budget: under 8 minutes on an
# H100 (a timeout stops it at 8).
#
#     bash benchmarks/gpu_suite.sh [gpu.py options, which override the defaults]
#     bash benchmarks/gpu_suite.sh --device cpu --model test_efficientnet --image-size 64 --batch-size 4 \
#         --steps 2 --warmup 1 --predict-images 8 --views 2        # a smoke test on a CPU (rates mean nothing)
#
# The GPU machine needs Python 3.12 with torch, torchvision, timm, pytorch-lightning, torchmetrics, numpy, OpenCV,
# pandas (and their dependencies); carnet runs from this checkout (no `pip install -e`). What it lacks (hydra-core,
# omegaconf, antlr4, albumentations and theirs) comes as wheels: run `bash benchmarks/fetch_wheels.sh` on a machine
# with network access first; it fills benchmarks/wheels/ (~13 MB, gitignored), which must travel with the checkout
# (copy the folder, or name it in the device tool's carry list: carry=["benchmarks/wheels"]). CARNET_WHEELS=DIR
# points elsewhere. The wheels are unpacked into a temporary folder put on PYTHONPATH, only when Python cannot
# import those packages already. PYTHON=python3.12 picks the interpreter; SUITE_TIMEOUT (seconds, 480) the limit.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="${CARNET_WHEELS:-$REPO/benchmarks/wheels}"
export NO_ALBUMENTATIONS_UPDATE=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import hydra, omegaconf, albumentations, imagehash" 2>/dev/null; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "gpu_suite.sh: $PY cannot import hydra/albumentations and $WHEELS has no wheels:" \
             "run benchmarks/fetch_wheels.sh and carry $WHEELS here" >&2
        exit 1
    fi
    SITE="$(mktemp -d -t carnet_wheels_XXXXXX)"
    trap 'rm -rf "$SITE"' EXIT
    for wheel in "${wheels[@]}"; do
        "$PY" -m zipfile -e "$wheel" "$SITE"
    done
    export PYTHONPATH="$SITE:$PYTHONPATH"
    echo "gpu_suite.sh: ${#wheels[@]} wheels from $WHEELS unpacked into $SITE"
fi

"$PY" -c "import sys, torch; print(f'python {sys.version.split()[0]}, torch {torch.__version__}, CUDA ' \
    f'{torch.version.cuda}, GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else None}')"
start=$(date +%s)
timeout "${SUITE_TIMEOUT:-480}" "$PY" "$REPO/benchmarks/gpu.py" --end-to-end --model tf_efficientnet_b6 \
    --image-size 448 --batch-size 32 64 --steps 20 --warmup 5 --views 4 "$@"
# torch.compile, GPU only: the model-only step eager vs regional compilation, and the warm-up of a first run (an
# empty compile cache) and of a second process that finds the first one's cache (goal: <= 60 s).
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    COMPILE_CACHE="$(mktemp -d -t carnet_inductor_XXXXXX)"
    for run in "first run, empty cache" "second run, warm cache"; do
        echo "gpu_suite.sh: regional compile, $run"
        TORCHINDUCTOR_CACHE_DIR="$COMPILE_CACHE" timeout "${COMPILE_TIMEOUT:-240}" "$PY" "$REPO/benchmarks/gpu.py" \
            --model tf_efficientnet_b6 --image-size 448 --batch-size 32 --steps 20 --warmup 3 --no-max-batch \
            --variants channels_last regional "$@" || echo "gpu_suite.sh: the $run stopped (exit $?)"
    done
    rm -rf "$COMPILE_CACHE"
fi
echo "gpu_suite.sh: $(( $(date +%s) - start )) s"
