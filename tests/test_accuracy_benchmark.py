"""benchmarks/accuracy.py end to end on tiny synthetic data: all three methods, two carnet phases, one seed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers.paths import REPO

PHASES = ["head", "unfreeze_half"]
# Every carnet phase as short as the test suite's training runs: one epoch, tiny batches, no step budget.
CARNET_ARGS = ["trainer.max_epochs=1", "budget.min_steps=0", "data.batch_size=8", "data.num_workers=0",
               "data.verify=false", "head_fit.views=1", "trainer.enable_progress_bar=false",
               "trainer.enable_model_summary=false", "trainer.num_sanity_val_steps=0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Demo cars (its test_labels.csv holds each test image's class), classes.txt, and test_efficientnet
    weights as a headless timm state dict in safetensors: the inputs the benchmark expects."""
    import timm
    from safetensors.torch import save_file

    from carnet.tools.demo import CLASS_NAMES, make_dataset

    tmp = tmp_path_factory.mktemp("accuracy")
    root = make_dataset(tmp / "cars", per_class=4, test=10, seed=0)
    (root / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    weights = tmp / "test_efficientnet.safetensors"
    state = timm.create_model("test_efficientnet", num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    return root, weights


@pytest.mark.slow
def test_accuracy_benchmark_end_to_end(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    root, weights = dataset
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "benchmarks" / "accuracy.py"), "--data", str(root), "--weights",
               str(weights), "--model", "test_efficientnet", "--seeds", "0", "--phases", ",".join(PHASES),
               "--image-size", "64", "--out", str(out), "--workers", "0", "--batch-size", "8", "--ft-epochs", "2",
               "--device", "cpu", "--carnet-args", *CARNET_ARGS]
    proc = subprocess.run(command, cwd=REPO, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"

    results = json.loads((out / "accuracy.json").read_text())
    runs = results["runs"]
    assert set(runs) == {"probe", "headfit", "finetune", "carnet"}
    for method, rows in runs.items():
        assert [r["seed"] for r in rows] == [0], method
        for key in ("test_acc", "test_acc_tta"):
            assert 0.0 <= rows[0][key] <= 1.0, (method, key)
        assert rows[0]["seconds"] > 0
        # the photos it missed are its plain accuracy's complement, each with a wrong class
        missed, labels = rows[0]["missed"], results["meta"]["test_labels"]
        assert len(missed) == round((1 - rows[0]["test_acc"]) * len(labels)), method
        assert all(labels[i] != predicted for i, predicted in missed.items()), method
    assert 0.0 <= runs["probe"][0]["val_acc"] <= 1.0
    assert runs["finetune"][0]["val_acc"] is None
    default_views = OmegaConf.load(REPO / "conf" / "train.yaml").head_fit.views  # stated once, in conf
    assert runs["headfit"][0]["views"] == 1 + default_views  # the eval view and as many augmented ones as carnet's

    carnet = runs["carnet"][0]
    assert [p["phase"] for p in carnet["phases"]] == PHASES
    assert all(p["status"] == "completed" and 0.0 <= p["best_val_acc"] <= 1.0 for p in carnet["phases"])
    assert carnet["val_acc"] == carnet["phases"][-1]["best_val_acc"]
    commands = carnet["commands"]
    assert [c.split()[:3] for c in commands[:2]] == [["python", "train.py", f"phase={p}"] for p in PHASES]
    assert "tta=false" in commands[2] and "tta=true" in commands[3]
    assert all("image_size=64" in c for c in commands[:2])

    table = (out / "accuracy.md").read_text()
    for name in ("probe", "headfit", "finetune", "carnet", *PHASES):
        assert f"| {name} |" in table
    missed_anywhere = set().union(*(rows[0]["missed"] for rows in runs.values()))
    assert all(f"| {i} |" in table for i in missed_anywhere)


@pytest.mark.slow
def test_pseudo_label_cv_scores_each_threshold_on_held_out_training_photos(dataset: tuple[Path, Path],
                                                                           tmp_path: Path) -> None:
    """benchmarks/pseudo_label_cv.py: a row a threshold, its CV accuracy over every training photo (40, so a
    multiple of 1/40), its accuracy on the --val root's photos that are not training photos (by file name), test
    accuracy over the 10 test photos; two scales exercise the upsampled features."""
    from carnet.data.layout import scan_train
    from carnet.tools.demo import CLASS_NAMES, make_dataset

    root, weights = dataset
    val_root = make_dataset(tmp_path / "val", per_class=6, test=1, seed=1)
    train = scan_train(root, len(CLASS_NAMES))
    for path in train.path[:3]:  # training photos among the validation photos: they must be left out
        shutil.copy(root / path, val_root / path)
    held_out = [p for p in scan_train(val_root, len(CLASS_NAMES)).path if p not in set(train.path)]
    assert len(held_out) == 6 * len(CLASS_NAMES)
    out = tmp_path / "cv.md"
    command = [sys.executable, str(REPO / "benchmarks" / "pseudo_label_cv.py"), "--data", str(root), "--weights",
               str(weights), "--model", "test_efficientnet", "--image-size", "64", "--scales", "1", "1.5",
               "--thresholds", "off", "0.2", "--seeds", "0", "--folds", "2", "--views", "1", "--threads", "1",
               "--val", str(val_root), "--out", str(out)]
    proc = subprocess.run(command, cwd=REPO, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    assert f"{len(held_out)} validation photos" in out.read_text()
    rows = [line.strip("|").split("|") for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    assert [r[0].strip() for r in rows] == ["off", "0.2"]
    for row in rows:
        cv, val, test = float(row[1]), float(row[3]), float(row[5])
        assert round(cv * 40, 6).is_integer() and round(test * 10, 6).is_integer()
        photos = val * len(held_out)  # a share of the 60 photos, printed to 3 decimals
        assert abs(photos - round(photos)) <= 0.0005 * len(held_out) and 0 <= min(cv, val, test) <= 1


@pytest.mark.slow  # ~20 s: features of 40 photos x 3 views, six L2 searches
def test_head_fit_solver_benchmark_searches_each_sample_both_ways(dataset: tuple[Path, Path]) -> None:
    """benchmarks/head_fit_solver.py: a row a sample (20 stratified photos, then all 40) with its rows (photos x 3
    views), both searches' L2 from the grid and their seconds; the exit code says whether the two agreed."""
    from carnet.training.head_fit import L2_GRID

    root, weights = dataset
    command = [sys.executable, str(REPO / "benchmarks" / "head_fit_solver.py"), "--data", str(root), "--weights",
               str(weights), "--model", "test_efficientnet", "--image-size", "64", "--views", "2", "--photos", "20",
               "0", "--workers", "0", "--batch-size", "8"]
    proc = subprocess.run(command, cwd=REPO, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
                          capture_output=True, text=True, timeout=600)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| photos")]
    assert proc.returncode in (0, 1) and len(rows) == 2, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    assert [row[0] for row in rows] == ["20", "40"]
    assert [int(row[1].split(" x ")[0]) for row in rows] == [60, 120]
    for row in rows:
        apart, together, *seconds = float(row[3]), float(row[4]), *map(float, row[5:8])
        assert apart in L2_GRID and together in L2_GRID and min(seconds) >= 0  # seconds to 0.1: 0.0 is possible
    agree = all(row[3] == row[4] for row in rows)
    assert (proc.returncode == 0) == agree and ("chose different L2" in proc.stdout) == (not agree)
