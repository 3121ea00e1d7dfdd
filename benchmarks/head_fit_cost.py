"""What the head fit costs at the competition's scale: ``python train.py phase=head`` with the defaults on 15,561
photos (12,449 train + 3,112 validate), and the head fit's share of that phase.

    python benchmarks/head_fit_cost.py [--photos 15561] [--image-size 224 448] [--model tf_efficientnet_b6]
                                       [--device cuda|cpu] [--workers N] [--data DIR]
                                       [--variant "KEY=VALUE ..."]...

For each image size, two real ``train.py phase=head`` runs, read back through their ``summary.json``: the defaults
(the head fitted on frozen features, at most ``head_fit.max_images`` of them, then the phase's epoch of SGD and its
validation) and the same with ``head_fit.enabled=false``. The table has the head fit's images, its feature and
solver seconds as it logs them (of the features: waiting for the loader, the forward passes, and the first pass,
with cuDNN's algorithm search on a GPU), each run's seconds, and the head fit's cost: what it added to the run, and
that as a share of the run (issue 21's goal: at most 10 %). The head fit's own seconds include the warm-up of the
first forward passes and of the loader's workers, which the run without it pays in its first steps instead; the
difference does not. Each ``--variant`` adds a run with the head fit and those overrides (e.g. ``--variant
head_fit.pad_batches=true``), in a row of its own against the same run without the head fit.
``model.pretrained=false``: the weights do not change the cost of a forward pass, only how many L-BFGS iterations
the solver takes (at most 300 a fit). The data: ``--data DIR`` (Kaggle layout), else ``--photos`` of carnet-demo's
640x480 photos, each drawn (copies of a few drawings, as benchmarks/gpu.py uses, would put copies of a training
photo in the cross-validation's held-out folds: its loss then falls down to the weakest L2, where L-BFGS needs the
most iterations).
``--device cpu`` with a tiny model is this script's smoke test (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_check import run_train  # noqa: E402

from carnet.tools.demo import make_dataset  # noqa: E402


def head_phase(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """One ``python train.py phase=head`` run and what its summary.json says the head fit and the phase took."""
    summary, wall = run_train(run_dir, ["phase=head", *overrides])
    fit = summary.head_fit or {}
    return {"train": summary.num_train, "val": summary.num_val, "steps": summary.taken_steps,
            "images": fit.get("images"), "l2": fit.get("l2"), "features": fit.get("features_seconds"),
            "loader": fit.get("loader_seconds"), "forward": fit.get("forward_seconds"),
            "first_forward": fit.get("first_forward_seconds"),
            "solver": fit.get("solver_seconds"), "head_fit": fit.get("seconds"), "run": summary.seconds,
            "wall": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=15561, help="labelled photos (a fifth validate)")
    ap.add_argument("--model", default="tf_efficientnet_b6")
    ap.add_argument("--image-size", type=int, nargs="+", default=[224])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--data", type=Path, help="a Kaggle-layout folder (default: --photos demo photos, each drawn)")
    ap.add_argument("--variant", action="append", default=[], metavar="OVERRIDES",
                    help="one more run with the head fit and these space-separated train.py overrides (repeatable)")
    a = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="carnet_head_fit_cost_") as tmp_name:
        tmp = Path(tmp_name)
        root = a.data or make_dataset(tmp / "data", per_class=math.ceil(a.photos / 10), test=8, seed=0)
        model = f"model={a.model}" if (REPO / "conf" / "model" / f"{a.model}.yaml").is_file() else \
            f"model.name={a.model}"
        common = [model, "model.pretrained=false", f"data.root={root}", f"data.num_workers={a.workers}",
                  "data.verify=false", "trainer=gpu" if a.device == "cuda" else "trainer=cpu",
                  "trainer.enable_progress_bar=false", "logger=none"]
        rows = []
        for size in a.image_size:
            sized = [*common, f"image_size={size}"]
            runs = []
            for name, extra in [("defaults", []), *((v, v.split()) for v in a.variant)]:
                runs.append((name, head_phase(tmp / f"head_{size}_{len(runs)}", [*sized, *extra])))
                print(f"{a.model} {size} px, {name}: {runs[-1][1]}", flush=True)
            without = head_phase(tmp / f"sgd_{size}", [*sized, "head_fit.enabled=false"])
            print(f"{a.model} {size} px, head_fit.enabled=false: {without}", flush=True)
            rows += [(size, name, r, without) for name, r in runs]
    print(f"\n{a.model}, `python train.py phase=head`, {a.device}, {a.workers} loader workers:\n")
    print("| image size | overrides | photos (train + val) | phase steps | head-fit images | L2 "
          "| features s (loader wait, forward passes, the first pass) | solver s "
          "| head fit s (logged) | run s | run s without it | head fit's cost | cost / run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size, name, r, plain in rows:
        cost = r["run"] - plain["run"]
        print(f"| {size} | {name} | {r['train']:,} + {r['val']:,} | {r['steps']} | {r['images']:,} | {r['l2']:g} "
              f"| {r['features']} ({r['loader']}, {r['forward']}, {r['first_forward']}) "
              f"| {r['solver']} | {r['head_fit']} | {r['run']:.1f} | {plain['run']:.1f} | {cost:.1f} "
              f"| {cost / r['run']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
