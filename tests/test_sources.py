"""data.extra: folder and CSV sources with label maps add the right images, to training only."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from carnet.data.layout import scan_train
from carnet.data.sources import load_source, read_sources
from carnet.errors import DataError
from carnet.summary import read_summary
from carnet.tools.demo import CLASS_NAMES
from carnet.training.pipeline import run_pipeline
from tests.helpers.images import car_jpeg
from tests.helpers.overrides import ONE_BATCH
from tests.helpers.paths import REPO
from tests.helpers.recipe import data_module


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    """A folder source (their names, one unmapped folder) and a CSV source (their codes, one unmapped label)."""
    photos = tmp_path / "photos"
    for i in range(3):
        car_jpeg(photos / "priora" / f"p{i}.jpg", 0, 100 + i)
    for i in range(2):
        car_jpeg(photos / "niva" / "sub" / f"n{i}.jpg", 5, 200 + i)  # nested folders count for their top folder
    car_jpeg(photos / "tractor" / "t0.jpg", 3, 300)  # no class of ours: dropped and counted
    folder_yaml = tmp_path / "conf" / "photos.yaml"
    folder_yaml.parent.mkdir()
    folder_yaml.write_text("name: photos\ntype: folder\npath: ../photos\n"
                           "label_map:\n  priora: Lada Priora\n  niva: 5\n")

    table = tmp_path / "other" / "labels.csv"
    rows = [(car_jpeg(table.parent / "img" / f"c{i}.jpg", 8, 400 + i).relative_to(table.parent), "VW")
            for i in range(2)]
    rows.append((car_jpeg(tmp_path / "elsewhere" / "abs.jpg", 1, 500), "FF"))  # absolute path
    rows += [(car_jpeg(table.parent / "img" / f"x{i}.jpg", 2, 600 + i).relative_to(table.parent), "BUS")
             for i in range(2)]
    pd.DataFrame(rows, columns=["path", "label"]).assign(prob=0.99).to_csv(table, index=False)
    csv_yaml = tmp_path / "csv.yaml"
    csv_yaml.write_text(f"name: web\ntype: csv\npath: {table}\nlabel_map:\n  VW: Volkswagen Passat\n  FF: 1\n")
    return {"folder": folder_yaml, "csv": csv_yaml, "root": tmp_path}


def test_folder_and_csv_sources_map_labels_and_count_drops(sources: dict[str, Path]) -> None:
    frame, stats = read_sources([sources["folder"], sources["csv"]], CLASS_NAMES)
    got = {(Path(p).name, label, s) for p, label, s in frame.itertuples(index=False)}
    want = {(f"p{i}.jpg", 0, "photos") for i in range(3)} | {(f"n{i}.jpg", 5, "photos") for i in range(2)}
    want |= {("c0.jpg", 8, "web"), ("c1.jpg", 8, "web"), ("abs.jpg", 1, "web")}
    assert got == want
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in frame.path)
    assert stats["photos"].as_dict() == {"read": 6, "kept": 5, "dropped_unmapped": 1,
                                         "unmapped_labels": {"tractor": 1}}
    assert stats["web"].as_dict()["dropped_unmapped"] == 2 and stats["web"].unmapped == {"BUS": 2}


def test_extra_images_go_to_training_only(tiny_data: Path, sources: dict[str, Path]) -> None:
    kwargs = dict(root=tiny_data, class_names=CLASS_NAMES, num_workers=0, seed=3)
    plain = data_module(**kwargs)
    plain.setup()
    dm = data_module(**kwargs, extra=[str(sources["folder"]), str(sources["csv"])])
    dm.setup()
    split = dm.split
    extra = split[split.source != "train"]
    assert len(extra) == 8 and set(extra.split) == {"train"}
    assert extra.groupby("source").size().to_dict() == {"photos": 5, "web": 3}
    # the competition images validate exactly as without extra data
    own = split[split.source == "train"].drop(columns="source").reset_index(drop=True)
    pd.testing.assert_frame_equal(own, plain.split.drop(columns="source").reset_index(drop=True),
                                  check_dtype=False)
    assert dm.data_summary()["extra_sources"]["photos"]["used"] == 5
    assert dm.data_summary()["extra_sources"]["web"]["unmapped_labels"] == {"BUS": 2}
    # the training loader reads extra images by their absolute paths
    dataset = dm.train_dataloader().dataset
    assert len(dataset) == (split.split == "train").sum()
    image, label = dataset[dataset.paths.index(extra.path.iloc[0])]
    assert label == extra.label.iloc[0] and image.shape[0] == 3


def test_extra_source_repeating_competition_photos_never_trains_on_validation(tiny_data: Path,
                                                                              tmp_path: Path) -> None:
    """A source pointing at data/train (an easy slip) lists every competition photo again: they keep their split
    and the repeats are dropped with a warning, so no validation photo also trains."""
    (tmp_path / "again.yaml").write_text(f"name: again\ntype: folder\npath: {tiny_data / 'train'}\n")
    kwargs = dict(root=tiny_data, class_names=CLASS_NAMES, num_workers=0, verify=False, seed=3)
    plain = data_module(**kwargs)
    plain.setup()
    dm = data_module(**kwargs, extra=[str(tmp_path / "again.yaml")])
    with pytest.warns(UserWarning, match=r"leaving out 40 .*again.*train/"):
        dm.setup()
    pd.testing.assert_frame_equal(dm.split, plain.split)
    assert dm.data_summary()["extra_sources"]["again"]["used"] == 0
    assert not set(dm.split.path[dm.split.split == "val"]) & set(dm.split.path[dm.split.split == "train"])


def test_extra_photo_twice_is_kept_once_and_a_contradiction_is_refused(tiny_data: Path, tmp_path: Path,
                                                                        sources: dict[str, Path]) -> None:
    copy = tmp_path / "copy.yaml"
    copy.write_text(sources["folder"].read_text().replace("name: photos", "name: copy")
                    .replace("../photos", str(sources["root"] / "photos")))
    dm = data_module(tiny_data, CLASS_NAMES, num_workers=0, verify=False, extra=[str(sources["folder"]), str(copy)])
    with pytest.warns(UserWarning, match=r"leaving out 5 .*p0\.jpg"):
        dm.setup()
    assert {k: v["used"] for k, v in dm.data_summary()["extra_sources"].items()} == {"photos": 5, "copy": 0}
    assert dm.split.path.is_unique

    # a competition photo labelled otherwise by a source: refused, naming the photo, both labels and the source
    victim = scan_train(tiny_data, 10).iloc[0]
    wrong = (int(victim.label) + 1) % 10
    table = tmp_path / "wrong.csv"
    pd.DataFrame({"path": [str(tiny_data / victim.path)], "label": [wrong]}).to_csv(table, index=False)
    (tmp_path / "wrong.yaml").write_text(f"name: wrong\ntype: csv\npath: {table}\n")
    dm = data_module(tiny_data, CLASS_NAMES, num_workers=0, verify=False, extra=[str(tmp_path / "wrong.yaml")])
    with pytest.raises(DataError, match=rf"{victim.path}.*label {victim.label}.*'train'.*label {wrong}.*'wrong'"):
        dm.setup()


def test_a_competition_photo_linked_twice_is_one_photo(tiny_data: Path, tmp_path: Path) -> None:
    """Two names of one file (a symlink) are one photo: kept once in its own class, refused across classes."""
    import shutil

    data = Path(shutil.copytree(tiny_data, tmp_path / "cars"))
    (data / "train.csv").unlink()  # the folders are the labels
    target = sorted((data / "train" / "2").glob("*.jpg"))[0]
    (data / "train" / "2" / "link.jpg").symlink_to(target)
    dm = data_module(data, CLASS_NAMES, num_workers=0, verify=False)
    with pytest.warns(UserWarning, match=r"leaving out 1 .*train/2/.*\(train, already from train\)"):
        dm.setup()
    assert len(dm.split) == 40
    (data / "train" / "2" / "link.jpg").rename(data / "train" / "6" / "link.jpg")
    with pytest.raises(DataError, match=r"train/2/.*label 2 .*label 6 .*as train/6/link\.jpg"):
        data_module(data, CLASS_NAMES, num_workers=0, verify=False).setup()


def test_labels_without_map_must_be_classes(tmp_path: Path) -> None:
    good = tmp_path / "good"
    car_jpeg(good / "3" / "a.jpg", 3, 1)
    car_jpeg(good / "Lada Niva" / "b.jpg", 5, 2)
    (tmp_path / "good.yaml").write_text(f"name: good\ntype: folder\npath: {good}\n")
    frame, _ = read_sources(tmp_path / "good.yaml", CLASS_NAMES)
    assert sorted(frame.label) == [3, 5]

    car_jpeg(tmp_path / "bad" / "11" / "c.jpg", 1, 3)
    (tmp_path / "bad.yaml").write_text("name: bad\ntype: folder\npath: bad\n")
    with pytest.raises(DataError, match=r"bad\.yaml.*'11'.*label_map"):
        read_sources([tmp_path / "bad.yaml"], CLASS_NAMES)


@pytest.mark.parametrize(("text", "match"), [
    ("name: x\ntype: zip\npath: .\n", "type='zip'"),
    ("name: x\ntype: folder\n", "'path' is missing"),
    ("name: x\ntype: csv\npath: nope.csv\n", "nope.csv is not a file"),
    ("name: x\ntype: folder\npath: .\nlabel_map:\n  a: Lada Nine\n", "label_map\\['a'\\] = 'Lada Nine'"),
    ("name: x\ntype: folder\npath: .\nlabels: {}\n", "unknown key"),
    ("name: [x\n", "not valid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'"),
])
def test_bad_source_yaml_names_file_and_key(tmp_path: Path, text: str, match: str) -> None:
    """In one line (PyYAML's own message of broken YAML spans six)."""
    (tmp_path / "src.yaml").write_text(text)
    with pytest.raises(DataError, match=re.escape(match) if "YAML" in match else match) as err:
        load_source(tmp_path / "src.yaml", CLASS_NAMES)
    assert "src.yaml" in str(err.value) and "\n" not in str(err.value)


def test_shipped_example_sources_parse(tmp_path: Path) -> None:
    """examples/sources/*.yaml are valid sources once their folders exist (checked on a copy pointing at tmp)."""
    import yaml

    examples = sorted((REPO / "examples" / "sources").glob("*.yaml"))
    assert len(examples) >= 2
    for example in examples:
        spec = yaml.safe_load(example.read_text())
        target = tmp_path / example.stem
        if spec["type"] == "folder":
            car_jpeg(target / next(iter(spec["label_map"])) / "a.jpg", 0, 1)
        else:
            car_jpeg(tmp_path / "a.jpg", 0, 1)
            target = tmp_path / f"{example.stem}.csv"
            pd.DataFrame({"path": ["a.jpg"], "label": [next(iter(spec["label_map"]))]}).to_csv(target, index=False)
        copy = tmp_path / example.name
        copy.write_text(json.dumps({**spec, "path": str(target)}))
        frame, stats = read_sources([copy], CLASS_NAMES)
        assert len(frame) == 1 and stats[spec["name"]].kept == 1


@pytest.mark.slow
def test_train_records_sources_in_summary(train_run, sources: dict[str, Path]) -> None:
    """`train.py data.extra=[...]` trains on the extra images and summary.json/split.csv say how many from where."""
    run_dir, _ = train_run(f"data.extra=[{sources['folder']},{sources['csv']}]", "data.fold=1", "data.dedup=true")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert {k: v["used"] for k, v in summary["extra_sources"].items()} == {"photos": 5, "web": 3}
    assert summary["extra_sources"]["photos"]["unmapped_labels"] == {"tractor": 1}
    assert summary["fold"] == 1 and summary["num_folds"] == 5 and summary["num_dedup_excluded"] == 0
    split = pd.read_csv(run_dir / "split.csv")
    assert set(split[split.source != "train"].split) == {"train"}
    assert summary["num_train"] == (split.split == "train").sum() and summary["num_val"] == (split.fold == 1).sum()


def test_a_pipeline_passes_an_extra_source_list_on_as_typed(tiny_data: Path, sources: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """carnet-pipeline echoes each phase's command before running it: ``data.extra=[/abs/source.yaml]`` is a Hydra
    list, not Rich markup (read as a closing tag, it stopped the pipeline before its first phase)."""
    shown = io.StringIO()
    extra = f"data.extra=[{sources['csv']}]"
    folder = run_pipeline([f"data.root={tiny_data}", *ONE_BATCH, "head_fit.views=0", f"paths.output_dir={tmp_path}",
                           "refit=false", extra], ["head"], console=Console(file=shown, width=300),
                          folder=tmp_path / "p")
    assert extra in shown.getvalue()
    run_dir = json.loads((folder / "pipeline.json").read_text())["phases"][0]["run_dir"]
    assert read_summary(run_dir).extra_sources["web"]["used"] == 3
