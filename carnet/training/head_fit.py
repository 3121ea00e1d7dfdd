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
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from carnet.errors import CarnetError
from carnet.models.network import eval_mode
from carnet.summary import RunSummary

log = logging.getLogger(__name__)
T = TypeVar("T")

# Down to 1e-6: with 1e-4 at the bottom, cross-validation chose the bottom in every head fit on the car-ad photos
# (50 and 365), and its log-loss kept falling below (lite0 features of 50 photos x 5 views: 0.254 at 1e-4, 0.242
# at 1e-6, flat below 1e-5, where the solver's iteration cap regularises). The walk starts at the strong end and
# stops once the loss rises, so a larger set whose minimum lies higher never reaches the costly weak end.
L2_GRID = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


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


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = 300,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS: minimises mean cross-entropy + l2/2 * ||W||^2 (bias
    not penalised). Returns (W of shape [features, classes], b). Double precision: L-BFGS's line search needs it.

    ``init``: a starting (W, b), e.g. the solution at a neighbouring L2 strength (a warm start: the optimum moves
    little between grid points, so the solver needs a fraction of the iterations it needs from zero)."""
    x, y = x.double(), y.long()
    weight, bias = _start_at(init, (x.shape[1], num_classes), x.device)

    def objective() -> torch.Tensor:
        return F.cross_entropy(x @ weight + bias, y) + 0.5 * l2 * (weight * weight).sum()

    return _minimise(objective, weight, bias, max_iter)


def _start_at(init: tuple[torch.Tensor, torch.Tensor] | None, shape: tuple[int, ...],
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The solver's (W, b) in double precision, requiring grad: zeros of ``shape`` (W's; b's lacks the features
    axis), or a copy of ``init``."""
    if init is None:
        return (torch.zeros(shape, dtype=torch.double, device=device, requires_grad=True),
                torch.zeros((*shape[:-2], shape[-1]), dtype=torch.double, device=device, requires_grad=True))
    weight, bias = (t.detach().to(device, torch.double).clone().requires_grad_(True) for t in init)
    return weight, bias


def _minimise(objective: Callable[[], torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
             max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch L-BFGS on ``objective`` over (W, b); returns them detached."""
    # tolerance_grad 1e-6 (was 1e-9): the objective then agrees to 1e-6, far below the 1e-4 at which the
    # cross-validated losses are compared, in half the function evaluations (measured on 600 x 1280 features).
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def fit_logistic_folds(x: torch.Tensor, y: torch.Tensor, fold: torch.Tensor, folds: int, num_classes: int,
                       l2: float, max_iter: int = 300, init: tuple[torch.Tensor, torch.Tensor] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fit_logistic` on every fold's training rows (``fold != k``) at once, as one L-BFGS run over the sum of
    the folds' objectives: they share no weights, so each fold's gradient is its own problem's and the optimum is
    each fold's own. Returns (W [folds, features, classes], b [folds, classes]).

    Why: on a GPU an L-BFGS iteration on a head-sized problem is a few tiny kernels and a host sync, so the solver's
    time is its iteration count; one run for the folds instead of one each divides it by about the number of folds
    (tf_efficientnet_b6's 2,304 features of 1,499 photos on an H200: 58.4 s of solver a fold at a time, 14.4 s
    together). Where the iteration cap stops the folds, they stop together, not each at its own cap."""
    x, y = x.double(), y.long()
    rows = torch.stack([fold != k for k in range(folds)]).double()  # [folds, rows]: 1 where the row trains fold k
    weight, bias = _start_at(init, (folds, x.shape[1], num_classes), x.device)
    targets = y.repeat(folds)

    def objective() -> torch.Tensor:
        logits = torch.einsum("nd,kdc->knc", x, weight) + bias[:, None]
        nll = F.cross_entropy(logits.reshape(-1, num_classes), targets, reduction="none").view(folds, -1)
        return ((nll * rows).sum(1) / rows.sum(1)).sum() + 0.5 * l2 * (weight * weight).sum()

    return _minimise(objective, weight, bias, max_iter)


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
              grid: Sequence[float] = L2_GRID, folds: int = 5, seed: int = 0,
              progress: Callable[[float, float, int, int], None] | None = None,
              together: bool | None = None) -> tuple[float, dict[float, float]]:
    """The L2 strength of ``grid`` with the lowest k-fold log-loss (ties: the stronger one), and each one's loss.

    The grid is walked from the strongest L2 down, each fold's fit warm-started from its fit at the previous
    strength, and the walk stops once the loss has risen at two grid points in a row past its minimum: the weakly
    regularised end is where L-BFGS needs the most iterations, and the cross-validated loss is U-shaped in L2.
    ``progress(l2, loss, done, total)`` is called after each grid point. ``together``: the folds in one solver run
    (:func:`fit_logistic_folds`); by default on a GPU, where that is faster, and one fold at a time on the CPU, where
    each fold's solver stops as soon as it converges (the run together stops with the slowest fold, and where the
    loss is flat in L2 the two may choose neighbouring points). On a CPU the search alone took 0.34-0.62 x the time
    together (benchmarks/head_fit_solver.py), but in the few-shot recipe it saved a few percent of the run and
    scored a test photo less on one seed of three (docs/fine-tuning.md), so the CPU keeps a run a fold."""
    labels = y.cpu().numpy()
    folds = int(min(folds, np.bincount(labels[np.unique(groups, return_index=True)[1]]).min()))
    if folds < 2:  # a class with a single photo: nothing to cross-validate on
        return float(np.median(grid)), {}
    fold = torch.as_tensor(photo_folds(groups, labels, folds, seed), device=x.device)
    together = x.device.type != "cpu" if together is None else together
    losses: dict[float, float] = {}
    starts: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * folds
    joint: tuple[torch.Tensor, torch.Tensor] | None = None
    ordered = sorted((float(g) for g in grid), reverse=True)
    rises = 0
    for i, l2 in enumerate(ordered):
        if together:
            joint = fit_logistic_folds(x, y, fold, folds, num_classes, l2, init=joint)
            starts = list(zip(*joint, strict=True))
        else:
            starts = [fit_logistic(x[fold != k], y[fold != k], num_classes, l2, init=starts[k]) for k in range(folds)]
        total = 0.0
        for k, (weight, bias) in enumerate(starts):
            held = fold == k
            total += F.cross_entropy(x[held].double() @ weight + bias, y[held], reduction="sum").item()
        losses[l2] = total / len(y)
        if progress is not None:
            progress(l2, losses[l2], i + 1, len(ordered))
        rises = rises + 1 if i and losses[l2] > min(losses.values()) + 1e-4 else 0
        if rises >= 2:
            break
    best = min(losses, key=lambda l2: (round(losses[l2], 4), -l2))
    return best, losses


def standardised(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, mean, std): features scaled to zero mean and unit spread per column, as the solver takes them (an L2
    strength then means the same whatever the backbone's feature scale); the small epsilon keeps a constant column
    finite."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    return (x - mean) / std, mean, std


def fit_head(x: torch.Tensor, y: torch.Tensor, groups: np.ndarray, num_classes: int,
             grid: Sequence[float] = L2_GRID, folds: int = 5,
             progress: Callable[[float, float, int, int], None] | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The linear head (weight [classes, features], bias) for raw features ``x``: features are standardised for
    the solver, L2 is cross-validated, and the standardisation is folded back into the layer."""
    z, mean, std = standardised(x)
    with single_thread(z.device):
        l2, losses = choose_l2(z, y, groups, num_classes, grid, folds, seed=0, progress=progress)
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


def plan_images(num_photos: int, views: int, max_images: int | None) -> tuple[int, int]:
    """(photos, views per photo, the eval view included) whose features the head is fitted on: every photo in the
    eval view and ``views`` augmented views, as long as that is at most ``max_images`` images; beyond, fewer
    augmented views, and beyond ``max_images`` photos a sample of that many in the eval view alone.

    Why a cap: computing features is a forward pass per image, as the head phase's own epoch is, so on 12,449 photos
    5 views would cost five times the phase's training. Many photos need no augmented views to fit 10 x 2,304
    weights, and the phase's SGD epoch refines the head on every photo afterwards."""
    per_photo = views + 1
    if max_images is None or num_photos * per_photo <= max_images:
        return num_photos, per_photo
    if num_photos <= max_images:
        return num_photos, max(1, max_images // num_photos)
    return max_images, 1


def passes_per_image(scales: Sequence[float]) -> float:
    """Forward passes at ``image_size`` one image costs at ``model.scales``: s² a scale (its area)."""
    return sum(s * s for s in scales)


def capped_images(max_images: int | None, scales: Sequence[float]) -> int | None:
    """The images ``max_images`` allows at ``model.scales``: an image at scale s costs s² forward passes at
    ``image_size`` (its area), so [1, 1.29] counts 2.7 a view. The cap is a budget of passes, so that the head fit
    stays the same share of its phase with several scales as with one."""
    if max_images is None:
        return None
    return max(1, int(max_images / passes_per_image(scales)))


def unlabelled_photos(max_images: int | None, spent: float, scales: Sequence[float]) -> int | None:
    """How many unlabelled photos the pseudo-labels may take: what the labelled images' forward passes (``spent``)
    left of ``max_images``, each photo two images (the eval view and mirrored) at every scale. None: no cap."""
    if max_images is None:
        return None
    return int((max_images - spent) / (2 * passes_per_image(scales)))


def sample_photos(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` row indices of ``labels``, stratified by class (each class in proportion, at least one), sorted."""
    rng = np.random.default_rng(seed)
    share = count / len(labels)
    chosen = []
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        chosen.append(rng.permutation(members)[:max(1, round(len(members) * share))])
    return np.sort(np.concatenate(chosen))


def batch_to_pad_to(batch_size: int, device: torch.device) -> int | None:
    """The batch size ``head_fit.pad_batches`` pads short batches to: the loaders' own where cuDNN searches for the
    fastest convolution algorithms (cudnn.benchmark, on for GPU runs), else None (no padding: it would only add
    work)."""
    return int(batch_size) if device.type == "cuda" and torch.backends.cudnn.benchmark else None


def padded(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, size: int | None) -> torch.Tensor:
    """``forward(images)``, computed on the batch padded to ``size`` images (copies of its last) and cut back.

    Why: with cudnn.benchmark every new input shape starts a search over each convolution's algorithms (for an
    EfficientNet, hundreds of layer shapes), and a loader's last batch is short: padded, the head fit's forward
    passes keep the one shape the phase's training steps use (their algorithms found once), at the price of fewer
    than a batch of extra images. The backbone is in eval mode, so the padding rows do not touch the others."""
    count = len(images)
    if size is None or count >= size:
        return forward(images)
    return forward(torch.cat([images, images[-1:].expand(size - count, *images.shape[1:])]))[:count]


def pooled(trainer: pl.Trainer, net: nn.Module, images: torch.Tensor, scale: float, pad_to: int | None) -> torch.Tensor:
    """The head fit's features of a batch: ``net.features`` at ``scale`` in the run's precision, on the batch padded
    to ``pad_to`` (:func:`padded`), as float32."""
    with trainer.precision_plugin.forward_context():
        return padded(partial(net.features, scale=scale), images, pad_to).float()


class Progress:
    """Log lines while the head fit works (it used to be silent for up to a quarter of an hour): one a view, and
    within a view at most one every ``every`` seconds. It also splits the features' time into waiting for the
    loader (its workers' start included) and the forward passes (the first apart: on a GPU it includes cuDNN's
    algorithm search), since on an H200 1,499 images took 24 s where the network alone needs under 2."""

    def __init__(self, every: float = 30.0) -> None:
        self.every, self.started, self.last = every, time.time(), time.time()
        self.loader_seconds = self.forward_seconds = 0.0
        self.first_forward_seconds: float | None = None

    def elapsed(self) -> float:
        return time.time() - self.started

    def batches(self, loader: Iterable[T]) -> Iterator[T]:
        """``loader``'s batches, the time spent waiting for each (and for the workers to start) counted."""
        start = time.perf_counter()
        for batch in loader:
            self.loader_seconds += time.perf_counter() - start
            yield batch
            start = time.perf_counter()

    @contextmanager
    def forward(self, device: torch.device) -> Iterator[None]:
        """Count the time of this block (a batch's move to the device and its forward passes), waiting for the GPU
        to finish them."""
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        self.forward_seconds += seconds
        if self.first_forward_seconds is None:
            self.first_forward_seconds = seconds

    def timing(self) -> dict[str, float | None]:
        """summary.json's split of the features' seconds."""
        first = self.first_forward_seconds
        return {"loader_seconds": round(self.loader_seconds, 2), "forward_seconds": round(self.forward_seconds, 2),
                "first_forward_seconds": None if first is None else round(first, 2)}

    def batch(self, view: int, views: int, done: int, total: int) -> None:
        if time.time() - self.last >= self.every:
            self.last = time.time()
            log.info("head fit: features of view %d/%d: %d/%d photos, %.0f s", view + 1, views, done, total,
                     self.elapsed())

    def view(self, view: int, views: int, total: int) -> None:
        self.last = time.time()
        log.info("head fit: features of view %d/%d (%s): %d photos, %.0f s", view + 1, views,
                 "eval view" if view == 0 else "augmented", total, self.elapsed())

    def grid(self, l2: float, loss: float, done: int, total: int) -> None:
        log.info("head fit: L2 %g: cross-validated log-loss %.4f (%d/%d of the grid), %.0f s", l2, loss, done, total,
                 self.elapsed())


# Pseudo-labelling rounds: each refits the head on the labelled rows plus the unlabelled photos the previous fit is
# sure of. Two, as measured (docs/fine-tuning.md); the second lets the first refit's surer head admit more photos.
PSEUDO_ROUNDS = 2


def sure_photos(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(photo indices, their most likely class) of the rows of ``probs`` whose top probability exceeds
    ``threshold``: the unlabelled photos a head is sure enough of to learn from."""
    confidence, label = probs.max(1)
    sure = torch.nonzero(confidence > threshold).flatten()
    return sure, label[sure]


def self_train(x: torch.Tensor, y: torch.Tensor, groups: np.ndarray, unlabelled: torch.Tensor, num_classes: int,
               threshold: float, grid: Sequence[float] = L2_GRID, folds: int = 5,
               progress: Callable[[float, float, int, int], None] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """:func:`fit_head` on the labelled rows, then :data:`PSEUDO_ROUNDS` times again with the unlabelled photos the
    last head was sure of (:func:`sure_photos`), labelled by it (self-training, Lee 2013's pseudo-labels on frozen
    features). ``unlabelled``: [views, photos, features]; a photo's probability is the mean over its views, and
    all its views join the rows, in one cross-validation fold (a group of their own)."""
    weight, bias, info = fit_head(x, y, groups, num_classes, grid, folds, progress)
    views, photos = unlabelled.shape[:2]
    flat = unlabelled.reshape(views * photos, -1)
    sure = torch.zeros(0, dtype=torch.long)
    for _ in range(PSEUDO_ROUNDS):
        probs = (flat @ weight.t() + bias).softmax(1).view(views, photos, -1).mean(0)
        sure, labels = sure_photos(probs, threshold)
        if not len(sure):
            break
        rows = unlabelled[:, sure].reshape(views * len(sure), -1)
        extra = np.tile(np.arange(len(sure)), views) + int(groups.max()) + 1
        weight, bias, info = fit_head(torch.cat([x, rows]), torch.cat([y, labels.to(y.device).repeat(views)]),
                                      np.concatenate([groups, extra]), num_classes, grid, folds, progress)
    return weight, bias, {**info, "pseudo_labelled": len(sure), "unlabelled": photos}


class HeadFit(pl.Callback):
    """At the start of a run, fit the head on frozen features (L-BFGS, L2 by cross-validation); then train as
    configured. With a frozen backbone the SGD epochs that follow only refine it (and validation, with the
    phase's best checkpoint, decides whether they did).

    ``max_images`` caps the images whose features are computed, counted in forward passes at ``image_size``
    (:func:`plan_images`, :func:`capped_images`); progress is logged. With ``pseudo_label`` (a probability), the
    head also learns from the unlabelled test photos it is that sure of (:func:`self_train`), within what the
    labelled photos leave of ``max_images`` (each photo two passes: the eval view and mirrored)."""

    def __init__(self, *, views: int, folds: int, max_images: int | None, seed: int,
                 pseudo_label: float | None, pad_batches: bool = False, grid: Sequence[float] = L2_GRID) -> None:
        self.views, self.folds, self.grid = int(views), int(folds), tuple(float(g) for g in grid)
        self.max_images = int(max_images) if max_images else None
        self.pseudo_label = None if pseudo_label is None else float(pseudo_label)
        self.seed = int(seed)
        self.pad_batches = bool(pad_batches)
        self.head_fit: dict[str, Any] | None = None  # what the fit found, for summary.json

    def pad_to(self, batch_size: int, device: torch.device) -> int | None:
        """The size short batches are padded to (:func:`padded`): None unless ``pad_batches`` asks for it."""
        return batch_to_pad_to(batch_size, device) if self.pad_batches else None

    @torch.no_grad()
    def features(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 progress: Progress | None = None) -> tuple[torch.Tensor, ...]:
        """Pooled features of the training photos (or of a sample, :func:`plan_images`): the eval view, then the
        augmented views of each, each at every scale of ``model.scales``."""
        progress = progress or Progress()
        datamodule = trainer.datamodule
        labels_all = datamodule.split.label[datamodule.split.split == "train"].to_numpy()
        net, backbone = pl_module.net, pl_module.backbone
        photos, per_photo = plan_images(len(labels_all), self.views, capped_images(self.max_images, net.scales))
        subset = sample_photos(labels_all, photos, self.seed) if photos < len(labels_all) else None
        pad_to = self.pad_to(datamodule.batch_size, pl_module.device)
        with eval_mode(backbone):
            rows, labels, groups = [], [], []
            for view in range(per_photo):
                loader = datamodule.feature_loader(augmented=view > 0, seed=view, photos=subset)
                start = 0
                for images, targets in progress.batches(loader):
                    with progress.forward(pl_module.device):
                        images = images.to(pl_module.device)  # uint8: the net normalises (and sets the memory format)
                        for scale in net.scales:  # one row per scale the network predicts at (model.scales)
                            rows.append(pooled(trainer, net, images, scale, pad_to))
                            labels.append(targets.to(pl_module.device))
                            groups.append(np.arange(start, start + len(targets)))
                    start += len(targets)
                    progress.batch(view, per_photo, start, photos)
                progress.view(view, per_photo, photos)
        return torch.cat(rows), torch.cat(labels), np.concatenate(groups)

    @torch.no_grad()
    def unlabelled_features(self, trainer: pl.Trainer, pl_module: pl.LightningModule, progress: Progress,
                            spent: float) -> torch.Tensor | None:
        """Pooled features of the unlabelled test photos as [views, photos, features], the views being the eval
        view and its mirror at every scale: a seeded sample within the forward passes the labelled photos
        (``spent``) left of ``max_images``. None when the data has no test photos or the budget none left.

        Why labelled photos first: they are what the head fit measured on; where they fill the budget (on 365
        photos nearly, at the competition's scale a sample of them does) the head needs no pseudo-labels."""
        datamodule = trainer.datamodule
        try:
            frame = datamodule.test_frame()
        except CarnetError as error:
            log.info("head fit: no unlabelled photos to pseudo-label (%s)", error)
            return None
        net, backbone = pl_module.net, pl_module.backbone
        photos = len(frame)
        budget = unlabelled_photos(self.max_images, spent, net.scales)
        if budget is not None:
            photos = min(photos, budget)
        if photos < 1:
            log.info("head fit: no unlabelled photos to pseudo-label: the labelled photos took head_fit.max_images")
            return None
        subset = None if photos == len(frame) else np.sort(
            np.random.default_rng(self.seed).choice(len(frame), photos, replace=False))
        pad_to = self.pad_to(datamodule.batch_size, pl_module.device)
        with eval_mode(backbone):
            views: list[list[torch.Tensor]] = [[] for _ in range(2 * len(net.scales))]
            done = 0
            for images, _ in progress.batches(datamodule.unlabelled_loader(subset)):
                with progress.forward(pl_module.device):
                    images = images.to(pl_module.device)
                    for i, (scale, mirrored) in enumerate((s, m) for s in net.scales for m in (False, True)):
                        views[i].append(pooled(trainer, net, images.flip(-1) if mirrored else images, scale, pad_to))
                done += len(images)
                progress.batch(0, 1, done, photos)
        log.info("head fit: features of %d unlabelled photos (eval view and mirrored), %.0f s", photos,
                 progress.elapsed())
        return torch.stack([torch.cat(v) for v in views])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path:  # resumed: the checkpoint has the head already
            return
        layer = linear_layer(pl_module.head)
        progress = Progress()
        x, y, groups = self.features(trainer, pl_module, progress)
        spent = len(y) / len(pl_module.net.scales) * passes_per_image(pl_module.net.scales)  # forward passes
        unlabelled = (None if self.pseudo_label is None
                      else self.unlabelled_features(trainer, pl_module, progress, spent))
        features_seconds = progress.elapsed()
        if unlabelled is None:
            weight, bias, info = fit_head(x, y, groups, layer.out_features, self.grid, self.folds, progress.grid)
        else:
            weight, bias, info = self_train(x, y, groups, unlabelled, layer.out_features, self.pseudo_label,
                                            self.grid, self.folds, progress.grid)
        weight = trainer.strategy.broadcast(weight)  # DDP: every rank ends with rank 0's head
        bias = trainer.strategy.broadcast(bias)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
            train_acc = (pl_module.head(x).argmax(1) == y).float().mean().item()
        photos = len(np.unique(groups))
        scales = len(pl_module.net.scales)
        self.head_fit = {"photos": photos, "views": len(y) // max(1, photos * scales), "scales": scales,
                         "images": len(y), **info, "train_acc": round(train_acc, 4),
                         "features_seconds": round(features_seconds, 1), **progress.timing(),
                         "solver_seconds": round(progress.elapsed() - features_seconds, 1),
                         "seconds": round(progress.elapsed(), 1)}
        log.info("head fitted on frozen features: %d photos x %d views%s, l2=%g (cross-validated), train acc %.3f, "
                 "%.1f s (features %.1f s: loader %.1f s, forward %.1f s; solver %.1f s)", photos,
                 self.head_fit["views"], f" + {info['pseudo_labelled']} of {info['unlabelled']} unlabelled photos it "
                 "was sure of" if "unlabelled" in info else "", info["l2"], train_acc, progress.elapsed(),
                 features_seconds, progress.loader_seconds, progress.forward_seconds,
                 progress.elapsed() - features_seconds)

    def add_to_summary(self, summary: RunSummary) -> None:
        """summary.json's ``head_fit``: photos, views, images, the chosen L2, train accuracy, seconds (features and
        solver apart, the features' loader wait and forward passes apart) (SummaryReporter)."""
        summary.head_fit = self.head_fit
