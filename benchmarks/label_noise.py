"""Label noise: does ``carnet-inspect`` find flipped labels, and does training on the corrected labels recover accuracy?

    python benchmarks/label_noise.py --data DIR --weights FILE [--model tf_efficientnet_lite0] [--seeds 0 1 2]
        [--fraction 0.1] [--train-seeds 0] [--out outputs/label_noise]

e.g. ``python benchmarks/label_noise.py --data ../shared/data/adsdev
--weights ../shared/weights/tf_efficientnet_lite0.in1k.safetensors``. DIR is in the Kaggle layout with
``test_labels.csv`` and ``classes.txt``, as for ``benchmarks/accuracy.py``. DIR itself is only read.

For each seed, a copy of DIR gets ``--fraction`` of its training labels flipped, each to another class drawn
uniformly (seeded; the photo moves to its new class folder and ``train.csv`` is rewritten, in the copy). Then:

1. ``carnet-inspect --data COPY --model MODEL --weights FILE`` (the probe path: frozen ImageNet features, a 5-fold
   linear probe, cleanlab) runs as a user runs it, timed (wall clock, and the CPU seconds of the process). Its
   ``label_scores.csv`` ranks every photo: precision = recall at k = the number flipped (the k lowest scores), and
   the precision and recall of the photos cleanlab flags (``label_issues.csv``).
2. Test accuracy of a linear probe (carnet's head solver, ``fit_head``, on the same frozen features) trained on the
   noisy labels, on the noisy labels minus the flagged photos (``label_issues.csv`` unedited, applied by
   ``data.corrections``'s own code), and on the clean labels.
3. For ``--train-seeds``: the same three with ``train.py phase=head`` (``head_fit.views=1``) and ``predict.py``,
   the second with ``data.corrections=<copy's label_issues.csv>``: the documented loop back, end to end.

The unflipped DIR is inspected once too: how many photos it flags, listed for a look.
Writes ``--out``/label_noise.md (tables) and label_noise.json (per seed, with every command line).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from accuracy import (  # noqa: E402
    class_names_of,
    hydra_list,
    run_command,
    shell_word,
    submission_accuracy,
    test_labels,
)

from carnet.data.corrections import apply_corrections, read_corrections  # noqa: E402
from carnet.data.layout import scan_train  # noqa: E402
from carnet.inference.selection import Images  # noqa: E402
from carnet.inspection.probe import frozen_features, pretrained_backbone  # noqa: E402
from carnet.inspection.targets import timm_model_name  # noqa: E402
from carnet.summary import read_summary  # noqa: E402
from carnet.tools.inspection import inspect_runner  # noqa: E402
from carnet.training.head_fit import fit_head  # noqa: E402


def flipped_copy(root: Path, copy: Path, fraction: float, seed: int, num_classes: int,
                 reuse: bool = False) -> pd.DataFrame:
    """Copy ``root`` to ``copy`` with ``fraction`` of its training labels flipped; return every training photo with
    ``Id``, ``label`` (in the copy), ``true`` and ``flipped``. The flips depend on the seed alone (``reuse``: the
    copy is there already, made by this function with this seed)."""
    if not reuse:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(root, copy)
    frame = scan_train(root, num_classes)
    frame["Id"] = frame.path.map(lambda p: Path(p).name)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(frame), round(fraction * len(frame)), replace=False)
    frame["true"] = frame.label
    frame["flipped"] = False
    for i in chosen:
        new = (frame.label[i] + rng.integers(1, num_classes)) % num_classes  # uniform over the other classes
        old = copy / frame.path[i]
        target = copy / "train" / str(new) / old.name
        if not reuse:
            target.parent.mkdir(parents=True, exist_ok=True)
            old.rename(target)
        frame.loc[i, "label"] = int(new)
        frame.loc[i, "flipped"] = True
    frame["path"] = "train/" + frame.label.astype(str) + "/" + frame.Id
    if (copy / "train.csv").is_file() and not reuse:
        frame[["Id", "label"]].rename(columns={"label": "Category"}).to_csv(copy / "train.csv", index=False)
    return frame


def inspect(data: Path, out: Path, args: argparse.Namespace, class_names: list[str]) -> dict[str, Any]:
    """carnet-inspect on ``data`` alone, as a subprocess: its record, wall and CPU seconds, and the command."""
    command = [sys.executable, "-m", "carnet.tools.inspection", "--data", str(data), "--model", args.model,
               "--weights", str(args.weights), "--class-names", ",".join(class_names), "--out", str(out)]
    if args.reuse and (out / "inspect.json").is_file() and (out / "timing.json").is_file():
        return {**json.loads((out / "inspect.json").read_text()), **json.loads((out / "timing.json").read_text())}
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    timing = {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "load_average": os.getloadavg()[0],
              "command": shlex.join(["carnet-inspect", *command[3:]])}
    (out / "timing.json").write_text(json.dumps(timing))
    return {**json.loads((out / "inspect.json").read_text()), **timing}


def recovery(frame: pd.DataFrame, out: Path) -> dict[str, Any]:
    """Precision = recall at k = number flipped, from the ranking; precision and recall of the flagged photos."""
    scores = pd.read_csv(out / "label_scores.csv").merge(frame[["path", "flipped"]], on="path", how="left")
    if scores.flipped.isna().any():
        raise SystemExit(f"{out / 'label_scores.csv'} ranks photos that are not in the copy")
    k = int(frame.flipped.sum())
    top = scores.sort_values("rank").head(k)
    flagged = scores[scores.flagged]
    hits = int(flagged.flipped.sum())
    return {"flipped": k, "hits_at_k": int(top.flipped.sum()), "precision_at_k": float(top.flipped.mean()),
            "recall_at_k": float(top.flipped.sum() / k), "flagged": len(flagged),
            "flagged_precision": hits / len(flagged) if len(flagged) else None, "flagged_recall": hits / k}


def probe_accuracy(x: torch.Tensor, y: np.ndarray, xt: torch.Tensor, yt: np.ndarray, num_classes: int) -> float:
    """Test accuracy of carnet's head solver (standardised features, L2 by 5-fold CV) fitted on (x, y)."""
    weight, bias, _ = fit_head(x, torch.as_tensor(np.array(y, dtype=np.int64)), np.arange(len(y)), num_classes)
    return float(((xt @ weight.t() + bias).argmax(1).numpy() == yt).mean())


def train_head(data: Path, out: Path, seed: int, args: argparse.Namespace, class_names: list[str],
               ctx: dict[str, Any], corrections: Path | None = None) -> dict[str, Any]:
    """train.py phase=head, then predict.py on the test photos: test accuracy, commands, seconds. ``--reuse`` keeps
    a completed run with the same corrections file (by its SHA-256) and its submission."""
    run, submission = out / "run", out / "submission.csv"
    train = [sys.executable, str(REPO / "train.py"), "phase=head", f"model={args.model}",
             f"model.weights={args.weights}", f"data.root={data}", f"data.class_names={hydra_list(class_names)}",
             "trainer=cpu", f"seed={seed}", "head_fit.views=1", f"paths.output_dir={out}", f"hydra.run.dir={run}"]
    if corrections is not None:
        train.append(f"data.corrections={corrections}")
    predict = [sys.executable, str(REPO / "predict.py"), f"ckpt={run / 'checkpoints' / 'best.ckpt'}",
               f"data.root={data}", f"out={submission}", "device=cpu"]
    summary = read_summary(run, missing_ok=True)
    wanted = hashlib.sha256(corrections.read_bytes()).hexdigest() if corrections is not None else None
    reuse = args.reuse and submission.is_file() and summary is not None and summary.status == "completed" and \
        (summary.corrections or {}).get("sha256") == wanted
    if reuse:
        shown = [" ".join(shell_word(c) for c in ["python", Path(c[1]).name, *c[2:]]) for c in (train, predict)]
        seconds = summary.seconds
    else:
        shutil.rmtree(out, ignore_errors=True)
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
        shown_train, train_s = run_command(train, out / "train.log", env)
        shown_predict, predict_s = run_command(predict, out / "predict.log", env)
        shown, seconds = [shown_train, shown_predict], round(train_s + predict_s, 1)
        summary = read_summary(run)
    return {"test_acc": submission_accuracy(submission, ctx), "best_val_acc": summary.best_val_acc,
            "num_train": summary.num_train, "corrections": summary.corrections, "commands": shown,
            "seconds": seconds, "reused": bool(reuse)}


def spread(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(results: dict[str, Any]) -> str:
    meta, seeds, clean = results["meta"], results["seeds"], results["clean"]
    lines = [f"# Label noise on {meta['data']}", "",
             f"{meta['model']} ({meta['weights']}), {meta['train_photos']} training / {meta['test_photos']} test "
             f"photos, {meta['fraction']:.0%} of the training labels flipped; `{meta['command']}`.", "",
             "| seed | flipped | P@k = R@k | flagged | flagged precision | flagged recall | inspect wall s | "
             "inspect CPU s | suspects s (features + fit) | load avg |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        r, i = s["recovery"], s["inspect"]
        le = i["label_errors"]
        lines.append(f"| {s['seed']} | {r['flipped']} | {r['precision_at_k']:.3f} ({r['hits_at_k']}/{r['flipped']}) | "
                     f"{r['flagged']} | {r['flagged_precision']:.3f} | {r['flagged_recall']:.3f} | "
                     f"{i['wall_seconds']:.0f} | {i['cpu_seconds']:.0f} | {i['seconds']['suspects']:.0f} "
                     f"({le['feature_seconds']:.0f} + {le['fit_seconds']:.0f}) | {i['load_average']:.1f} |")
    lines += ["", f"Unflipped data: {clean['inspect']['suspects']} photo(s) flagged of {clean['inspect']['ranked']} "
              f"({clean['inspect']['wall_seconds']:.0f} s wall, {clean['inspect']['cpu_seconds']:.0f} s CPU):", ""]
    lines += [f"- `{f['path']}`: given {f['given']}, suggested {f['suggested']} (score {f['score']:.4f})"
              for f in clean["flagged"]] or ["- none"]
    lines += ["", "Test accuracy (linear probe on frozen features, carnet's head solver; mean ± sd over seeds):", "",
              "| labels | test accuracy | training photos |", "|---|---|---|"]
    for key, name in (("noisy", "10 % flipped"), ("dropped", "flipped, minus the flagged photos"),
                      ("clean", "clean")):
        lines.append(f"| {name} | {spread([s['probe'][key]['test_acc'] for s in seeds])} | "
                     f"{spread([s['probe'][key]['photos'] for s in seeds], 0)} |")
    trained = [s for s in seeds if s.get("head")]
    if trained:
        lines += ["", f"Test accuracy after `train.py phase=head` (seeds {[s['seed'] for s in trained]}; carnet "
                  "validates on 20 % of the photos):", "",
                  "| labels | test accuracy | val accuracy | training photos |", "|---|---|---|---|"]
        for key, name in (("noisy", "10 % flipped"), ("dropped", "flipped + data.corrections=label_issues.csv"),
                          ("clean", "clean")):
            rows = [s["head"][key] for s in trained]
            lines.append(f"| {name} | {spread([r['test_acc'] for r in rows])} | "
                         f"{spread([r['best_val_acc'] for r in rows])} | {spread([r['num_train'] for r in rows], 0)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--train-seeds", type=int, nargs="*", default=[0], help="seeds that also train phase=head")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--out", type=Path, default=Path("outputs/label_noise"))
    ap.add_argument("--reuse", action="store_true",
                    help="keep the inspections and phase=head runs already in --out (a run with other corrections, or "
                         "an inspection folder without timing.json, is redone)")
    args = ap.parse_args(argv)
    args.data, args.weights, args.out = args.data.resolve(), args.weights.resolve(), args.out.resolve()
    class_names = class_names_of(args.data)
    k = len(class_names)
    train, test = scan_train(args.data, k), test_labels(args.data)
    ctx = {"test": test}
    meta = {"command": shlex.join(["python", "benchmarks/label_noise.py", *(argv or sys.argv[1:])]),
            "data": str(args.data), "weights": str(args.weights), "model": args.model, "fraction": args.fraction,
            "train_photos": len(train), "test_photos": len(test), "cpus": os.cpu_count()}
    args.out.mkdir(parents=True, exist_ok=True)

    print("features of every photo (for the probe's test accuracy)", flush=True)
    backbone = pretrained_backbone(timm_model_name(args.model), args.image_size, str(args.weights))
    runner = inspect_runner(device="cpu")
    photos = Images(args.data, [*train.path, *test.path], [*train.path, *test.path], [-1] * (len(train) + len(test)))
    features = frozen_features(backbone.net, photos, backbone.meta, runner)
    by_id = dict(zip([Path(p).name for p in photos.paths], features, strict=True))
    xt, yt = torch.stack([by_id[i] for i in test.Id]), test.Category.to_numpy()

    results: dict[str, Any] = {"meta": meta, "seeds": []}
    clean = inspect(args.data, args.out / "clean" / "inspect", args, class_names)
    flagged = pd.read_csv(args.out / "clean" / "inspect" / "label_issues.csv")
    results["clean"] = {"inspect": clean, "flagged": flagged.to_dict("records")}
    print(f"unflipped: {clean['suspects']} flagged, {clean['wall_seconds']:.0f} s", flush=True)
    for seed in args.seeds:
        base = args.out / f"seed{seed}"
        copy = base / "data"
        frame = flipped_copy(args.data, copy, args.fraction, seed, k, reuse=args.reuse)
        record = inspect(copy, base / "inspect", args, class_names)
        rec = recovery(frame, base / "inspect")
        issues = base / "inspect" / "label_issues.csv"
        kept, _ = apply_corrections(frame, read_corrections(issues, class_names), issues)
        x_of = lambda rows: torch.stack([by_id[i] for i in rows.Id])  # noqa: E731
        probe = {"noisy": {"photos": len(frame), "test_acc": probe_accuracy(x_of(frame), frame.label.to_numpy(), xt,
                                                                            yt, k)},
                 "dropped": {"photos": len(kept), "test_acc": probe_accuracy(x_of(kept), kept.label.to_numpy(), xt,
                                                                             yt, k)},
                 "clean": {"photos": len(frame), "test_acc": probe_accuracy(x_of(frame), frame.true.to_numpy(), xt,
                                                                            yt, k)}}
        entry = {"seed": seed, "recovery": rec, "inspect": record, "probe": probe}
        print(f"seed {seed}: P@k {rec['precision_at_k']:.3f}, flagged {rec['flagged']} (precision "
              f"{rec['flagged_precision']:.3f}, recall {rec['flagged_recall']:.3f}), inspect "
              f"{record['wall_seconds']:.0f} s; probe test acc " + ", ".join(f"{key} {v['test_acc']:.3f}"
                                                                             for key, v in probe.items()), flush=True)
        if seed in args.train_seeds:
            entry["head"] = {
                "noisy": train_head(copy, base / "head_noisy", seed, args, class_names, ctx),
                "dropped": train_head(copy, base / "head_dropped", seed, args, class_names, ctx, issues),
                "clean": train_head(args.data, base / "head_clean", seed, args, class_names, ctx)}
            print(f"seed {seed}: phase=head test acc " + ", ".join(f"{key} {v['test_acc']:.3f}"
                                                                   for key, v in entry["head"].items()), flush=True)
        results["seeds"].append(entry)
        (args.out / "label_noise.json").write_text(json.dumps(results, indent=2, default=str))
    text = report(results)
    (args.out / "label_noise.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
