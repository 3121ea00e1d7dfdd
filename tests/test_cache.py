"""The decoded-image cache (data.cache=memory|disk): hits, misses, invalidation when a file changes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from carnet.data.cache import ImageCache, decode_resized
from carnet.data.decode import DECODE_VERSION, decode_image
from carnet.errors import CacheError
from tests.helpers.images import train_jpegs
from tests.helpers.recipe import data_module


@pytest.fixture
def photos(tiny_data: Path, tmp_path: Path) -> list[Path]:
    """Private copies of two 640x480 JPEGs (the tests rewrite them)."""
    out = []
    for i, src in enumerate(train_jpegs(tiny_data)[:2]):
        out.append(tmp_path / f"img{i}.jpg")
        shutil.copy(src, out[-1])
    return out


def replace_with(path: Path, other: Path) -> None:
    """Rewrite ``path`` with another image's bytes and a new mtime, as an edit or re-download would."""
    data = other.read_bytes()
    stat = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_decode_resized_shrinks_to_min_side_only(photos: list[Path]) -> None:
    assert decode_resized(photos[0], 300).shape == (300, 400, 3)
    assert np.array_equal(decode_resized(photos[0], None), decode_image(photos[0]))
    assert decode_resized(photos[0], 1000).shape == (480, 640, 3)  # never enlarged


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_hit_miss_and_invalidation(mode: str, photos: list[Path], tmp_path: Path) -> None:
    cache = ImageCache(mode, tmp_path / "cache")
    first = cache.get(photos[0], 300)
    assert (cache.hits, cache.misses) == (0, 1)
    again = cache.get(photos[0], 300)
    assert (cache.hits, cache.misses) == (1, 1)
    assert np.array_equal(first, again) and np.array_equal(first, decode_resized(photos[0], 300))

    other_size = cache.get(photos[0], 240)  # keyed by image size: another entry
    assert other_size.shape[0] == 240 and cache.misses == 2
    assert len(cache) == 2

    replace_with(photos[0], photos[1])
    changed = cache.get(photos[0], 300)
    assert cache.misses == 3, "a rewritten file must not be served from the cache"
    assert np.array_equal(changed, decode_resized(photos[1], 300))
    assert not np.array_equal(changed, first)
    assert len(cache) == 2  # the stale entry was replaced, not kept


def test_disk_cache_is_shared_across_instances(photos: list[Path], tmp_path: Path) -> None:
    ImageCache("disk", tmp_path / "cache").get(photos[0], 300)
    later = ImageCache("disk", tmp_path / "cache")  # another worker process or a later run
    image = later.get(photos[0], 300)
    assert (later.hits, later.misses) == (1, 0)
    assert image.shape == (300, 400, 3)
    assert sorted(p.parent.name for p in (tmp_path / "cache").rglob("*.npy")) == [f"s300-d{DECODE_VERSION}"]


def test_disk_entries_of_an_older_decoder_are_not_served(photos: list[Path], tmp_path: Path) -> None:
    """A cache folder written before a decoding fix (EXIF orientation, 16-bit scaling) is not read again."""
    cache = ImageCache("disk", tmp_path / "cache")
    cache.get(photos[0], 300)
    [entry] = (tmp_path / "cache").rglob("*.npy")
    old = tmp_path / "cache" / "s300" / entry.name  # where the previous decoder kept the same image
    old.parent.mkdir()
    entry.rename(old)
    np.save(old, np.zeros((300, 400, 3), np.uint8))
    fresh = ImageCache("disk", tmp_path / "cache")
    assert fresh.get(photos[0], 300).any() and (fresh.hits, fresh.misses) == (0, 1)


def test_disk_cache_recovers_from_a_truncated_entry(photos: list[Path], tmp_path: Path) -> None:
    cache = ImageCache("disk", tmp_path / "cache")
    cache.get(photos[0], 300)
    (entry,) = (tmp_path / "cache").rglob("*.npy")
    entry.write_bytes(entry.read_bytes()[:100])  # a run killed while writing (without our temp + rename)
    assert np.array_equal(cache.get(photos[0], 300), decode_resized(photos[0], 300))
    assert cache.misses == 2


def test_bad_settings_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=r"data\.cache=.ram.*none, memory, disk"):
        ImageCache("ram")
    with pytest.raises(CacheError, match=r"data\.cache_dir"):
        ImageCache("disk", None)


def test_datamodule_memory_cache_fills_once_and_serves_every_epoch(tiny_data: Path) -> None:
    dm = data_module(tiny_data, [str(k) for k in range(10)], image_size=64, batch_size=8, num_workers=0,
                     verify=False, cache="memory")
    dm.setup("fit")
    loader = dm.train_dataloader()  # fills the cache before any worker would fork
    n_train = int((dm.split.split == "train").sum())
    assert len(dm.cache) == n_train and dm.cache.misses == n_train
    shapes = [images.shape[1:] for _ in range(2) for images, _ in loader]
    assert set(shapes) == {(3, 64, 64)}
    assert dm.cache.misses == n_train  # two epochs, no decoding
    assert dm.cache.hits == 2 * (n_train // 8) * 8
