#!/usr/bin/env bash
# carnet's GPU suite, correctness first: (1) the `gpu`-marked tests; (2) benchmarks/gpu_check.py: short real train.py
# runs on the GPU (data.decode=cpu|gpu x model.compile=false|regional) whose losses must agree with the CPU's;
# then speed, for tf_efficientnet_b6 at 448 px, bf16 (fp16 on cards without it): (3) benchmarks/gpu.py --end-to-end
# at batches 32 and 64: model-only vs loader alone vs carnet's train(), and GPU predict (plain and TTA) vs the raw
# forward pass, with Markdown tables for README "Performance"; (4) model-only training steps at batch 32, fp32 vs
# bf16 vs bf16+channels_last vs regional compile (an empty compile cache), then (5) regional compile again in a
# second process that finds that cache (its warm-up; goal <= 60 s). Each stage has its own time limit (seconds:
# CHECK_TIMEOUT 200 for 1-2, SUITE_TIMEOUT 240 for 3, COMPILE_TIMEOUT 200 for 4-5); a stage that fails or stops is
# named at the end and makes the exit code 1. Stages 1, 2, 4 and 5 need a GPU. About 8 minutes on an H200.
#
#     bash benchmarks/gpu_suite.sh [gpu.py --end-to-end options, which override the defaults]
#     bash benchmarks/gpu_suite.sh --device cpu --model test_efficientnet --image-size 64 --batch-size 4 \
#         --steps 2 --warmup 1 --predict-images 8 --views 2        # a smoke test on a CPU (rates mean nothing)
#
# The GPU machine needs Python 3.12 with torch, torchvision, timm, pytorch-lightning, torchmetrics, numpy, OpenCV,
# pandas, scipy and pytest (and their dependencies); carnet runs from this checkout (no `pip install -e`). What it
# lacks (hydra-core, omegaconf, antlr4, albumentations and theirs) comes as wheels: run `bash
# benchmarks/fetch_wheels.sh` on a machine with network access first; it fills benchmarks/wheels/ (~13 MB,
# gitignored), which must travel with the checkout (copy the folder, or name it in the device tool's carry list:
# carry=["benchmarks/wheels"]). CARNET_WHEELS=DIR points elsewhere. The wheels are unpacked into a temporary folder
# put on PYTHONPATH, only when Python cannot import those packages already. PYTHON=python3.12 picks the interpreter.
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
failed=()
cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
stage() {  # stage NAME SECONDS COMMAND...: run it under its time limit; a failure is named at the end
    local name="$1" limit="$2"
    shift 2
    echo "gpu_suite.sh: $name ($(( $(date +%s) - start )) s in)"
    timeout "$limit" "$@" || { echo "gpu_suite.sh: $name stopped (exit $?)"; failed+=("$name"); }
}
if [ "$cuda" = 1 ]; then
    stage "gpu tests" "${CHECK_TIMEOUT:-200}" "$PY" -m pytest -q -p no:cacheprovider -m gpu \
        "$REPO/tests/test_device_pipeline.py" "$REPO/tests/test_config.py"
    stage "gpu_check" "${CHECK_TIMEOUT:-200}" "$PY" "$REPO/benchmarks/gpu_check.py"
fi
stage "end-to-end" "${SUITE_TIMEOUT:-240}" "$PY" "$REPO/benchmarks/gpu.py" --end-to-end --model tf_efficientnet_b6 \
    --image-size 448 --batch-size 32 64 --steps 20 --warmup 5 --views 4 "$@"
if [ "$cuda" = 1 ]; then
    export TORCHINDUCTOR_CACHE_DIR="$(mktemp -d -t carnet_inductor_XXXXXX)"  # empty: the first run compiles
    for variants in "fp32 amp channels_last regional" "regional"; do
        stage "model-only: $variants" "${COMPILE_TIMEOUT:-200}" \
            "$PY" "$REPO/benchmarks/gpu.py" --model tf_efficientnet_b6 --image-size 448 --batch-size 32 --steps 20 \
            --warmup 3 --no-max-batch --variants $variants
    done
    rm -rf "$TORCHINDUCTOR_CACHE_DIR"
fi
echo "gpu_suite.sh: $(( $(date +%s) - start )) s${failed[*]:+; failed: ${failed[*]}}"
[ ${#failed[@]} -eq 0 ]
