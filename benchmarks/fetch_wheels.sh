#!/usr/bin/env bash
# Wheels that benchmarks/gpu_suite.sh needs on a GPU machine whose Python (3.12) has torch, timm, Lightning,
# torchmetrics, numpy, OpenCV and pandas but not carnet's other dependencies: hydra-core, omegaconf, antlr4,
# albumentations and theirs (cp312, manylinux x86_64, no dependency resolution: the list is complete).
#
#     bash benchmarks/fetch_wheels.sh [DIR]        # DIR: default benchmarks/wheels (gitignored), ~13 MB
#
# Versions are those carnet is tested with (pywavelets: 1.8.0, the last with manylinux2014 wheels). antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 needs) exists only as
# an sdist: its pure-Python wheel is built here with `pip wheel`.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="${1:-$HERE/wheels}"
PY="${PYTHON:-python3}"
mkdir -p "$DEST"
"$PY" -m pip download --dest "$DEST" --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --implementation cp --no-deps --quiet \
    hydra-core==1.3.8 omegaconf==2.3.1 albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4 \
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 stringzilla==5.3.2 simsimd==6.5.16 \
    imagehash==4.3.2 pywavelets==1.8.0
"$PY" -m pip wheel --no-deps --no-build-isolation --wheel-dir "$DEST" --quiet antlr4-python3-runtime==4.9.3 \
    || "$PY" -m pip wheel --no-deps --wheel-dir "$DEST" --quiet antlr4-python3-runtime==4.9.3
ls -1 "$DEST"/*.whl
du -ch "$DEST"/*.whl | tail -1
