"""``make data``: the competition's files with the official ``kaggle`` client, unzipped into ``data.root``'s layout.

``carnet-download [--root data]`` checks for Kaggle credentials *before* touching the network (no
credentials: a message saying where ``kaggle.json`` goes and how to accept the rules, exit code 2, in well under a
second), downloads ``sf-dl-car-classification.zip`` with ``kaggle competitions download`` (which itself skips an
up-to-date zip), and unpacks it, nested ``train.zip`` / ``test.zip`` included, into::

    root/train/<k>/*.jpg  root/train.csv  root/test_upload/*.jpg  root/sample-submission.csv

It is idempotent: a root that already has that layout is left alone (``--force`` unpacks again).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

COMPETITION = "sf-dl-car-classification"
RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"
EXIT_NO_CREDENTIALS, EXIT_CLIENT, EXIT_LAYOUT = 2, 3, 4

NO_CREDENTIALS = f"""\
error: no Kaggle credentials found, so the data cannot be downloaded.

1. On https://www.kaggle.com/settings (section "API") click "Create New Token": it downloads kaggle.json.
2. Put it where the kaggle client looks for it and make it private:
       mkdir -p ~/.kaggle && mv ~/Downloads/kaggle.json ~/.kaggle/kaggle.json && chmod 600 ~/.kaggle/kaggle.json
   (or $KAGGLE_CONFIG_DIR/kaggle.json, or export KAGGLE_USERNAME=... KAGGLE_KEY=...,
    or a new-style token in KAGGLE_API_TOKEN / ~/.kaggle/access_token).
3. Accept the competition rules once, logged in, at
       {RULES_URL}
   ("I Understand and Accept"); without that the download answers 403 Forbidden.
Then run `make data` again.
"""

RULES_HINT = f"""\
the kaggle client failed (its message is above). If it says 403 / Forbidden, accept the competition rules at
    {RULES_URL}
with the account of your kaggle.json, then run `make data` again."""


def credentials(env: dict[str, str] | None = None, home: Path | None = None) -> str | None:
    """Where the kaggle client would find credentials (a short description), or None if nowhere.

    Mirrors the client's own search (kaggle 1.x and 2.x) so a missing token is reported before any network call.
    """
    env = dict(os.environ if env is None else env)
    home = Path(home or env.get("HOME") or Path.home())
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    if env.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    candidates = [Path(env["KAGGLE_CONFIG_DIR"]) / "kaggle.json"] if env.get("KAGGLE_CONFIG_DIR") else []
    xdg = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    candidates += [home / ".kaggle" / "kaggle.json", xdg / "kaggle" / "kaggle.json",
                   home / ".kaggle" / "access_token", home / ".kaggle" / "access_token.txt",
                   home / ".kaggle" / "credentials.json"]
    for path in candidates:
        if path.is_file() and path.stat().st_size > 0:
            return str(path)
    return None


def layout_complete(root: Path) -> bool:
    """True when ``root`` already holds the unpacked competition (what carnet.data expects)."""
    train = root / "train"
    return (
        (root / "train.csv").is_file() and (root / "sample-submission.csv").is_file()
        and train.is_dir() and any(p.is_dir() and any(p.iterdir()) for p in train.iterdir())
        and (root / "test_upload").is_dir() and any((root / "test_upload").iterdir())
    )


def _unzip(archive: Path, into: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():  # refuse entries that would land outside `into` (zip slip)
            if not (into / member).resolve().is_relative_to(into.resolve()):
                raise ValueError(f"{archive}: unsafe path {member!r} in the archive")
        zf.extractall(into)


def _extract_all(archive: Path, into: Path, max_zips: int = 100) -> None:
    """Unzip ``archive`` into ``into``, then every zip that appears there, in its own folder (the competition
    zip holds train.zip and test.zip); each inner zip is deleted once unpacked."""
    _unzip(archive, into)
    for _ in range(max_zips):
        inner = next(iter(sorted(into.rglob("*.zip"))), None)
        if inner is None:
            return
        _unzip(inner, inner.parent)
        inner.unlink()
    raise ValueError(f"{archive}: more than {max_zips} nested zips")


def _find(staging: Path, name: str, is_dir: bool) -> Path | None:
    """The shallowest path called ``name`` under ``staging`` (zips may or may not wrap files in a folder)."""
    hits = sorted((p for p in staging.rglob(name) if p.is_dir() == is_dir and "__MACOSX" not in p.parts),
                  key=lambda p: len(p.parts))
    return hits[0] if hits else None


def unpack(archive: str | os.PathLike, root: str | os.PathLike) -> Path:
    """Unpack the competition zip into ``root``'s layout; each target is replaced only once it is complete."""
    archive, root = Path(archive), Path(root)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / ".unpack"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _extract_all(archive, staging)
        found = {"train": _find(staging, "train", True),
                 "test_upload": _find(staging, "test_upload", True) or _find(staging, "test", True),
                 "train.csv": _find(staging, "train.csv", False),
                 "sample-submission.csv": _find(staging, "sample-submission.csv", False)}
        missing = [k for k, v in found.items() if v is None]
        if missing:
            raise ValueError(f"{archive} does not contain {missing} (found: "
                             f"{sorted(str(p.relative_to(staging)) for p in staging.iterdir())})")
        for name, src in found.items():
            dst = root / name
            if dst.is_dir():
                shutil.rmtree(dst)
            elif dst.exists():
                dst.unlink()
            os.replace(src, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def download(root: Path, competition: str = COMPETITION) -> Path:
    """Run the official client; return the zip (the client skips the download when it is up to date)."""
    cache = root / ".download"
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "kaggle", "competitions", "download", "-c", competition, "-p", str(cache)]
    print("$ " + " ".join(cmd[2:]), flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        if not any(cache.iterdir()):
            cache.rmdir()
        raise RuntimeError(RULES_HINT)
    zips = sorted(cache.glob("*.zip"), key=lambda p: p.stat().st_mtime)
    if not zips:
        raise RuntimeError(f"kaggle reported success but left no zip in {cache}")
    return zips[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="carnet-download", description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("data"), help="where to unpack (data.root; default data/)")
    ap.add_argument("--competition", default=COMPETITION)
    ap.add_argument("--check", action="store_true", help="only check: data already there, or credentials present")
    ap.add_argument("--force", action="store_true", help="unpack again even if the layout is complete")
    ap.add_argument("--keep-zip", action="store_true", help="keep the downloaded zip in ROOT/.download")
    a = ap.parse_args(argv)
    if layout_complete(a.root) and not a.force:
        print(f"{a.root}: the competition data is already there (train/, train.csv, test_upload/, "
              f"sample-submission.csv); nothing to do (--force unpacks again)")
        return 0
    where = credentials()
    if where is None:
        print(NO_CREDENTIALS, file=sys.stderr, end="")
        return EXIT_NO_CREDENTIALS
    if a.check:
        print(f"Kaggle credentials: {where}")
        return 0
    if importlib.util.find_spec("kaggle") is None:  # not `import kaggle`: it authenticates on import
        print("error: the kaggle client is not installed: pip install -e '.[data]'", file=sys.stderr)
        return EXIT_CLIENT
    try:
        archive = download(a.root, a.competition)
        unpack(archive, a.root)
    except (RuntimeError, ValueError, zipfile.BadZipFile) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_LAYOUT if isinstance(err, (ValueError, zipfile.BadZipFile)) else EXIT_CLIENT
    if not a.keep_zip:
        shutil.rmtree(a.root / ".download", ignore_errors=True)
    n_train = sum(1 for _ in (a.root / "train").rglob("*.jpg"))
    n_test = sum(1 for _ in (a.root / "test_upload").iterdir())
    print(f"{a.root}: {n_train} train images, {n_test} test images; train with data.root={a.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
