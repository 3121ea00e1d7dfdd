"""Batched inference: a loader per checkpoint (its own size, normalisation, interpolation and crop), mixed
precision, and the softmax probabilities of every TTA view (:mod:`carnet.inference.tta`).

Also the console predict reports on, and its progress bars.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from carnet.data.dataset import ImageDataset
from carnet.data.transforms import build_eval_transform, decode_min_side
from carnet.errors import DataError
from carnet.inference.ensemble import Model, ensemble
from carnet.inference.selection import Images
from carnet.inference.tta import TTA, view_logits
from carnet.runtime import inference_amp, inference_device, resolve_workers

console = Console(stderr=True)
if not console.is_terminal:  # logs and pipes: room for the report table instead of rich's 80 columns
    console.width = 120


def progress_bars() -> Progress:
    """Progress bars on predict's console, one task per model and image set."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("img"),
                    TimeRemainingColumn(), console=console, transient=False)


class _CheckedDataset(ImageDataset):
    """ImageDataset that reports an undecodable file instead of raising inside a loader worker.

    A worker's exception reaches the main process as a wrapped traceback string; returning the reason lets
    predict raise one clear :class:`DataError` naming the file.
    """

    def __init__(self, *args: Any, image_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.image_size = image_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image, label = super().__getitem__(index)
            return image, label, ""
        except Exception as err:  # PIL and OpenCV raise many types for bad files
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), self.labels[index], \
                f"{type(err).__name__}: {err}"


@dataclass(frozen=True)
class Runner:
    """Batched inference settings: device, loader, memory format and mixed precision.

    No defaults and no ``auto``: predict builds it from conf/predict.yaml with :meth:`from_config`, which resolves
    the ``auto`` values once (carnet.runtime); code that builds one directly says what it runs with.
    """

    device: str
    batch_size: int
    num_workers: int
    channels_last: bool
    amp: bool
    draft: bool

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Runner:
        """predict's runner (conf/predict.yaml): ``device``, ``amp`` and ``data.num_workers`` resolved here."""
        device = inference_device(cfg.device)
        return cls(device=device, batch_size=int(cfg.data.batch_size),
                   num_workers=resolve_workers(cfg.data.num_workers), channels_last=bool(cfg.channels_last),
                   amp=inference_amp(cfg.amp, device), draft=bool(cfg.data.draft))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        kind = torch.device(self.device).type
        dtype = torch.bfloat16 if kind == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(kind, dtype=dtype)

    def loader(self, images: Images, meta: dict[str, Any]) -> DataLoader:
        """A loader feeding the model what its checkpoint says (size, normalisation, interpolation, crop)."""
        size = int(meta["image_size"])
        transform = build_eval_transform(size, meta.get("interpolation", "bicubic"), float(meta.get("crop_pct", 1.0)))
        # draft: decode JPEGs at a reduced DCT scale that still covers the resize target (2-4x less decoding).
        min_side = decode_min_side(transform) if self.draft else None
        dataset = _CheckedDataset(images.root, images.paths, images.labels, transform, min_side=min_side,
                                  image_size=size)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=self.device.startswith("cuda"))

    def prepare(self, net: torch.nn.Module) -> torch.nn.Module:
        """The net on the device, in eval mode and memory format (a channels_last net converts its input too)."""
        net = net.to(self.device).eval()
        return net.to(memory_format=torch.channels_last) if self.channels_last else net

    @torch.inference_mode()
    def view_probs(self, model: Model, images: Images, tta: TTA, progress: Progress | None = None) -> torch.Tensor:
        """Softmax probabilities of every view in ``tta.forward_views``: (views, images, classes) on the CPU."""
        net = self.prepare(model.net)
        views = tta.forward_views
        task = progress.add_task(f"{model.label} {images.what}", total=len(images.paths)) if progress else None
        outs, seen = [], 0
        for batch, _, errors in self.loader(images, model.meta):
            bad = [(i, e) for i, e in enumerate(errors) if e]
            if bad:
                i, why = bad[0]
                path = images.root / images.paths[seen + i]
                raise DataError(f"cannot decode {images.what} image {path} ({why}); replace or remove the file"
                                + (f" and its row in {images.root / 'sample-submission.csv'}"
                                   if images.what == "test" else ""))
            batch = batch.to(self.device, non_blocking=True)  # uint8: the net normalises it on the device
            with self._autocast():
                logits = view_logits(net, batch, views)
            outs.append(logits.softmax(-1).cpu())
            seen += len(batch)
            if progress is not None:
                progress.advance(task, len(batch))
        model.net = net.cpu() if self.device != "cpu" else net  # free the GPU for the next model
        return torch.cat(outs, 1)


def predict_probs(models: Sequence[Model], images: Images, tta: TTA, runner: Runner) -> torch.Tensor:
    """Ensemble of the models' TTA-merged probabilities on ``images``: (images, classes)."""
    with progress_bars() as progress:
        merged = [tta.combine(runner.view_probs(m, images, tta, progress)) for m in models]
    return ensemble(merged, [m.weight for m in models])
