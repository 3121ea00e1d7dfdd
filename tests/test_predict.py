"""predict: submission format, TTA and ensemble identities, bad input, pseudo-labels, the validation report.

One real tiny training run (module scope) provides the checkpoint; predict runs in-process through the Hydra
compose API (as `python predict.py ...` composes it), and once as the real script.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from carnet.errors import CheckpointError, DataError, PredictError
from carnet.inference.tta import IDENTITY, TTA, View, build_views, merge_probs, tta_predict
from carnet.models.checkpoint import load_checkpoint, read_checkpoint
from tests.helpers.overrides import PREDICT, TINY
from tests.helpers.reference import reference_probs
from tests.helpers.runs import run_predict, run_script
from tests.helpers.tolerances import PROBS

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The best checkpoint of one real tiny train.py run (trained once for this module)."""
    base = tmp_path_factory.mktemp("predict_run")
    run_script("train.py", f"data.root={tiny_data}", *TINY, f"hydra.run.dir={base / 'run'}",
               f"paths.output_dir={base / 'outputs'}")
    ckpt = base / "run" / "checkpoints" / "best.ckpt"
    assert ckpt.is_file()
    return ckpt


def test_submission_matches_sample_submission(trained: Path, tiny_data: Path, tmp_path: Path) -> None:
    """The real file's format (first rows of the Kaggle sample-submission.csv): same Ids, same order, int classes."""
    root = tmp_path / "kaggle"
    (root / "test_upload").mkdir(parents=True)
    sample = pd.read_csv(FIXTURES / "sample-submission.csv", dtype={"Id": str})
    tiny_tests = sorted((tiny_data / "test_upload").iterdir())
    for i, image_id in enumerate(sample.Id):
        shutil.copy(tiny_tests[i % len(tiny_tests)], root / "test_upload" / image_id)
    shutil.copy(FIXTURES / "sample-submission.csv", root / "sample-submission.csv")
    out = tmp_path / "sub" / "submission.csv"

    run_predict(f"ckpt={trained}", f"data.root={root}", f"out={out}", "tta='true'")

    assert out.read_text().splitlines()[0] == "Id,Category"
    submission = pd.read_csv(out, dtype={"Id": str})
    assert list(submission.Id) == list(sample.Id)
    assert pd.api.types.is_integer_dtype(submission.Category)
    class_names = read_checkpoint(trained)["carnet"]["class_names"]
    assert submission.Category.between(0, len(class_names) - 1).all()
    probs = pd.read_csv(out.with_name("submission.probs.csv"), dtype={"Id": str})
    assert list(probs.columns) == ["Id", *class_names]
    assert list(probs.Id) == list(sample.Id)
    values = probs[class_names].to_numpy()
    np.testing.assert_allclose(values.sum(1), 1, atol=1e-5)
    assert (values.argmax(1) == submission.Category.to_numpy()).all()


def test_identity_only_tta_equals_plain_prediction(trained: Path, tiny_data: Path, tmp_path: Path) -> None:
    plain = run_predict(f"ckpt={trained}", f"data.root={tiny_data}", f"out={tmp_path / 'a.csv'}", "data.draft=false")
    identity = run_predict(f"ckpt={trained}", f"data.root={tiny_data}", f"out={tmp_path / 'b.csv'}",
                           "data.draft=false", "tta='true'", "~tta.views.hflip")
    flipped = run_predict(f"ckpt={trained}", f"data.root={tiny_data}", f"out={tmp_path / 'c.csv'}",
                          "data.draft=false", "tta='true'")
    expected = reference_probs(trained, tiny_data, [f"test_upload/{i}" for i in plain["ids"]])
    torch.testing.assert_close(plain["probs"], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(identity["probs"], plain["probs"], **PROBS)
    assert not torch.allclose(flipped["probs"], plain["probs"], atol=1e-6), "hflip TTA changed nothing"


def test_tta_merges_of_identical_views_equal_the_view(trained: Path) -> None:
    net, _ = load_checkpoint(trained)
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    flip = View("flip", hflip=True)
    plain = tta_predict(net, images)
    alone = tta_predict(net, images, [flip])
    assert not torch.allclose(alone, plain, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(plain, net(images).softmax(-1))
    twice = (flip, View("flip2", hflip=True))
    for merge in ("mean", "gmean"):
        torch.testing.assert_close(tta_predict(net, images, TTA(twice, merge)), alone, **PROBS)
    # fastai's beta: 1 keeps the plain prediction, 0 the augmented views only
    torch.testing.assert_close(tta_predict(net, images, TTA((IDENTITY, flip), beta=1.0)), plain)
    torch.testing.assert_close(tta_predict(net, images, TTA((IDENTITY, flip), beta=0.0)), alone)
    stack = torch.stack([plain, alone])
    torch.testing.assert_close(merge_probs(stack, "mean"), (plain + alone) / 2)
    assert [v.name for v in build_views({"identity": {}, "hflip": {"hflip": True}})] == ["identity", "hflip"]


def test_ensemble_of_one_checkpoint_equals_it(trained: Path, tiny_data: Path, tmp_path: Path) -> None:
    single = run_predict(f"ckpt={trained}", f"data.root={tiny_data}", f"out={tmp_path / 'a.csv'}")
    listed = run_predict(f"ckpt=[{trained}]", f"data.root={tiny_data}", f"out={tmp_path / 'b.csv'}")
    weighted = run_predict(f"ckpt=[{trained},{trained}]", "weights=[0.3,0.7]", f"data.root={tiny_data}",
                           f"out={tmp_path / 'c.csv'}")
    torch.testing.assert_close(listed["probs"], single["probs"], **PROBS)
    torch.testing.assert_close(weighted["probs"], single["probs"], **PROBS)

    other = tmp_path / "other_classes.ckpt"
    checkpoint = read_checkpoint(trained)
    checkpoint["carnet"]["class_names"] = [f"car {k}" for k in range(len(checkpoint["carnet"]["class_names"]))]
    torch.save(checkpoint, other)
    with pytest.raises(PredictError, match="different classes") as err:
        run_predict(f"ckpt=[{trained},{other}]", f"data.root={tiny_data}", f"out={tmp_path / 'd.csv'}")
    assert str(trained) in str(err.value) and str(other) in str(err.value)


def test_bad_input_names_the_file_and_writes_no_submission(trained: Path, tiny_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "cars"
    shutil.copytree(tiny_data, root)
    broken = sorted((root / "test_upload").iterdir())[3]
    broken.write_bytes(b"\xff\xd8 this is not a JPEG")
    out = tmp_path / "sub" / "submission.csv"
    with pytest.raises(DataError, match=re.escape(broken.name)):
        run_predict(f"ckpt={trained}", f"data.root={root}", f"out={out}")
    assert not out.exists() and not out.with_name("submission.probs.csv").exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())  # no temporary file left either

    (root / "sample-submission.csv").unlink()
    with pytest.raises(DataError, match=re.escape("sample-submission.csv")):
        run_predict(f"ckpt={trained}", f"data.root={root}", f"out={out}")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=re.escape("garbage.ckpt")):
        run_predict(f"ckpt={garbage}", f"data.root={tiny_data}", f"out={out}")
    assert not out.exists()


def test_pseudo_labels_are_the_rows_above_threshold(trained: Path, tiny_data: Path, tmp_path: Path) -> None:
    first = run_predict(f"ckpt={trained}", f"data.root={tiny_data}", f"out={tmp_path / 'a.csv'}")
    top = first["probs"].max(-1).values
    threshold = float(top.median())
    result = run_predict(f"ckpt={trained}", f"data.root={tiny_data}", f"out={tmp_path / 'b.csv'}",
                         f"pseudo_label.threshold={threshold}", "pseudo_label.name=p1",
                         f"paths.output_dir={tmp_path / 'outputs'}")
    folder = tmp_path / "outputs" / "pseudo" / "p1"
    assert result["pseudo"] == folder
    source = yaml.safe_load((folder / "source.yaml").read_text())
    assert source == {"name": "pseudo", "type": "csv", "path": "pseudo.csv"}
    rows = pd.read_csv(folder / source["path"])
    assert list(rows.columns) == ["path", "label"]
    expected = {str((tiny_data / "test_upload" / i).resolve()): int(p.argmax())
                for i, p, t in zip(first["ids"], first["probs"], top, strict=True) if t >= threshold}
    assert 0 < len(expected) <= len(top)
    assert dict(zip(rows.path, rows.label, strict=True)) == expected
    assert all(Path(p).is_file() for p in rows.path)
    counts = pd.read_csv(folder / "counts.csv")
    assert counts["count"].sum() == len(rows)
    assert list(counts["count"]) == np.bincount(rows.label, minlength=len(counts)).tolist()


def test_val_report_from_a_copied_checkpoint(trained: Path, tmp_path: Path) -> None:
    """split=val finds the run through the checkpoint's metadata; tta=auto picks views and says which."""
    copied = tmp_path / "elsewhere.ckpt"
    shutil.copy(trained, copied)
    result = run_predict(f"ckpt={copied}", "split=val", "tta=auto", f"report_dir={tmp_path / 'report'}")
    report = pd.read_csv(tmp_path / "report" / "val_report.csv")
    assert report.prediction.iloc[0] == "plain"
    assert {"view hflip", "view zoom115"} <= set(report.prediction)
    picked_plain_only = [v.is_identity for v in result["tta"].views] == [True]
    assert report.prediction.iloc[-1].startswith("TTA ") != picked_plain_only
    assert (tmp_path / "report" / "confusion_val.png").stat().st_size > 0
    split = pd.read_csv(trained.parent.parent / "split.csv")
    val = split[split.split == "val"]
    predictions = pd.read_csv(tmp_path / "report" / "val_predictions.csv")
    assert list(predictions.path) == list(val.path)
    assert result["val"]["accuracy"] == pytest.approx((predictions.pred == predictions.label).mean())
    chosen = [v.name for v in result["tta"].views]
    assert chosen and set(chosen) <= {"identity", "hflip", "zoom115", "zoom115_hflip", "scale115", "crop_tl",
                                      "crop_br"}
    assert result["val"]["confusion"].sum() == len(val)


@pytest.mark.slow
def test_predict_script_with_tta_true(trained: Path, tiny_data: Path, tmp_path: Path) -> None:
    """The real entry point: `tta=true` (a bare boolean to Hydra) selects conf/tta/true.yaml."""
    out = tmp_path / "submission.csv"
    proc = run_script("predict.py", f"ckpt={trained}", f"data.root={tiny_data}", f"out={out}", "tta=true", *PREDICT)
    assert "mean(identity+hflip)" in proc.stderr
    in_process = run_predict(f"ckpt={trained}", f"data.root={tiny_data}", f"out={tmp_path / 'b.csv'}", "tta='true'")
    written = pd.read_csv(out.with_name("submission.probs.csv")).drop(columns="Id").to_numpy()
    np.testing.assert_allclose(written, in_process["probs"].numpy(), **PROBS)
