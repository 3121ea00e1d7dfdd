"""K-fold: folds are disjoint, cover the data, are stratified and fixed by the seed; split.csv and oof_frame."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from carnet.artifacts import SPLIT_FILE, write_json
from carnet.data.splits import assign_split, stratified_folds
from carnet.errors import DataError
from carnet.inference.oof import oof_frame
from carnet.tools.demo import CLASS_NAMES
from tests.helpers.overrides import TINY
from tests.helpers.recipe import data_module
from tests.helpers.runs import run_script


def test_folds_are_disjoint_cover_and_stratified() -> None:
    rng = np.random.default_rng(0)
    labels = rng.choice(7, size=5003, p=[0.3, 0.2, 0.15, 0.15, 0.1, 0.07, 0.03])
    paths = [f"train/{k}/{i}.jpg" for i, k in enumerate(labels)]
    folds = stratified_folds(paths, labels, 5, seed=11)
    assert folds.shape == labels.shape and set(folds) == set(range(5))
    # each row in exactly one fold's validation set: disjoint and covering
    val_sets = [set(np.flatnonzero(assign_split(paths, labels, 11, 0.2, 5, k)[0] == "val")) for k in range(5)]
    assert sum(len(v) for v in val_sets) == len(labels)
    assert set().union(*val_sets) == set(range(len(labels)))
    # stratified: every class's share of each fold a fifth, up to sampling noise (3.5 standard deviations)
    for k in np.unique(labels):
        n = (labels == k).sum()
        shares = np.bincount(folds[labels == k], minlength=5) / n
        assert np.all(np.abs(shares - 0.2) <= 3.5 * np.sqrt(0.2 * 0.8 / n)), (k, shares)
    # the seed fixes the folds
    assert np.array_equal(folds, stratified_folds(paths, labels, 5, seed=11))
    assert not np.array_equal(folds, stratified_folds(paths, labels, 5, seed=12))


@pytest.mark.parametrize(("num_folds", "fold", "match"), [(5, 5, "data.fold=5"), (1, 0, "num_folds=1"),
                                                          (None, 0, "data.fold=0")])
def test_bad_fold_settings_are_clear(num_folds: int | None, fold: int, match: str) -> None:
    with pytest.raises(DataError, match=match):
        assign_split(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], [0, 1, 0, 1], 0, 0.2, num_folds, fold)


def _fold_runs(tiny_data: Path, tmp_path: Path, num_folds: int = 4) -> list[Path]:
    """What `train.py -m data.fold=0..3` leaves before training: split.csv + summary.json per fold."""
    runs = []
    for k in range(num_folds):
        dm = data_module(tiny_data, CLASS_NAMES, num_workers=0, verify=False, num_folds=num_folds, fold=k)
        dm.setup()
        run = tmp_path / f"fold{k}"
        run.mkdir()
        dm.write_split(run / SPLIT_FILE)
        write_json(run / "summary.json", {"data_root": str(tiny_data), **dm.data_summary()})
        runs.append(run)
    return runs


def test_datamodule_folds_and_oof_frame(tiny_data: Path, tmp_path: Path) -> None:
    runs = _fold_runs(tiny_data, tmp_path)
    splits = [pd.read_csv(r / SPLIT_FILE) for r in runs]
    assert all((s.split == "val").eq(s.fold == k).all() for k, s in enumerate(splits))  # fold k's val = fold k
    assert all(s.fold.equals(splits[0].fold) for s in splits)  # the same assignment in every run
    oof = oof_frame(runs, require_all=True)
    everything = splits[0]
    assert sorted(oof.path) == sorted(everything.path)  # every image exactly once, out of fold
    merged = oof.merge(everything, on="path", suffixes=("", "_split"))
    assert (merged.label == merged.label_split).all() and (merged.fold == merged.fold_split).all()
    assert (oof.run_dir == [str(runs[f]) for f in oof.fold]).all()

    with pytest.raises(DataError, match=r"missing fold\(s\) \[3\]"):
        oof_frame(runs[:3], require_all=True)
    assert len(oof_frame(runs[:3])) == (everything.fold < 3).sum()
    with pytest.raises(DataError, match="both validate on fold 0"):
        oof_frame([runs[0], runs[0]])


def test_oof_frame_refuses_runs_with_different_folds(tiny_data: Path, tmp_path: Path) -> None:
    runs = _fold_runs(tiny_data, tmp_path, num_folds=4)
    other = tmp_path / "other_seed"
    other.mkdir()
    dm = data_module(tiny_data, CLASS_NAMES, num_workers=0, verify=False, num_folds=4, fold=1, seed=99)
    dm.setup()
    dm.write_split(other / SPLIT_FILE)
    (other / "summary.json").write_text(json.dumps(dm.data_summary()))
    with pytest.raises(DataError, match="differently"):
        oof_frame([runs[0], other])
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "summary.json").write_text(json.dumps({"fold": None}))
    with pytest.raises(DataError, match="not trained on a fold"):
        oof_frame([plain])


@pytest.mark.slow
def test_train_multirun_over_folds(tiny_data: Path, tmp_path: Path) -> None:
    """`python train.py -m data.fold=0,1` trains one run per fold and records the fold everywhere."""
    sweep = tmp_path / "sweep"
    run_script("train.py", "-m", f"data.root={tiny_data}", *TINY, "data.num_folds=3", "data.fold=0,1",
        f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=fold${data.fold}")
    for k in (0, 1):
        summary = json.loads((sweep / f"fold{k}" / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["fold"] == k and summary["num_folds"] == 3
        split = pd.read_csv(sweep / f"fold{k}" / SPLIT_FILE)
        assert ((split.split == "val") == (split.fold == k)).all()
    oof = oof_frame([sweep / "fold0", sweep / "fold1"])
    assert set(oof.fold) == {0, 1}
