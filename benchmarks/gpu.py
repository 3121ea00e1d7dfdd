"""GPU fast paths for the competition recipe: tf_efficientnet_b6 training at 448 px, fp32 vs bf16 vs channels_last
vs torch.compile (the whole network, and regional: each backbone block).

    python benchmarks/gpu.py [--model tf_efficientnet_b6] [--image-size 448] [--batch-size 16] [--steps 20]
                             [--no-compile] [--no-max-batch] [--train-images 15561]
                             [--variants fp32 amp channels_last compile regional]

For each variant: training images/s (forward, label-smoothed cross-entropy, backward, AdamW step; the network is
carnet's CarNet with its linear head and the B6 config's dropout / drop path), peak GPU memory at
``--batch-size``, the largest batch that fits (doubling, then bisection to a multiple of 8; not for the compiled
variant, whose every new batch size recompiles), and the epoch time this rate gives for ``--train-images``
(15,561: the competition's training set). Batches are random tensors already on the GPU, so these are the
model's rates: the loader must deliver as many images/s (see benchmarks/loader.py for images/s per CPU core).
cudnn.benchmark is on, as carnet turns it on for GPU runs. Needs a CUDA GPU; exits with a message otherwise
(``--device cpu``: fp32 on the CPU, no largest-batch search). The compiled variants' warm-up is the time of their
untimed steps, compilation included: compiled code goes to carnet's persistent cache (``TORCHINDUCTOR_CACHE_DIR``,
default ~/.cache/carnet/inductor), so run the script twice with the same folder to see a second run's warm-up
(benchmarks/gpu_suite.sh does, with an empty folder first).

    python benchmarks/gpu.py --end-to-end [--batch-size 32 64] [--data DIR] [--workers N] [--views 4]

``--end-to-end`` puts the model's rate next to the whole pipeline's, for each batch size (bf16 or fp16 autocast,
channels_last, eager): model-only (as above: uint8 batches already on the GPU); the loader alone (carnet's
DataModule over JPEGs on disk, every loader worker, batches copied to the GPU, no model); end-to-end (carnet's
``train()``, what ``python train.py`` runs: DataModule, LightningModule, Trainer, callbacks, checkpoints, with
validation and the LR scheduler off), each over ``--steps`` steps after ``--warmup``; then predict: the raw batched
forward pass over images already decoded on the GPU, ``carnet.inference.predict`` (checkpoint, loader, outputs),
and predict with TTA of n views. It ends with Markdown tables for README "Performance". The data: ``--data DIR``
(Kaggle layout), else carnet-demo's 640x480 photos written to a temporary folder (a few hundred drawn, copied up to
the count the steps need). ``--device cpu`` runs it all on the CPU in fp32: for smoke tests of this script only.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from carnet.models.heads import build_head  # noqa: E402
from carnet.models.network import CarNet, compile_network, create_backbone  # noqa: E402

NUM_CLASSES = 10
DEVICE = "cuda"  # a module constant so the step code can be smoke-tested on a CPU
HEAD = {"_target_": "carnet.models.heads.LinearHead", "dropout": 0.5}


VARIANTS = ("fp32", "amp", "channels_last", "compile", "regional")


@dataclass
class Variant:
    name: str
    dtype: torch.dtype | None  # autocast dtype; None = fp32
    channels_last: bool
    compile: bool | str  # False, True (the whole network) or "regional" (each backbone block)


def build_net(model: str, variant: Variant) -> CarNet:
    backbone = create_backbone(model, pretrained=False, drop_rate=0.5, drop_path_rate=0.2)
    net = CarNet(backbone, build_head(HEAD, backbone.num_features, NUM_CLASSES)).to(DEVICE).train()
    if variant.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if variant.compile:
        compile_network(net, variant.compile)  # in place, as carnet's model.compile=true / regional does
    return net


Step = Callable[[torch.Tensor, torch.Tensor], None]


def make_step(net: CarNet, variant: Variant) -> tuple[Step, torch.optim.Optimizer]:
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(DEVICE, enabled=variant.dtype is torch.float16)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        if variant.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast(DEVICE, dtype=variant.dtype) if variant.dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            loss = F.cross_entropy(net(images), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step, optimizer


def batch(size: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 pixels, as carnet's loader hands them over (CarNet normalises them on the device)."""
    return (torch.randint(0, 256, (size, 3, image_size, image_size), dtype=torch.uint8, device=DEVICE),
            torch.randint(0, NUM_CLASSES, (size,), device=DEVICE))


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure(model: str, variant: Variant, batch_size: int, image_size: int, steps: int, warmup: int) -> dict:
    """images/s over ``steps`` steps after ``warmup`` (compile happens there: its time is reported apart)."""
    net = build_net(model, variant)
    step, optimizer = make_step(net, variant)
    images, labels = batch(batch_size, image_size)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(warmup):
        step(images, labels)
    sync()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step(images, labels)
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else math.nan
    del net, optimizer, step, images, labels
    free()
    return {"rate": batch_size * steps / seconds, "peak_gib": peak, "warmup_s": warmup_s}


def fits(model: str, variant: Variant, size: int, image_size: int) -> bool:
    """Whether two training steps at batch ``size`` run without running out of GPU memory."""
    net = step = optimizer = images = labels = None
    try:
        net = build_net(model, variant)
        step, optimizer = make_step(net, variant)
        images, labels = batch(size, image_size)
        for _ in range(2):  # the second step also holds AdamW's state
            step(images, labels)
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del net, step, optimizer, images, labels
        free()


def largest_batch(model: str, variant: Variant, image_size: int, start: int, limit: int = 4096) -> int:
    """Doubling from ``start`` until a batch does not fit, then bisection down to a multiple of 8."""
    if not fits(model, variant, start, image_size):
        lo, hi = 0, start
    else:
        lo, hi = start, start * 2
        while hi <= limit and fits(model, variant, hi, image_size):
            lo, hi = hi, hi * 2
    while hi - lo > 8:
        mid = (lo + hi) // 2 // 8 * 8 or (lo + hi) // 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if fits(model, variant, mid, image_size) else (lo, mid)
    return lo


# --------------------------------------------------------------------------------------------------------------
# --end-to-end: model-only vs loader alone vs carnet's train(), and predict vs the raw forward pass


class StepTimer(pl.Callback):
    """Wall time of ``steps`` whole loop iterations (fetch, step, callbacks) after ``warmup`` ones, device synced at
    both ends. Built by Hydra from ``cfg.callbacks`` inside ``train()``: the result goes to ``StepTimer.result``."""

    result: ClassVar[dict[str, float]] = {}

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.start: float | None = None
        self.images = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            sync()
            self.start = time.perf_counter()
        elif self.start is not None and trainer.global_step <= self.warmup + self.steps:
            self.images += len(batch[1])
            if trainer.global_step == self.warmup + self.steps:
                sync()
                StepTimer.result = {"seconds": time.perf_counter() - self.start, "images": self.images}


def demo_data(root: Path, n_train: int, n_test: int) -> Path:
    """carnet-demo's 640x480 photos: a few hundred drawn, copied up to ``n_train`` training and ``n_test`` test
    images (drawing is slow; every copy is still a file that the loader reads and decodes)."""
    from carnet.tools.demo import make_dataset

    per_class = math.ceil(n_train / 10)
    make_dataset(root, per_class=min(per_class, 30), test=min(n_test, 64), seed=0)
    (root / "train.csv").unlink(missing_ok=True)  # labels from the class folders, copies included
    for folder in (root / "train").iterdir():
        drawn = sorted(folder.glob("*.jpg"))
        for i in range(len(drawn), per_class):
            shutil.copyfile(drawn[i % len(drawn)], folder / f"copy{i}_{drawn[i % len(drawn)].name}")
    photos = root / "photos"  # predict's images=DIR
    photos.mkdir()
    drawn = sorted((root / "test_upload").glob("*.jpg"))
    for i in range(n_test):
        shutil.copyfile(drawn[i % len(drawn)], photos / f"{i:05d}.jpg")
    return root


def train_cfg(a: argparse.Namespace, root: Path, batch_size: int, run_dir: Path, timer: dict | None = None) -> Any:
    """The config ``python train.py`` would compose for this model, size, batch and precision."""
    from tests.helpers.config import compose_cfg

    cuda = DEVICE == "cuda"
    model = f"model={a.model}" if (REPO / "conf" / "model" / f"{a.model}.yaml").is_file() else f"model.name={a.model}"
    overrides = [
        model, "model.pretrained=false", "model.channels_last=true", "model.compile=false",
        f"image_size={a.image_size}", f"data.root={root}", f"data.batch_size={batch_size}",
        f"data.num_workers={a.workers}", "data.verify=false", "data.val_fraction=0.05",
        "trainer=gpu" if cuda else "trainer=cpu", f"trainer.precision={a.precision}",
        "trainer.num_sanity_val_steps=0", "+trainer.limit_val_batches=0", "trainer.max_epochs=1000",
        f"+trainer.max_steps={a.warmup + a.steps}", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "logger=none", "scheduler=none", f"run_dir={run_dir}",
    ]
    if a.decode:
        overrides.append(f"data.decode={a.decode}")
    cfg = compose_cfg(overrides)
    if timer is not None:
        cfg.callbacks = {"timer": timer}
    return cfg


def loader_rate(a: argparse.Namespace, root: Path, batch_size: int, tmp: Path) -> float:
    """images/s of carnet's training loader alone: every worker, batches copied to the device, no model."""
    from lightning_fabric.utilities.apply_func import move_data_to_device

    from carnet.runtime import resolve_runtime
    from carnet.training.builders import build_datamodule, build_module

    cfg = train_cfg(a, root, batch_size, tmp / "loader")
    runtime = resolve_runtime(cfg)
    dm = build_datamodule(cfg, build_module(cfg, runtime), runtime)
    dm.setup("fit")
    start, images = None, 0
    batches = iter(dm.train_dataloader())
    for i in range(a.warmup + a.steps):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(dm.train_dataloader())
            x, y = next(batches)
        move_data_to_device((x, y), torch.device(DEVICE))  # what Lightning does with a batch (any type)
        if i == a.warmup - 1:
            sync()
            start = time.perf_counter()
        elif i >= a.warmup:
            images += len(y)
    sync()
    return images / (time.perf_counter() - start)


def end_to_end_rate(a: argparse.Namespace, root: Path, batch_size: int, tmp: Path) -> float:
    """images/s of carnet's ``train()`` over ``--steps`` steps after ``--warmup`` (setup and start-up excluded)."""
    from carnet.training.train import train

    timer = {"_target_": f"{StepTimer.__module__}.StepTimer", "warmup": a.warmup, "steps": a.steps}
    StepTimer.result = {}
    train(train_cfg(a, root, batch_size, tmp / f"train_{batch_size}", timer))
    if not StepTimer.result:
        raise RuntimeError("the end-to-end run ended before its timed steps did")
    return StepTimer.result["images"] / StepTimer.result["seconds"]


def predict_rates(a: argparse.Namespace, root: Path, batch_size: int, tmp: Path) -> dict[str, float]:
    """images/s of the raw forward pass (images already decoded, transformed and on the device), of predict
    (checkpoint, loader workers, forward, files) and of predict with each TTA view count in ``--views``."""
    from carnet.inference.predict import predict
    from carnet.inference.runner import Runner, console
    from carnet.inference.selection import Images
    from carnet.models.checkpoint import load_checkpoint
    from carnet.runtime import inference_amp
    from tests.helpers.config import compose_cfg
    from tests.helpers.recipe import classifier

    module = classifier(model_name=a.model, class_names=[f"class {k}" for k in range(10)], image_size=a.image_size)
    ckpt = tmp / "predict.ckpt"
    torch.save({"state_dict": module.state_dict(), "carnet": module.inference_meta()}, ckpt)
    del module
    photos = sorted((root / "photos").glob("*.jpg"))
    runner = Runner(device=DEVICE, batch_size=batch_size, num_workers=a.workers, channels_last=True,
                    amp=inference_amp("auto", DEVICE), draft=True)

    def run_predict(views: int) -> float:
        cfg = compose_cfg([f"ckpt={ckpt}", f"images={root / 'photos'}", f"out={tmp / f'pred_{views}.csv'}",
                           f"data.batch_size={batch_size}", f"data.num_workers={a.workers}", f"device={DEVICE}",
                           "tta=full" if views > 1 else "tta='false'"], config_name="predict")
        if views > 1:
            cfg.tta.views = dict(list(cfg.tta.views.items())[:views])
        start = time.perf_counter()
        quiet, console.quiet = console.quiet, True  # predict's progress bar and table of results
        try:
            predict(cfg)
        finally:
            console.quiet = quiet
        return len(photos) / (time.perf_counter() - start)

    def raw() -> float:
        net, meta = load_checkpoint(ckpt)
        net = runner.prepare(net)
        names = [p.name for p in photos]
        images = [x for x, *_ in runner.loader(Images(root / "photos", names, names, [-1] * len(names)), meta)]
        images = [x.to(DEVICE) for x in images]
        with torch.inference_mode(), runner._autocast():
            for x in images[:2]:
                net(x)
            sync()
            start = time.perf_counter()
            for x in images:
                net(x).float().softmax(-1).cpu()
            sync()
        return len(photos) / (time.perf_counter() - start)

    run_predict(1)  # warm-up: cudnn algorithm search, page cache
    rates = {"raw": raw(), "plain": run_predict(1)}
    for views in a.views:
        rates[f"tta{views}"] = run_predict(views)
    return rates


def end_to_end(a: argparse.Namespace) -> None:
    low = torch.bfloat16 if a.precision.startswith("bf16") else torch.float16 if a.precision.startswith("16") else None
    variant = Variant(f"{a.precision}+channels_last", low, True, False)
    started = time.perf_counter()
    decode = a.decode or "cpu (default)"  # conf/data/kaggle_cars.yaml's data.decode
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"{card}, torch {torch.__version__}; {a.model} at {a.image_size} px, {a.precision}, channels_last, eager; "
          f"batches {a.batch_size}, {a.workers} loader workers, data.decode={decode}, "
          f"{a.steps} timed steps after {a.warmup}", flush=True)
    with tempfile.TemporaryDirectory(prefix="carnet_gpu_") as tmp_name:
        tmp = Path(tmp_name)
        root = a.data
        if root is None:
            need = math.ceil((a.warmup + a.steps + 1) * max(a.batch_size) / 0.95)
            root = demo_data(tmp / "demo", need, a.predict_images)
            print(f"demo data: {need} training and {a.predict_images} test photos (640x480) in {root}", flush=True)
        elif not (root / "photos").is_dir():
            raise SystemExit(f"--data {root}: expected train/<k>/ and photos/ (the images predict times)")
        rows, predicts = [], []
        for batch_size in a.batch_size:
            model_only = measure(a.model, variant, batch_size, a.image_size, a.steps, a.warmup)["rate"]
            print(f"  batch {batch_size}: model-only {model_only:.1f} images/s", flush=True)
            loader = loader_rate(a, root, batch_size, tmp)
            print(f"  batch {batch_size}: loader alone {loader:.1f} images/s", flush=True)
            e2e = end_to_end_rate(a, root, batch_size, tmp)
            print(f"  batch {batch_size}: end-to-end {e2e:.1f} images/s", flush=True)
            free()
            rows.append((batch_size, model_only, loader, e2e))
            pr = predict_rates(a, root, batch_size, tmp)
            print(f"  batch {batch_size}: predict " + ", ".join(f"{k} {v:.1f}" for k, v in pr.items()) + " images/s",
                  flush=True)
            predicts.append((batch_size, pr))
            free()
    print(f"\n### {a.model} at {a.image_size} px, {a.precision}, channels_last, eager, {a.workers} loader workers, "
          f"data.decode={decode}\n")
    print("| card | batch | model-only img/s | loader img/s | end-to-end img/s | end-to-end / model-only "
          "| loader / model-only |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for batch_size, model_only, loader, e2e in rows:
        print(f"| {card} | {batch_size} | {model_only:.0f} | {loader:.0f} | {e2e:.0f} | {e2e / model_only:.2f} "
              f"| {loader / model_only:.2f} |")
    tta_heads = "".join(f" TTA {v} img/s | TTA {v} / ({v} x plain) |" for v in a.views)
    print(f"\n| card | batch | raw forward img/s | predict img/s | predict / raw |{tta_heads}")
    print("|---|---:|---:|---:|---:|" + "---:|---:|" * len(a.views))
    for batch_size, pr in predicts:
        tta = "".join(f" {pr[f'tta{v}']:.0f} | {pr['plain'] / (v * pr[f'tta{v}']):.2f} |"
                      for v in a.views)
        print(f"| {card} | {batch_size} | {pr['raw']:.0f} | {pr['plain']:.0f} | {pr['plain'] / pr['raw']:.2f} |{tta}")
    print("\nmodel-only: training steps on uint8 batches already on the device; loader: carnet's DataModule alone, "
          "batches copied to the device; end-to-end: carnet's train() (validation and LR scheduler off); goals: "
          "end-to-end >= 0.95 x model-only, predict >= 0.9 x raw forward, TTA n views <= 1.1 x n x plain time.")
    print(f"gpu.py --end-to-end: {time.perf_counter() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tf_efficientnet_b6")
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[16],
                    help="batch size (--end-to-end: one row per size)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile needs them)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="which variants to measure (amp: bf16, or fp16 on cards without it; compile: the whole "
                         "network; regional: each backbone block; both with amp and channels_last)")
    ap.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch search")
    ap.add_argument("--train-images", type=int, default=15561, help="images per epoch for the epoch-time estimate")
    ap.add_argument("--end-to-end", action="store_true",
                    help="model-only vs loader alone vs carnet's train(), and predict vs the raw forward pass")
    ap.add_argument("--data", type=Path, help="--end-to-end: train/<k>/*.jpg and photos/*.jpg (default: demo photos)")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="loader workers (all cores)")
    ap.add_argument("--views", type=int, nargs="+", default=[4], help="--end-to-end: TTA view counts to time")
    ap.add_argument("--predict-images", type=int, default=1024, help="--end-to-end: photos predict times")
    ap.add_argument("--decode", choices=["cpu", "gpu", "auto", "device"],
                    help="--end-to-end: data.decode (default: the config's). With gpu, 'loader alone' is the workers "
                         "reading bytes, and the decoding and augmentation count in end-to-end")
    ap.add_argument("--precision", help="--end-to-end: bf16-mixed / 16-mixed (default: the card's) or 32")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: fp32 on the CPU, to smoke-test this script only (its rates mean nothing)")
    a = ap.parse_args(argv)
    global DEVICE
    DEVICE = a.device
    if a.end_to_end:
        logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        if DEVICE == "cuda" and not torch.cuda.is_available():
            sys.exit("benchmarks/gpu.py --end-to-end needs a CUDA GPU (or --device cpu for a smoke test)")
        torch.backends.cudnn.benchmark = DEVICE == "cuda"
        if a.precision is None:
            a.precision = "32" if DEVICE == "cpu" else "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        a.warmup = max(1, a.warmup)
        end_to_end(a)
        return
    a.batch_size = a.batch_size[0]
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit(f"benchmarks/gpu.py needs a CUDA GPU, and torch {torch.__version__} sees none here "
                 f"(torch.cuda.is_available() is False). Run it on a GPU machine: python benchmarks/gpu.py")

    if DEVICE == "cuda":
        torch.backends.cudnn.benchmark = True  # what carnet's trainer.benchmark=null gives on a GPU
        low = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        low_name = "bf16" if low is torch.bfloat16 else "fp16"
        name = torch.cuda.get_device_name()
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        card = f"{name} ({total:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:  # fp32 throughout, no memory figures
        low, low_name, a.no_max_batch = None, "fp32", True
        card = f"CPU ({len(os.sched_getaffinity(0))} cores), torch {torch.__version__}"
    fast = f"{low_name}+channels_last"
    table = {
        "fp32": Variant("fp32", None, False, False),
        "amp": Variant(low_name, low, False, False),
        "channels_last": Variant(fast, low, True, False),
        "compile": Variant(f"{fast}+compile", low, True, True),
        "regional": Variant(f"{fast}+regional", low, True, "regional"),
    }
    variants = [table[key] for key in a.variants
                if not (a.no_compile and table[key].compile) and not (key == "amp" and low is None)]
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or "~/.cache/carnet/inductor"
    print(f"{card}; {a.model} at {a.image_size} px, batch {a.batch_size}, AdamW, label smoothing 0.1; compile "
          f"cache {cache}", flush=True)

    rows = []
    for variant in variants:
        warmup = a.warmup + (10 if variant.compile else 0)
        result = measure(a.model, variant, a.batch_size, a.image_size, a.steps, warmup)
        if not a.no_max_batch and not variant.compile:
            result["max_batch"] = largest_batch(a.model, variant, a.image_size, a.batch_size)
        rows.append((variant, result))
        print(f"  {variant.name}: {result['rate']:.1f} images/s, peak {result['peak_gib']:.1f} GiB, "
              f"warm-up {result['warmup_s']:.0f} s", flush=True)

    base = rows[0][1]["rate"]
    print(f"\n{'variant':<30} {'images/s':>9} {'vs ' + rows[0][0].name:>12} {'warm-up s':>10} {'peak GiB':>9} "
          f"{'max batch':>10} {'epoch (' + str(a.train_images) + ' img)':>20}")
    for variant, r in rows:
        epoch = a.train_images / r["rate"]
        max_batch = str(r.get("max_batch", "-"))
        print(f"{variant.name:<30} {r['rate']:>9.1f} {r['rate'] / base:>11.2f}x {r['warmup_s']:>10.1f} "
              f"{r['peak_gib']:>9.1f} {max_batch:>10} {f'{epoch / 60:.1f} min':>20}")
    print(f"peak GiB at batch {a.batch_size}; max batch: largest that trains (multiple of 8); epoch: training "
          f"images / rate, model only (no loader stalls, no validation); warm-up: the untimed steps "
          f"({a.warmup}, +10 for compiled variants), compilation included")


if __name__ == "__main__":
    main()
