"""Export a checkpoint for serving without PyTorch: ONNX (onnxruntime) and optionally TorchScript.

::

    carnet-export --ckpt best.ckpt --out model.onnx [--torchscript model.pt]

The ONNX graph maps ``images`` (N, 3, H, W uint8 pixels, RGB; N is dynamic) to ``logits`` (N, C): the
normalisation is part of the graph, as it is part of the network in training, predict and serving. Everything
needed to feed it is stored in the file's metadata (:mod:`carnet.inference.onnx_meta`, with ``input_dtype``), so
:func:`carnet.inference.onnx_meta.read_onnx_meta` and :meth:`carnet.data.eval_view.EvalView.of` rebuild
the exact eval view. The TorchScript module takes the same uint8 batch (or float 0..255). After writing, the
export runs the file with onnxruntime and checks its probabilities against torch's. Files are written under a
temporary name and renamed (:func:`carnet.artifacts.atomic_path`), so a failed export leaves no half file.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carnet.artifacts import atomic_path
from carnet.errors import ExportError
from carnet.inference.onnx_meta import add_onnx_meta
from carnet.models.checkpoint import load_checkpoint

INPUT_NAME, OUTPUT_NAME = "images", "logits"
INPUT_DTYPE = "uint8"  # what the exported files take: pixels, as the loaders hand them over
DEFAULT_OPSET = 17
# The opsets torch's TorchScript-based exporter (dynamo=False) writes: torch.onnx._constants' ONNX_MIN_OPSET and
# ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET (tests/test_export.py holds the two equal).
OPSETS = range(7, 21)


def example_pixels(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """A random uint8 (batch, 3, size, size) pixel batch: the input every exported file takes."""
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def export_onnx(ckpt: str | os.PathLike, out: str | os.PathLike, opset: int = DEFAULT_OPSET,
                check: bool = True, atol: float = 1e-4) -> dict[str, Any]:
    """Write ``out`` (.onnx) from a carnet checkpoint; return the metadata (plus ``max_abs_diff`` if checked).

    With ``check``, a file whose probabilities differ from torch's by more than ``atol`` is not written.
    """
    import onnx

    out = Path(out)
    net, meta = load_checkpoint(ckpt)
    size = int(meta["image_size"])
    meta = {**meta, "input_dtype": INPUT_DTYPE}
    example = example_pixels(2, size)
    with atomic_path(out) as tmp:
        # dynamo=False: the TorchScript-based exporter handles timm models without onnxscript and is stable
        # across torch versions; the batch axis stays dynamic so one file serves any batch size.
        torch.onnx.export(net, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
        model = onnx.load(str(tmp))
        onnx.checker.check_model(model)
        add_onnx_meta(model, meta)
        model.producer_name = "carnet"
        model.doc_string = (f"carnet {meta['model_name']}: {INPUT_NAME} (N,3,{size},{size}) {INPUT_DTYPE} RGB "
                            f"pixels -> {OUTPUT_NAME} (N,C)")
        onnx.save(model, str(tmp))
        result = dict(meta)
        if check:
            result["max_abs_diff"] = diff = compare_onnx(net, tmp, example)
            if diff > atol:
                raise ExportError(f"{out}: onnxruntime probabilities differ from torch's by {diff:.2e} "
                                  f"(> {atol:g}); not written")
    return result


def compare_onnx(net: torch.nn.Module, onnx_path: str | os.PathLike, batch: torch.Tensor) -> float:
    """Largest absolute difference between torch's and onnxruntime's softmax probabilities on ``batch`` (uint8)."""
    import onnxruntime as ort

    with torch.inference_mode():
        expected = torch.softmax(net(batch).double(), dim=1).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {INPUT_NAME: batch.numpy()})[0]
    got = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    return float(np.abs(got - expected).max())


def export_torchscript(ckpt: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write a traced TorchScript module; the metadata JSON rides along as the extra file ``carnet.json``.

    Read it back with ``files = {"carnet.json": ""}; torch.jit.load(out, _extra_files=files)``.
    """
    out = Path(out)
    net, meta = load_checkpoint(ckpt)
    meta = {**meta, "input_dtype": INPUT_DTYPE}
    size = int(meta["image_size"])
    with atomic_path(out) as tmp, warnings.catch_warnings():
        # torch 2.10+ marks TorchScript deprecated in favour of torch.export; the format is what this option is for
        # (C++ and mobile runtimes load it), and ONNX is the recommended export.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(net, example_pixels(1, size))
        torch.jit.save(traced, str(tmp), _extra_files={"carnet.json": json.dumps(meta)})
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="carnet-export", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="carnet checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="ONNX file to write")
    parser.add_argument("--torchscript", default=None, metavar="PATH", help="also write a TorchScript file")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset, {OPSETS[0]}-{OPSETS[-1]} (default {DEFAULT_OPSET})")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-torch comparison")
    args = parser.parse_args(argv)
    if args.opset not in OPSETS:
        parser.error(f"--opset {args.opset}: expected {OPSETS[0]}-{OPSETS[-1]}, the opsets torch's exporter writes")
    for flag, path, example in (("--out", args.out, "model.onnx"), ("--torchscript", args.torchscript, "model.pt")):
        if path and Path(path).is_dir():
            parser.error(f"{flag} {path} is a folder; expected a file name, e.g. {Path(path) / example}")
    try:
        result = export_onnx(args.ckpt, args.out, opset=args.opset, check=not args.no_check)
        if args.torchscript:
            export_torchscript(args.ckpt, args.torchscript)
    except (ValueError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    line = f"wrote {args.out} ({result['model_name']}, {len(result['class_names'])} classes, {result['image_size']} px)"
    if "max_abs_diff" in result:
        line += f"; onnxruntime vs torch max |dp| = {result['max_abs_diff']:.2e}"
    print(line)
    if args.torchscript:
        print(f"wrote {args.torchscript} (TorchScript, metadata in extra file carnet.json)")


if __name__ == "__main__":
    main()
