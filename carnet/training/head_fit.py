"""Fit the linear head on features computed once: the "LP" of LP-FT (Kumar et al. 2022).

While the backbone is frozen, an image's features never change, so the head phase is a convex problem:
multinomial logistic regression on pooled features. Computing the features once (the original view plus a few
augmented views of each training photo) and solving it with full-batch L-BFGS converges in seconds, where epochs
of SGD through the whole network barely move a random head on small data (50 photos at batch 32 are one step an
epoch). The L2 strength is chosen by k-fold cross-validation over training photos (never on the validation
split, which still judges the phase), by log-loss, which is smoother than accuracy on small folds.

Why not scikit-learn: it would be one more dependency for one solver, and torch's L-BFGS runs on the GPU too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from carnet.errors import CarnetError
from carnet.summary import RunSummary

log = logging.getLogger(__name__)

L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


@contextmanager
def single_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread for the solver on the CPU: its matrices are small, and on a loaded machine OpenMP's
    waiting threads made one fit 100x slower (32 s instead of 0.2 s for 150 x 1280 features, 2 cores)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
                 max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS: minimises mean cross-entropy + l2/2 * ||W||^2 (bias
    not penalised). Returns (W of shape [features, classes], b). Double precision: L-BFGS's line search needs it."""
    x, y = x.double(), y.long()
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.double, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.double, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * l2 * (weight * weight).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def photo_folds(groups: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold index per row, stratified by class over photos: every view of a photo falls in the same fold."""
    photos, first = np.unique(groups, return_index=True)
    photo_labels = labels[first]
    fold_of = np.zeros(len(photos), dtype=int)
    rng = np.random.default_rng(seed)
    for k in np.unique(photo_labels):
        members = rng.permutation(np.flatnonzero(photo_labels == k))
        fold_of[members] = np.arange(len(members)) % folds
    return fold_of[np.searchsorted(photos, groups)]


def choose_l2(x: torch.Tensor, y: torch.Tensor, groups: np.ndarray, num_classes: int,
              grid: Sequence[float] = L2_GRID, folds: int = 5, seed: int = 0) -> tuple[float, dict[float, float]]:
    """The L2 strength of ``grid`` with the lowest k-fold log-loss (ties: the stronger one), and each one's loss."""
    labels = y.cpu().numpy()
    folds = int(min(folds, np.bincount(labels[np.unique(groups, return_index=True)[1]]).min()))
    if folds < 2:  # a class with a single photo: nothing to cross-validate on
        return float(np.median(grid)), {}
    fold = torch.as_tensor(photo_folds(groups, labels, folds, seed), device=x.device)
    losses = {}
    for l2 in grid:
        total = 0.0
        for k in range(folds):
            train, held = fold != k, fold == k
            weight, bias = fit_logistic(x[train], y[train], num_classes, l2)
            total += F.cross_entropy(x[held].double() @ weight + bias, y[held], reduction="sum").item()
        losses[float(l2)] = total / len(y)
    best = min(losses, key=lambda l2: (round(losses[l2], 4), -l2))
    return best, losses


def fit_head(x: torch.Tensor, y: torch.Tensor, groups: np.ndarray, num_classes: int,
             grid: Sequence[float] = L2_GRID, folds: int = 5) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The linear head (weight [classes, features], bias) for raw features ``x``: features are standardised for
    the solver, L2 is cross-validated, and the standardisation is folded back into the layer."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    with single_thread(z.device):
        l2, losses = choose_l2(z, y, groups, num_classes, grid, folds, seed=0)
        weight, bias = fit_logistic(z, y, num_classes, l2)
    weight = weight / std.double()[:, None]
    bias = bias - mean.double() @ weight
    return weight.t().float(), bias.float(), {"l2": l2, "cv_loss": round(losses.get(l2, float("nan")), 4)}


def linear_layer(head: nn.Module) -> nn.Linear:
    """The head's only linear layer; a head with more layers (MLPHead) cannot be fitted in closed form."""
    layers = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if len(layers) != 1:
        raise CarnetError(f"head_fit.enabled=true needs a single linear layer (head=linear); this head has "
                          f"{len(layers)} linear layers: set head_fit.enabled=false or head=linear")
    return layers[0]


class HeadFit(pl.Callback):
    """At the start of a run, fit the head on frozen features (L-BFGS, L2 by cross-validation); then train as
    configured. With a frozen backbone the SGD epochs that follow only refine it (and validation, with the
    phase's best checkpoint, decides whether they did)."""

    def __init__(self, *, views: int, folds: int, grid: Sequence[float] = L2_GRID) -> None:
        self.views, self.folds, self.grid = int(views), int(folds), tuple(float(g) for g in grid)
        self.head_fit: dict[str, Any] | None = None  # what the fit found, for summary.json

    @torch.no_grad()
    def features(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[torch.Tensor, ...]:
        """Pooled features of the training photos: the eval view, then ``views`` augmented views of each."""
        net, backbone = pl_module.net, pl_module.backbone
        was_training = backbone.training
        backbone.eval()
        rows, labels, groups = [], [], []
        for view in range(self.views + 1):
            loader = trainer.datamodule.feature_loader(augmented=view > 0, seed=view)
            start = 0
            for images, targets in loader:
                images = images.to(pl_module.device)  # uint8: the net normalises (and sets the memory format)
                with trainer.precision_plugin.forward_context():
                    rows.append(net.features(images).float())
                labels.append(targets.to(pl_module.device))
                groups.append(np.arange(start, start + len(targets)))
                start += len(targets)
        backbone.train(was_training)
        return torch.cat(rows), torch.cat(labels), np.concatenate(groups)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path:  # resumed: the checkpoint has the head already
            return
        layer = linear_layer(pl_module.head)
        started = time.time()
        x, y, groups = self.features(trainer, pl_module)
        weight, bias, info = fit_head(x, y, groups, layer.out_features, self.grid, self.folds)
        weight = trainer.strategy.broadcast(weight)  # DDP: every rank ends with rank 0's head
        bias = trainer.strategy.broadcast(bias)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
            train_acc = (pl_module.head(x).argmax(1) == y).float().mean().item()
        self.head_fit = {"photos": len(np.unique(groups)), "views": self.views + 1, **info,
                         "train_acc": round(train_acc, 4), "seconds": round(time.time() - started, 1)}
        log.info("head fitted on frozen features: %d photos x %d views, l2=%g (cross-validated), train acc %.3f, "
                 "%.1f s", self.head_fit["photos"], self.views + 1, info["l2"], train_acc, self.head_fit["seconds"])

    def add_to_summary(self, summary: RunSummary) -> None:
        """summary.json's ``head_fit``: photos, views, the chosen L2, train accuracy, seconds (SummaryReporter)."""
        summary.head_fit = self.head_fit
