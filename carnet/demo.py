"""Synthetic stand-in for the Kaggle *sf-dl-car-classification* data set.

``python -m carnet.demo OUT`` writes ten classes of procedurally drawn side-view cars in the competition's layout
(``train/<k>/<id>.jpg``, ``train.csv``, ``test_upload/``, ``sample-submission.csv``), so the whole pipeline and
``make demo`` run offline in minutes instead of needing the 1.7 GB download. The classes differ only in body shape
and proportions; colour, background, position, scale, mirroring and tilt are random so that no trivial image
statistic gives the label away. The hidden test labels go to ``test_labels.csv`` so that examples can score themselves.
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


class Body(NamedTuple):
    """Side-view proportions in units of the car length: x runs from the nose (0) to the tail (1), y up from the ground."""

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
    pillars: tuple[float, ...]  # B (and C) pillar positions as fractions of the side-glass length
    smooth: int  # Chaikin passes: 0 = boxy 70s/80s car, 2 = rounded modern one
    bumper: str  # "chrome" | "black" | "body"
    extras: str = ""  # any of: spare (wheel on the tailgate), rack, spoiler, twin (round lamps), cladding, moulding, trim


#  wheel  front rear  sill  nose  belt  roof  ws    ws_top roof_end rw  deck  pillars       smooth bumper  extras
BODIES = [
    Body(.090, .19, .78, .080, .210, .280, .430, .36, .50, .72, .84, .290, (.47, .82), 2, "body"),  # Priora
    Body(.115, .16, .84, .100, .250, .330, .540, .27, .43, .86, 1.0, .360, (.45, .80), 3, "body", "cladding"),  # Focus
    Body(.085, .17, .81, .075, .200, .280, .440, .36, .50, .80, 1.0, .260, (.44, .78), 0, "black", "moulding"),  # 2114
    Body(.090, .19, .77, .085, .220, .290, .520, .28, .40, .62, .76, .360, (.45, .85), 3, "black", "spoiler"),  # 2110
    Body(.070, .21, .74, .075, .260, .270, .420, .34, .40, .70, .76, .260, (.50,), 0, "chrome", "twin"),  # 2107
    Body(.130, .20, .76, .140, .320, .350, .600, .33, .41, .96, 1.0, .380, (.56,), 0, "black", "spare"),  # Niva
    Body(.090, .17, .81, .085, .220, .300, .470, .30, .44, .95, 1.0, .310, (.38, .68), 1, "body", "rack"),  # Kalina
    Body(.085, .17, .80, .075, .120, .250, .380, .40, .54, .62, 1.0, .240, (.62,), 0, "black"),  # 2109
    Body(.095, .17, .76, .065, .150, .210, .310, .40, .56, .70, .84, .210, (.46, .80), 2, "chrome", "trim"),  # Passat
    Body(.085, .18, .79, .075, .110, .250, .390, .38, .52, .70, .83, .290, (.47, .82), 0, "black", "moulding"),  # 21099
]  # fmt: skip


def _chaikin(pts: list[tuple[float, float]], passes: int) -> list[tuple[float, float]]:
    """Round the corners of a closed polygon: modern cars have soft silhouettes, old Ladas sharp ones."""
    for _ in range(passes):
        nxt = []
        for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
            nxt += [(0.75 * x0 + 0.25 * x1, 0.75 * y0 + 0.25 * y1), (0.25 * x0 + 0.75 * x1, 0.25 * y0 + 0.75 * y1)]
        pts = nxt
    return pts


def _color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _car(rng: np.random.Generator, body: Body, length: int) -> Image.Image:
    """Draw one car facing left on a transparent layer whose bottom edge (minus a margin) is the ground."""
    b = Body(*(v * rng.uniform(0.96, 1.04) if isinstance(v, float) else v for v in body))  # per-car proportions
    m = int(0.06 * length)
    img = Image.new("RGBA", (length + 2 * m, int(0.66 * length) + 2 * m), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)

    def p(x: float, y: float) -> tuple[float, float]:
        return m + x * length, img.height - m - y * length

    paint = _color(rng, 10, 246)  # random colour: must carry no class information
    dark = tuple(int(c * 0.6) for c in paint)
    d.ellipse([p(-0.02, 0.025), p(1.02, -0.025)], fill=(0, 0, 0, 110))  # shadow on the ground
    back = [(b.roof_end, b.roof), (b.rw, max(b.belt, b.deck))] + ([(0.985, b.deck)] if b.rw < 0.97 else [])
    outline = [(0.01, b.sill), (0.0, b.nose), (0.02, b.nose + 0.01), (b.ws, b.belt), (b.ws_top, b.roof)]
    outline += back + [(1.0, b.deck - 0.015), (1.0, b.sill + 0.02), (0.98, b.sill)]
    lw = max(2, int(0.012 * length))
    d.polygon([p(*q) for q in _chaikin(outline, b.smooth)], fill=paint, outline=(20, 20, 20), width=lw)
    d.rectangle([p(0.02, b.sill + 0.035), p(0.98, b.sill)], fill=dark)  # rocker panel shade

    ink = (int(rng.integers(10, 40)),) * 3  # near-black plastic and rubber
    if "cladding" in b.extras:
        d.rectangle([p(0.04, b.sill + 0.07), p(0.96, b.sill)], fill=ink)
    if "moulding" in b.extras:
        y = (b.sill + b.belt) / 2
        d.rectangle([p(0.02, y + 0.02), p(0.98, y - 0.015)], fill=ink)

    # side glass: the cabin quad inset by the pillar width, split into windows by B (and C) pillars
    rx = b.roof_end + (b.rw - b.roof_end) * (b.roof - b.belt - 0.012) / max(b.roof - max(b.belt, b.deck), 1e-3)
    g0, g1 = b.ws + 0.04, min(rx, 0.97) - 0.03
    glass = [(g0, b.belt + 0.012), (b.ws_top + 0.015, b.roof - 0.018), (b.roof_end - 0.02, b.roof - 0.018)]
    mask = Image.new("L", img.size)
    md = ImageDraw.Draw(mask)
    md.polygon([p(*q) for q in _chaikin([*glass, (g1, b.belt + 0.012)], min(b.smooth, 1))], fill=255)
    pw = max(2, int(0.03 * length))
    for f in b.pillars:
        x = g0 + f * (g1 - g0)
        md.line([p(x, b.belt), p(x, b.roof)], fill=0, width=pw)
        d.line([p(x, b.belt), p(x, b.sill + 0.04)], fill=dark, width=max(1, pw // 4))  # door seam
    d.line([p(g0 - 0.02, b.belt), p(g0 - 0.02, b.sill + 0.04)], fill=dark, width=max(1, pw // 4))
    img.paste(_color(rng, 20, 90), mask=mask)
    if "trim" in b.extras:
        d.line([p(g0 - 0.03, b.belt), p(g1 + 0.02, b.belt)], fill=_color(rng, 200, 250), width=pw)

    # bumpers and lamps
    bcol = {"chrome": _color(rng, 185, 240), "black": ink, "body": dark}[b.bumper]
    bh = 0.045 if b.bumper != "body" else 0.03
    for x0, x1 in ((-0.012, 0.1), (0.9, 1.012)):
        d.rectangle([p(x0, b.sill + 0.02 + bh), p(x1, b.sill + 0.02)], fill=bcol)
    if "twin" in b.extras:
        for x in (0.012, 0.05):
            d.ellipse([p(x - 0.018, b.nose - 0.012), p(x + 0.018, b.nose - 0.048)], fill=_color(rng, 210, 256))
    else:
        d.rectangle([p(0.0, b.nose - 0.015), p(0.045, b.nose - 0.05)], fill=_color(rng, 200, 256))
    d.rectangle([p(0.965, b.deck - 0.02), p(1.0, b.deck - 0.065)], fill=(200, 20 + int(rng.integers(40)), 20))

    # wheels under dark arches; rim colour and size are random, not class cues
    rim = _color(rng, 60, 230)
    for cx in (b.front, b.rear):
        d.pieslice([p(cx - 1.18 * b.wheel, 2.18 * b.wheel), p(cx + 1.18 * b.wheel, -0.18 * b.wheel)], 180, 360,
                   fill=(10, 10, 10))
        d.ellipse([p(cx - b.wheel, 2 * b.wheel), p(cx + b.wheel, 0)], fill=ink)
        r = b.wheel * rng.uniform(0.5, 0.65)
        d.ellipse([p(cx - r, b.wheel + r), p(cx + r, b.wheel - r)], fill=rim)
    if "spare" in b.extras:
        cy, r = (b.sill + b.deck) / 2 + 0.01, 0.8 * b.wheel
        d.ellipse([p(1.0 - 0.2 * r, cy + r), p(1.0 + 0.35 * r, cy - r)], fill=ink, outline=rim, width=pw // 2)
    if "rack" in b.extras:
        y = b.roof + 0.035
        d.line([p(b.ws_top + 0.06, y), p(b.roof_end - 0.03, y)], fill=ink, width=pw)
        for x in (b.ws_top + 0.08, b.roof_end - 0.06):
            d.line([p(x, b.roof), p(x, y)], fill=ink, width=pw)
    if "spoiler" in b.extras:
        d.polygon([p(*q) for q in ((0.9, b.deck), (0.92, b.deck + 0.05), (1.01, b.deck + 0.055), (1.0, b.deck))], fill=ink)
    return img


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Muted sky/wall gradient, ground, blocky 'buildings' and stray shapes: clutter the net must learn to ignore."""
    horizon = int(h * rng.uniform(0.3, 0.7))
    grey = rng.uniform(60, 200)
    top, mid, low, bottom = (grey + 0.5 * (rng.uniform(0, 255, 3) - grey) for _ in range(4))
    y = np.arange(h)[:, None]
    col = np.where(y < horizon, top + (mid - top) * y / horizon, low + (bottom - low) * (y - horizon) / h)
    img = Image.fromarray(np.repeat(col[:, None, :], w, axis=1).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 7)):
        x0, bw, bh = rng.uniform(-50, w), rng.uniform(30, 200), rng.uniform(20, horizon)
        fill = tuple(int(v) for v in np.clip(mid + rng.uniform(-50, 50, 3), 0, 255))
        d.rectangle([x0, horizon - bh, x0 + bw, horizon], fill=fill)
    for _ in range(rng.integers(0, 6)):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, 30)
        shape = d.ellipse if rng.random() < 0.5 else d.rectangle
        shape([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r], fill=_color(rng))
    return img


def render(cls: int, seed: int, key: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """One RGB image of class ``cls``; ``(seed, key)`` fully determines the pixels, whichever process draws it."""
    rng = np.random.default_rng([seed, key])
    w, h = size
    img = _background(rng, w, h)
    car = _car(rng, BODIES[cls], int(w * rng.uniform(0.35, 0.9)))
    if rng.random() < 0.5:
        car = car.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    car = car.rotate(rng.uniform(-4, 4), resample=Image.Resampling.BILINEAR, expand=True)
    x = rng.uniform(min(0, w - car.width), max(0, w - car.width))
    ground = rng.uniform(min(h, car.height * 0.85), h + car.height * 0.05)  # layer bottom; may crop the roof/wheels
    img.paste(car, (int(x), int(ground - car.height)), car)
    if rng.random() < 0.5:  # Avito-style watermark in a corner
        d = ImageDraw.Draw(img)
        font = ImageFont.load_default(size=int(rng.integers(12, 24)))
        d.text((rng.choice([8, w - 110]), rng.choice([6, h - 30])), "avito.ru", font=font, fill=_color(rng, 150))
    noise = rng.integers(-6, 7, (h // 4, w // 4, 3), dtype=np.int16).repeat(4, 0).repeat(4, 1)  # blocky sensor noise
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

    Refuses a non-empty ``out`` unless ``force``; then only the paths this function writes are replaced.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass --force (force=True) to overwrite the demo data there")
        for name in ("train", "test_upload"):
            shutil.rmtree(out / name, ignore_errors=True)
    rng = np.random.default_rng(seed)
    n_train = per_class * len(CLASS_NAMES)
    ids = rng.choice(900_000, n_train + test, replace=False) + 100_000  # unique like the real 100155.jpg
    train_cls = rng.permutation(np.repeat(np.arange(len(CLASS_NAMES)), per_class))
    test_cls = rng.integers(0, len(CLASS_NAMES), test)
    for k in range(len(CLASS_NAMES)):
        (out / "train" / str(k)).mkdir(parents=True, exist_ok=True)
    (out / "test_upload").mkdir(parents=True, exist_ok=True)

    jobs = [(str(out / "train" / str(c) / f"{i}.jpg"), int(c), seed, int(i), size) for i, c in zip(ids, train_cls)]
    jobs += [(str(out / "test_upload" / f"{i}.jpg"), int(c), seed, int(i), size) for i, c in zip(ids[n_train:], test_cls)]
    workers = min(os.cpu_count() or 1, 8)
    if workers > 1 and len(jobs) >= 64:
        with Pool(workers) as pool:
            pool.map(_write, jobs, chunksize=16)
    else:
        for job in jobs:
            _write(job)

    def write_csv(name: str, rows: list[tuple[str, int]]) -> None:
        with open(out / name, "w", newline="") as f:
            csv.writer(f).writerows([("Id", "Category"), *rows])

    write_csv("train.csv", [(f"{i}.jpg", int(c)) for i, c in zip(ids, train_cls)])
    write_csv("sample-submission.csv", [(f"{i}.jpg", 0) for i in ids[n_train:]])
    write_csv("test_labels.csv", [(f"{i}.jpg", int(c)) for i, c in zip(ids[n_train:], test_cls)])
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m carnet.demo OUT [--per-class N] [--test N] [--seed S] [--force]``."""
    ap = argparse.ArgumentParser(prog="python -m carnet.demo", description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output directory (must be empty or missing unless --force)")
    ap.add_argument("--per-class", type=int, default=150, help="train images per class (default 150)")
    ap.add_argument("--test", type=int, default=100, help="test_upload images (default 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="write into a non-empty OUT")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        make_dataset(a.out, a.per_class, a.test, a.seed, force=a.force)
    except FileExistsError as e:
        ap.exit(2, f"error: {e}\n")
    n = a.per_class * len(CLASS_NAMES)
    print(f"demo data: {n} train ({a.per_class}/class) + {a.test} test images -> {a.out} "
          f"in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
