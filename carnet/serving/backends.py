"""Backends: a model file -> a callable mapping a uint8 (N, 3, H, W) pixel batch to (N, C) logits.

The model normalises the pixels itself (:class:`carnet.models.network.Normalize`, exported into the ONNX graph).
An ONNX file exported before that (its input is float32, already normalised) is fed what it expects: the
backend normalises with the file's mean and std.

``torch`` runs a carnet checkpoint with PyTorch; ``onnx`` runs a file written by ``carnet-export`` with
onnxruntime. Importing this module, and building and running an :class:`OnnxBackend`, imports no torch
(tests/test_serve.py checks it): torch and timm are imported only inside :class:`TorchBackend`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from carnet.errors import ModelLoadError
from carnet.inference.onnx_meta import read_onnx_meta

BACKENDS = ("torch", "onnx")


class Backend(Protocol):
    name: str
    meta: dict[str, Any]

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, so ONNX and torch probabilities are compared without float32 rounding."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class TorchBackend:
    """A carnet checkpoint run with PyTorch on the CPU (:func:`carnet.models.checkpoint.load_checkpoint`)."""

    name = "torch"

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None) -> None:
        # Imported here, not at the top: torch, timm and the checkpoint loader cost seconds and hundreds of MB,
        # and a process serving an ONNX file must not pay for them.
        import torch

        from carnet.models.checkpoint import load_checkpoint

        if num_threads:
            torch.set_num_threads(num_threads)
        self._torch = torch
        self.net, self.meta = load_checkpoint(path)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Logits of a uint8 (or float 0..255) (N, 3, H, W) pixel batch; the network normalises it."""
        with self._torch.inference_mode():
            return self.net(self._torch.from_numpy(np.ascontiguousarray(batch))).float().numpy()


class OnnxBackend:
    """An ONNX file written by ``carnet-export``, run with onnxruntime on the CPU."""

    name = "onnx"

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None) -> None:
        import onnxruntime as ort  # the serve extra

        self.meta = read_onnx_meta(path)
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

        self.input_type = self.session.get_inputs()[0].type  # tensor(uint8); tensor(float) in older exports
        if self.input_type == "tensor(float)":
            mean, std = np.asarray(self.meta["mean"], np.float32), np.asarray(self.meta["std"], np.float32)
            self._offset, self._scale = (mean * 255).reshape(1, -1, 1, 1), (1 / (std * 255)).reshape(1, -1, 1, 1)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Logits of a uint8 (or float 0..255) (N, 3, H, W) pixel batch."""
        if self.input_type == "tensor(uint8)":
            if batch.dtype != np.uint8:  # float 0..255 (a resampled TTA view): the graph takes bytes
                batch = np.clip(np.rint(batch), 0, 255).astype(np.uint8)
            return self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0]
        x = (batch.astype(np.float32) - self._offset) * self._scale  # an older file: normalised float32 input
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def check_model_file(path: str | os.PathLike, backend: str = "torch") -> Path:
    """``path`` if it is a file the backend can be asked to load (exists; ``.onnx`` for ``onnx`` and only for it),
    else :class:`ModelLoadError` saying what to do. Cheap (no torch, nothing read): gunicorn's master runs it
    before forking workers (:mod:`carnet.serving.gunicorn_conf`)."""
    path = Path(path)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if not path.is_file():
        raise ModelLoadError(f"ckpt={path}: file not found")
    if backend == "torch" and path.suffix == ".onnx":
        raise ModelLoadError(f"ckpt={path} is an ONNX file: serve it with backend='onnx' (--backend onnx)")
    if backend == "onnx" and path.suffix != ".onnx":
        raise ModelLoadError(f"backend='onnx' needs a .onnx file, got {path}: write one with "
                             f"`carnet-export --ckpt {path} --out model.onnx`")
    return path


def load_backend(path: str | os.PathLike, backend: str = "torch", num_threads: int | None = None) -> Backend:
    """The backend serving ``path``: a carnet ``.ckpt`` with ``torch``, a ``.onnx`` file with ``onnx``."""
    path = check_model_file(path, backend)
    return TorchBackend(path, num_threads) if backend == "torch" else OnnxBackend(path, num_threads)
