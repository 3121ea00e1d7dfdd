"""The run directory's atomic writers: whole files only, and the modes every other file gets."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from carnet.artifacts import atomic_path, write_csv_atomic, write_json, write_text_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_respect_the_umask(tmp_path: Path, umask_022) -> None:
    import pandas as pd

    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives under this umask
    written = [write_text_atomic(tmp_path / "a.txt", "x"), write_json(tmp_path / "summary.json", {"a": 1}),
               write_csv_atomic(pd.DataFrame({"a": [1]}), tmp_path / "probs.csv")]
    assert {_mode(p) for p in written} == {_mode(plain)} == {0o644}

    os.umask(0o077)
    assert _mode(write_text_atomic(tmp_path / "private.txt", "x")) == 0o600


def test_atomic_folders_respect_the_umask(tmp_path: Path, umask_022) -> None:
    with atomic_path(tmp_path / "export", directory=True) as tmp:
        (tmp / "model.onnx").write_bytes(b"x")
    assert _mode(tmp_path / "export") == 0o755


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = write_text_atomic(tmp_path / "summary.json", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
