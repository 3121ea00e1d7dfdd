"""The head fit's search for its L2 strength, its cross-validation folds solved one L-BFGS run at a time or all in
one run (``carnet.training.head_fit.choose_l2``'s ``together``), on real frozen features: the L2 each chooses
(the head fitted afterwards depends on nothing else) and its seconds, side by side in one process.

    python benchmarks/head_fit_solver.py --data DIR --weights FILE [--model tf_efficientnet_lite0]
        [--image-size 224] [--views 5] [--photos 50 150 0] [--threads 1] [--workers 2]

DIR and FILE as for ``benchmarks/accuracy.py``. Features of every training photo of DIR in the evaluation view and
``--views`` augmented views (carnet's ``light`` augmentation, as the head fit draws them) are computed once; then
for each ``--photos`` count (0: all), a class-stratified sample of that many photos with all their views is
standardised as ``fit_head`` does and searched both ways, on ``--threads`` intra-op threads (the head fit uses one
on a CPU). Exit code 1 when the two choose different L2 strengths for any sample.
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
import torch  # noqa: E402
from accuracy import (  # noqa: E402
    AugmentedView,
    EvalView,
    class_names_of,
    data_config_of,
    load_backbone,
    markdown,
    view_features,
)

from carnet.data.layout import scan_train  # noqa: E402
from carnet.training.head_fit import choose_l2, sample_photos, standardised  # noqa: E402


def features(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """[view, photo, feature] of the training photos (view 0 the evaluation view) and their labels."""
    train = scan_train(args.data, len(class_names_of(args.data)))
    paths, labels = [args.data / p for p in train.path], train.label.tolist()
    backbone = load_backbone(args.model, args.weights).eval()
    config = data_config_of(backbone, args.image_size)
    views = [EvalView(config, args.image_size)] + [
        AugmentedView(config, args.image_size, "light", seed) for seed in range(args.views)]
    return view_features(backbone, paths, labels, views, args, torch.device("cpu")), torch.tensor(labels)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--views", type=int, default=5, help="augmented views of each training photo")
    ap.add_argument("--photos", type=int, nargs="+", default=[50, 150, 0], help="photos a sample (0: all)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of the solver")
    ap.add_argument("--workers", type=int, default=2, help="loader workers for the features")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)

    start = time.perf_counter()
    x, y = features(args)
    views, photos, dim = x.shape
    print(f"features: {photos} photos x {views} views x {dim}, {time.perf_counter() - start:.0f} s", flush=True)
    torch.set_num_threads(args.threads)
    rows, agree = [], True
    for count in args.photos:
        chosen = np.arange(photos) if count in (0, photos) else sample_photos(y.numpy(), min(count, photos), 0)
        sample, _, _ = standardised(x[:, chosen].reshape(-1, dim))  # as fit_head does
        labels, groups = y[chosen].repeat(views), np.tile(np.arange(len(chosen)), views)
        found = {}
        for together in (False, True):
            begin = time.perf_counter()
            l2, losses = choose_l2(sample, labels, groups, int(y.max()) + 1, together=together)
            found[together] = (l2, len(losses), time.perf_counter() - begin)
        agree &= found[False][0] == found[True][0]
        (l2_apart, points, apart), (l2_together, points_together, together_s) = found[False], found[True]
        rows.append([str(len(chosen)), f"{len(sample):,} x {dim}", f"{points}, {points_together}", f"{l2_apart:g}",
                     f"{l2_together:g}", f"{apart:.1f}", f"{together_s:.1f}", f"{together_s / max(apart, 1e-9):.2f}"])
        print(rows[-1], flush=True)
    print(f"\n{args.model} features of {args.data.name}, {args.threads} solver thread(s):\n")
    print(markdown(["photos", "rows x features", "grid points walked", "L2, a fold at a time", "L2, folds together",
                    "s, a fold at a time", "s, folds together", "together / apart"], rows))
    if not agree:
        print("the two searches chose different L2 strengths")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
