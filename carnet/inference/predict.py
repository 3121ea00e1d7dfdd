"""Checkpoints -> Kaggle submission (``split=test``), the top classes of a folder of photos (``images=DIR``), an
honest validation report (``split=val``) or the out-of-fold report of a k-fold sweep (``split=oof``): the driver
of conf/predict.yaml.

The parts: :mod:`~carnet.inference.ensemble` (checkpoints and weights), :mod:`~carnet.inference.selection` (which
images), :mod:`~carnet.inference.runner` (batched inference), :mod:`~carnet.inference.tta` (views and their merge),
:mod:`~carnet.inference.evaluate` (val and oof reports) and :mod:`~carnet.inference.outputs` (submission and
pseudo-labels). ``carnet-predict`` (carnet.inference.cli, ``predict.py`` at the top level) runs :func:`predict`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from carnet.config import plain
from carnet.config_check import check_predict_config
from carnet.errors import PredictError
from carnet.inference.ensemble import load_models
from carnet.inference.evaluate import describe, evaluate_oof, evaluate_val, uses_tta
from carnet.inference.outputs import (
    check_outputs,
    check_pseudo_labels,
    check_report_dir,
    reports_folder,
    show_image_predictions,
    top_k_table,
    write_image_predictions,
    write_pseudo_labels,
    write_submission,
)
from carnet.inference.runner import Runner, console, predict_probs
from carnet.inference.selection import Images, folder_images, oof_images, test_images, val_images
from carnet.inference.tta import TTA, build_views


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, ListConfig)):
        return list(value)
    return [value]


def build_tta(cfg: DictConfig | dict[str, Any] | bool | None) -> tuple[TTA, bool]:
    """(TTA recipe, auto) from the ``tta`` config group; false/None -> plain prediction."""
    if cfg in (None, False) or (hasattr(cfg, "get") and not cfg.get("enabled", True)):
        return TTA(), False
    if cfg is True:
        cfg = {"views": {"identity": {}, "hflip": {"hflip": True}}}
    spec = dict(plain(cfg))
    tta = TTA(tuple(build_views(spec.get("views"))), spec.get("merge", "mean"), spec.get("beta"))
    return tta, bool(spec.get("auto", False))


@dataclass
class _Plan:
    """What the cheap checks resolved before any checkpoint is loaded."""

    out: Path
    report_dir: Path | None = None
    images: Images | None = None  # split=test: the test split or images=DIR
    top_k: int | None = None  # images=DIR only
    pseudo: tuple[float, Path] | None = None  # (threshold, folder)


def _plan(cfg: DictConfig, auto: bool) -> _Plan:
    """The cheap checks, before any checkpoint is loaded: split, outputs, pseudo-label folder and the images to
    predict (test split or ``images=``); a mistake in them costs nothing and replaces no earlier output."""
    if cfg.split not in ("test", "val", "oof"):
        raise PredictError(f"split={cfg.split}: expected test (submission), val (validation report) or oof "
                           f"(out-of-fold report of k-fold runs)")
    photos = cfg.get("images")
    if photos is not None and cfg.split != "test":
        raise PredictError(f"images={photos} with split={cfg.split}: a folder of photos has no labels to report "
                           f"on; use images= with split=test (the default)")
    default = "predictions.csv" if photos is not None else "submission.csv"
    out = cfg.get("out") or default
    plan = _Plan(Path(out))
    if cfg.get("report_dir") and (cfg.split != "test" or auto):  # tta=auto writes the val report too
        plan.report_dir = check_report_dir(cfg.report_dir)  # else the runs' folder, known once they are found
    if cfg.split != "test":
        return plan
    plan.out, _ = check_outputs(out, default)
    pseudo = cfg.get("pseudo_label") or {}
    if pseudo.get("threshold") is not None:
        try:
            threshold = float(pseudo.threshold)
        except ValueError as err:
            raise PredictError(f"pseudo_label.threshold={pseudo.threshold}: expected a probability in (0, 1]") \
                from err
        name = pseudo.get("name") or time.strftime("%Y-%m-%d_%H-%M-%S")
        plan.pseudo = threshold, check_pseudo_labels(threshold, Path(pseudo.dir) / name)
    if photos is not None:
        plan.top_k = cfg.top_k
        plan.images = folder_images(photos)
    else:
        plan.images = test_images(cfg.data.root or "data")
    return plan


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Run predict as configured (conf/predict.yaml); return what it wrote and measured."""
    started = time.time()
    check_predict_config(cfg)
    tta, auto = build_tta(cfg.get("tta"))
    plan = _plan(cfg, auto)
    models = load_models(_as_list(cfg.ckpt), _as_list(cfg.get("weights")) or None)
    runner = Runner.from_config(cfg)
    result: dict[str, Any] = {"models": [str(m.path) for m in models]}

    if cfg.split == "oof":  # each image scored by its own fold's checkpoint: no ensemble, so no weights
        if _as_list(cfg.get("weights")) or (cfg.get("pseudo_label") or {}).get("threshold") is not None:
            console.print("weights and pseudo_label are ignored with split=oof (one checkpoint per fold)")
        parts, num_folds, total = oof_images(models, cfg.data.root, _as_list(cfg.get("run_dir")))
        report_dir = plan.report_dir or check_report_dir(reports_folder([p.run_dir for p in parts]))
        tta, report = evaluate_oof(parts, tta, auto, runner, report_dir, num_folds, total)
        result.update(oof=report, tta=tta, seconds=time.time() - started)
        return result

    if cfg.split == "val" or auto:
        val = val_images(models, cfg.data.root, _as_list(cfg.get("run_dir")))
        report_dir = plan.report_dir or check_report_dir(reports_folder(val.runs))
        tta, report = evaluate_val(models, val, tta, auto, runner, report_dir)
        result.update(val=report, tta=tta)
        if cfg.split == "val":
            if (cfg.get("pseudo_label") or {}).get("threshold") is not None:
                console.print("pseudo_label.threshold is ignored with split=val (pseudo-labels come from test images)")
            result["seconds"] = time.time() - started
            return result

    images = plan.images
    probs = predict_probs(models, images, tta, runner)
    class_names = models[0].class_names
    if plan.top_k is not None:  # images=DIR
        written, probs_path = write_image_predictions(images.ids, probs, class_names, plan.out, plan.top_k)
        show_image_predictions(top_k_table(images.ids, probs, class_names, 1))
        result["predictions"] = written
    else:
        written, probs_path = write_submission(images.ids, probs, class_names, plan.out)
        result["submission"] = written
    console.print(f"wrote {written} ({len(images.ids)} rows) and {probs_path}"
                  + (f" with TTA {describe(tta)}" if uses_tta(tta) else ""))
    result.update(probs_csv=probs_path, probs=probs, ids=images.ids, tta=tta)

    if plan.pseudo is not None:
        threshold, folder = plan.pseudo
        result["pseudo"] = write_pseudo_labels(images, probs, class_names, threshold, folder,
                                               [m.path for m in models])
    result["seconds"] = time.time() - started
    return result
