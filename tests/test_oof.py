"""predict split=oof: each fold predicted by its own run's checkpoint, checked against predictions made by hand.

Two real tiny fold runs (`train.py data.num_folds=2 data.fold=0|1`); predict runs in-process through the Hydra
compose API as `python predict.py ... split=oof` composes it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch

from carnet.artifacts import SPLIT_FILE
from carnet.errors import PredictError
from carnet.models.checkpoint import load_checkpoint
from carnet.summary import SUMMARY_FILE
from tests.helpers.images import train_jpegs
from tests.helpers.reference import reference_probs
from tests.helpers.runs import run_predict

# Full-size decoding: by_hand decodes every image at full size too.
OOF = ["split=oof", "data.draft=false"]


def by_hand(ckpt: Path, root: Path, paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain, identity+hflip mean) softmax of the checkpoint on its eval view of each image, without predict."""
    plain = reference_probs(ckpt, root, paths)
    return plain, (plain + reference_probs(ckpt, root, paths, hflip=True)) / 2


@pytest.mark.slow  # ~21 s on 2 cores: two training runs and predict with TTA; keeps `make test` under 10 minutes
def test_oof_accuracy_equals_independent_predictions(train_run: Callable, tiny_data: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    runs = [train_run("data.num_folds=2", f"data.fold={k}", run_dir=tmp_path / f"fold{k}")[0] for k in (0, 1)]
    ckpts = [run / "checkpoints" / "best.ckpt" for run in runs]
    report = tmp_path / "report"
    # given out of fold order: the report is in fold order anyway
    result = run_predict(*OOF, f"ckpt=[{ckpts[1]},{ckpts[0]}]", "tta='true'", f"report_dir={report}")
    oof = result["oof"]

    plain, tta, labels, paths, folds = [], [], [], [], []
    for k, (run, ckpt) in enumerate(zip(runs, ckpts, strict=True)):
        split = pd.read_csv(run / SPLIT_FILE)
        own = split[split.fold == k]
        assert (own.split == "val").all()
        p, t = by_hand(ckpt, tiny_data, list(own.path))
        plain.append(p)
        tta.append(t)
        labels += list(own.label)
        paths += list(own.path)
        folds += [k] * len(own)
    plain, tta, labels = torch.cat(plain), torch.cat(tta), torch.tensor(labels)

    assert oof["plain_accuracy"] == pytest.approx((plain.argmax(-1) == labels).float().mean().item())
    assert oof["tta_accuracy"] == pytest.approx((tta.argmax(-1) == labels).float().mean().item())
    assert oof["accuracy"] == oof["tta_accuracy"]
    torch.testing.assert_close(oof["probs"], tta, atol=1e-5, rtol=1e-4)
    assert oof["folds"] == [0, 1] and oof["missing_folds"] == []

    written = pd.read_csv(report / "oof_predictions.csv")
    class_names = load_checkpoint(ckpts[0])[1]["class_names"]
    assert list(written.columns) == ["path", "label", "fold", "prediction", *class_names]
    assert list(written.path) == paths and list(written.fold) == folds and list(written.label) == labels.tolist()
    assert (written.prediction == written[class_names].to_numpy().argmax(1)).all()
    # every training image exactly once
    train_images = sorted(str(p.relative_to(tiny_data)) for p in train_jpegs(tiny_data))
    assert sorted(written.path) == train_images and written.path.is_unique
    assert (report / "confusion_oof.png").stat().st_size > 0
    table = pd.read_csv(report / "oof_report.csv")
    assert list(table.fold) == ["0", "1", "all"]
    assert table.images.tolist() == [folds.count(0), folds.count(1), len(folds)]
    for k in (0, 1):
        mask = torch.tensor(folds) == k
        assert table.plain_accuracy[k] == pytest.approx((plain[mask].argmax(-1) == labels[mask]).float().mean().item())
    assert "out-of-fold" in capsys.readouterr().err

    # one fold only: partial coverage, said so
    partial = run_predict(*OOF, f"ckpt={ckpts[1]}", f"report_dir={tmp_path / 'partial'}")["oof"]
    assert partial["missing_folds"] == [0] and partial["num_images"] == folds.count(1)
    assert partial["num_train_images"] == len(train_images)
    assert partial["accuracy"] == pytest.approx(table.plain_accuracy[1])
    assert "partial coverage" in capsys.readouterr().err

    # two checkpoints of the same fold
    with pytest.raises(PredictError, match="both validate on fold 0"):
        run_predict(*OOF, f"ckpt=[{ckpts[0]},{ckpts[0]}]", f"report_dir={tmp_path / 'twice'}")

    # a checkpoint whose run was not trained on a fold: summary.json without fold, or split.csv without column
    plain_run = tmp_path / "plain"
    shutil.copytree(runs[0], plain_run)
    summary = json.loads((plain_run / SUMMARY_FILE).read_text())
    (plain_run / SUMMARY_FILE).write_text(json.dumps({**summary, "fold": None, "num_folds": None}))
    not_fold = plain_run / "checkpoints" / "best.ckpt"
    with pytest.raises(PredictError, match=re.escape(str(not_fold)) + ".*not from a k-fold run.*has no 'fold'"):
        run_predict(*OOF, f"ckpt=[{ckpts[1]},{not_fold}]", f"report_dir={tmp_path / 'bad'}")
    (plain_run / SUMMARY_FILE).write_text(json.dumps(summary))
    pd.read_csv(plain_run / SPLIT_FILE).drop(columns="fold").to_csv(plain_run / SPLIT_FILE, index=False)
    with pytest.raises(PredictError, match=re.escape(str(not_fold)) + ".*no 'fold' column"):
        run_predict(*OOF, f"ckpt={not_fold}", f"report_dir={tmp_path / 'bad'}")
    assert not (tmp_path / "bad").exists()
