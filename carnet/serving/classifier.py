"""One uploaded image -> class probabilities: the checkpoint's own eval transform, a backend, optional flip TTA;
and the holder that loads the classifier once per process.

Preprocessing is the training evaluation view: the decoded RGB image fed through
:func:`carnet.data.transforms.build_eval_transform` with the model's own size / interpolation / crop, to a uint8
(1, 3, H, W) batch; the model normalises it (the checkpoint's network and the exported ONNX graph alike).
(albumentations imports torch itself, so this module does too; only :mod:`carnet.serving.backends` is torch-free.)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from carnet.data.decode import decode_min_side
from carnet.data.transforms import build_eval_transform
from carnet.inference.tta import merge_probs
from carnet.serving.backends import load_backend, softmax

log = logging.getLogger(__name__)


def hflip_tta(run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray) -> np.ndarray:
    """Test-time augmentation: the image and its horizontal mirror in one batch of 2N, merged like predict.py's
    ``tta=true`` (:func:`carnet.inference.tta.merge_probs`, mean). Views are applied to the numpy batch so the
    ONNX backend gets them too.
    """
    n = len(batch)
    probs = softmax(run(np.concatenate([batch, batch[..., ::-1]])))
    return merge_probs(torch.from_numpy(probs).view(2, n, -1)).numpy()


class Classifier:
    """Image array -> probabilities: the checkpoint's eval transform, the backend, optional flip TTA."""

    def __init__(self, path: str | os.PathLike, backend: str = "torch", tta: bool = False,
                 num_threads: int | None = None) -> None:
        self.backend = load_backend(path, backend, num_threads)
        self.meta = self.backend.meta
        self.tta = tta
        m = self.meta
        self._transform_lock = threading.Lock()
        self.transform = build_eval_transform(m["image_size"], m["interpolation"], m["crop_pct"])
        # The smallest shorter side the eval view needs: uploads are decoded down to it (JPEG draft), as predict
        # decodes files, so a 36 MP photo costs what the model input needs.
        self.min_side = decode_min_side(self.transform)

    @property
    def model_name(self) -> str:
        return self.meta["model_name"]

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """The eval view of one RGB uint8 image as a uint8 (1, 3, H, W) batch (the backend normalises)."""
        # albumentations keeps per-call state on its transform objects; the dev server is threaded, and the
        # lock costs nothing next to the forward pass.
        with self._transform_lock:
            return self.transform(image=image)["image"].numpy()[None]

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
