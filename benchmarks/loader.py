"""Training-loader throughput: carnet's DataModule vs a plain torchvision ImageFolder + transforms.v2 loader.

    python benchmarks/loader.py [--data DIR] [--sizes 224 448] [--workers N] [--batch-size 32] [--repeats 3]

DIR is a dataset in the Kaggle layout (``train/<k>/*.jpg``); without it a synthetic one is written to a temporary
folder by ``carnet.tools.demo`` (640x480 JPEGs, like the competition's photos). Both loaders read exactly the same
files with the same workers and batch size and run the same augmentation (``augment=light``: random resized
crop of 50-100 % of the frame, mirror, brightness/contrast), so the ratio measures the pipelines alone. The
ceiling is a loader that only decodes the same JPEGs at full size. Every figure is images/s of one epoch after a
warm-up epoch; contenders are interleaved and the median of ``--repeats`` rounds is reported, because this
machine's cores are shared and absolute numbers drift. The goal: carnet >= 1.3x the baseline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset, default_collate  # noqa: E402
from torchvision import datasets  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from carnet.data.datamodule import CarDataModule  # noqa: E402
from carnet.data.decode import decode_image  # noqa: E402
from carnet.runtime import default_num_workers  # noqa: E402
from tests.helpers.config import compose_cfg  # noqa: E402
from tests.helpers.recipe import data_module  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def light_augment(image_size: int) -> list:
    """The `augment=light` list of conf/, resolved at this image size."""
    cfg = compose_cfg(["augment=light", f"image_size={image_size}"])
    return OmegaConf.to_container(cfg.augment.train, resolve=True)


def baseline_transform(image_size: int) -> v2.Compose:
    """The same augmentation written the plain torchvision way: transforms.v2 on the PIL image ImageFolder gives."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), ratio=(0.75, 1.3333), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(brightness=0.15, contrast=0.15)], p=0.5),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


class DecodeOnly(Dataset):
    """Full-size JPEG decoding of the same files and nothing else: the rate no loader of them can beat."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> int:
        return int(decode_image(self.paths[index]).shape[0])


def epoch_rate(loader: DataLoader) -> float:
    """Images per second of one pass over ``loader``."""
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch[0]) if isinstance(batch, list | tuple) else len(batch)
    return n / (time.perf_counter() - start)


def make_loader(dataset: Dataset, batch_size: int, workers: int, shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      persistent_workers=workers > 0, drop_last=shuffle)


def stage_split(module: CarDataModule, batch_size: int, limit: int) -> dict[str, float]:
    """ms per image of carnet's decode, augment and collate, timed one after another in this process.

    With one torch thread, as in a loader worker (collating 32 images with two threads on freshly
    allocated memory is many times slower on this sandboxed machine, and workers never do that).
    """
    dataset = module.train_dataloader().dataset
    n = min(limit, len(dataset))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    images = [dataset.load(i) for i in range(n)]
    t1 = time.perf_counter()
    samples = [(dataset.transform(image=img)["image"], dataset.labels[i]) for i, img in enumerate(images)]
    t2 = time.perf_counter()
    for i in range(0, n, batch_size):
        default_collate(samples[i:i + batch_size])
    t3 = time.perf_counter()
    torch.set_num_threads(threads)
    return {"decode": (t1 - t0) / n * 1e3, "augment": (t2 - t1) / n * 1e3, "collate": (t3 - t2) / n * 1e3}


def baseline_stage_split(folder: datasets.ImageFolder, limit: int) -> dict[str, float]:
    """ms per image of the baseline's PIL loading and transforms.v2, one after another, one thread (as above)."""
    n = min(limit, len(folder))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    images = [folder.loader(folder.samples[i][0]) for i in range(n)]
    for img in images:
        img.load()
    t1 = time.perf_counter()
    for img in images:
        folder.transform(img)
    t2 = time.perf_counter()
    torch.set_num_threads(threads)
    return {"decode": (t1 - t0) / n * 1e3, "augment": (t2 - t1) / n * 1e3}


def bench_size(root: Path, size: int, workers: int, batch_size: int, repeats: int, stage_images: int) -> dict:
    """All figures at one image size."""
    class_names = sorted((p.name for p in (root / "train").iterdir() if p.is_dir()), key=int)
    common = dict(root=root, class_names=class_names, image_size=size, batch_size=batch_size,
                  num_workers=workers, verify=False, val_fraction=0.05, augment=light_augment(size))
    module = data_module(**common)  # conf/'s data recipe with these changes
    module.setup("fit")
    train_rows = module.split[module.split.split == "train"]
    wanted = {str((root / p).resolve()) for p in train_rows.path}

    folder = datasets.ImageFolder(str(root / "train"), transform=baseline_transform(size))
    folder.samples = [s for s in folder.samples if str(Path(s[0]).resolve()) in wanted]
    folder.imgs = folder.samples
    assert len(folder) == len(train_rows), "baseline and carnet must read the same files"

    cached = data_module(**common, cache="memory")
    cached.split = module.split
    t0 = time.perf_counter()
    cached_loader = cached.train_dataloader()  # decodes every image once into memory, before workers fork
    warm_s = time.perf_counter() - t0

    contenders: dict[str, DataLoader] = {
        "baseline": make_loader(folder, batch_size, workers),
        "carnet": module.train_dataloader(),
        "decode_only": make_loader(DecodeOnly([root / p for p in train_rows.path]), batch_size, workers),
        "carnet_cache": cached_loader,
    }
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for loader in contenders.values():
        epoch_rate(loader)  # warm-up: start the workers, fill the page cache
    for _ in range(repeats):
        for name, loader in contenders.items():  # interleaved: drift hits every contender alike
            rates[name].append(epoch_rate(loader))
    median = {name: statistics.median(r) for name, r in rates.items()}
    ratios = [c / b for c, b in zip(rates["carnet"], rates["baseline"], strict=True)]
    return {
        "size": size, "images": len(train_rows), "rates": median, "ratio": statistics.median(ratios),
        "ratio_range": (min(ratios), max(ratios)), "warm_s": warm_s,
        "min_side": module.train_dataloader().dataset.min_side,
        "tensor": module.train_dataloader().dataset[0][0],  # one image as the loader hands it over
        "stages": stage_split(module, batch_size, stage_images),
        "baseline_stages": baseline_stage_split(folder, stage_images),
    }


def print_report(results: list[dict], workers: int, batch_size: int) -> None:
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPU(s) visible, {workers} loader worker(s), "
          f"batch {batch_size}, augment=light; images/s (median of interleaved epochs)")
    print(f"{'size':>5} {'baseline':>9} {'carnet':>8} {'ratio':>6} {'(range)':>12} {'decode-only':>12} "
          f"{'fraction':>9} {'cached':>8} {'cached/base':>11}")
    for r in results:
        m = r["rates"]
        lo, hi = r["ratio_range"]
        print(f"{r['size']:>5} {m['baseline']:>9.1f} {m['carnet']:>8.1f} {r['ratio']:>6.2f} "
              f"{f'{lo:.2f}-{hi:.2f}':>12} {m['decode_only']:>12.1f} {m['carnet'] / m['decode_only']:>9.2f} "
              f"{m['carnet_cache']:>8.1f} {m['carnet_cache'] / m['baseline']:>11.2f}")
    print("ratio = carnet / baseline (goal >= 1.3); fraction = carnet / full-size decode-only rate (the ceiling); "
          "cached = carnet with data.cache=memory after its one-off fill")
    print("\nper-stage split, ms per image in one process (carnet decode / augment+to-tensor / collate; "
          "baseline decode / transforms.v2):")
    for r in results:
        s, b = r["stages"], r["baseline_stages"]
        total = sum(s.values())
        print(f"{r['size']:>5}: carnet decode {s['decode']:.2f} ({s['decode'] / total:.0%}), augment "
              f"{s['augment']:.2f} ({s['augment'] / total:.0%}), collate {s['collate']:.2f} "
              f"({s['collate'] / total:.0%}), decode min side {r['min_side']}, cache fill {r['warm_s']:.1f} s | "
              f"baseline decode {b['decode']:.2f}, augment {b['augment']:.2f}")
    print("\nper image handed over (carnet: uint8 pixels, normalised by the network on its device):")
    for r in results:
        t = r["tensor"]
        print(f"{r['size']:>5}: {t.dtype} {tuple(t.shape)}, {t.nelement() * t.element_size() / 2**20:.2f} MB "
              f"(float32 would be {t.nelement() * 4 / 2**20:.2f} MB)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="dataset root with train/<k>/*.jpg (default: a synthetic one)")
    ap.add_argument("--per-class", type=int, default=24, help="synthetic images per class (without --data)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    ap.add_argument("--workers", type=int, default=default_num_workers())
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stage-images", type=int, default=64, help="images timed for the per-stage split")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = a.data
        if root is None:
            from carnet.tools.demo import make_dataset

            root = make_dataset(Path(tmp) / "demo", per_class=a.per_class, test=1, seed=0)
        sizes = {Image.open(p).size for p in list((root / "train").rglob("*.jpg"))[:50]}
        print(f"data: {root} (image sizes seen: {sorted(sizes)[:4]}{' ...' if len(sizes) > 4 else ''})")
        results = []
        for size in a.sizes:
            results.append(bench_size(root, size, a.workers, a.batch_size, a.repeats, a.stage_images))
            r = results[-1]
            print(f"{size}px: " + ", ".join(f"{k} {v:.1f}" for k, v in r["rates"].items()) + " images/s", flush=True)
        print_report(results, a.workers, a.batch_size)


if __name__ == "__main__":
    main()
