"""Audit a car data set: exact and near-duplicate images, train/test leaks, label conflicts, class balance.

``carnet-audit DATA [--extra SRC.yaml ...]`` hashes every image (SHA-1 and a perceptual hash), confirms each
near-duplicate candidate with a pixel check (``carnet.data.dedup``) and writes audit.md, audit_pairs.csv and
audit_classes.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from carnet.artifacts import spreadsheet_safe, write_csv_atomic, write_text_atomic
from carnet.config import config_dir
from carnet.data.dedup import (
    DEFAULT_SIMILARITY,
    DEFAULT_THRESHOLD,
    confirmed_pairs,
    hash_images,
    nearest_distances,
)
from carnet.data.layout import IMAGE_EXTENSIONS
from carnet.data.sources import read_sources
from carnet.errors import DataError

PAIR_COLUMNS = ["kind", "scope", "distance", "similarity", "label_conflict", "group_a", "path_a", "label_a",
                "group_b", "path_b", "label_b"]


GROUP_ORDER = {"train": 0, "test": 2}  # extra:<name> sort between them: scopes read train/extra, extra/test


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def collect(root: str | os.PathLike, extra: Sequence[str | os.PathLike] = (),
            class_names: Sequence[str] = ()) -> tuple[pd.DataFrame, dict[str, Any]]:
    """All images to audit: frame ``path`` (absolute), ``rel``, ``group``, ``label`` (or NA), plus layout facts."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"audit: data root {root} does not exist")
    layout: dict[str, Any] = {"problems": []}
    rows = []
    train_dir = root / "train"
    on_disk = _images_in(train_dir) if train_dir.is_dir() else []
    for p in on_disk:
        folder = p.relative_to(train_dir).parts[0]
        label = int(folder) if folder.isdigit() and len(p.relative_to(train_dir).parts) > 1 else None
        if label is None:
            layout["problems"].append(f"{p.relative_to(root)}: not in a class folder train/<k>/")
        rows.append((str(p), str(p.relative_to(root)), "train", label))
    layout["train_on_disk"] = len(on_disk)
    train_csv = root / "train.csv"
    if train_csv.is_file():
        table = pd.read_csv(train_csv, dtype=str)
        listed = {f"train/{c}/{i}" for i, c in zip(table.Id, table.Category, strict=True)}
        disk = {r[1] for r in rows}
        by_name: dict[str, list[str]] = {}
        for rel in disk:
            by_name.setdefault(Path(rel).name, []).append(rel)
        missing = sorted(listed - disk)
        moved = [m for m in missing if Path(m).name in by_name]
        layout["train_csv_counts"] = table.Category.astype(int).value_counts().to_dict()
        layout.update(train_listed=len(listed), train_missing=len(missing), train_unlisted=len(disk - listed),
                      train_missing_examples=missing[:5])
        for m in moved[:20]:
            layout["problems"].append(f"train.csv puts {Path(m).name} in {Path(m).parent} but it is in "
                                      f"{', '.join(str(Path(x).parent) for x in by_name[Path(m).name])}")
    test_dir = root / "test_upload"
    test_files = _images_in(test_dir) if test_dir.is_dir() else []
    rows += [(str(p), str(p.relative_to(root)), "test", None) for p in test_files]
    layout["test_on_disk"] = len(test_files)
    sample = root / "sample-submission.csv"
    if sample.is_file():
        ids = set(pd.read_csv(sample, dtype=str).Id)
        names = {p.name for p in test_files}
        layout.update(test_listed=len(ids), test_missing=len(ids - names), test_unlisted=len(names - ids))
    extra_frame, stats = read_sources(list(extra), class_names)
    rows += [(p, p, f"extra:{s}", int(lab)) for p, lab, s in zip(extra_frame.path, extra_frame.label,
                                                                  extra_frame.source, strict=True)]
    layout["sources"] = {name: s.as_dict() for name, s in stats.items()}
    frame = pd.DataFrame(rows, columns=["path", "rel", "group", "label"])
    frame["label"] = frame.label.astype("Int64")
    return frame, layout


def _group_key(group: str) -> int:
    return GROUP_ORDER.get(group, 1)


def find_pairs(images: pd.DataFrame, threshold: int, min_similarity: float = DEFAULT_SIMILARITY,
               workers: int | None = None) -> tuple[pd.DataFrame, int]:
    """Exact (same SHA-1) and near (phash distance <= threshold, different bytes, confirmed by the pixel check at
    ``min_similarity``) pairs among ``images``, and how many phash candidates the pixel check turned down."""
    records = []
    readable = images[images.sha1.notna()]
    for _, dup in readable.groupby("sha1"):
        idx = dup.index.to_list()
        records += [("exact", a, b, 0, 1.0) for k, a in enumerate(idx) for b in idx[k + 1:]]
    hashed = images[images.phash.notna()]
    same_bytes = hashed.sha1.to_numpy()
    phash = hashed.phash.to_numpy().astype(np.uint64)
    # exact copies need no pixel check: one image per SHA-1 goes in, its copies get its near pairs below
    first = ~pd.Series(same_bytes).duplicated().to_numpy()
    i, j, d, sim, candidates = confirmed_pairs(hashed.path.to_numpy()[first], phash[first], threshold,
                                               min_similarity, workers=workers)
    kept = hashed.index.to_numpy()[first]
    members = hashed.groupby("sha1").groups
    for x, y, z, q in zip(kept[i], kept[j], d, sim, strict=True):
        records += [("near", a, b, int(z), float(q)) for a in members[images.sha1[x]] for b in members[images.sha1[y]]]
    out = []
    for kind, x, y, dist, similarity in records:
        ra, rb = images.loc[x], images.loc[y]
        if (_group_key(ra.group), ra.rel) > (_group_key(rb.group), rb.rel):
            ra, rb = rb, ra
        ga, gb = ("extra" if g.startswith("extra:") else g for g in (ra.group, rb.group))
        conflict = bool(pd.notna(ra.label) and pd.notna(rb.label) and ra.label != rb.label)
        out.append((kind, f"{ga}/{gb}", dist, round(similarity, 3), conflict, ra.group, ra.rel, ra.label,
                    rb.group, rb.rel, rb.label))
    pairs = pd.DataFrame(out, columns=PAIR_COLUMNS)
    pairs = pairs.sort_values(["scope", "kind", "distance", "path_a"], kind="stable").reset_index(drop=True)
    return pairs, candidates - len(i)


def _table(frame: pd.DataFrame) -> str:
    """A markdown table (pandas' to_markdown needs tabulate; this needs nothing)."""
    if frame.empty:
        return "_none_\n"
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join(lines) + "\n"


def _plot_classes(counts: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4), constrained_layout=True)
    counts.plot.bar(ax=ax, width=0.8)  # grouped: train.csv (listed) and train (on disk) would double up stacked
    ax.legend(fontsize=8, loc="lower right")
    ax.set_ylabel("images")
    ax.set_title("images per class")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def audit(root: str | os.PathLike, extra: Sequence[str | os.PathLike] = (), out: str | os.PathLike | None = None,
          class_names: Sequence[str] = (), threshold: int = DEFAULT_THRESHOLD, workers: int | None = None,
          progress: bool = True, examples: int = 30, min_similarity: float = DEFAULT_SIMILARITY) -> dict[str, Any]:
    """Audit ``root`` (+ extra sources); write audit.md, audit_pairs.csv, audit_classes.png to ``out``.

    Returns the facts the report shows: ``pairs`` (frame), ``rejected`` (phash candidates the pixel check turned
    down), ``images`` (frame with hashes), ``layout``, ``paths``.
    """
    started = time.time()
    root = Path(root).resolve()
    out = Path(out) if out is not None else Path("outputs") / "audit"
    out.mkdir(parents=True, exist_ok=True)
    images, layout = collect(root, extra, class_names)
    hashes = hash_images(images.path, workers, progress)
    images = pd.concat([images, hashes.drop(columns="path")], axis=1)
    pairs, rejected = find_pairs(images, threshold, min_similarity, workers)

    pairs_path, md_path, png_path = out / "audit_pairs.csv", out / "audit.md", out / "audit_classes.png"
    write_csv_atomic(spreadsheet_safe(pairs), pairs_path)

    labelled = images[images.label.notna()]
    counts = pd.crosstab(labelled.label.astype(int), labelled.group) if len(labelled) else pd.DataFrame()
    if layout.get("train_csv_counts"):  # what train.csv lists, whether or not the files are there
        listed = pd.Series(layout["train_csv_counts"], name="train.csv").to_frame()
        counts = listed.join(counts, how="outer") if len(counts) else listed
        counts = counts.fillna(0).astype(int).sort_index()
    counts.columns.name = None
    if len(counts):
        counts.index = [f"{k} {class_names[k]}" if k < len(class_names) else str(k) for k in counts.index]
        _plot_classes(counts, png_path)
    unreadable = images[images.error.notna()][["group", "rel", "error"]]

    md = [f"# Data audit of `{root}`\n",
          f"{len(images)} images hashed in {time.time() - started:.0f} s. Exact duplicates: same SHA-1 of the bytes. "
          f"Near duplicates: perceptual hash (imagehash.phash, 64 bits) at Hamming distance <= {threshold}, "
          f"different bytes, confirmed by a pixel check (similarity >= {min_similarity}: correlation of colour "
          f"thumbnails, best over slight crops; {rejected} look-alike candidate pair(s) turned down). "
          f"All pairs: `{pairs_path.name}`.\n",
          "## Images\n"]
    groups = images.groupby("group").agg(images=("path", "count"), unreadable=("error", lambda e: e.notna().sum()))
    md.append(_table(groups.reset_index()))
    facts = {k: v for k, v in layout.items()
             if k not in ("problems", "sources", "train_missing_examples", "train_csv_counts")}
    md.append("\nLayout: " + ", ".join(f"{k}={v}" for k, v in facts.items()) + "\n")
    if layout.get("train_missing"):
        md.append(f"\n{layout['train_missing']} file(s) listed in train.csv are missing, e.g. "
                  f"{', '.join(layout['train_missing_examples'])}\n")
    for name, s in layout["sources"].items():
        md.append(f"\nSource `{name}`: {s['read']} read, {s['kept']} kept, {s['dropped_unmapped']} dropped with "
                  f"unmapped labels {s['unmapped_labels'] or ''}\n")
    if layout["problems"]:
        md.append("\n" + "\n".join(f"- {p}" for p in layout["problems"][:examples]) + "\n")

    md.append("\n## Class counts\n")
    md.append(_table(counts.reset_index(names="class")) if len(counts) else "_no labelled images_\n")
    if len(counts):
        md.append(f"\n![classes]({png_path.name})\n")

    md.append("\n## Duplicates\n")
    if len(pairs):
        summary = pairs.groupby(["scope", "kind"]).agg(pairs=("path_a", "count"),
                                                       label_conflicts=("label_conflict", "sum")).reset_index()
        md.append(_table(summary))
    else:
        md.append("_no duplicate pairs_\n")
    hashed = images.phash.dropna().to_numpy().astype(np.uint64)
    if len(hashed) > 1:
        hist = np.bincount(np.minimum(nearest_distances(hashed), 17), minlength=18)
        md.append("\nNearest-neighbour phash distance per image (how far each image is from its closest other "
                  "image; near = <= threshold): " + ", ".join(f"{d if d < 17 else '>16'}: {n}"
                                                              for d, n in enumerate(hist) if n) + "\n")
    conflicts = pairs[pairs.label_conflict]
    md.append(f"\n### Labels that disagree between duplicates ({len(conflicts)})\n")
    md.append(_table(conflicts.head(examples)))
    for scope in sorted(pairs.scope.unique()):
        shown = pairs[pairs.scope == scope]
        md.append(f"\n### {scope} ({len(shown)} pairs, first {min(examples, len(shown))})\n")
        md.append(_table(shown.head(examples)[["kind", "distance", "path_a", "label_a", "path_b", "label_b"]]))

    md.append("\n## Image sizes and formats\n")
    ok = images[images.error.isna()]
    if len(ok):
        md.append(_table(ok.groupby(["group", "format", "mode"]).size().reset_index(name="images")))
        sizes = (ok.width.astype(int).astype(str) + "x" + ok.height.astype(int).astype(str)).value_counts().head(10)
        md.append("\nMost common sizes (WxH): " + ", ".join(f"{s} ({n})" for s, n in sizes.items()) + "\n")
        stats = ok[["width", "height"]].astype(int).describe().loc[["min", "50%", "max"]].T
        md.append("\n" + _table(stats.rename(columns={"50%": "median"}).reset_index(names="side")))
    md.append(f"\n## Unreadable files ({len(unreadable)})\n")
    md.append(_table(unreadable.head(examples * 3)))
    write_text_atomic(md_path, "".join(md))
    return {"images": images, "pairs": pairs, "rejected": rejected, "layout": layout,
            "paths": {"audit_md": md_path, "pairs_csv": pairs_path, "classes_png": png_path}}


def _class_names(path: Path, ap: argparse.ArgumentParser) -> list[str]:
    """``--data-config``'s class names, or argparse's error naming the file and what it lacks."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        ap.error(f"--data-config {path}: cannot read it ({getattr(err, 'strerror', None) or 'not YAML'})")
    names = loaded.get("class_names") if isinstance(loaded, dict) else None
    if not isinstance(names, list) or not names:
        ap.error(f"--data-config {path}: expected a YAML with a class_names list, as conf/data/kaggle_cars.yaml has")
    return [str(name) for name in names]


def _default_class_names() -> list[str]:
    """The competition's classes, as ``conf/data/kaggle_cars.yaml`` lists them."""
    return list(yaml.safe_load((config_dir() / "data" / "kaggle_cars.yaml").read_text())["class_names"])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="carnet-audit", description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="data root in the Kaggle layout (train/<k>/, train.csv, test_upload/)")
    ap.add_argument("--extra", nargs="*", default=[], metavar="SRC.yaml", help="extra sources (data.extra format)")
    ap.add_argument("--out", type=Path, default=Path("outputs/audit"), help="report folder (default outputs/audit)")
    ap.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD,
                    help=f"near-duplicate candidates: Hamming distance of 64-bit phashes (default {DEFAULT_THRESHOLD})")
    ap.add_argument("--similarity", type=float, default=DEFAULT_SIMILARITY,
                    help=f"pixel check a candidate must pass, 0-1; 0 = hash only (default {DEFAULT_SIMILARITY})")
    ap.add_argument("--workers", type=int, default=None, help="hashing threads (default min(8, CPUs))")
    ap.add_argument("--data-config", type=Path, default=None,
                    help="YAML with class_names (default: conf/data/kaggle_cars.yaml)")
    a = ap.parse_args(argv)
    if not 0 <= a.threshold <= 64:
        ap.error(f"--threshold {a.threshold}: expected a Hamming distance 0-64 (the bits of a 64-bit phash)")
    if not 0 <= a.similarity <= 1:
        ap.error(f"--similarity {a.similarity}: expected a number in [0, 1] (0: the hash alone)")
    if a.workers is not None and a.workers < 1:
        ap.error(f"--workers {a.workers}: expected a whole number >= 1")
    names = _class_names(a.data_config, ap) if a.data_config else _default_class_names()
    try:
        result = audit(a.root, a.extra, a.out, names, a.threshold, a.workers, min_similarity=a.similarity)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pairs = result["pairs"]
    print(f"{len(result['images'])} images; {int((pairs.kind == 'exact').sum())} exact and "
          f"{int((pairs.kind == 'near').sum())} near duplicate pairs; {int(pairs.label_conflict.sum())} label "
          f"conflicts; {int(result['images'].error.notna().sum())} unreadable; {result['rejected']} look-alike "
          f"candidate(s) turned down by the pixel check")
    for scope, n in pairs.scope.value_counts().sort_index().items():
        print(f"  {scope}: {n} pairs")
    print(f"report: {result['paths']['audit_md']}\npairs:  {result['paths']['pairs_csv']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
