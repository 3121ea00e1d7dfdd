"""`make data` (carnet-download): fails fast without credentials; unpacks nested zips; idempotent."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from carnet.data.layout import read_test, scan_train
from carnet.tools.download import credentials, layout_complete, main, unpack
from tests.helpers.images import train_jpegs
from tests.helpers.paths import REPO


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_") and k != "XDG_CONFIG_HOME"}
    return {**env, "HOME": str(home)}


def test_without_credentials_fails_fast_with_instructions(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    # -X importtime lists every module the process imports: the Kaggle client (which would try the network) is not
    # among them. (A module list, not a wall-clock bound: on a loaded machine the interpreter's start alone varies.)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "carnet.tools.download", "--root",
                           str(tmp_path / "data")], cwd=REPO, env=_clean_env(home), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "carnet.tools" in imported and not {m for m in imported if m.split(".")[0] == "kaggle"}
    assert "~/.kaggle/kaggle.json" in proc.stderr and "chmod 600" in proc.stderr
    assert "https://www.kaggle.com/competitions/sf-dl-car-classification/rules" in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing written


def test_credentials_are_found_where_the_client_looks(tmp_path: Path) -> None:
    env = _clean_env(tmp_path)
    assert credentials(env) is None
    assert credentials({**env, "KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}) == "KAGGLE_USERNAME/KAGGLE_KEY"
    assert credentials({**env, "KAGGLE_USERNAME": "u"}) is None  # half a pair is no credential
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert credentials(env) == str(tmp_path / ".kaggle" / "kaggle.json")


def _competition_zip(tmp_path: Path, tiny_data: Path) -> Path:
    """A zip shaped like Kaggle's: train.zip (train/<k>/), test.zip (test_upload/), the two CSVs."""
    build = tmp_path / "zipbuild"
    build.mkdir()
    with zipfile.ZipFile(build / "train.zip", "w") as zf:
        for p in train_jpegs(tiny_data):
            zf.write(p, p.relative_to(tiny_data))
    with zipfile.ZipFile(build / "test.zip", "w") as zf:
        for p in sorted((tiny_data / "test_upload").glob("*.jpg")):
            zf.write(p, p.relative_to(tiny_data))
    outer = tmp_path / "sf-dl-car-classification.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(build / "train.zip", "train.zip")
        zf.write(build / "test.zip", "test.zip")
        zf.write(tiny_data / "train.csv", "train.csv")
        zf.write(tiny_data / "sample-submission.csv", "sample-submission.csv")
    return outer


def test_unpack_nested_zips_into_the_layout_and_is_idempotent(tiny_data: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    root = unpack(_competition_zip(tmp_path, tiny_data), tmp_path / "data")
    assert layout_complete(root)
    assert sorted(p.name for p in root.iterdir()) == ["sample-submission.csv", "test_upload", "train", "train.csv"]
    assert len(scan_train(root, 10)) == len(scan_train(tiny_data, 10)) and len(read_test(root)) == 6
    # a second `make data` leaves the unpacked data alone, even without credentials
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    for key in [k for k in os.environ if k.startswith("KAGGLE_")]:
        monkeypatch.delenv(key)
    assert main(["--root", str(root)]) == 0
    assert main(["--root", str(root), "--check"]) == 0


def test_unpack_rejects_an_archive_without_the_competition_files(tmp_path: Path) -> None:
    bad = tmp_path / "other.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("readme.txt", "not the competition")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("Id,Category\n")  # existing files survive a failed unpack
    with pytest.raises(ValueError, match=r"does not contain \['train', 'test_upload', 'train.csv'"):
        unpack(bad, tmp_path / "data")
    assert (tmp_path / "data" / "train.csv").read_text() == "Id,Category\n"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["train.csv"]
