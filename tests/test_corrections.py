"""data.corrections: the user's keep/drop/relabel verdicts from label_issues.csv, applied after the split so that no
other photo changes side, recorded in summary.json, and every mistake in the file one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from carnet.artifacts import SPLIT_FILE
from carnet.data.corrections import apply_corrections, read_corrections
from carnet.data.datamodule import CarDataModule
from carnet.errors import DataError
from carnet.summary import read_summary
from carnet.tools.demo import CLASS_NAMES
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import ONE_BATCH
from tests.helpers.recipe import data_module

NAMES = list(CLASS_NAMES)


def _split(root: Path, corrections: Path | None = None) -> tuple[pd.DataFrame, CarDataModule]:
    dm = data_module(root, NAMES, image_size=64, verify=False, num_workers=0, corrections=corrections)
    dm.setup()
    return dm.split, dm


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_drop_and_relabel_move_no_other_photo(tiny_data: Path, tmp_path: Path) -> None:
    plain, _ = _split(tiny_data)
    # The only validation photo of its class: drawn without it, the split would send another photo of that class to
    # validation (every class is validated); applied after the split, nothing else moves.
    val_counts = plain[plain.split == "val"].label.value_counts()
    lone = plain[(plain.split == "val") & plain.label.isin(val_counts[val_counts == 1].index)].iloc[0]
    moved = plain[(plain.split == "train") & (plain.label != lone.label)].iloc[0]
    kept = plain[(plain.split == "train") & (plain.label != moved.label) & (plain.path != lone.path)].iloc[0]
    new_label = (int(moved.label) + 1) % len(NAMES)
    issues = _write(tmp_path / "label_issues.csv", [
        {"rank": 1, "path": lone.path, "split": "val", "given": NAMES[lone.label], "suggested": NAMES[0],
         "score": 0.01, "action": "drop"},
        {"rank": 2, "path": moved.path, "split": "train", "given": NAMES[moved.label],
         "suggested": NAMES[new_label], "score": 0.02, "action": "Relabel"},
        {"rank": 3, "path": kept.path, "split": "train", "given": kept.label, "suggested": NAMES[0], "score": 0.03,
         "action": "keep"}])

    corrected, dm = _split(tiny_data, issues)
    assert lone.path not in set(corrected.path)
    row = corrected.set_index("path").loc[moved.path]
    assert (row.label, row.split) == (new_label, "train")
    others = plain[~plain.path.isin([lone.path, moved.path])].set_index("path")
    assert corrected.set_index("path").loc[others.index, ["label", "split"]].equals(others[["label", "split"]])
    stats = dm.data_summary()["corrections"]
    assert {k: stats[k] for k in ("rows", "dropped", "relabelled", "kept")} == {"rows": 3, "dropped": 1,
                                                                               "relabelled": 1, "kept": 1}
    assert len(stats["sha256"]) == 64


@pytest.mark.parametrize(("rows", "match"), [
    ([{"path": "train/0/x.jpg"}], r"expected at least path, action"),
    ([{"path": "{first}", "action": "remove"}], r"row 2 .*action 'remove'; expected one of keep, drop, relabel"),
    ([{"path": "{first}", "action": "relabel", "suggested": "Tesla"}], r"row 2 column suggested: 'Tesla' is not"),
    ([{"path": "{first}", "action": "relabel", "suggested": ""}], r"relabel needs the new class in column suggested"),
    ([{"path": "{first}", "action": "drop"}, {"path": "{first}", "action": "keep"}], r"has 2 rows"),
    ([{"path": "train/0/nope.jpg", "action": "drop"}], r"not photos of this data set, first: train/0/nope.jpg"),
    ([{"path": "{first}", "action": "drop", "given": "{other}"}], r"is labelled \d+ in the data but \d+ in the file"),
])
def test_bad_corrections_are_one_line(tiny_data: Path, tmp_path: Path, rows: list[dict], match: str) -> None:
    frame = pd.read_csv(tiny_data / "train.csv")
    first = f"train/{frame.Category[0]}/{frame.Id[0]}"
    other = NAMES[(frame.Category[0] + 1) % len(NAMES)]
    rows = [{k: str(v).format(first=first, other=other) for k, v in row.items()} for row in rows]
    path = _write(tmp_path / "label_issues.csv", rows)
    with pytest.raises(DataError, match=match) as caught:
        _split(tiny_data, path)
    assert "\n" not in str(caught.value)


def test_missing_corrections_file_is_named(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.corrections=.*gone.csv: file not found"):
        read_corrections(tmp_path / "gone.csv", NAMES)


def test_class_index_is_accepted_and_given_is_optional(tmp_path: Path) -> None:
    frame = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "label": [0, 1]})
    path = _write(tmp_path / "c.csv", [{"path": "a.jpg", "action": "relabel", "suggested": 2}])
    corrected, stats = apply_corrections(frame, read_corrections(path, ["x", "y", "z"]), path)
    assert corrected.label.tolist() == [2, 1] and stats["relabelled"] == 1


def test_training_records_the_corrections(train_run, tiny_data: Path, tmp_path: Path) -> None:
    frame = pd.read_csv(tiny_data / "train.csv")
    dropped = f"train/{frame.Category[0]}/{frame.Id[0]}"
    issues = _write(tmp_path / "label_issues.csv", [{"path": dropped, "action": "drop"}])
    run, _ = train_run(f"data.corrections={issues}", "data.verify=false", "trainer.num_sanity_val_steps=0",
                       "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["corrections"]["dropped"] == 1 and summary["corrections"]["file"] == str(issues)
    assert dropped not in set(pd.read_csv(run / SPLIT_FILE).path)
    assert (tiny_data / dropped).is_file()  # the data folder is never touched


def test_a_bad_corrections_file_stops_the_run_before_the_model_is_built(tiny_data: Path, tmp_path: Path) -> None:
    """A mistake inside the file is found with the data folder's checks, in a second: before the run resolves its
    runtime and builds (or downloads) a model; the summary says why."""
    from carnet.training.train import train

    issues = _write(tmp_path / "label_issues.csv", [{"path": "train/0/x.jpg", "action": "remove"}])
    run = tmp_path / "run"
    with pytest.raises(DataError, match=r"row 2 .*action 'remove'"):
        train(compose_cfg([f"data.root={tiny_data}", *ONE_BATCH, f"data.corrections={issues}", f"run_dir={run}",
                           f"paths.output_dir={tmp_path / 'outputs'}"]))
    summary = read_summary(run)
    assert summary.status == "failed" and "action 'remove'" in summary.error
    assert summary.resolved is None  # refused before carnet.runtime resolved the run's `auto` values
