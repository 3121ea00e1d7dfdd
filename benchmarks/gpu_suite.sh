#!/usr/bin/env bash
# carnet's GPU suite, correctness first, in stages that SUITE_STAGES picks (default: all five, in this order; each
# under its own time limit in seconds):
#   tests    the `gpu`-marked tests (TESTS_TIMEOUT, 120);
#   check    benchmarks/gpu_check.py: short real train.py runs on the GPU, data.decode=cpu|gpu x
#            model.compile=false|regional, whose losses must agree with the CPU's (CHECK_TIMEOUT, 300);
#   speed    benchmarks/gpu.py --end-to-end, tf_efficientnet_b6 at 448 px, bf16, batches 32 and 64: model-only vs
#            loader alone vs carnet's train(), GPU predict (plain, TTA) vs the raw forward pass, with Markdown tables
#            for README "Performance" (SUITE_TIMEOUT, 240);
#   compile  model-only steps at batch 32: fp32, bf16, bf16+channels_last and regional compile on an empty compile
#            cache, then regional compile in a second process that finds that cache: its warm-up, goal <= 60 s
#            (COMPILE_TIMEOUT, 300 each);
#   headfit  benchmarks/head_fit_cost.py: `train.py phase=head` (tf_efficientnet_b6, 224 px) on 15,561 photos with
#            the defaults, with head_fit.pad_batches=true, and without the head fit: its cost and share of the phase
#            (HEADFIT_TIMEOUT, 480: on an H200 four such runs took 349 s, with copied photos; drawing the 15,561
#            photos takes about 140 s on one core of a 2-core CPU. 448 px cost the head fit as much as 224 px there,
#            so the stage measures 224 px alone).
# A stage that fails or stops at its limit is named at the end and makes the exit code 1. tests, check and compile
# need a GPU. On an H200 the five take longer than a 15-minute device session: run them in parts there, e.g.
# SUITE_STAGES="tests check", then "speed", then "compile headfit" (docs/performance.md, "GPU suite").
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
stages=" ${SUITE_STAGES:-tests check speed compile headfit} "
if [ "$cuda" = 1 ] && [[ $stages == *" tests "* ]]; then
    stage "gpu tests" "${TESTS_TIMEOUT:-120}" "$PY" -m pytest -q -p no:cacheprovider -m gpu \
        "$REPO/tests/test_device_pipeline.py" "$REPO/tests/test_config.py"
fi
if [ "$cuda" = 1 ] && [[ $stages == *" check "* ]]; then
    stage "gpu_check" "${CHECK_TIMEOUT:-300}" "$PY" "$REPO/benchmarks/gpu_check.py"
fi
if [[ $stages == *" speed "* ]]; then
    stage "end-to-end" "${SUITE_TIMEOUT:-240}" "$PY" "$REPO/benchmarks/gpu.py" --end-to-end \
        --model tf_efficientnet_b6 --image-size 448 --batch-size 32 64 --steps 20 --warmup 5 --views 4 "$@"
fi
if [ "$cuda" = 1 ] && [[ $stages == *" compile "* ]]; then
    export TORCHINDUCTOR_CACHE_DIR="$(mktemp -d -t carnet_inductor_XXXXXX)"  # empty: the first run compiles
    for variants in "fp32 amp channels_last regional" "regional"; do
        stage "model-only: $variants" "${COMPILE_TIMEOUT:-300}" \
            "$PY" "$REPO/benchmarks/gpu.py" --model tf_efficientnet_b6 --image-size 448 --batch-size 32 --steps 20 \
            --warmup 3 --no-max-batch --variants $variants
    done
    rm -rf "$TORCHINDUCTOR_CACHE_DIR"
fi
if [ "$cuda" = 1 ] && [[ $stages == *" headfit "* ]]; then
    stage "head fit at scale" "${HEADFIT_TIMEOUT:-480}" "$PY" "$REPO/benchmarks/head_fit_cost.py" --image-size 224 \
        --variant head_fit.pad_batches=true
fi
echo "gpu_suite.sh: $(( $(date +%s) - start )) s${failed[*]:+; failed: ${failed[*]}}"
[ ${#failed[@]} -eq 0 ]
