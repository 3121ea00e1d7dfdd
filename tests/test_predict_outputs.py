"""predict's outputs (issue 13, item 8): checked before anything is loaded or written, and one probabilities file
per submission (``<out stem>.probs.csv``), so two predictions into one folder keep both.

Runs predict in-process on the session's tiny checkpoint and tiny dataset (tests/conftest.py).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from carnet.errors import CarnetError
from tests.helpers.runs import run_predict
from tests.helpers.tolerances import PROBS


def test_probs_file_is_named_after_the_submission() -> None:
    from carnet.inference.outputs import output_paths

    assert output_paths("out/submission.csv") == (Path("out/submission.csv"), Path("out/submission.probs.csv"))
    assert output_paths("b") == (Path("b"), Path("b.probs.csv"))


def test_out_folder_is_refused_before_loading_or_writing(tiny_checkpoint: Path, tiny_data: Path,
                                                         tmp_path: Path) -> None:
    """out= a folder: one line naming it, and no file beside it replaced (it used to overwrite probs.csv)."""
    folder = tmp_path / "results"
    folder.mkdir()
    old = {tmp_path / "probs.csv": "Id,old\n", tmp_path / "results.probs.csv": "Id,old\n"}
    for path, text in old.items():
        path.write_text(text)
    with pytest.raises(CarnetError, match=re.escape(f"out={folder}")) as err:
        run_predict(f"ckpt={tiny_checkpoint}", f"data.root={tiny_data}", f"out={folder}")
    assert "\n" not in str(err.value) and "submission.csv" in str(err.value)  # says what to pass instead
    assert {p: p.read_text() for p in old} == old
    assert list(folder.iterdir()) == []

    # checked before the checkpoints are loaded: a broken checkpoint is not what is reported
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CarnetError, match=re.escape(f"out={folder}")):
        run_predict(f"ckpt={garbage}", f"data.root={tiny_data}", f"out={folder}")
    with pytest.raises(CarnetError, match="is a file"):  # a parent that is a file
        run_predict(f"ckpt={garbage}", f"data.root={tiny_data}", f"out={garbage}/submission.csv")


def test_two_predictions_into_one_folder_keep_their_probabilities(tiny_checkpoint: Path, tiny_data: Path,
                                                                  tmp_path: Path) -> None:
    plain = run_predict(f"ckpt={tiny_checkpoint}", f"data.root={tiny_data}", f"out={tmp_path / 'plain.csv'}")
    flipped = run_predict(f"ckpt={tiny_checkpoint}", f"data.root={tiny_data}", f"out={tmp_path / 'tta.csv'}",
                          "tta='true'")
    assert not torch.allclose(plain["probs"], flipped["probs"], atol=1e-6)
    for name, result in (("plain", plain), ("tta", flipped)):
        path = tmp_path / f"{name}.probs.csv"
        assert result["probs_csv"] == path
        written = pd.read_csv(path, dtype={"Id": str})
        assert list(written.Id) == result["ids"]
        np.testing.assert_allclose(written.drop(columns="Id").to_numpy(), result["probs"].numpy(), **PROBS)
    assert not (tmp_path / "probs.csv").exists()


def test_other_outputs_are_checked_before_loading(tiny_data: Path, tmp_path: Path) -> None:
    """An existing pseudo-label folder, a bad threshold or a report_dir that is a file fail before the (here
    unreadable) checkpoint is even opened, instead of after the whole inference."""
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    (tmp_path / "pseudo" / "round1").mkdir(parents=True)
    common = [f"ckpt={garbage}", f"data.root={tiny_data}", f"out={tmp_path / 'submission.csv'}"]
    with pytest.raises(CarnetError, match="round1 already exists"):
        run_predict(*common, "pseudo_label.threshold=0.9", "pseudo_label.name=round1",
                    f"pseudo_label.dir={tmp_path / 'pseudo'}")
    with pytest.raises(CarnetError, match=re.escape("pseudo_label.threshold=1.5")):
        run_predict(*common, "pseudo_label.threshold=1.5", f"pseudo_label.dir={tmp_path / 'pseudo'}")
    with pytest.raises(CarnetError, match=re.escape(f"report_dir={garbage}")):
        run_predict(*common, "split=val", f"report_dir={garbage}")
    assert not (tmp_path / "submission.csv").exists()


@pytest.mark.parametrize("which", ["out", "probs"])
def test_a_read_only_output_is_refused_before_loading(which: str, tiny_checkpoint: Path, tiny_data: Path,
                                                      tmp_path: Path) -> None:
    """out= an existing 0444 file (or its probabilities file) is refused in one line; the file keeps its text and
    mode (the atomic rename replaced it, root or not). Checked before the checkpoint is opened: an unreadable one
    is not what is reported."""
    out = tmp_path / "submission.csv"
    locked = out if which == "out" else tmp_path / "submission.probs.csv"
    locked.write_text("Id,Category\nkeep,0\n")
    locked.chmod(0o444)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    for ckpt in (tiny_checkpoint, garbage):
        with pytest.raises(CarnetError, match=re.escape(f"out={out}") + ".*read-only") as err:
            run_predict(f"ckpt={ckpt}", f"data.root={tiny_data}", f"out={out}")
        assert "\n" not in str(err.value) and str(locked) in str(err.value)
        assert locked.read_text() == "Id,Category\nkeep,0\n" and locked.stat().st_mode & 0o777 == 0o444


FORMULAS = ["=HYPERLINK(1).jpg", "+1.jpg", "-2.jpg", "@SUM(1).jpg"]


def test_file_names_that_spreadsheets_run_are_neutralised(tiny_checkpoint: Path, tiny_data: Path,
                                                          tmp_path: Path) -> None:
    """Photo names starting with = + - @ are written with a leading single quote (OWASP, CSV injection) into
    predictions.csv and its probabilities file; submission.csv keeps the Ids exactly as Kaggle lists them."""
    photos = tmp_path / "photos"
    photos.mkdir()
    source = next((tiny_data / "test_upload").glob("*.jpg"))
    for name in [*FORMULAS, "plain.jpg"]:
        shutil.copy(source, photos / name)
    run_predict(f"ckpt={tiny_checkpoint}", f"images={photos}", f"out={tmp_path / 'predictions.csv'}")
    expected = sorted(["'" + n for n in FORMULAS] + ["plain.jpg"])
    for name in ("predictions.csv", "predictions.probs.csv"):
        assert sorted(pd.read_csv(tmp_path / name).file) == expected, name

    # The Kaggle layout: the same names as test Ids
    root = tmp_path / "kaggle"
    shutil.copytree(photos, root / "test_upload")
    pd.DataFrame({"Id": [*FORMULAS, "plain.jpg"], "Category": 0}).to_csv(root / "sample-submission.csv", index=False)
    run_predict(f"ckpt={tiny_checkpoint}", f"data.root={root}", f"out={tmp_path / 'submission.csv'}")
    assert list(pd.read_csv(tmp_path / "submission.csv").Id) == [*FORMULAS, "plain.jpg"]
    assert list(pd.read_csv(tmp_path / "submission.probs.csv").Id) == ["'" + n for n in FORMULAS] + ["plain.jpg"]
