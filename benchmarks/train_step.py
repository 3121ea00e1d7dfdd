"""Training-loop overhead: carnet's Lightning fit loop vs a plain PyTorch loop, same model, batch, optimizer, data.

    python benchmarks/train_step.py [--models test_efficientnet tf_efficientnet_lite0] [--image-size 128]
                                    [--batch-size 16] [--steps 10] [--repeats 3] [--threads 1]

carnet's side is what ``python train.py`` builds: :func:`carnet.training.builders.build_module` and
:func:`carnet.training.builders.build_trainer` from conf/ (AdamW with head/backbone groups, label
smoothing, logging, checkpointing, the Rich progress bar, run artifacts), with validation and the LR scheduler
off (the default plateau scheduler monitors val/acc; schedulers cost the same in both loops). The plain loop
runs the same ``CarNet``, optimizer groups and loss by hand. Both read the same in-memory batches
(training views of real photos from ``--data`` or carnet.tools.demo, decoded and transformed once, in memory), so
the loader is out of the picture (benchmarks/loader.py measures that). The two loops alternate step by step inside
one fit (see :class:`Interleave`), because this machine's cores are shared and load comes and goes; the first
epoch is a warm-up, and the median over the other ``--repeats`` epochs of the per-epoch ratio is reported.
A small model is the harsher test: per-step overhead weighs more next to a cheap step. Goal: >= 0.95.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from carnet.runtime import resolve_runtime  # noqa: E402
from carnet.training.builders import build_module, build_trainer  # noqa: E402
from carnet.training.run_dir import RunArtifacts  # noqa: E402
from tests.helpers.config import compose_cfg  # noqa: E402


class Interleave(pl.Callback):
    """Alternates the two loops step by step inside one fit, so load spikes on the shared cores hit both alike.

    At each Lightning batch start it runs one plain step (timed). A Lightning step is the time from the end of
    that plain step to the next batch start: the whole loop iteration (fetch, training_step, backward, optimizer,
    logging, callbacks, progress bar). The last interval of an epoch (it holds epoch-end work) is left out.
    """

    def __init__(self, plain_step: Callable[[], None]) -> None:
        self.plain_step = plain_step
        self.plain: list[list[float]] = []
        self.lightning: list[list[float]] = []
        self.mark: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.plain.append([])
        self.lightning.append([])
        self.mark = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        now = time.perf_counter()
        if self.mark is not None:
            self.lightning[-1].append(now - self.mark)
        self.plain_step()
        self.plain[-1].append(time.perf_counter() - now)
        self.mark = time.perf_counter()


def config(model: str, image_size: int, batch_size: int, run_dir: Path) -> DictConfig:
    overrides = [f"model={model}", "model.pretrained=false", "trainer=cpu", f"image_size={image_size}",
                 f"data.batch_size={batch_size}", "+trainer.limit_val_batches=0",
                 "scheduler=none",
                 "trainer.num_sanity_val_steps=0"]
    return compose_cfg(overrides)


def batches(data: Path, cfg: DictConfig, n_images: int, batch_size: int) -> DataLoader:
    """``n_images`` training views of real images, decoded and augmented once, served from memory."""
    from carnet.data.datamodule import CarDataModule
    from carnet.training.builders import build_datamodule

    runtime = resolve_runtime(cfg)
    module = build_module(cfg, runtime)
    dm: CarDataModule = build_datamodule(cfg, module, runtime)
    dm.root, dm.num_workers, dm.verify = data, 0, False
    dm.setup("fit")
    dataset = dm.train_dataloader().dataset
    items = [dataset[i % len(dataset)] for i in range(n_images)]
    images = torch.stack([x for x, _ in items])
    labels = torch.tensor([y for _, y in items])
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False, drop_last=True)


def plain_loop(net: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
               label_smoothing: float) -> Callable[[], None]:
    """One step of the textbook loop per call (running loss/accuracy kept as tensors, as a plain loop would)."""
    batches = iter(loader)
    totals = {"loss": torch.zeros(()), "correct": torch.zeros((), dtype=torch.long)}

    def step() -> None:
        nonlocal batches
        try:
            images, labels = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, labels = next(batches)
        net.train()
        logits = net(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals["loss"] += loss.detach()
        totals["correct"] += (logits.argmax(1) == labels).sum()

    return step


def bench_model(model: str, data: Path, image_size: int, batch_size: int, steps: int, repeats: int,
                tmp: Path) -> dict:
    cfg = config(model, image_size, batch_size, tmp / model)
    loader = batches(data, cfg, steps * batch_size, batch_size)
    n_images = steps * batch_size

    runtime = resolve_runtime(cfg)
    torch.manual_seed(0)
    plain_module = build_module(cfg, runtime)
    net = plain_module.net
    optimizer = instantiate(plain_module.hparams.optimizer)(plain_module.param_groups())  # fused as resolved
    torch.manual_seed(0)
    module = build_module(cfg, runtime)

    interleave = Interleave(plain_loop(net, optimizer, loader, cfg.label_smoothing))
    cfg.trainer.max_epochs = repeats + 1  # the first epoch of each is a warm-up (allocator, first-touch memory)
    artifacts = RunArtifacts(tmp / model, {"model": model}, monitor=cfg.checkpoint.monitor, mode=cfg.checkpoint.mode)
    trainer = build_trainer(cfg, tmp / model, [interleave, artifacts], runtime)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    fit_s = time.perf_counter() - start - sum(map(sum, interleave.plain))
    plain = [statistics.mean(e) for e in interleave.plain[1:]]
    lightning = [statistics.mean(e) for e in interleave.lightning[1:]]
    ratios = [p / q for p, q in zip(plain, lightning, strict=True)]
    return {
        "model": model, "plain": batch_size / statistics.median(plain),
        "lightning": batch_size / statistics.median(lightning),
        "ratio": statistics.median(ratios), "range": (min(ratios), max(ratios)),
        "fit_rate": n_images * (repeats + 1) / fit_s,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="dataset root with train/<k>/*.jpg (default: a synthetic one)")
    ap.add_argument("--models", nargs="+", default=["test_efficientnet", "tf_efficientnet_lite0"])
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both loops (1: on 2 shared cores, two OpenMP threads under load spin "
                         "and slow every step several-fold, drowning the difference being measured)")
    ap.add_argument("--steps", type=int, default=10, help="batches per timed epoch")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data
        if data is None:
            from carnet.tools.demo import make_dataset

            data = make_dataset(Path(tmp) / "demo", per_class=max(4, a.batch_size // 5), test=1, seed=0)
        results = []
        for model in a.models:
            results.append(bench_model(model, data, a.image_size, a.batch_size, a.steps, a.repeats, Path(tmp)))
            r = results[-1]
            print(f"{model}: plain {r['plain']:.1f}, lightning {r['lightning']:.1f} images/s", flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {a.image_size} px, batch {a.batch_size}, "
          f"{a.steps} steps/epoch, AdamW, fp32; images/s (median over {a.repeats} epochs, loops alternating by step)")
    print(f"{'model':<24} {'plain':>8} {'carnet':>8} {'ratio':>6} {'(range)':>11} {'whole fit()':>12}")
    for r in results:
        lo, hi = r["range"]
        print(f"{r['model']:<24} {r['plain']:>8.1f} {r['lightning']:>8.1f} {r['ratio']:>6.3f} "
              f"{f'{lo:.2f}-{hi:.2f}':>11} {r['fit_rate']:>12.1f}")
    print("ratio = carnet Lightning loop / plain loop over the training batches (goal >= 0.95); whole fit() = "
          "images / wall time of trainer.fit incl. setup, epoch-end checkpoint, metrics and curves")


if __name__ == "__main__":
    main()
