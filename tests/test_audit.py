"""The audit finds planted exact and resized duplicates, leaks and label conflicts; data.dedup drops val twins."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from carnet.tools.audit import main as audit_main
from carnet.tools.demo import CLASS_NAMES, render
from tests.helpers.recipe import data_module


def _shrink(src: Path, dst: Path, factor: float = 0.5, quality: int = 70) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as img:
        img.resize((int(img.width * factor), int(img.height * factor)), Image.Resampling.LANCZOS).save(
            dst, quality=quality)


@pytest.fixture
def planted(tiny_data: Path, tmp_path: Path) -> dict[str, object]:
    """A copy of tiny_data with planted twins; returns the root, an extra source and the expected pairs."""
    root = tmp_path / "cars"
    shutil.copytree(tiny_data, root)
    train = pd.read_csv(root / "train.csv")
    first = {k: train.Id[train.Category == k].iloc[0] for k in range(10)}
    rows = [("dup_a.jpg", 3), ("small_d.jpg", 6)]
    shutil.copy(root / "train/0" / first[0], root / "train/3/dup_a.jpg")  # exact copy, other label
    _shrink(root / "train/4" / first[4], root / "train/6/small_d.jpg")  # resized copy, other label
    (root / "train/5/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    pd.concat([train, pd.DataFrame(rows, columns=["Id", "Category"])]).to_csv(root / "train.csv", index=False)
    _shrink(root / "train/1" / first[1], root / "test_upload/small_b.jpg", factor=0.4)  # train/test leak
    sample = pd.read_csv(root / "sample-submission.csv")
    pd.concat([sample, pd.DataFrame({"Id": ["small_b.jpg"], "Category": [0]})]).to_csv(
        root / "sample-submission.csv", index=False)

    extra = tmp_path / "extra"
    _shrink(root / "train/2" / first[2], extra / "Lada 2114" / "c_twin.jpg", factor=0.8, quality=50)
    (extra / "Lada 2107").mkdir()
    render(4, seed=123, key=1).save(extra / "Lada 2107" / "new.jpg", quality=90)
    source = tmp_path / "extra.yaml"
    source.write_text("name: web\ntype: folder\npath: extra\n")
    expected = {
        ("exact", "train/train", f"train/0/{first[0]}", "train/3/dup_a.jpg", True),
        ("near", "train/train", f"train/4/{first[4]}", "train/6/small_d.jpg", True),
        ("near", "train/test", f"train/1/{first[1]}", "test_upload/small_b.jpg", False),
        ("near", "train/extra", f"train/2/{first[2]}", str(extra / "Lada 2114" / "c_twin.jpg"), False),
    }
    return {"root": root, "source": source, "expected": expected}


def test_audit_finds_planted_duplicates_leaks_and_conflicts(planted: dict, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report"
    assert audit_main([str(planted["root"]), "--extra", str(planted["source"]), "--out", str(out)]) == 0
    pairs = pd.read_csv(out / "audit_pairs.csv")
    found = {(r.kind, r.scope, r.path_a, r.path_b, bool(r.label_conflict)) for r in pairs.itertuples()}
    assert found == planted["expected"]  # every planted pair, nothing else among distinct images
    near = pairs[pairs.kind == "near"]
    assert (near.distance <= 6).all()

    report = (out / "audit.md").read_text()
    assert "Labels that disagree between duplicates (2)" in report
    assert "train/5/broken.jpg" in report.split("## Unreadable files (1)")[1]
    assert "5 Lada Niva" in report and "JPEG" in report and "640x480" in report
    assert (out / "audit_classes.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "1 exact and 3 near duplicate pairs; 2 label conflicts; 1 unreadable" in printed


def test_dedup_drops_training_twins_of_validation_images(tiny_data: Path, tmp_path: Path) -> None:
    kwargs = dict(root=tiny_data, class_names=CLASS_NAMES, num_workers=0, seed=5, verify=False)
    plain = data_module(**kwargs)
    plain.setup()
    val = plain.split[plain.split.split == "val"].head(3)
    twins = tmp_path / "twins"
    for path, label in zip(val.path, val.label, strict=True):
        _shrink(tiny_data / path, twins / str(label) / f"twin_{Path(path).name}")
    render(0, seed=9, key=9).save(twins / "0" / "unrelated.jpg")
    (tmp_path / "twins.yaml").write_text(f"name: twins\ntype: folder\npath: {twins}\n")

    kept = data_module(**kwargs, extra=[str(tmp_path / "twins.yaml")])
    kept.setup()
    assert (kept.split.source == "twins").sum() == 4
    dm = data_module(**kwargs, extra=[str(tmp_path / "twins.yaml")], dedup=True)
    dm.setup()
    assert sorted(Path(p).name for p in dm.dedup_dropped.path) == sorted(f"twin_{Path(p).name}" for p in val.path)
    assert set(dm.dedup_dropped.val_twin) == set(val.path)
    assert list(dm.split[dm.split.source == "twins"].path.map(lambda p: Path(p).name)) == ["unrelated.jpg"]
    assert dm.data_summary()["num_dedup_excluded"] == 3
    assert (dm.split.split == "val").sum() == (plain.split.split == "val").sum()  # validation untouched


@pytest.mark.parametrize(("args", "line"), [
    (["--threshold", "-3"], "--threshold -3: expected a Hamming distance 0-64 (the bits of a 64-bit phash)"),
    (["--similarity", "2"], "--similarity 2.0: expected a number in [0, 1] (0: the hash alone)"),
    (["--workers", "0"], "--workers 0: expected a whole number >= 1"),
    (["--data-config", "{tmp}/none.yaml"], "--data-config {tmp}/none.yaml: cannot read it (No such file or directory)"),
    (["--data-config", "{tmp}/list.yaml"], "--data-config {tmp}/list.yaml: expected a YAML with a class_names list, "
                                           "as conf/data/kaggle_cars.yaml has"),
])
def test_cli_refuses_bad_options_in_one_line(args: list[str], line: str, tiny_data: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A negative --threshold or a --similarity above 1 audited silently with no near duplicates at all; a
    --data-config that was missing or held no class_names ended in a traceback. Nothing is written."""
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SystemExit) as stopped:
        audit_main([str(tiny_data), "--out", str(tmp_path / "audit"), *(a.format(tmp=tmp_path) for a in args)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"carnet-audit: error: {line.format(tmp=tmp_path)}"
    assert not (tmp_path / "audit").exists()
