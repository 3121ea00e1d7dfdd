"""The inspection page: one static HTML file with its CSS inline and no script, and the thumbnails it shows in a
``thumbs/`` folder beside it, so it opens from disk in any browser without a network (or a server).

Each photo on the page is a small JPEG (longest side ``THUMB_SIDE``) made from the photo as training sees it
(EXIF orientation applied) and links to the original file.
"""

from __future__ import annotations

import hashlib
import html
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from rich.progress import Progress

from carnet.data.decode import decode_image

THUMB_SIDE = 200
THUMBS = "thumbs"
SECTIONS = {"summary": "Summary", "per-class": "Per class", "confusion": "Confusion matrix",
            "balance": "Class balance", "top-losses": "Top losses", "suspects": "Suspected label errors",
            "duplicates": "Near-duplicates and leaks"}

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1180px;padding:0 16px 40px;
color:#1d2330;background:#fff}
h1{font-size:1.5em;margin:18px 0 4px}h2{font-size:1.2em;margin:28px 0 8px;border-bottom:1px solid #d8dce3;
padding-bottom:4px}
nav a{margin-right:12px;font-size:.9em}p.note{color:#555;font-size:.88em;margin:4px 0 10px}
table{border-collapse:collapse;font-size:.88em}th,td{padding:3px 8px;border:1px solid #e1e4ea;text-align:right}
th{background:#f3f5f8}td.name,th.name{text-align:left}
.facts td{text-align:left;border:none;padding:1px 10px 1px 0}.facts td:first-child{color:#666}
.big{display:flex;gap:28px;margin:10px 0}.big div{font-size:.85em;color:#555}.big b{display:block;font-size:1.9em;
color:#1d2330}
.cm td{min-width:34px;text-align:center}.bar{display:inline-block;height:9px;background:#4c78a8;vertical-align:middle;
margin-left:6px}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{width:208px;border:1px solid #dfe3ea;border-radius:6px;padding:4px;
font-size:.8em;background:#fafbfc}.card img{width:200px;height:150px;object-fit:contain;background:#eef0f3;
display:block}.card .path{color:#777;word-break:break-all;font-size:.9em}.bad{color:#b3261e;font-weight:600}
.good{color:#1e7b34;font-weight:600}.pair{width:428px}.pair .imgs{display:flex;gap:4px}.leak{border-color:#d9534f}
.missing{width:200px;height:150px;display:flex;align-items:center;justify-content:center;background:#eef0f3;
color:#999}
code{background:#f3f5f8;padding:1px 4px;border-radius:3px}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


class Thumbnails:
    """The photos the page shows, as small JPEGs in ``<out>/thumbs/`` named by a hash of the photo's path."""

    def __init__(self, out: Path, side: int = THUMB_SIDE) -> None:
        self.out, self.side = out, side
        self.wanted: dict[Path, str] = {}
        self.failed: set[Path] = set()

    def name(self, photo: Path) -> str:
        photo = Path(photo).resolve()
        if photo not in self.wanted:
            self.wanted[photo] = f"{THUMBS}/{hashlib.blake2b(str(photo).encode(), digest_size=8).hexdigest()}.jpg"
        return self.wanted[photo]

    def _write(self, photo: Path) -> bool:
        target = self.out / self.wanted[photo]
        try:
            image = Image.fromarray(decode_image(photo, self.side))  # reduced-scale JPEG decoding
            image.thumbnail((self.side, self.side))
            tmp = target.with_suffix(".tmp")
            image.save(tmp, format="JPEG", quality=85)
            os.replace(tmp, target)
            return True
        except Exception:  # an unreadable photo is shown as such on the page, not a reason to fail it
            return False

    def write(self, progress: Progress | None = None, workers: int = 2) -> None:
        """Make every thumbnail asked for (threads: PIL releases the GIL while decoding)."""
        (self.out / THUMBS).mkdir(parents=True, exist_ok=True)
        photos = list(self.wanted)
        task = progress.add_task("thumbnails", total=len(photos)) if progress is not None else None
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for photo, ok in zip(photos, pool.map(self._write, photos), strict=True):
                if not ok:
                    self.failed.add(photo)
                if progress is not None:
                    progress.advance(task)

    def img(self, photo: Path, alt: str) -> str:
        """The ``<img>`` of a photo, linked to the original file; a placeholder when it could not be read."""
        photo = Path(photo).resolve()
        if photo in self.failed:
            return f'<div class="missing">cannot decode {_e(photo.name)}</div>'
        return f'<a href="{_e(photo.as_uri())}"><img src="{_e(self.name(photo))}" alt="{_e(alt)}"></a>'


@dataclass
class Page:
    """Everything the page shows; sections with nothing to show say so."""

    title: str
    facts: list[tuple[str, str]]
    class_names: list[str]
    root: Path
    scope: str = ""
    scope_note: str = ""
    headline: dict[str, float] | None = None
    per_class: pd.DataFrame | None = None
    confusion: np.ndarray | None = None
    balance: pd.DataFrame | None = None
    balance_note: str = ""
    losses: pd.DataFrame | None = None
    suspects: pd.DataFrame | None = None
    suspects_total: int = 0
    suspects_note: str = ""
    pairs: pd.DataFrame | None = None
    pairs_note: str = ""
    files: list[tuple[str, str]] = field(default_factory=list)

    def photo(self, path: str) -> Path:
        """A photo's file: split.csv's paths are relative to the data root (extra sources' may be absolute)."""
        return self.root / path


def _summary(page: Page) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in page.facts)
    out = [f'<table class="facts">{rows}</table>']
    if page.headline:
        h = page.headline
        out.append(f'<div class="big"><div><b>{h["accuracy"]:.4f}</b>accuracy</div><div><b>{h["log_loss"]:.4f}</b>'
                   f'log-loss</div><div><b>{h["photos"]}</b>{_e(page.scope)} photos</div></div>')
    if page.scope_note:
        out.append(f'<p class="note">{_e(page.scope_note)}</p>')
    if page.files:
        out.append('<p class="note">Files: ' + ", ".join(f'<a href="{_e(href)}">{_e(name)}</a>'
                                                           for name, href in page.files) + "</p>")
    return "".join(out)


def _per_class(page: Page) -> str:
    if page.per_class is None:
        return '<p class="note">No model predictions to score.</p>'
    rows = "".join(f'<tr><td class="name">{_e(r["class"])}</td><td>{r.precision:.3f}</td><td>{r.recall:.3f}</td>'
                   f'<td>{r.f1:.3f}</td><td>{int(r.support)}</td></tr>' for _, r in page.per_class.iterrows())
    return ('<table><tr><th class="name">class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th>'
            f'</tr>{rows}</table>')


def _confusion(page: Page) -> str:
    if page.confusion is None:
        return '<p class="note">No model predictions to score.</p>'
    matrix = page.confusion
    totals = np.maximum(matrix.sum(1, keepdims=True), 1)
    head = "".join(f"<th>{_e(n)}</th>" for n in page.class_names)
    rows = []
    for i, name in enumerate(page.class_names):
        cells = []
        for j in range(len(page.class_names)):
            share = matrix[i, j] / totals[i, 0]
            colour = "30,123,52" if i == j else "179,38,30"
            style = f' style="background:rgba({colour},{0.08 + 0.6 * share:.2f})"' if matrix[i, j] else ""
            cells.append(f"<td{style}>{matrix[i, j] if matrix[i, j] else ''}</td>")
        rows.append(f'<tr><th class="name">{_e(name)}</th>{"".join(cells)}<td>{int(totals[i, 0])}</td></tr>')
    return (f'<p class="note">Rows: true class; columns: predicted class; counts of {_e(page.scope)} photos.</p>'
            f'<table class="cm"><tr><th class="name">true \\ predicted</th>{head}<th>total</th></tr>'
            f'{"".join(rows)}</table>')


def _balance(page: Page) -> str:
    table = page.balance
    if table is None or table.empty:
        return '<p class="note">No labelled photos.</p>'
    top = max(int(table.to_numpy().max()), 1)
    head = "".join(f"<th>{_e(c)}</th>" for c in table.columns)
    rows = "".join(
        f'<tr><td class="name">{_e(name)}</td>'
        + "".join(f'<td>{int(v)}<span class="bar" style="width:{60 * v / top:.0f}px"></span></td>' for v in row)
        + f"<td>{int(sum(row))}</td></tr>" for name, row in zip(table.index, table.to_numpy(), strict=True))
    total = "".join(f"<td>{int(v)}</td>" for v in table.sum(0)) + f"<td>{int(table.to_numpy().sum())}</td>"
    note = f'<p class="note">{_e(page.balance_note)}</p>' if page.balance_note else ""
    return (f'{note}<table><tr><th class="name">class</th>{head}<th>all</th></tr>{rows}'
            f'<tr><th class="name">all</th>{total}</tr></table>')


def _card(thumbs: Thumbnails, page: Page, path: str, lines: Sequence[str], cls: str = "card") -> str:
    body = "".join(f"<div>{line}</div>" for line in lines)
    return (f'<div class="{cls}">{thumbs.img(page.photo(path), path)}{body}'
            f'<div class="path">{_e(path)}</div></div>')


def _losses(page: Page, thumbs: Thumbnails) -> str:
    if page.losses is None:
        return '<p class="note">No model predictions to score.</p>'
    if page.losses.empty:
        return f'<p class="note">No mistakes among the {_e(page.scope)} photos.</p>'
    names = page.class_names
    cards = [_card(thumbs, page, r.path, [
        f'true <span class="good">{_e(names[r.label])}</span> ({r.p_true:.3f})',
        f'predicted <span class="bad">{_e(names[r.predicted])}</span> ({r.p_predicted:.3f})',
        f"loss {r.loss:.2f}" + (f", fold {r.fold}" if r.fold >= 0 else "")]) for r in page.losses.itertuples()]
    return (f'<p class="note">The {len(cards)} {_e(page.scope)} photos the model is most confidently wrong about '
            f'(highest -log p(true class)); the probability of each class in brackets.</p>'
            f'<div class="grid">{"".join(cards)}</div>')


def _suspects(page: Page, thumbs: Thumbnails) -> str:
    note = f'<p class="note">{_e(page.suspects_note)}</p>' if page.suspects_note else ""
    if page.suspects is None:
        return note or '<p class="note">Not computed.</p>'
    if page.suspects.empty:
        return note + '<p class="note">No photo is flagged.</p>'
    cards = [_card(thumbs, page, r.path, [
        f"#{r.rank} given <span class=\"bad\">{_e(r.given)}</span>",
        f'suggested <span class="good">{_e(r.suggested)}</span> ({r.suggested_prob:.3f})',
        f"score {r.score:.4f}" + (f", {_e(r.split)}" if r.split else "")]) for r in page.suspects.itertuples()]
    shown = f"the first {len(cards)} of " if len(cards) < page.suspects_total else ""
    return (f'{note}<p class="note">Flagged: {page.suspects_total} photo(s); {shown}in rank order (score: '
            f'out-of-fold probability of the given label).</p><div class="grid">{"".join(cards)}</div>')


def _pairs(page: Page, thumbs: Thumbnails) -> str:
    note = f'<p class="note">{_e(page.pairs_note)}</p>' if page.pairs_note else ""
    if page.pairs is None:
        return note or '<p class="note">Not computed.</p>'
    if page.pairs.empty:
        return note + '<p class="note">No duplicate pairs.</p>'
    names = page.class_names

    def label(value: object) -> str:
        return "" if pd.isna(value) else _e(names[int(value)] if 0 <= int(value) < len(names) else value)

    cards = []
    for r in page.pairs.itertuples():
        conflict = ' <span class="bad">labels differ</span>' if r.label_conflict else ""
        imgs = "".join(f'<div>{thumbs.img(page.photo(p), p)}<div>{label(lab)}</div><div class="path">{_e(p)}</div>'
                       f"</div>" for p, lab in ((r.path_a, r.label_a), (r.path_b, r.label_b)))
        cls = "card pair leak" if r.leak else "card pair"
        cards.append(f'<div class="{cls}"><div><b>{_e(r.where)}</b>{" leak" if r.leak else ""}: {_e(r.kind)}, '
                     f'distance {int(r.distance)}, similarity {r.similarity:.2f}{conflict}</div>'
                     f'<div class="imgs">{imgs}</div></div>')
    return f'{note}<div class="grid">{"".join(cards)}</div>'


def render(page: Page, thumbs: Thumbnails) -> str:
    """The whole page as one HTML document (thumbnails must be written first: unreadable ones are marked)."""
    bodies = {"summary": _summary(page), "per-class": _per_class(page), "confusion": _confusion(page),
              "balance": _balance(page), "top-losses": _losses(page, thumbs), "suspects": _suspects(page, thumbs),
              "duplicates": _pairs(page, thumbs)}
    nav = "".join(f'<a href="#{k}">{_e(v)}</a>' for k, v in SECTIONS.items())
    sections = "".join(f'<section id="{k}"><h2>{_e(SECTIONS[k])}</h2>{bodies[k]}</section>' for k in SECTIONS)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(page.title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body><h1>{_e(page.title)}</h1><nav>{nav}</nav>{sections}</body></html>\n')


def wanted_photos(page: Page, thumbs: Thumbnails) -> None:
    """Ask for the thumbnail of every photo the page shows."""
    for frame, columns in ((page.losses, ["path"]), (page.suspects, ["path"]), (page.pairs, ["path_a", "path_b"])):
        if frame is not None:
            for column in columns:
                for path in frame[column]:
                    thumbs.name(page.photo(path))
