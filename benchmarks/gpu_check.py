"""Is carnet's GPU path right before it is fast: short real ``train.py`` runs on the GPU, compared with the CPU.

    python benchmarks/gpu_check.py [--model test_efficientnet] [--image-size 96] [--epochs 4] [--tolerance 0.03]

Each run is ``python train.py`` in its own process, as a user starts it, on carnet-demo photos (10 classes; AdamW at
a learning rate of 0.01, so that the losses move within a few dozen steps): on the GPU (``trainer=gpu``, precision
auto: bf16 where the card has it) for each of ``data.decode=cpu|gpu`` x ``model.compile=false|regional``, and on the
CPU in fp32 as the reference, with the same pixel pipeline: ``data.decode=cpu``, and for ``gpu`` its own code on the
CPU (``data.decode=device``; only the JPEG decoder differs then, nvJPEG against libjpeg). The same seed gives the
same split, batch order and augmentation draws everywhere, so each epoch's ``train/loss`` and ``val/loss``
(metrics.csv) must agree with the reference within ``--tolerance`` (relative; low precision and a GPU's summation
order make them differ a little, a wrong pixel path or compiled graph by far more). A run that fails, writes no
``summary.json`` with status ``completed``, or differs, makes the exit code 1. ``--device cpu`` runs the "GPU" runs
on the CPU too, ``gpu`` as ``device`` (a smoke test of this script; compile is skipped).
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from carnet.artifacts import read_metrics  # noqa: E402
from carnet.summary import RunSummary, read_summary  # noqa: E402

LOSSES = ["train/loss", "val/loss"]
SAME_PIXELS_ON_THE_CPU = {"cpu": "cpu", "gpu": "device"}  # data.decode on the GPU -> the same pixel code on the CPU


def run_train(run_dir: Path, overrides: list[str], limit: float | None = None) -> tuple[RunSummary, float]:
    """One ``python train.py`` run, as a user starts it: its summary.json and its wall time. A run that fails or
    does not complete raises with its stderr's end; one still going after ``limit`` seconds gets SIGABRT, on which
    Python's faulthandler prints every thread's stack: the error then says where it hung."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *overrides, f"run_dir={run_dir}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        _, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, stderr = proc.communicate()
        stderr = f"still running after {limit:.0f} s; its stacks:\n{stderr.split('Extension modules:')[0]}"
    seconds = time.perf_counter() - start
    summary = read_summary(run_dir, missing_ok=True)  # carnet's contract: summary.json and metrics.csv
    status = summary.status if summary is not None else None
    if proc.returncode != 0 or summary is None or status != "completed":
        raise RuntimeError(f"train.py {' '.join(overrides)}: exit {proc.returncode}, summary status {status}\n"
                           f"{stderr[-6000:]}")
    return summary, seconds


def train_losses(run_dir: Path, overrides: list[str], limit: float) -> tuple[pd.DataFrame, float]:
    """:func:`run_train`'s run: its metrics.csv losses (one row per epoch) and its wall time."""
    _, seconds = run_train(run_dir, overrides, limit)
    return read_metrics(run_dir)[["epoch", *LOSSES]].set_index("epoch"), seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="test_efficientnet")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--per-class", type=int, default=16, help="demo photos per class (a fifth validate)")
    ap.add_argument("--tolerance", type=float, default=0.03, help="largest relative loss difference allowed")
    ap.add_argument("--decode", nargs="+", choices=["cpu", "gpu"], default=["cpu", "gpu"])
    ap.add_argument("--compile", nargs="+", choices=["false", "regional"], default=["false", "regional"])
    ap.add_argument("--run-limit", type=float, default=120, help="seconds a run may take (then: where it hung)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    a = ap.parse_args(argv)

    from carnet.tools.demo import make_dataset

    with tempfile.TemporaryDirectory(prefix="carnet_gpu_check_") as tmp_name:
        tmp = Path(tmp_name)
        root = make_dataset(tmp / "data", per_class=a.per_class, test=8, seed=0)
        common = [f"model={a.model}", "model.pretrained=false", f"image_size={a.image_size}", f"data.root={root}",
                  "data.batch_size=16", "data.num_workers=4", "data.verify=false", f"trainer.max_epochs={a.epochs}",
                  "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                  "trainer.num_sanity_val_steps=0", "budget.min_steps=0", "scheduler=none", "optimizer.lr=0.01",
                  "logger=none"]
        references = {}  # data.decode of a GPU run -> the CPU run of the same pixel pipeline
        for decode in a.decode:
            cpu_decode = SAME_PIXELS_ON_THE_CPU[decode]
            try:
                references[decode], seconds = train_losses(tmp / f"cpu_{cpu_decode}", [*common, "trainer=cpu",
                                                        f"data.decode={cpu_decode}"], a.run_limit)
            except RuntimeError as error:
                print(f"gpu_check: FAILED: the CPU reference run: {error}", flush=True)
                return 1
            print(f"reference: CPU fp32, data.decode={cpu_decode}, {seconds:.1f} s\n"
                  f"{references[decode].to_string()}", flush=True)
        accelerator = "trainer=gpu" if a.device == "cuda" else "trainer=cpu"
        compiles = a.compile if a.device == "cuda" else ["false"]
        failed = []
        for decode, compile_ in itertools.product(a.decode, compiles):
            name = f"data.decode={decode} model.compile={compile_}"
            run_decode = decode if a.device == "cuda" else SAME_PIXELS_ON_THE_CPU[decode]
            try:
                losses, seconds = train_losses(tmp / f"{decode}_{compile_}", [*common, accelerator,
                                            f"data.decode={run_decode}", f"model.compile={compile_}"], a.run_limit)
            except RuntimeError as error:
                print(f"FAILED {name}: {error}", flush=True)
                failed.append(name)
                continue
            reference = references[decode]
            differs = ((losses - reference).abs() / reference.abs()).max()
            ok = bool(len(losses) == len(reference) and (differs <= a.tolerance).all())
            print(f"{'ok' if ok else 'DIFFERS'} {name}: {seconds:.1f} s, largest relative difference "
                  + ", ".join(f"{k} {differs[k]:.4f}" for k in LOSSES)
                  + ("" if ok else f"\n{losses.to_string()}"), flush=True)
            if not ok:
                failed.append(name)
    print(f"gpu_check: {'all runs agree with the CPU' if not failed else 'FAILED: ' + '; '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
