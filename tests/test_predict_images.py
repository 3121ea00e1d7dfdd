"""predict on a plain folder of photos (issue 13, item 20): ``images=DIR`` -> file, class, probability and the
top-k, with TTA and ensembles as for the test split; bad folders and files are one-line errors naming them.

Runs predict in-process on the session's tiny checkpoint (tests/conftest.py).
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
from carnet.models.checkpoint import read_checkpoint
from tests.helpers.images import photo
from tests.helpers.reference import reference_probs
from tests.helpers.runs import run_predict


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Ten photos as a user has them: JPEGs and a PNG, upper-case suffixes, a sub-folder, and files to skip."""
    folder = tmp_path / "my photos"
    (folder / "trip").mkdir(parents=True)
    names = [f"IMG_{i:04d}.JPG" for i in range(6)] + ["car.jpeg", "trip/a.jpg", "trip/b.jpg"]
    for i, name in enumerate(names):
        (folder / name).write_bytes(photo(i))
    (folder / "screenshot.png").write_bytes(photo(9, fmt="PNG"))
    (folder / "notes.txt").write_text("not a photo")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "thumb.jpg").write_bytes(b"skipped: in a hidden folder")
    (folder / "._IMG_0000.JPG").write_bytes(b"skipped: a hidden file (macOS resource fork)")
    return folder


EXPECTED_FILES = sorted([f"IMG_{i:04d}.JPG" for i in range(6)] + ["car.jpeg", "screenshot.png", "trip/a.jpg",
                                                                    "trip/b.jpg"])


def test_folder_of_photos_gives_file_class_probability_and_top_k(tiny_checkpoint: Path, photos: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    result = run_predict(f"ckpt={tiny_checkpoint}", f"images={photos}", f"out={out}", "top_k=3",
                         "data.draft=false")
    class_names = read_checkpoint(tiny_checkpoint)["carnet"]["class_names"]
    table = pd.read_csv(out)
    assert list(table.columns) == ["file", "class", "probability", "class_2", "probability_2", "class_3",
                                   "probability_3"]
    assert list(table.file) == EXPECTED_FILES  # sub-folders included, as paths relative to the folder
    expected = reference_probs(tiny_checkpoint, photos, EXPECTED_FILES).numpy()
    order = np.argsort(-expected, axis=1, kind="stable")
    for rank, (name_col, prob_col) in enumerate((("class", "probability"), ("class_2", "probability_2"),
                                                 ("class_3", "probability_3"))):
        assert list(table[name_col]) == [class_names[k] for k in order[:, rank]]
        np.testing.assert_allclose(table[prob_col], expected[np.arange(len(order)), order[:, rank]], atol=1e-5)
    probs = pd.read_csv(tmp_path / "preds.probs.csv")
    assert list(probs.columns) == ["file", *class_names]
    np.testing.assert_allclose(probs[class_names].to_numpy(), expected, atol=1e-5)
    assert result["predictions"] == out and result["probs_csv"] == tmp_path / "preds.probs.csv"
    assert not (tmp_path / "submission.csv").exists()


def test_folder_uses_tta_and_ensembles_like_the_test_split(tiny_checkpoint: Path, tiny_data: Path,
                                                           tmp_path: Path) -> None:
    """The Kaggle test images copied to a plain folder get the same probabilities, with TTA and an ensemble."""
    folder = tmp_path / "plain"
    shutil.copytree(tiny_data / "test_upload", folder)
    settings = [f"ckpt=[{tiny_checkpoint},{tiny_checkpoint}]", "weights=[0.3,0.7]", "tta='true'"]
    kaggle = run_predict(*settings, f"data.root={tiny_data}", f"out={tmp_path / 'submission.csv'}")
    photos = run_predict(*settings, f"images={folder}", f"out={tmp_path / 'photos.csv'}", "top_k=1")
    plain = run_predict(f"ckpt={tiny_checkpoint}", f"images={folder}", f"out={tmp_path / 'plain.csv'}")
    assert photos["ids"] == sorted(kaggle["ids"])
    order = [kaggle["ids"].index(i) for i in photos["ids"]]
    torch.testing.assert_close(photos["probs"], kaggle["probs"][order], atol=1e-5, rtol=1e-4)  # other batches
    assert not torch.allclose(photos["probs"], plain["probs"], atol=1e-6), "TTA changed nothing"
    table = pd.read_csv(tmp_path / "photos.csv")
    assert list(table.columns) == ["file", "class", "probability"]


def test_one_photo_file(tiny_checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    result = run_predict(f"ckpt={tiny_checkpoint}", f"images={photos / 'car.jpeg'}", f"out={tmp_path / 'p.csv'}")
    assert list(pd.read_csv(tmp_path / "p.csv").file) == ["car.jpeg"]
    torch.testing.assert_close(result["probs"], reference_probs(tiny_checkpoint, photos, ["car.jpeg"]),
                               atol=1e-5, rtol=1e-4)


def test_bad_folders_and_photos_are_one_line_errors(tiny_checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    out = tmp_path / "preds.csv"
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no photos here")
    cases = [  # checked before the (unreadable) checkpoint is loaded
        (f"images={empty}", f"no image files .*in {re.escape(str(empty))}"),
        (f"images={tmp_path / 'missing'}", re.escape(f"images={tmp_path / 'missing'} does not exist")),
        (f"images={empty / 'readme.txt'}", re.escape(f"images={empty / 'readme.txt'} is not an image file")),
    ]
    for override, message in cases:
        with pytest.raises(CarnetError, match=message) as err:
            run_predict(f"ckpt={garbage}", override, f"out={out}")
        assert "\n" not in str(err.value)
    with pytest.raises(CarnetError, match=re.escape("split=val")):
        run_predict(f"ckpt={garbage}", f"images={photos}", "split=val", f"out={out}")
    with pytest.raises(CarnetError, match=re.escape("top_k=0")):
        run_predict(f"ckpt={garbage}", f"images={photos}", "top_k=0", f"out={out}")

    broken = photos / "trip" / "b.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a JPEG")
    with pytest.raises(CarnetError, match=re.escape(str(broken))) as err:
        run_predict(f"ckpt={tiny_checkpoint}", f"images={photos}", f"out={out}")
    assert "\n" not in str(err.value) and "sample-submission" not in str(err.value)
    assert not out.exists() and not out.with_name("preds.probs.csv").exists()
