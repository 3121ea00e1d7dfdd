"""One uploaded image -> class probabilities: the checkpoint's own eval view, a backend, optional flip TTA;
and the holder that loads the classifier once per process.

Preprocessing is the training evaluation view, :class:`carnet.data.eval_view.EvalView` with the model's own size,
interpolation and crop (the function training validates and predict classifies with), to a uint8 (1, 3, H, W)
batch; the model normalises it (the checkpoint's network and the exported ONNX graph alike). NumPy and OpenCV
only: a process serving an ONNX file imports no torch, Hydra or albumentations (tests/test_serve.py checks it).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import numpy as np

from carnet.data.eval_view import EvalView
from carnet.serving.backends import load_backend, softmax

log = logging.getLogger(__name__)


def hflip_tta(run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray) -> np.ndarray:
    """Test-time augmentation: the image and its horizontal mirror in one batch of 2N, their probabilities
    averaged like predict.py's ``tta=true`` (:func:`carnet.inference.tta.merge_probs`, ``mean``; in NumPy here,
    so the ONNX backend needs no torch)."""
    n = len(batch)
    probs = softmax(run(np.concatenate([batch, batch[..., ::-1]])))
    return probs.reshape(2, n, -1).mean(0)


class Classifier:
    """Image array -> probabilities: the checkpoint's eval view, the backend, optional flip TTA."""

    def __init__(self, path: str | os.PathLike, backend: str = "torch", tta: bool = False,
                 num_threads: int | None = None) -> None:
        self.backend = load_backend(path, backend, num_threads)
        self.meta = self.backend.meta
        self.tta = tta
        self.view = EvalView.of(self.meta)
        # The smallest shorter side the eval view needs: uploads are decoded down to it (JPEG draft), as predict
        # decodes files, so a 36 MP photo costs what the model input needs.
        self.min_side = self.view.resize_to

    @property
    def model_name(self) -> str:
        return self.meta["model_name"]

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """The eval view of one RGB uint8 image as a uint8 (1, 3, H, W) batch (the backend normalises)."""
        return self.view.batch(image)

    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        """Class probabilities (float64, length C) of one RGB uint8 image."""
        batch = self.preprocess(image)
        probs = hflip_tta(self.backend, batch) if self.tta else softmax(self.backend(batch))
        return probs[0]


class ModelHolder:
    """Loads the classifier once per process (thread-safe), and again only in a process forked after loading."""

    def __init__(self, factory: Callable[[], Classifier]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._model: Classifier | None = None
        self._pid: int | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None and self._pid == os.getpid()

    def get(self) -> Classifier:
        if not self.loaded:
            with self._lock:
                if not self.loaded:
                    started = time.perf_counter()
                    self._model, self._pid = self._factory(), os.getpid()
                    log.info("pid %d loaded %s (%s) in %.1f s", self._pid, self._model.model_name,
                             self._model.backend.name, time.perf_counter() - started)
        assert self._model is not None
        return self._model
