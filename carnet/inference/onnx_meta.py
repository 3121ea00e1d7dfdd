"""The carnet metadata of an ONNX file, written by ``carnet-export`` and read without PyTorch or timm.

Everything needed to feed the graph (image size, interpolation, crop_pct, the input dtype, class names, model
name; mean and std, which the graph applies itself since ``input_dtype`` is ``uint8``) is stored in the file's
``metadata_props`` under ``carnet`` as JSON: the same dict as a checkpoint's ``checkpoint["carnet"]`` (and each
field again under its own key, for tools that only look for, say, ``mean``).
This module imports only the standard library and, when a file is read or written, ``onnx`` (the ``serve``
extra), so the ONNX backend of :mod:`carnet.serving.backends` stays free of torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from carnet.errors import ExportError

# The metadata_props key holding the metadata as JSON. It is the checkpoint's key too
# (carnet.models.checkpoint.CHECKPOINT_KEY, which imports torch; tests/test_export.py checks they agree).
META_KEY = "carnet"
REQUIRED_META = ("model_name", "class_names", "image_size", "mean", "std", "interpolation", "crop_pct")
# Written since the graph normalises uint8 pixels itself ("uint8"); files without it take normalised float32.
INPUT_DTYPE_KEY = "input_dtype"


def add_onnx_meta(model: Any, meta: dict[str, Any]) -> None:
    """Store ``meta`` in an ``onnx.ModelProto``'s ``metadata_props``: all of it under :data:`META_KEY` (what
    carnet reads), plus one entry per preprocessing field (each value JSON-encoded)."""
    extra = [INPUT_DTYPE_KEY] if INPUT_DTYPE_KEY in meta else []
    for key, value in {META_KEY: meta, **{k: meta[k] for k in (*REQUIRED_META, *extra)}}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)


def read_onnx_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The inference metadata stored by ``carnet-export`` in an ONNX file (the weights are not loaded)."""
    import onnx  # the serve extra: only needed once an ONNX file is read

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: ONNX file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise ExportError(f"{path} cannot be read as ONNX ({type(err).__name__}: {err})") from err
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props:
        raise ExportError(f"{path} has no '{META_KEY}' metadata: export it with `carnet-export`")
    meta = json.loads(props[META_KEY])
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ExportError(f"{path}: '{META_KEY}' metadata lacks {missing}")
    return meta
