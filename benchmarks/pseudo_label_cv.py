"""Choose head-fit options (``head_fit.pseudo_label``, views, scales) on labelled photos, never on the test labels.

    python benchmarks/pseudo_label_cv.py --data DIR --weights FILE [--thresholds off 0.8 0.9 0.95 0.98 0.99]
        [--scales 1 [1.29 ...]] [--views 14] [--seeds 0 1 2] [--folds 5] [--val ROOT]
        [--out outputs/pseudo_label_cv.md]

DIR and FILE as for ``benchmarks/accuracy.py``. The head fit alone, as carnet's head phase does it
(``carnet.training.head_fit.fit_head`` and ``self_train``), on frozen features computed once: each training photo in
the evaluation view and ``--views`` augmented views (carnet's ``light`` augmentation, drawn with the seed), each
test photo in the evaluation view and mirrored, at every scale of ``--scales`` (the image upsampled inside the
network, as ``model.scales`` does). For each seed and each of ``--folds`` stratified folds of the training photos,
the head is fitted on the other folds' photos, pseudo-labels come from the test photos plus the held-out fold's
photos (unlabelled to it), and the held-out photos are predicted: the CV accuracy of a threshold is over every
training photo and seed (``--folds 0``: no CV). ``--val ROOT`` scores the head fitted on all training photos on the
labelled photos of ``ROOT/train/<k>/`` that are not training photos of DIR (by file name): e.g. the 315 photos of
``adsdev`` that ``adsdev_fewshot`` does not train on, a validation set for few-shot choices. The test accuracy of
that head (the test photos unlabelled) is printed beside it, for reporting only. Features take about 2 minutes on a
2-core CPU for 50 + 123 photos at one scale and 4 views, each threshold about 70 s a seed with CV.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accuracy import (  # noqa: E402
    AugmentedView,
    EvalView,
    Photos,
    class_names_of,
    data_config_of,
    load_backbone,
    loader,
    predict_views,
    scan_train,
    test_labels,
)
from torch import nn  # noqa: E402

from carnet.training.head_fit import fit_head, photo_folds, self_train  # noqa: E402


class Upsampled(nn.Module):
    """The backbone on its input upsampled ``scale`` times (bicubic), as ``CarNet.features`` does."""

    def __init__(self, backbone: nn.Module, scale: float) -> None:
        super().__init__()
        self.backbone, self.scale = backbone, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            x = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return self.backbone(x)


def validation_photos(root: Path, train: pd.DataFrame, num_classes: int) -> pd.DataFrame:
    """The labelled photos of ``root`` (``train/<k>/``) whose file names are not among ``train``'s, with ``path``
    relative to ``root``: photos the head never trained on."""
    photos = scan_train(root, num_classes)
    kept = photos[~photos.path.map(lambda p: Path(p).name).isin({Path(p).name for p in train.path})]
    if kept.empty:
        raise SystemExit(f"--val {root}: every photo of {root / 'train'} is a training photo of the data; "
                         f"expected labelled photos the head does not train on")
    return kept


def features(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Training photos: [seed, view, scale, photo, feature] (view 0 the eval view) and their eval view mirrored
    [scale, photo, feature]; test photos: [eval/mirrored, scale, photo, feature]; validation photos (``--val``):
    [scale, photo, feature]; labels."""
    names = class_names_of(args.data)
    train, test = scan_train(args.data, len(names)), test_labels(args.data)
    train_paths, train_y = [args.data / p for p in train.path], train.label.tolist()
    test_paths, test_y = [args.data / p for p in test.path], test.Category.tolist()
    backbone = load_backbone(args.model, args.weights).eval()
    config = data_config_of(backbone, args.image_size)
    device = torch.device("cpu")
    nets = [Upsampled(backbone, s) for s in args.scales]
    evaluated = [predict_views(net, loader(Photos(test_paths, test_y, EvalView(config, args.image_size)), args),
                               device) for net in nets]
    test_x = torch.stack([torch.stack([plain for plain, _ in evaluated]), torch.stack([m for _, m in evaluated])])
    # The eval view draws nothing random: computed once (with its mirror), it is view 0 of every seed.
    train_eval = [predict_views(net, loader(Photos(train_paths, train_y, EvalView(config, args.image_size)), args),
                                device) for net in nets]
    plain, mirrored = torch.stack([p for p, _ in train_eval]), torch.stack([m for _, m in train_eval])
    per_seed = []
    for seed in args.seeds:
        views = [AugmentedView(config, args.image_size, "light", seed * 1000 + v) for v in range(args.views)]
        per_seed.append(torch.stack([plain] + [torch.stack([
            predict_views(net, loader(Photos(train_paths, train_y, view), args, seed=seed + 1 + i), device,
                          flip=False)[0] for net in nets]) for i, view in enumerate(views)]))
        print(f"features: seed {seed} done", flush=True)
    data = {"train": torch.stack(per_seed), "train_mirrored": mirrored, "test": test_x,
            "train_y": torch.tensor(train_y), "test_y": torch.tensor(test_y)}
    if args.val is not None:
        val = validation_photos(args.val, train, len(names))
        view = Photos([args.val / p for p in val.path], val.label.tolist(), EvalView(config, args.image_size))
        data["val"] = torch.stack([predict_views(net, loader(view, args), device, flip=False)[0] for net in nets])
        data["val_y"] = torch.tensor(val.label.tolist())
    return data


def head(train: torch.Tensor, y: torch.Tensor, unlabelled: torch.Tensor, threshold: float | None,
         num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The head fit on ``train`` [view, scale, photo, feature] with labels ``y``, pseudo-labelling ``unlabelled``
    [view, scale, photo, feature] above ``threshold`` (None: off)."""
    views, scales, photos, dim = train.shape
    x = train.reshape(-1, dim)
    rows_y = y.repeat(views * scales)
    groups = np.tile(np.arange(photos), views * scales)
    if threshold is None:
        weight, bias, _ = fit_head(x, rows_y, groups, num_classes)
    else:
        weight, bias, _ = self_train(x, rows_y, groups, unlabelled.reshape(-1, unlabelled.shape[2], dim),
                                     num_classes, threshold)
    return weight, bias


def predict(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Class of each photo of ``x`` [scale, photo, feature]: probabilities averaged over scales, as carnet's
    network does."""
    return (x @ weight.t() + bias).softmax(-1).mean(0).argmax(-1)


def cells(scores: list[float]) -> str:
    """Two table cells: the mean over seeds and each seed's score (dashes where nothing was scored)."""
    if not scores:
        return "— | —"
    return f"{np.mean(scores):.3f} | {' / '.join(f'{s:.3f}' for s in scores)}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0])
    ap.add_argument("--thresholds", nargs="+", default=["off", "0.8", "0.9", "0.95", "0.98", "0.99"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--views", type=int, default=4, help="augmented views of each training photo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val", type=Path, default=None,
                    help="a data root whose labelled photos that DIR does not train on score each setting")
    ap.add_argument("--out", type=Path, default=Path("outputs/pseudo_label_cv.md"))
    args = ap.parse_args(argv)
    args.batch_size, args.workers = 32, min(2, args.threads)
    torch.set_num_threads(args.threads)
    data = features(args)
    torch.set_num_threads(1)  # the solver's matrices are small (carnet.training.head_fit.single_thread)
    y, test_y = data["train_y"], data["test_y"]
    num_classes = int(y.max()) + 1
    title = f"# The head fit on {args.data}: {args.folds}-fold CV"
    lines = [title + (f", validation on {args.val}" if args.val else ""), "",
             f"{args.model} at {args.image_size} px, scales {args.scales}, seeds {args.seeds}, "
             f"{len(y)} training photos x (1 + {args.views}) views, {len(test_y)} test photos unlabelled"
             + (f", {len(data['val_y'])} validation photos of {args.val}." if "val" in data else "."), "",
             "| threshold | CV acc | CV acc by seed | val acc | val acc by seed | test acc (report only) "
             "| test acc by seed | s |",
             "|---|---|---|---|---|---|---|---|"]
    for name in args.thresholds:
        threshold = None if name == "off" else float(name)
        started, cv, val, test = time.perf_counter(), [], [], []
        for i, seed in enumerate(args.seeds):
            train = data["train"][i]
            fold = photo_folds(np.arange(len(y)), y.numpy(), args.folds, 100 + seed) if args.folds else None
            correct = 0
            for k in range(args.folds):
                fit, held = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
                held_views = torch.stack([train[0][:, held], data["train_mirrored"][:, held]])
                pool = torch.cat([data["test"], held_views], dim=2)  # the held-out photos are unlabelled to it
                weight, bias = head(train[:, :, fit], y[fit], pool, threshold, num_classes)
                correct += int((predict(weight, bias, train[0][:, held]) == y[held]).sum())
            if args.folds:
                cv.append(correct / len(y))
            weight, bias = head(train, y, data["test"], threshold, num_classes)
            if "val" in data:
                val.append(float((predict(weight, bias, data["val"]) == data["val_y"]).float().mean()))
            test.append(float((predict(weight, bias, data["test"][0]) == test_y).float().mean()))
        row = (f"| {name} | {cells(cv)} | {cells(val)} | {cells(test)} | {time.perf_counter() - started:.0f} |")
        lines.append(row)
        print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\n{args.out}")


if __name__ == "__main__":
    main()
