"""The synthetic demo data must match the Kaggle layout exactly, or the real pipeline would choke on it."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from PIL import Image

from carnet.tools import demo
from carnet.tools.demo import CLASS_NAMES, main, make_dataset

PER_CLASS, TEST = 3, 5


def _rows(path: Path) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["Id", "Category"]
        return [(i, int(c)) for i, c in reader]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("demo") / "cars", per_class=PER_CLASS, test=TEST, seed=0)


def test_train_layout(data: Path) -> None:
    assert len(CLASS_NAMES) == 10
    assert sorted(p.name for p in (data / "train").iterdir()) == sorted(str(k) for k in range(10))
    rows = _rows(data / "train.csv")
    assert len(rows) == 10 * PER_CLASS
    on_disk = {(p.name, int(p.parent.name)) for p in (data / "train").glob("*/*.jpg")}
    assert set(rows) == on_disk
    for k in range(10):
        assert sum(c == k for _, c in rows) == PER_CLASS
    for name, k in rows[:4]:
        with Image.open(data / "train" / str(k) / name) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (640, 480))
            im.load()


def test_test_layout_and_ids(data: Path) -> None:
    sub = _rows(data / "sample-submission.csv")
    assert {i for i, _ in sub} == {p.name for p in (data / "test_upload").iterdir()}
    assert len(sub) == TEST and all(c == 0 for _, c in sub)
    labels = _rows(data / "test_labels.csv")
    assert [i for i, _ in labels] == [i for i, _ in sub] and all(0 <= c < 10 for _, c in labels)
    ids = [i for i, _ in _rows(data / "train.csv")] + [i for i, _ in sub]
    assert len(set(ids)) == len(ids)
    assert all(i.endswith(".jpg") and i[:-4].isdigit() for i in ids)


def test_deterministic_per_seed(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "_POOL_MIN", 1)  # same bytes whether drawn in-process or by the workers
    same = make_dataset(tmp_path / "same", per_class=PER_CLASS, test=TEST, seed=0)
    assert _files(same) == _files(data)
    other = make_dataset(tmp_path / "other", per_class=PER_CLASS, test=TEST, seed=1)
    assert _files(other) != _files(data)


def test_refuses_non_empty_out(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path))):
        make_dataset(tmp_path, per_class=1, test=1)
    make_dataset(tmp_path, per_class=1, test=1, force=True)
    assert (tmp_path / "keep.txt").exists() and len(_rows(tmp_path / "train.csv")) == 10


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    main([str(out), "--per-class", "1", "--test", "2", "--seed", "3"])
    assert len(_rows(out / "train.csv")) == 10 and len(list((out / "test_upload").iterdir())) == 2
    assert str(out) in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([str(out)])
    assert exc.value.code != 0
    assert str(out) in capsys.readouterr().err


@pytest.mark.parametrize(("args", "line"), [
    (["--per-class", "0"], "carnet-demo: error: --per-class 0 --test 100: expected --per-class >= 1 and --test >= 0"),
    ([], "error: {out} is a file; expected a folder to write the data set into"),
])
def test_cli_refuses_what_it_cannot_write_in_one_line(args: list[str], line: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A file for OUT was a NotADirectoryError traceback; --per-class 0 wrote a data set that training refuses."""
    out = tmp_path / "taken"
    out.write_text("a file, not a folder")
    with pytest.raises(SystemExit) as exc:
        main([str(out), *args])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == line.format(out=out)
    assert out.read_text() == "a file, not a folder"
