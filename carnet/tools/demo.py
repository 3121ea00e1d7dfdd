"""Synthetic stand-in for the Kaggle *sf-dl-car-classification* data set.

``carnet-demo OUT`` draws ten classes of side-view cars in the competition's layout
(``train/<k>/<id>.jpg``, ``train.csv``, ``test_upload/``, ``sample-submission.csv``), so the whole pipeline
and ``make demo`` run offline in minutes instead of needing the real download. A class is defined by body
shape, proportions and fittings (bumpers, mouldings, roof rack, ...); paint colour, background, position,
scale, mirroring and tilt are random, so no simple image statistic gives the label away. The hidden test
labels go to ``test_labels.csv`` (not part of the Kaggle layout) so that examples can score themselves.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import time
from multiprocessing import Pool
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CLASS_NAMES = [
    "Lada Priora", "Ford Focus", "Lada 2114", "Lada 2110", "Lada 2107",
    "Lada Niva", "Lada Kalina", "Lada 2109", "Volkswagen Passat", "Lada 21099",
]  # fmt: skip
_POOL_MIN = 64  # fewer images than this are drawn in-process: starting workers would cost more than it saves


class Body(NamedTuple):
    """Side view in units of the car length: x runs from the nose (0) to the tail (1), y up from the ground"""

    wheel: float  # wheel radius
    front: float  # front axle x
    rear: float  # rear axle x
    sill: float  # height of the body's lower edge
    nose: float  # height of the front end
    belt: float  # beltline: bottom of the side windows, top of the hood at the windshield
    roof: float  # roof height
    ws: float  # windshield base x
    ws_top: float  # windshield top x
    roof_end: float  # x where the roof meets the rear window
    rw: float  # rear-window base x (1 for hatchbacks and wagons)
    deck: float  # height of the tail (trunk lid or hatch bottom)
    pillars: tuple[float, ...]  # B (and C) pillars as fractions of the side-glass length
    smooth: int  # Chaikin passes: 0 = boxy 80s Lada, 3 = rounded modern car
    bumper: str  # "chrome" | "black" | "body"
    # spare (wheel on the tailgate), rack, spoiler, twin (round lamps), cladding, moulding, trim (chrome belt
    # line), mudflaps, vinyl (black roof): bold fittings keep the classes learnable by a tiny net at 96-128 px
    extras: str = ""


# Index = class. Silhouettes loosely follow the real cars, exaggerated so they differ at thumbnail size.
# fmt: off
BODIES = [  # wheel front rear sill nose belt roof  ws  ws_top r_end rw  deck  pillars  smooth bumper extras
    Body(.09, .19, .78, .08, .21, .28, .43, .36, .50, .72, .84, .29, (.47, .82), 2, "body", "trim"),
    Body(.115, .16, .84, .10, .25, .33, .54, .27, .43, .86, 1.0, .36, (.45, .80), 3, "body", "cladding"),
    Body(.085, .17, .81, .075, .20, .28, .44, .36, .50, .80, 1.0, .26, (.44, .78), 0, "black", "moulding"),
    Body(.09, .19, .77, .085, .22, .29, .52, .28, .40, .62, .76, .36, (.45, .85), 3, "black", "spoiler"),
    Body(.07, .21, .74, .075, .26, .27, .42, .34, .40, .70, .76, .26, (.50,), 0, "chrome", "twin"),
    Body(.13, .20, .76, .14, .32, .35, .60, .33, .41, .96, 1.0, .38, (.56,), 0, "black", "spare"),
    Body(.09, .17, .81, .085, .22, .30, .47, .30, .44, .95, 1.0, .31, (.38, .68), 1, "body", "rack"),
    Body(.085, .17, .80, .075, .12, .25, .38, .40, .54, .62, 1.0, .24, (.62,), 0, "black", "mudflaps"),
    Body(.095, .17, .76, .065, .15, .21, .31, .40, .56, .70, .84, .21, (.46, .80), 2, "chrome", "trim"),
    Body(.085, .18, .79, .075, .11, .25, .39, .38, .52, .70, .83, .29, (.47, .82), 0, "black", "vinyl"),
]
# fmt: on

Point = tuple[float, float]


def _chaikin(pts: list[Point], passes: int) -> list[Point]:
    """Round the corners of a closed polygon: modern cars have soft silhouettes, old Ladas sharp ones."""
    a = np.asarray(pts, dtype=float)
    for _ in range(passes):
        b = np.roll(a, -1, axis=0)
        a = np.stack([0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b], axis=1).reshape(-1, 2)
    return [(float(x), float(y)) for x, y in a]


def _color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, ...]:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _car(rng: np.random.Generator, body: Body, length: int) -> Image.Image:
    """Draw one car facing left on a transparent layer whose bottom edge (minus a margin) is the ground."""
    b = Body(*(v * rng.uniform(0.96, 1.04) if isinstance(v, float) else v for v in body))  # per-car jitter
    m = int(0.06 * length)
    img = Image.new("RGBA", (length + 2 * m, int(0.66 * length) + 2 * m), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)

    def p(x: float, y: float) -> Point:
        return m + x * length, img.height - m - y * length

    def rect(x0: float, y0: float, x1: float, y1: float, fill: tuple[int, ...]) -> None:
        d.rectangle([p(x0, y1), p(x1, y0)], fill=fill)

    paint = _color(rng, 10, 246)  # random colour: it must carry no class information
    dark = tuple(int(c * 0.6) for c in paint)
    d.ellipse([p(-0.02, 0.025), p(1.02, -0.025)], fill=(0, 0, 0, 110))  # shadow on the ground
    outline = [(0.01, b.sill), (0.0, b.nose), (0.02, b.nose + 0.01), (b.ws, b.belt), (b.ws_top, b.roof)]
    tail = [(0.985, b.deck)] if b.rw < 0.97 else []  # sedans: flat trunk lid behind the rear window
    outline += [(b.roof_end, b.roof), (b.rw, max(b.belt, b.deck)), *tail]
    outline += [(1.0, b.deck - 0.015), (1.0, b.sill + 0.02), (0.98, b.sill)]
    lw = max(2, int(0.012 * length))
    d.polygon([p(*q) for q in _chaikin(outline, b.smooth)], fill=paint, outline=(20, 20, 20), width=lw)
    rect(0.02, b.sill, 0.98, b.sill + 0.035, dark)  # rocker panel shade
    ink = (int(rng.integers(10, 40)),) * 3  # near-black plastic and rubber
    if "cladding" in b.extras:
        rect(0.04, b.sill, 0.96, b.sill + 0.07, ink)
    if "moulding" in b.extras:
        y = (b.sill + b.belt) / 2
        rect(0.02, y - 0.015, 0.98, y + 0.02, ink)

    # side glass: the cabin quad inset by the pillar width, split into windows by the B (and C) pillars
    slope = (b.rw - b.roof_end) / max(b.roof - max(b.belt, b.deck), 1e-3)  # rear window, x per unit of height
    rx = b.roof_end + slope * (b.roof - b.belt - 0.012)
    g0, g1 = b.ws + 0.04, min(rx, 0.97) - 0.03
    glass = [(g0, b.belt + 0.012), (b.ws_top + 0.015, b.roof - 0.018), (b.roof_end - 0.02, b.roof - 0.018)]
    mask = Image.new("L", img.size)
    md = ImageDraw.Draw(mask)
    md.polygon([p(*q) for q in _chaikin([*glass, (g1, b.belt + 0.012)], min(b.smooth, 1))], fill=255)
    pw = max(2, int(0.03 * length))
    for x in [g0 - 0.02] + [g0 + f * (g1 - g0) for f in b.pillars]:  # front door edge, then pillars
        if x > g0:
            md.line([p(x, b.belt), p(x, b.roof)], fill=0, width=pw)
        d.line([p(x, b.belt), p(x, b.sill + 0.04)], fill=dark, width=max(1, pw // 4))  # door seam
    img.paste(_color(rng, 20, 90), mask=mask)
    if "trim" in b.extras:
        d.line([p(g0 - 0.03, b.belt), p(g1 + 0.02, b.belt)], fill=_color(rng, 200, 250), width=pw)

    # bumpers and lamps
    bcol = {"chrome": _color(rng, 185, 240), "black": ink, "body": dark}[b.bumper]
    bh = 0.03 if b.bumper == "body" else 0.045
    for x0, x1 in ((-0.012, 0.1), (0.9, 1.012)):
        rect(x0, b.sill + 0.02, x1, b.sill + 0.02 + bh, bcol)
    if "twin" in b.extras:
        for x in (0.012, 0.05):
            d.ellipse([p(x - 0.018, b.nose - 0.012), p(x + 0.018, b.nose - 0.048)], fill=_color(rng, 210))
    else:
        rect(0.0, b.nose - 0.05, 0.045, b.nose - 0.015, _color(rng, 200, 256))
    rect(0.965, b.deck - 0.065, 1.0, b.deck - 0.02, (200, 20 + int(rng.integers(40)), 20))

    # wheels under dark arches; rim colour and size are random, not class cues
    rim = _color(rng, 60, 230)
    for cx in (b.front, b.rear):
        arch = 1.18 * b.wheel
        d.pieslice([p(cx - arch, b.wheel + arch), p(cx + arch, b.wheel - arch)], 180, 360, fill=(10, 10, 10))
        d.ellipse([p(cx - b.wheel, 2 * b.wheel), p(cx + b.wheel, 0)], fill=ink)
        r = b.wheel * rng.uniform(0.5, 0.65)
        d.ellipse([p(cx - r, b.wheel + r), p(cx + r, b.wheel - r)], fill=rim)
        if "mudflaps" in b.extras:
            rect(cx + 1.1 * b.wheel, 0.015, cx + 1.1 * b.wheel + 0.045, b.sill + 0.03, ink)
    if "vinyl" in b.extras:
        y = b.roof - 0.01
        d.line([p(b.ws_top - 0.01, y), p(b.roof_end + 0.01, y)], fill=ink, width=pw * 3 // 2)
    if "spare" in b.extras:
        cy, r = (b.sill + b.deck) / 2 + 0.01, 0.8 * b.wheel
        d.ellipse([p(1.0 - 0.2 * r, cy + r), p(1.0 + 0.35 * r, cy - r)], fill=ink, outline=rim, width=pw // 2)
    if "rack" in b.extras:
        y = b.roof + 0.035
        d.line([p(b.ws_top + 0.06, y), p(b.roof_end - 0.03, y)], fill=ink, width=pw)
        for x in (b.ws_top + 0.08, b.roof_end - 0.06):
            d.line([p(x, b.roof), p(x, y)], fill=ink, width=pw)
    if "spoiler" in b.extras:
        wing = [(0.9, b.deck), (0.92, b.deck + 0.05), (1.01, b.deck + 0.055), (1.0, b.deck)]
        d.polygon([p(*q) for q in wing], fill=ink)
    return img


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Muted sky/wall gradient, ground, blocky 'buildings' and stray shapes: clutter to learn to ignore."""
    horizon = int(h * rng.uniform(0.3, 0.7))
    grey = rng.uniform(60, 200)
    top, mid, low, bottom = (grey + 0.5 * (rng.uniform(0, 255, 3) - grey) for _ in range(4))
    y = np.arange(h)[:, None]
    col = np.where(y < horizon, top + (mid - top) * y / horizon, low + (bottom - low) * (y - horizon) / h)
    img = Image.fromarray(np.repeat(col[:, None, :], w, axis=1).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 7)):
        x0, bw, bh = rng.uniform(-50, w), rng.uniform(30, 200), rng.uniform(20, horizon)
        fill = tuple(int(v) for v in np.clip(mid + rng.uniform(-50, 50, 3), 0, 255))  # low contrast
        d.rectangle([x0, horizon - bh, x0 + bw, horizon], fill=fill)
    for _ in range(rng.integers(0, 6)):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, 30)
        shape = d.ellipse if rng.random() < 0.5 else d.rectangle
        shape([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r], fill=_color(rng))
    return img


def render(cls: int, seed: int, key: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """One RGB image of class ``cls``; ``(seed, key)`` fixes every pixel, whichever process draws it."""
    rng = np.random.default_rng([seed, key])
    w, h = size
    img = _background(rng, w, h)
    car = _car(rng, BODIES[cls], int(w * rng.uniform(0.35, 0.9)))
    if rng.random() < 0.5:
        car = car.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    car = car.rotate(rng.uniform(-4, 4), resample=Image.Resampling.BILINEAR, expand=True)
    x = rng.uniform(min(0, w - car.width), max(0, w - car.width))
    ground = rng.uniform(min(h, car.height * 0.85), h + car.height * 0.05)  # may crop the roof or wheels
    img.paste(car, (int(x), int(ground - car.height)), car)
    if rng.random() < 0.5:  # Avito-style watermark in a corner
        font = ImageFont.load_default(size=int(rng.integers(12, 24)))
        corner = (int(rng.choice([8, w - 110])), int(rng.choice([6, h - 30])))
        ImageDraw.Draw(img).text(corner, "avito.ru", font=font, fill=_color(rng, 150))
    noise = rng.integers(-6, 7, (h // 4 + 1, w // 4 + 1, 3), dtype=np.int16)  # blocky sensor noise
    noise = noise.repeat(4, 0).repeat(4, 1)[:h, :w]
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def _write(job: tuple[str, int, int, int, tuple[int, int]]) -> None:
    path, cls, seed, key, size = job
    render(cls, seed, key, size).save(path, quality=90)


def make_dataset(
    out: Path | str,
    per_class: int = 150,
    test: int = 100,
    seed: int = 0,
    size: tuple[int, int] = (640, 480),
    force: bool = False,
) -> Path:
    """Write the synthetic data set to ``out`` in the Kaggle layout and return ``out``.

    A non-empty ``out`` is refused unless ``force``; then ``train/`` and ``test_upload/`` are replaced (so no
    stale images from an earlier, larger run survive) and other files there are left alone.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass --force (force=True) to write into it anyway")
        for name in ("train", "test_upload"):
            shutil.rmtree(out / name, ignore_errors=True)
    rng = np.random.default_rng(seed)
    n_train = per_class * len(CLASS_NAMES)
    ids = [int(i) for i in rng.choice(900_000, n_train + test, replace=False) + 100_000]  # like 100155.jpg
    train_cls = [int(c) for c in rng.permutation(np.repeat(np.arange(len(CLASS_NAMES)), per_class))]
    test_cls = [int(c) for c in rng.integers(0, len(CLASS_NAMES), test)]
    train_rows = [(f"{i}.jpg", c) for i, c in zip(ids[:n_train], train_cls, strict=True)]
    test_rows = [(f"{i}.jpg", c) for i, c in zip(ids[n_train:], test_cls, strict=True)]

    for k in range(len(CLASS_NAMES)):
        (out / "train" / str(k)).mkdir(parents=True, exist_ok=True)
    (out / "test_upload").mkdir(parents=True, exist_ok=True)
    jobs = [(str(out / "train" / str(c) / name), c, seed, int(name[:-4]), size) for name, c in train_rows]
    jobs += [(str(out / "test_upload" / name), c, seed, int(name[:-4]), size) for name, c in test_rows]
    workers = min(os.cpu_count() or 1, 8)
    if workers > 1 and len(jobs) >= _POOL_MIN:
        with Pool(workers) as pool:
            pool.map(_write, jobs, chunksize=16)
    else:
        for job in jobs:
            _write(job)

    for name, rows in [
        ("train.csv", train_rows),
        ("sample-submission.csv", [(i, 0) for i, _ in test_rows]),
        ("test_labels.csv", test_rows),
    ]:
        with open(out / name, "w", newline="") as f:
            csv.writer(f).writerows([("Id", "Category"), *rows])
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: ``carnet-demo OUT [--per-class N] [--test N] [--seed S] [--force]``."""
    ap = argparse.ArgumentParser(prog="carnet-demo", description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output directory (must be missing or empty unless --force)")
    ap.add_argument("--per-class", type=int, default=150, help="train images per class (default 150)")
    ap.add_argument("--test", type=int, default=100, help="test_upload images (default 100)")
    ap.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    ap.add_argument("--force", action="store_true", help="write into a non-empty OUT")
    a = ap.parse_args(argv)
    if a.per_class < 1 or a.test < 0:  # a class without photos is a data set that training refuses
        ap.error(f"--per-class {a.per_class} --test {a.test}: expected --per-class >= 1 and --test >= 0")
    if a.out.exists() and not a.out.is_dir():
        ap.exit(2, f"error: {a.out} is a file; expected a folder to write the data set into\n")
    t0 = time.perf_counter()
    try:
        make_dataset(a.out, a.per_class, a.test, a.seed, force=a.force)
    except OSError as e:  # our FileExistsError, or what the system says of OUT (a file, no permission)
        ap.exit(2, f"error: {e if isinstance(e, FileExistsError) else f'cannot write {a.out} ({e.strerror})'}\n")
    n = a.per_class * len(CLASS_NAMES)
    dt = time.perf_counter() - t0
    print(f"demo data: {n} train ({a.per_class}/class) + {a.test} test images -> {a.out} in {dt:.1f}s")


if __name__ == "__main__":
    main()
