"""Near-duplicate calibration: distinct demo cars whose phashes collide are not flagged; true copies still are.

``carnet-demo`` (seed 0, default size) draws pairs of clearly different cars whose 64-bit phashes are only 4-6 bits
apart (same layout: sky, ground, a car in the middle). The audit and ``data.dedup`` used to call them duplicates
(label conflicts between classes). The pairs below are those of ``carnet-demo DIR``; ``render`` draws them alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from carnet.data.dedup import DEFAULT_THRESHOLD, drop_val_near_duplicates, hash_images
from carnet.tools.audit import main as audit_main
from carnet.tools.demo import render

# (class, key) of train/<class>/<key>.jpg in `carnet-demo DIR` (seed 0): phash distance 4-6, different cars
DEMO_COLLISIONS = [
    ((1, 335522), (6, 612313)), ((5, 643133), (5, 927219)), ((1, 702730), (1, 846757)),
    ((5, 682723), (5, 338017)), ((1, 485768), (1, 495510)), ((2, 259295), (2, 472672)),
    ((5, 652406), (5, 894257)), ((5, 983114), (6, 703557)), ((6, 797138), (6, 835224)),
]  # fmt: skip


def _copies(src: Path, folder: Path) -> dict[str, Path]:
    """True copies of one photo: re-encoded, resized, slightly cropped (both ways), brightness-shifted."""
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as img:
        img = img.convert("RGB")
    w, h = img.size
    made = {
        "q30": img,
        "half": img.resize((w // 2, h // 2), Image.Resampling.LANCZOS),
        "crop4": img.crop((int(w * 0.04), int(h * 0.04), int(w * 0.96), int(h * 0.96))),
        "cropside": img.crop((0, 0, int(w * 0.93), h)),
        "bright": ImageEnhance.Brightness(img).enhance(1.2),
    }
    out = {}
    for name, im in made.items():
        out[name] = folder / f"{name}_{src.stem}.jpg"
        im.save(out[name], quality=30 if name == "q30" else 85)
    return out


@pytest.fixture(scope="module")
def collisions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's colliding pairs in the Kaggle layout (train/<class>/<key>.jpg, train.csv)."""
    root = tmp_path_factory.mktemp("collide") / "cars"
    rows = []
    for pair in DEMO_COLLISIONS:
        for cls, key in pair:
            (root / "train" / str(cls)).mkdir(parents=True, exist_ok=True)
            render(cls, seed=0, key=key).save(root / "train" / str(cls) / f"{key}.jpg", quality=90)
            rows.append((f"{key}.jpg", cls))
    pd.DataFrame(rows, columns=["Id", "Category"]).to_csv(root / "train.csv", index=False)
    return root


def test_demo_collisions_are_phash_neighbours(collisions: Path) -> None:
    """Keeps the next tests honest: these distinct cars do reach the hash's candidate stage."""
    hashes = hash_images(sorted((collisions / "train").rglob("*.jpg")), progress=False)
    phash = dict(zip(hashes.path.map(lambda p: Path(p).stem), hashes.phash.astype(np.uint64), strict=True))
    for (_, a), (_, b) in DEMO_COLLISIONS:
        assert int(np.bitwise_count(phash[str(a)] ^ phash[str(b)])) <= min(6, DEFAULT_THRESHOLD)


def test_audit_does_not_flag_distinct_demo_cars(collisions: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    assert audit_main([str(collisions), "--out", str(tmp_path / "report")]) == 0
    pairs = pd.read_csv(tmp_path / "report" / "audit_pairs.csv")
    assert pairs.empty, pairs[["path_a", "path_b", "distance"]].to_string()
    assert "0 exact and 0 near duplicate pairs; 0 label conflicts" in capsys.readouterr().out


def test_dedup_keeps_distinct_demo_cars(collisions: Path) -> None:
    """Each pair's first car is in validation: training keeps the second, a different car."""
    firsts = {f"train/{c}/{k}.jpg" for (c, k), _ in DEMO_COLLISIONS}
    frame = pd.DataFrame({"path": sorted(str(p.relative_to(collisions))
                                         for p in (collisions / "train").rglob("*.jpg"))})
    frame["split"] = np.where(frame.path.isin(firsts), "val", "train")
    kept, dropped = drop_val_near_duplicates(frame, collisions)
    assert dropped.empty, dropped.to_string()
    assert len(kept) == len(frame)


def test_true_copies_are_found_by_audit_and_dedup(tiny_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "cars"
    shutil.copytree(tiny_data, root)
    train = pd.read_csv(root / "train.csv")
    originals = [f"train/{c}/{i}" for i, c in zip(train.Id[:2], train.Category[:2], strict=True)]
    copies = {orig: _copies(root / orig, root / "test_upload") for orig in originals}

    assert audit_main([str(root), "--out", str(tmp_path / "report")]) == 0
    pairs = pd.read_csv(tmp_path / "report" / "audit_pairs.csv")
    found = set(zip(pairs.path_a, pairs.path_b, strict=True))
    expected = {(orig, str(p.relative_to(root))) for orig, made in copies.items() for p in made.values()}
    assert expected <= found, sorted(expected - found)
    assert found <= expected | {(str(a.relative_to(root)), str(b.relative_to(root)))
                                for made in copies.values() for a in made.values() for b in made.values()
                                if str(a) < str(b)}  # nothing among the tiny data's distinct cars

    frame = pd.DataFrame({"path": originals + [str(p.relative_to(root)) for m in copies.values()
                                               for p in m.values()]})
    frame["split"] = ["val"] * len(originals) + ["train"] * (len(frame) - len(originals))
    kept, dropped = drop_val_near_duplicates(frame, root)
    assert sorted(dropped.path) == sorted(frame.path[len(originals):])
    assert sorted(kept.path) == sorted(originals)


def test_audit_help_says_what_it_does(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        audit_main(["--help"])
    assert "AUDITDOC" not in capsys.readouterr().out
