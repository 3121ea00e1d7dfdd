"""The wheel carries conf/, and a non-editable install trains from any folder with the `carnet-train` command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers.overrides import TINY
from tests.helpers.paths import CONF, REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source") / "carnet"
    # From a copy: setuptools' build/ folder in a checkout can hold files since deleted from the source.
    top = {".venv", ".venv-lowest", ".git", "build", "outputs", "multirun", "data", "demo_data",  # not carnet/data/
           "test-artifacts"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        return skip | (top & set(names) if Path(folder) == REPO else set())

    shutil.copytree(REPO, source, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    (found,) = out.glob("carnet-*.whl")
    return found


def test_wheel_carries_every_config_and_the_service_page(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"carnet/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert len(configs) > 40 and configs <= names, sorted(configs - names)
    assert "carnet/serving/page.html" in names


def test_installed_package_trains_outside_the_checkout(wheel: Path, tiny_data: Path, tmp_path: Path) -> None:
    """pip install (not editable) into a folder; run its `carnet-train` from an empty folder: configs come from
    the installed package, not from this checkout."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "NO_ALBUMENTATIONS_UPDATE": "1"}
    where = subprocess.run([sys.executable, "-c", "import carnet.config as c; print(c.config_dir())"], cwd=work,
                           env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()) == target / "carnet" / "conf"
    proc = subprocess.run([str(target / "bin" / "carnet-train"), *TINY, f"data.root={tiny_data}",
                           "hydra.run.dir=run"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["model"] == "test_efficientnet"
