"""Test-time augmentation: label-preserving views of an image batch, and the merge of their probabilities.

Views work on the already decoded and resized pixel batch (uint8 or float 0..255 NCHW, tensor ops on the model's
device; the network normalises), so an image is decoded once whatever the number of views and n views cost about n
forward passes. A view that resamples turns uint8 pixels into float 0..255 ones rather than rounding them back:
the network takes both, and since its normalisation is affine per channel, resampling before it equals resampling
after it. The functions here only
need a network and a batch: predict (files) and the web service (one uploaded image) share them.

Only views that keep a car a car of the same model are offered: horizontal flip, zoom, multi-scale and corner
crops. No vertical flips or 90-degree rotations: photos of cars are never upside down.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from carnet.errors import TTAError

MERGES = ("mean", "gmean")
CORNERS = ("center", "tl", "tr", "bl", "br")


@dataclass(frozen=True)
class View:
    """One test-time view. The defaults are the identity (the plain prediction).

    hflip: mirror left-right. zoom > 1: crop the central 1/zoom of the field and resize it back (zoom in).
    scale != 1: feed the whole image at scale x the model's size (multi-scale; pooled CNNs accept any size).
    crop: one of ``center, tl, tr, bl, br``: a crop_frac x crop_frac window there, resized back.
    """

    name: str = "identity"
    hflip: bool = False
    zoom: float = 1.0
    scale: float = 1.0
    crop: str | None = None
    crop_frac: float = 0.875

    def __post_init__(self) -> None:
        if self.zoom < 1:
            raise TTAError(f"tta view {self.name!r}: zoom={self.zoom}; expected >= 1 (1 = no zoom)")
        if self.scale <= 0:
            raise TTAError(f"tta view {self.name!r}: scale={self.scale}; expected > 0")
        if self.crop is not None and self.crop not in CORNERS:
            raise TTAError(f"tta view {self.name!r}: crop={self.crop!r}; expected one of {CORNERS}")
        if not 0 < self.crop_frac <= 1:
            raise TTAError(f"tta view {self.name!r}: crop_frac={self.crop_frac}; expected a fraction in (0, 1]")

    @property
    def is_identity(self) -> bool:
        return not self.hflip and self.zoom == 1 and self.scale == 1 and self.crop is None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """This view of an NCHW batch (same size unless ``scale`` != 1)."""
        if self.is_identity:
            return images
        height, width = images.shape[-2:]
        out = images
        if self.crop is not None:
            out = _window(out, self.crop, self.crop_frac)
        if self.zoom != 1:
            out = _window(out, "center", 1 / self.zoom)
        if out.shape[-2:] != (height, width) or self.scale != 1:
            size = (max(1, round(height * self.scale)), max(1, round(width * self.scale)))
            if not out.is_floating_point():  # interpolate has no uint8 kernel on CUDA; 0..255 floats lose nothing
                out = out.float()
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False, antialias=self.scale < 1)
        if self.hflip:
            out = out.flip(-1)
        return out


def _window(images: torch.Tensor, where: str, frac: float) -> torch.Tensor:
    """A frac x frac window of each image at ``where`` (center or a corner: tl, tr, bl, br)."""
    height, width = images.shape[-2:]
    h, w = max(1, round(height * frac)), max(1, round(width * frac))
    top, left = (height - h) // 2, (width - w) // 2
    if where != "center":
        top = 0 if where[0] == "t" else height - h
        left = 0 if where[1] == "l" else width - w
    return images[..., top:top + h, left:left + w]


IDENTITY = View()


def build_views(spec: Mapping[str, Mapping[str, Any] | None] | Sequence[Any] | None) -> list[View]:
    """Views from a config: a mapping ``name -> View fields`` (``{identity: {}, hflip: {hflip: true}}``).

    A mapping keyed by name lets the command line add one: ``+tta.views.zoom115={zoom:1.15}``.
    """
    if not spec:
        return [IDENTITY]
    if isinstance(spec, Mapping):
        items = [(str(name), dict(fields or {})) for name, fields in spec.items() if fields is not False]
    else:
        items = [(str(v.get("name", f"view{i}")), {k: x for k, x in dict(v).items() if k != "name"})
                 for i, v in enumerate(spec)]
    views = []
    for name, fields in items:
        unknown = set(fields) - {"hflip", "zoom", "scale", "crop", "crop_frac"}
        if unknown:
            raise TTAError(f"tta view {name!r}: unknown key(s) {sorted(unknown)}; expected hflip, zoom, scale, "
                           f"crop, crop_frac")
        views.append(View(name=name, **fields))
    return views


def view_logits(net: nn.Module, images: torch.Tensor, views: Sequence[View],
                forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Logits of every view, stacked: a (views, batch, classes) float32 tensor.

    ``images``: uint8 (or float 0..255) NCHW pixels; the network normalises them and matches its memory format
    (:class:`carnet.models.network.CarNet`). ``forward`` wraps the call (autocast) when the caller has its own;
    default ``net(x)``.
    """
    forward = forward or net
    return torch.stack([forward(view(images)).float() for view in views])


def merge_probs(probs: torch.Tensor, merge: str = "mean", beta: float | None = None,
                plain: torch.Tensor | None = None, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Merge per-view probabilities (views, batch, classes) into (batch, classes).

    ``mean``: arithmetic mean; ``gmean``: geometric mean, renormalised to sum to one (a view that is sure an
    image is *not* a class vetoes it more strongly). ``beta`` blends the plain (identity) prediction in as
    fastai's ``Learner.tta`` does: ``beta * plain + (1 - beta) * merged augmented views``.
    """
    if merge not in MERGES:
        raise TTAError(f"tta.merge={merge!r}; expected one of {MERGES}")
    w = torch.ones(probs.shape[0], dtype=probs.dtype, device=probs.device) if weights is None else \
        torch.as_tensor(list(weights), dtype=probs.dtype, device=probs.device)
    w = (w / w.sum()).view(-1, *([1] * (probs.dim() - 1)))
    if merge == "mean":
        merged = (probs * w).sum(0)
    else:
        merged = torch.exp((torch.log(probs.clamp_min(1e-12)) * w).sum(0))
        merged = merged / merged.sum(-1, keepdim=True)
    if beta is None:
        return merged
    if not 0 <= beta <= 1:
        raise TTAError(f"tta.beta={beta}; expected a weight in [0, 1] or null")
    if plain is None:
        raise TTAError("tta.beta needs the plain prediction")
    return torch.lerp(merged, plain, beta)


@dataclass(frozen=True)
class TTA:
    """A TTA recipe: views, how to merge them and fastai's ``beta``. ``TTA()`` is the plain prediction."""

    views: tuple[View, ...] = (IDENTITY,)
    merge: str = "mean"
    beta: float | None = None

    def __post_init__(self) -> None:
        if not self.views:
            raise TTAError("tta.views is empty: expected at least one view (identity: {} for the plain prediction)")
        if self.merge not in MERGES:
            raise TTAError(f"tta.merge={self.merge!r}; expected one of {MERGES}")
        if self.beta is not None and not 0 <= self.beta <= 1:
            raise TTAError(f"tta.beta={self.beta}; expected a weight in [0, 1] or null")
        names = [v.name for v in self.views]
        if len(set(names)) != len(names):
            raise TTAError(f"tta.views has duplicate names {names}")

    @property
    def forward_views(self) -> tuple[View, ...]:
        """The views to run: with ``beta`` the plain view is needed too, once."""
        if self.beta is not None and not any(v.is_identity for v in self.views):
            return (IDENTITY, *self.views)
        return self.views

    def combine(self, probs: torch.Tensor) -> torch.Tensor:
        """Merge probabilities of :attr:`forward_views` (views, batch, classes) into (batch, classes)."""
        views = self.forward_views
        if self.beta is None:
            return merge_probs(probs, self.merge)
        plain_at = next(i for i, v in enumerate(views) if v.is_identity)
        rest = [i for i, v in enumerate(views) if not v.is_identity]
        if not rest:  # only the plain view: blending it with itself changes nothing
            return probs[plain_at]
        return merge_probs(probs[rest], self.merge, beta=self.beta, plain=probs[plain_at])

    def subset(self, names: Sequence[str]) -> TTA:
        return TTA(tuple(v for v in self.views if v.name in set(names)), self.merge, self.beta)


@torch.inference_mode()
def tta_predict(net: nn.Module, images: torch.Tensor, tta: TTA | Sequence[View] | None = None,
                forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Merged class probabilities (batch, classes) of ``net`` on a pixel batch (uint8 NCHW) under ``tta``."""
    tta = tta if isinstance(tta, TTA) else TTA(tuple(tta)) if tta else TTA()
    probs = view_logits(net, images, tta.forward_views, forward).softmax(-1)
    return tta.combine(probs)


def scores(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(accuracy, negative log-likelihood) of class probabilities (images, classes) on ``labels``: what the val and
    out-of-fold reports show and what ``tta=auto`` ranks views by."""
    accuracy = (probs.argmax(-1) == labels).float().mean().item()
    nll = -torch.log(probs.gather(-1, labels[:, None]).clamp_min(1e-12)).mean().item()
    return accuracy, nll


def _position(views: Sequence[View], view: View) -> int:
    """Index of ``view`` in ``views``; any identity view stands for the plain prediction."""
    return next(i for i, v in enumerate(views) if v.name == view.name or (v.is_identity and view.is_identity))


def pick_views(probs: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor, tta: TTA,
               weights: Sequence[float] | None = None) -> tuple[TTA, float]:
    """The subset of ``tta.views`` whose merged prediction is most accurate on labelled images (``tta=auto``).

    ``probs`` holds every view's probabilities (views, images, classes) in ``tta.forward_views`` order, or one
    such tensor per model of an ensemble (averaged with ``weights`` after each model's merge). Ties go to the
    lower negative log-likelihood, then to fewer views. Every non-empty subset is scored: views are few and
    merging stored probabilities is cheap.
    """
    per_model = [probs] if isinstance(probs, torch.Tensor) else list(probs)
    w = torch.tensor(list(weights) if weights is not None else [1.0] * len(per_model))
    w = w / w.sum()
    order = tta.forward_views
    best: tuple[float, float, int] | None = None
    best_tta = tta
    for size in range(1, len(tta.views) + 1):
        for names in itertools.combinations([v.name for v in tta.views], size):
            candidate = tta.subset(names)
            index = [_position(order, v) for v in candidate.forward_views]
            merged = sum(wi * candidate.combine(p[index]) for wi, p in zip(w.tolist(), per_model, strict=True))
            acc, nll = scores(merged, labels)
            key = (-acc, nll, size)
            if best is None or key < best:
                best, best_tta = key, candidate
    return best_tta, -best[0]
