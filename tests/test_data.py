"""The Kaggle layout: scanning, clear errors for bad input, broken images, the stratified split."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from carnet.data.layout import read_test, scan_train
from carnet.data.splits import stratified_split
from carnet.errors import DataError
from tests.helpers.recipe import data_module

NAMES = [f"class {k}" for k in range(10)]


@pytest.fixture
def data(tiny_data: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dataset that a test may damage."""
    return Path(shutil.copytree(tiny_data, tmp_path / "cars"))


def test_scan_reads_train_csv_and_folders(data):
    frame = scan_train(data, 10)
    table = pd.read_csv(data / "train.csv")
    assert len(frame) == len(table) == 40
    assert sorted(frame.label.unique()) == list(range(10))
    assert all(p.startswith(f"train/{k}/") for p, k in zip(frame.path, frame.label, strict=True))
    (data / "train.csv").unlink()  # without train.csv the folders are the labels
    assert scan_train(data, 10).equals(frame)


def test_test_images_follow_sample_submission_order(data):
    frame = read_test(data)
    sample = pd.read_csv(data / "sample-submission.csv")
    assert list(frame.Id) == list(sample.Id)


def test_missing_root_says_how_to_get_data(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.*does not exist.*make data.*carnet-demo DIR"):
        scan_train(tmp_path / "nowhere", 10)


def test_unknown_class_folder_is_named(data):
    (data / "train" / "cabrio").mkdir()
    with pytest.raises(DataError, match=r"\['cabrio'\].*0..9"):
        scan_train(data, 10)


def test_empty_class_folder_is_named(data):
    for f in (data / "train" / "3").iterdir():
        f.unlink()
    (data / "train.csv").unlink()
    with pytest.raises(DataError, match=r"train/3"):
        scan_train(data, 10)


def test_train_csv_row_without_its_file_is_named(data):
    table = pd.read_csv(data / "train.csv")
    victim = data / "train" / str(table.Category[0]) / table.Id[0]
    victim.unlink()
    with pytest.raises(DataError, match=str(victim)):
        scan_train(data, 10)


def test_train_csv_repeated_rows_are_dropped_with_a_warning(data):
    """The same Id and Category twice is a harmless repeat: kept once (never once in train and once in val)."""
    table = pd.read_csv(data / "train.csv")
    pd.concat([table, table.iloc[[7, 3, 3]]]).to_csv(data / "train.csv", index=False)
    with pytest.warns(UserWarning, match=r"train\.csv.*3 repeated row") as record:
        frame = scan_train(data, 10)
    assert table.Id[3] in str(record[0].message) and table.Id[7] in str(record[0].message)
    assert len(frame) == 40 and frame.path.is_unique
    dm = data_module(data, NAMES, num_workers=0, verify=False)
    with pytest.warns(UserWarning, match="repeated row"):
        dm.setup()
    assert dm.split.path.is_unique and len(dm.split) == 40


def test_train_csv_id_with_two_categories_is_refused(data):
    """The same Id with two Categories is a contradiction: which label is right only the user can say."""
    table = pd.read_csv(data / "train.csv")
    name, first = table.Id[0], int(table.Category[0])
    other = (first + 1) % 10
    shutil.copy(data / "train" / str(first) / name, data / "train" / str(other) / name)  # both files exist
    pd.concat([table, pd.DataFrame({"Id": [name], "Category": [other]})]).to_csv(data / "train.csv", index=False)
    with pytest.raises(DataError, match=rf"train\.csv.*1 Id.*{name} \({min(first, other)}, {max(first, other)}\)"):
        scan_train(data, 10)


def test_bad_header_and_missing_sample_submission(data):
    (data / "train.csv").write_text("file,label\na.jpg,1\n")
    with pytest.raises(DataError, match=r"train.csv.*Id,Category"):
        scan_train(data, 10)
    (data / "sample-submission.csv").unlink()
    with pytest.raises(DataError, match=r"sample-submission.csv not found"):
        read_test(data)


def _damage(data: Path, count: int) -> list[Path]:
    victims = sorted((data / "train" / "5").glob("*.jpg"))[:count]
    for victim in victims:
        victim.write_bytes(victim.read_bytes()[:300])  # a truncated JPEG
    return victims


def test_undecodable_images_are_left_out_with_a_warning(data):
    victims = _damage(data, 2)
    dm = data_module(data, NAMES, image_size=32, num_workers=0)
    with pytest.warns(UserWarning, match="leaving out 2 image") as record:
        dm.setup("fit")
    message = str(record[0].message)
    assert all(str(v) in message for v in victims)
    assert len(dm.split) == 38 and not dm.split.path.str.contains(victims[0].name).any()


def test_strict_mode_lists_every_broken_image(data):
    victims = _damage(data, 2)
    dm = data_module(data, NAMES, image_size=32, num_workers=0, strict=True)
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    assert all(str(v) in str(err.value) for v in victims)


def _paths(labels: np.ndarray) -> list[str]:
    return [f"train/{k}/{i}.jpg" for i, k in enumerate(labels)]


def test_split_is_stratified_and_reproducible():
    sizes = [500, 400, 300, 300, 300, 250, 200, 200, 150, 100]
    labels = np.repeat(np.arange(10), sizes)
    first = stratified_split(_paths(labels), labels, 0.2, seed=7)
    assert np.array_equal(first, stratified_split(_paths(labels), labels, 0.2, seed=7))
    assert not np.array_equal(first, stratified_split(_paths(labels), labels, 0.2, seed=8))
    for k, n in enumerate(sizes):  # the asked share up to sampling noise (3.5 standard deviations)
        assert abs(first[labels == k].mean() - 0.2) <= 3.5 * np.sqrt(0.2 * 0.8 / n), (k, first[labels == k].mean())


def test_split_keeps_every_class_on_both_sides_of_tiny_data():
    labels = np.repeat(np.arange(3), 2)
    is_val = stratified_split(_paths(labels), labels, 0.2, seed=0)
    for k in range(3):
        assert is_val[labels == k].sum() == 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_val_fraction_out_of_range_is_an_error(fraction):
    with pytest.raises(DataError, match="val_fraction"):
        stratified_split(["a.jpg", "b.jpg"], [0, 1], fraction, seed=0)


def test_datamodule_split_file_round_trips(data, tmp_path):
    dm = data_module(data, NAMES, image_size=32, num_workers=0, seed=3)
    dm.setup("fit")
    dm.write_split(tmp_path / "split.csv")
    again = pd.read_csv(tmp_path / "split.csv")
    assert again.equals(dm.split)
    assert set(again.split) == {"train", "val"}
    dm2 = data_module(data, NAMES, image_size=32, num_workers=0, seed=3)
    dm2.setup("fit")
    assert dm2.split.equals(dm.split)


def test_loader_workers_draw_different_augmentations(tiny_data):
    """Forked workers must not replay one albumentations stream (the same image gets different views)."""
    from torch.utils.data import DataLoader

    from carnet.data.dataset import ImageDataset, seed_worker_augmentations
    from carnet.data.transforms import build_train_transform

    flip_and_crop = [{"_target_": "albumentations.RandomResizedCrop", "size": [32, 32], "scale": [0.2, 1.0]}]
    transform = build_train_transform(flip_and_crop, 32)
    transform.set_random_seed(0)
    path = scan_train(tiny_data, 10).path[0]
    dataset = ImageDataset(tiny_data, [path] * 4, [0] * 4, transform)
    loader = DataLoader(dataset, batch_size=1, num_workers=2, worker_init_fn=seed_worker_augmentations)
    first_of_worker0, first_of_worker1, *_ = [images[0] for images, _ in loader]
    assert not torch.equal(first_of_worker0, first_of_worker1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_set_epoch_makes_an_epoch_draw_the_same_batches_whatever_ran_before(tiny_data, num_workers):
    """``set_epoch`` seeds an epoch's shuffle, augmentations (in this process or in loader workers) and torch's
    generator from (seed, epoch) alone, as DistributedSampler.set_epoch does for its shuffle: what a resumed run
    relies on to repeat the epochs it continues."""
    crop = [{"_target_": "albumentations.RandomResizedCrop", "size": [32, 32], "scale": [0.2, 1.0]}]
    dm = data_module(tiny_data, NAMES, image_size=32, batch_size=8, num_workers=num_workers, verify=False,
                     augment=crop)
    dm.setup("fit")
    loader = dm.train_dataloader()

    def epoch(number: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        dm.set_epoch(number)
        batches = [torch.cat([images.flatten(), labels]) for images, labels in loader]
        return batches, torch.rand(3)  # what the training step draws next (dropout masks)

    second, draws = epoch(2)
    epoch(5)
    torch.rand(100)  # anything else drawn in between
    again, draws_again = epoch(2)
    assert dm.seeded_epoch == 2
    assert all(torch.equal(a, b) for a, b in zip(second, again, strict=True)) and torch.equal(draws, draws_again)
    fifth, _ = epoch(5)
    assert not all(torch.equal(a, b) for a, b in zip(second, fifth, strict=True))
