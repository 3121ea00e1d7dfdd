"""How much does predict's pipeline cost over the bare network, and what does TTA cost per view?

    python benchmarks/predict.py [--data DIR] [--model tf_efficientnet_lite0] [--image-size 224] [--batch-size 32]

Prints, from one run (interleaved repeats, medians):
  * plain predict images/s (``carnet.inference.predict.predict``: checkpoint load, decoding in loader workers, forward,
    files written) over the raw batched forward pass of the same model and batch size on the same images,
    already decoded and transformed in memory (goal >= 0.85);
  * TTA with n views over n x plain predict time (goal <= 1.1).

Without ``--data`` a synthetic dataset is written with ``carnet.tools.demo``. The model gets random weights (speed
does not depend on them), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from omegaconf import OmegaConf

from carnet.data.decode import decode_image
from carnet.data.layout import read_test
from carnet.inference.predict import predict
from tests.helpers.recipe import classifier
from tests.helpers.reference import eval_transform

CLASS_NAMES = [f"class {k}" for k in range(10)]


def make_checkpoint(path: Path, model: str, image_size: int) -> dict:
    """A carnet checkpoint of ``model`` with random weights (what read_checkpoint/load_checkpoint need)."""
    module = classifier(model_name=model, class_names=CLASS_NAMES, image_size=image_size)
    meta = module.inference_meta()
    torch.save({"state_dict": module.state_dict(), "carnet": meta}, path)
    return meta


def predict_cfg(ckpt: Path, root: Path, out: Path, args: argparse.Namespace, views: int) -> OmegaConf:
    all_views = {"identity": {}, "hflip": {"hflip": True}, "zoom115": {"zoom": 1.15},
                 "zoom115_hflip": {"zoom": 1.15, "hflip": True}, "crop_tl": {"crop": "tl"}, "crop_br": {"crop": "br"}}
    tta = {"enabled": views > 1, "auto": False, "merge": "mean", "beta": None,
           "views": dict(list(all_views.items())[:views])}
    return OmegaConf.create({
        "ckpt": str(ckpt), "weights": None, "split": "test", "out": str(out), "report_dir": None, "run_dir": None,
        "data": {"root": str(root), "batch_size": args.batch_size, "num_workers": args.num_workers, "draft": True},
        "device": "auto", "channels_last": args.channels_last, "amp": "auto", "tta": tta,
        "pseudo_label": {"threshold": None, "name": None, "dir": str(out.parent / "pseudo")},
    })


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and its reaped children (finished loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def preload(meta: dict, root: Path) -> torch.Tensor:
    """Every test image decoded and transformed as predict's loader does (uint8 pixels), stacked in memory."""
    transform = eval_transform(meta)
    return torch.stack([transform(image=decode_image(root / p))["image"] for p in read_test(root).path])


def raw_forward(ckpt: Path, images: torch.Tensor, batch_size: int, channels_last: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of the bare batched forward + softmax over pre-transformed images."""
    from carnet.models.checkpoint import load_checkpoint

    net, _ = load_checkpoint(ckpt)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = net.to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device, enabled=device == "cuda"):
        cpu, start = cpu_seconds(), time.perf_counter()
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size].to(device)  # uint8 pixels: the net normalises (and goes channels_last)
            net(batch).float().softmax(-1).cpu()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="dataset in the Kaggle layout (default: a fresh demo set)")
    parser.add_argument("--test", type=int, default=200, help="test images of the demo set (without --data)")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", default="auto")
    parser.add_argument("--views", type=int, nargs="+", default=[2, 4], help="TTA view counts to time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="carnet_bench_predict_"))
    root = args.data
    if root is None:
        from carnet.tools.demo import make_dataset

        root = make_dataset(work / "demo", per_class=1, test=args.test, seed=0)
    ckpt = work / "model.ckpt"
    meta = make_checkpoint(ckpt, args.model, args.image_size)
    n = len(read_test(root))
    print(f"{args.model} @ {args.image_size}px, batch {args.batch_size}, {n} test images from {root}, "
          f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, channels_last={args.channels_last}")

    def timed_predict(views: int) -> tuple[float, float]:
        cpu, start = cpu_seconds(), time.perf_counter()
        predict(predict_cfg(ckpt, root, work / f"sub_{views}" / "submission.csv", args, views))
        return time.perf_counter() - start, cpu_seconds() - cpu

    images = preload(meta, root)
    timed_predict(1)  # warm-up: first-call kernel selection, page cache
    raw_forward(ckpt, images, args.batch_size, args.channels_last)
    runs: dict[str, list[tuple[float, float]]] = {"raw": [], "plain": [], **{f"tta{v}": [] for v in args.views}}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits every variant alike
        runs["raw"].append(raw_forward(ckpt, images, args.batch_size, args.channels_last))
        runs["plain"].append(timed_predict(1))
        for views in args.views:
            runs[f"tta{views}"].append(timed_predict(views))
    # On a shared machine the fastest run is the one least disturbed by other processes: ratios use the
    # minimum wall time; CPU seconds (all threads and loader workers) are a cross-check that load cannot skew.
    wall = {k: min(w for w, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    for key in runs:
        walls = [round(w, 2) for w, _ in runs[key]]
        print(f"{key:6s}: {n / wall[key]:7.1f} images/s  (best {wall[key]:.2f} s of {walls}; CPU {cpu[key]:.2f} s)")
    print(f"plain predict / raw forward images/s: {wall['raw'] / wall['plain']:.3f} wall, "
          f"{cpu['raw'] / cpu['plain']:.3f} CPU   (goal >= 0.85)")
    for views in args.views:
        key = f"tta{views}"
        print(f"TTA {views} views / ({views} x plain): {wall[key] / (views * wall['plain']):.3f} wall, "
              f"{cpu[key] / (views * cpu['plain']):.3f} CPU   (goal <= 1.1)")

if __name__ == "__main__":
    main()
