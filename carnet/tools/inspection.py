"""``carnet-inspect``: one static page with the model's mistakes, suspected label errors, duplicates and leaks.

    carnet-inspect RUN_DIR                      # a run: its validation photos; label errors from a probe
    carnet-inspect SWEEP_DIR                    # a k-fold sweep: every photo out of fold; label errors from it
    carnet-inspect best.ckpt --data ROOT        # a checkpoint and the data it should score
    carnet-inspect --data ROOT --model NAME     # the data alone: a probe on ImageNet features

Writes ``index.html`` (with ``thumbs/``), ``label_issues.csv`` (the flagged photos, ``action=drop`` each: edit to
keep/drop/relabel, then train with ``data.corrections=.../label_issues.csv``), ``label_scores.csv`` (every photo's
score), ``predictions.csv`` (the scored photos' probabilities), ``inspect.json`` (the figures) and the audit's files
(``audit/``) to ``--out`` (default: ``RUN/inspect``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from carnet.artifacts import write_csv_atomic, write_json, write_text_atomic
from carnet.config import config_dir
from carnet.errors import InspectError, exit_on_error
from carnet.inspection.targets import Scored, Target, resolve

if TYPE_CHECKING:
    from carnet.inference.runner import Runner

ISSUES, SCORES, PAGE, FACTS = "label_issues.csv", "label_scores.csv", "index.html", "inspect.json"
PREDICTIONS = "predictions.csv"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that is a file, or whose label_issues.csv was changed since carnet-inspect wrote it (the
    user's verdicts: a new page must not overwrite them)."""
    if out.exists() and not out.is_dir():
        raise InspectError(f"--out {out} is a file; expected a folder for the page")
    issues = out / ISSUES
    if not issues.is_file():
        return
    facts = out / FACTS
    written = json.loads(facts.read_text()).get("label_issues_sha256") if facts.is_file() else None
    if written != _sha256(issues):
        raise InspectError(f"{issues} has changes carnet-inspect did not make (your keep/drop/relabel edits?): move "
                           f"it away or pass another --out, so that a new page does not overwrite it")


def inspect_runner(device: str | None = None, batch_size: int | None = None,
                   workers: int | str | None = None) -> Runner:
    """predict's batched inference (conf/predict.yaml: memory format, mixed precision, reduced-scale decoding, and
    the defaults of the three arguments), with the options this command was given."""
    from omegaconf import OmegaConf

    from carnet.inference.runner import Runner

    cfg = OmegaConf.load(config_dir() / "predict.yaml")  # its values only: no Hydra composition is needed
    for key, value in (("device", device), ("data.batch_size", batch_size), ("data.num_workers", workers)):
        if value is not None:
            OmegaConf.update(cfg, key, value)
    return Runner.from_config(cfg)


def _workers(text: str) -> int | str:
    """``--workers``: ``auto`` or a whole number >= 0 (argparse reports anything else in one line)."""
    if text == "auto" or (text.isdigit() and int(text) >= 0):
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: expected auto or a whole number >= 0")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="carnet-inspect", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:7]))
    ap.add_argument("target", nargs="?", help="a run directory, a k-fold sweep folder or a .ckpt file")
    ap.add_argument("--data", type=Path, help="data root (default: the one the run trained on)")
    ap.add_argument("--out", type=Path, help="page folder (default: TARGET/inspect; outputs/inspect for a .ckpt)")
    ap.add_argument("--model", help="with --data alone: the model whose ImageNet features the probe uses "
                                    "(a conf/model name, e.g. tf_efficientnet_lite0, or a timm name)")
    ap.add_argument("--weights", help="the probe's ImageNet weights, a local .safetensors/.pth in timm's key names "
                                      "(default: the run's model.weights, else timm's pretrained weights)")
    ap.add_argument("--class-names", help="with --data alone: class names, comma-separated (default: folder names)")
    ap.add_argument("--image-size", type=int, default=224, help="with --data alone: the probe's image size (224)")
    ap.add_argument("--seed", type=int, default=42, help="the split's seed where it is drawn anew (42, as train.py)")
    ap.add_argument("--val-fraction", type=float, default=0.2, help="the split's val_fraction where drawn anew (0.2)")
    ap.add_argument("--folds", type=int, default=5, help="the probe's cross-validation folds (5)")
    ap.add_argument("--top", type=int, default=24, help="top losses shown (24)")
    ap.add_argument("--show", type=int, default=60, help="suspected label errors shown (60; all in label_issues.csv)")
    ap.add_argument("--pairs", type=int, default=40, help="duplicate pairs shown (40; all in audit/audit_pairs.csv)")
    ap.add_argument("--tta", action="store_true", help="score with test-time augmentation (photo + mirror image)")
    ap.add_argument("--no-audit", action="store_true", help="skip the duplicate and leak search")
    ap.add_argument("--device", help="auto (CUDA if available), cpu, cuda (default: conf/predict.yaml's, auto)")
    ap.add_argument("--batch-size", type=int, help="photos per batch (default: conf/predict.yaml's, 32)")
    ap.add_argument("--workers", type=_workers,
                    help="loader workers (default: conf/predict.yaml's, auto: one per core, at most 8)")
    args = ap.parse_args(argv)
    for name in ("top", "show", "pairs", "batch_size", "image_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a whole number >= 1")
    if args.folds < 2:
        ap.error(f"--folds {args.folds}: expected at least 2")
    if not 0 < args.val_fraction < 1:
        ap.error(f"--val-fraction {args.val_fraction}: expected a fraction in (0, 1)")
    if args.target is not None and (args.model or args.class_names):
        ap.error("--model and --class-names go with --data alone (a run or checkpoint brings its own)")
    return args


def _suspects(target: Target, scored: Scored | None, args: argparse.Namespace, runner: Any,
              progress: Any) -> tuple[Any, dict[str, Any], Scored | None]:
    """(every photo ranked, how, the probe's predictions in data mode): out of fold from a sweep, else a probe."""
    from carnet.inference.selection import Images
    from carnet.inspection.issues import rank_photos
    from carnet.inspection.probe import frozen_features, probe_backbone, probe_oof

    names = target.class_names
    if target.is_sweep:
        ranked = rank_photos(scored.paths, scored.labels, scored.probs, names, [f"fold {k}" for k in scored.folds])
        return ranked, {"source": "out-of-fold predictions of the k-fold sweep"}, None
    model = target.models[0] if target.models else None
    fallback = (model.net, model.meta, str(model.path)) if model is not None else None
    backbone = probe_backbone(target.model_name, target.image_size, args.weights or target.weights,
                              target.pretrained, fallback)
    frame = target.frame
    images = Images(target.root, list(frame.path), list(frame.path), [int(v) for v in frame.label], "photos")
    started = time.perf_counter()
    features = frozen_features(backbone.net, images, backbone.meta, runner, progress)
    featured = time.perf_counter()
    probe = probe_oof(features, frame.label.to_numpy(), len(names), args.folds)
    ranked = rank_photos(list(frame.path), frame.label.to_numpy(), probe.probs, names, list(frame.split))
    how = {"source": f"a {probe.folds}-fold linear probe on frozen features of {backbone.source}",
           "label_free": backbone.label_free, "l2": probe.l2, "cv_log_loss": round(probe.cv_loss, 4),
           "photos": len(frame), "feature_seconds": round(featured - started, 1),
           "fit_seconds": round(time.perf_counter() - featured, 1)}
    as_scored = Scored("probe out-of-fold", list(frame.path), frame.label.to_numpy(), probe.probs) \
        if scored is None else None
    return ranked, how, as_scored


def inspect(args: argparse.Namespace) -> dict[str, Any]:
    """Build the page for ``args``; return what inspect.json records."""
    started = time.perf_counter()
    try:
        import cleanlab  # noqa: F401
    except ImportError as err:
        raise InspectError("carnet-inspect needs cleanlab (label errors) and scikit-learn (scores): pip install "
                           "'carnet[inspect]'") from err
    class_names = [c.strip() for c in args.class_names.split(",")] if args.class_names else None
    target = resolve(args.target, args.data, args.model, class_names, args.image_size, args.weights, args.seed,
                     args.val_fraction)
    out = Path(args.out) if args.out else target.default_out
    if out.resolve().is_relative_to(target.root.resolve()):
        raise InspectError(f"--out {out} is inside the data root {target.root}: carnet-inspect never writes into the "
                           f"data folder; choose another --out")
    check_out(out)  # before anything is computed: a refusal costs nothing

    from carnet.inference.predict import build_tta
    from carnet.inference.runner import progress_bars
    from carnet.inspection import figures
    from carnet.inspection.issues import write_label_issues
    from carnet.inspection.page import Page, Thumbnails, render, wanted_photos

    runner = inspect_runner(args.device, args.batch_size, args.workers)
    tta, _ = build_tta(bool(args.tta))
    seconds: dict[str, float] = {}
    scored = target.predict(runner, tta)
    seconds["predict"] = round(time.perf_counter() - started, 1)
    with progress_bars() as progress:
        ranked, how, probe_scored = _suspects(target, scored, args, runner, progress)
    seconds["suspects"] = round(time.perf_counter() - started - sum(seconds.values()), 1)
    scored = scored or probe_scored
    names = target.class_names

    pairs, pairs_note = None, "Skipped (--no-audit)."
    if not args.no_audit:
        from carnet.tools.audit import audit

        result = audit(target.root, out=out / "audit", class_names=names)
        pairs = figures.pair_sides(result["pairs"], target.frame, target.is_sweep)
        pairs_note = (f"{len(pairs)} pair(s) of exact or near-duplicate photos (perceptual hash, confirmed by a pixel "
                      f"check; carnet-audit), {int(pairs.leak.sum())} of them leaks across the split or into the "
                      f"test photos; leaks and label conflicts first" + (f", the first {args.pairs} shown"
                                                                          if len(pairs) > args.pairs else "") + ".")
        seconds["audit"] = round(time.perf_counter() - started - sum(seconds.values()), 1)

    out.mkdir(parents=True, exist_ok=True)
    flagged = ranked[ranked.flagged]
    write_csv_atomic(ranked.drop(columns=["label", "suggested_label"]).round(4), out / SCORES)
    write_csv_atomic(figures.predictions(scored, names), out / PREDICTIONS)
    write_label_issues(ranked, out / ISSUES)
    headline = figures.headline(scored, len(names))
    facts = [("inspected", f"{target.kind}: {target.name}"), ("data root", str(target.root)),
             ("model", target.model_name), ("split", target.split_note),
             ("label errors from", how["source"] + ("" if how.get("label_free", True) else
                                                    " (it trained on these labels: fewer errors are found)"))]
    page = Page(title=f"carnet inspection: {Path(target.name).name}", facts=facts, class_names=names,
                root=target.root, scope=scored.scope, headline=headline,
                per_class=figures.per_class(scored, names), confusion=figures.confusion(scored, len(names)),
                balance=figures.class_balance(target.frame, names, target.is_sweep),
                balance_note="Photos per class and fold." if target.is_sweep else "Photos per class and side.",
                losses=figures.top_losses(scored, args.top), suspects=flagged.head(args.show),
                suspects_total=len(flagged), pairs=None if pairs is None else pairs.head(args.pairs),
                pairs_note=pairs_note,
                suspects_note=(f"cleanlab's find_label_issues (confident learning) on the out-of-fold probabilities "
                               f"of {len(ranked)} labelled photos from {how['source']}. All flagged photos are in "
                               f"{ISSUES} with action=drop: set keep or relabel (to the suggested class, or edit it) "
                               f"and train with data.corrections={out / ISSUES}; the data folder is never changed."),
                files=[(name, name) for name in (ISSUES, SCORES, PREDICTIONS)]
                + ([] if args.no_audit else [("audit", "audit/audit.md")]))
    if target.kind == "data":
        page.scope_note = "No trained model: the scores are the probe's own out-of-fold predictions."
    thumbs = Thumbnails(out)
    wanted_photos(page, thumbs)
    with progress_bars() as progress:
        thumbs.write(progress)
    write_text_atomic(out / PAGE, render(page, thumbs))
    seconds["page"] = round(time.perf_counter() - started - sum(seconds.values()), 1)
    seconds["total"] = round(time.perf_counter() - started, 1)
    record = {"target": target.name, "kind": target.kind, "data_root": str(target.root), "scope": scored.scope,
              **headline, "suspects": len(flagged), "ranked": len(ranked), "label_errors": how,
              "pairs": None if pairs is None else len(pairs), "leaks": None if pairs is None else int(pairs.leak.sum()),
              "seconds": seconds, "label_issues_sha256": _sha256(out / ISSUES)}
    write_json(out / FACTS, record)
    print(f"{scored.scope}: accuracy {headline['accuracy']:.4f}, log-loss {headline['log_loss']:.4f} on "
          f"{headline['photos']} photos; {len(flagged)} suspected label error(s) of {len(ranked)} photos"
          + ("" if pairs is None else f"; {len(pairs)} duplicate pair(s), {int(pairs.leak.sum())} leak(s)"))
    print(f"page: {out / PAGE} ({seconds['total']:.0f} s)\nlabel issues: {out / ISSUES} (edit the action column, then "
          f"train with data.corrections={out / ISSUES})")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    with exit_on_error("carnet-inspect"):
        inspect(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
