"""A virtual environment with the lowest versions pyproject.toml allows (`make test-lowest`, run by .ci/run).

    python .ci/lowest.py VENV      # create VENV: every dependency at its floor, carnet installed editable
    python .ci/lowest.py --pins    # print the pins only

The floors are read from pyproject.toml, the one place they are written: each requirement of the package and of
its `dev` extra (with the extras that `dev` names) is pinned to its lower bound; one without a bound is left to
pip. torch and torchvision stay the machine's. Run it with the main environment's Python (.venv): VENV sees that
environment's packages through a .pth file, after its own, so pip installs only the pinned floors and whatever
their requirements need in other versions; everything else (torch, its 3 GB of NVIDIA libraries, transitive
dependencies that already fit) is reused, and pip never writes outside VENV. `pip check` then holds the result
consistent.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import tomllib  # Python 3.11+: CI's, and make test-lowest's
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
MACHINE = {"torch", "torchvision"}  # the machine's builds (local wheels, CUDA libraries): never re-pinned


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """The package's requirements, then those of its `dev` extra with the extras that `dev` names expanded."""
    project = tomllib.loads(pyproject.read_text())["project"]
    name, extras = canonicalize_name(project["name"]), project.get("optional-dependencies", {})
    found: dict[str, Requirement] = {}

    def add(lines: list[str]) -> None:
        for line in lines:
            req = Requirement(line)
            if canonicalize_name(req.name) == name:  # carnet[serve,...] inside dev
                for extra in sorted(req.extras):
                    add(extras[extra])
            else:
                found.setdefault(canonicalize_name(req.name), req)

    add(project["dependencies"])
    add(extras.get("dev", []))
    return list(found.values())


def floor(req: Requirement) -> str | None:
    """The version of the requirement's lower bound (`>=`, `==` or `~=`), or None when it has none."""
    bounds = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
    if len(bounds) > 1:
        raise SystemExit(f"{req}: more than one lower bound")
    return bounds[0] if bounds else None


def pins(reqs: list[Requirement]) -> list[str]:
    """`name==floor` for each requirement with a floor, the bare name otherwise; torch and torchvision left out."""
    return [f"{r.name}=={low}" if (low := floor(r)) else r.name for r in reqs
            if canonicalize_name(r.name) not in MACHINE]


def build(env_dir: Path) -> None:
    pinned = pins(requirements())
    venv.EnvBuilder(with_pip=True, clear=True, symlinks=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    site = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   text=True).strip()
    (Path(site) / "carnet-main-env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    print(f"lowest: {env_dir} over {sys.prefix}: {' '.join(pinned)}", flush=True)
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *pinned], check=True)
    # no build isolation: nothing to download; the floors above must also build carnet (test_packaging does)
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT)], check=True)
    subprocess.run([python, "-m", "pip", "check"], check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv", nargs="?", type=Path, help="the environment to create (replaced if it exists)")
    parser.add_argument("--pins", action="store_true", help="print the pins and exit")
    args = parser.parse_args(argv)
    if args.pins:
        print("\n".join(pins(requirements())))
    elif args.venv:
        build(args.venv.absolute())
    else:
        parser.error("give VENV or --pins")


if __name__ == "__main__":
    main()
