"""What CI relies on: every dependency has a floor that the lowest-versions step installs (.ci/lowest.py), every
private import is covered by an upper bound, and the browser test fails where CI says a browser must be there."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import sys

import pytest

from tests.helpers.devtools import REQUIRE_ENV, require_browser
from tests.helpers.paths import REPO


@pytest.fixture(scope="module")
def lowest():
    spec = importlib.util.spec_from_file_location("carnet_ci_lowest", REPO / ".ci" / "lowest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_every_dependency_has_a_floor(lowest) -> None:
    """The lowest-versions step tests each floor; a requirement without one would go untested at its bottom."""
    reqs = lowest.requirements()
    assert {"pytorch-lightning", "numpy", "flask", "pytest", "mlflow-skinny"} <= {r.name for r in reqs}
    assert [str(r) for r in reqs if lowest.floor(r) is None] == []


def test_lowest_pins_come_from_the_floors_in_pyproject(lowest, tmp_path) -> None:
    (tmp_path / "pyproject.toml").write_text("""
[project]
name = "Car_Net"
dependencies = ["torch>=2.4,<=2.14.1", "numpy>=2.0", "rich~=13.0", "six"]
[project.optional-dependencies]
serve = ["flask>=3.0", "numpy>=2.1"]
docs = ["sphinx>=7"]
dev = ["car-net[serve]", "pytest>=8.0"]
""")
    reqs = lowest.requirements(tmp_path / "pyproject.toml")
    # dev and the extras it names (not docs), the package's own requirement first where two name one package
    assert lowest.pins(reqs) == ["numpy==2.0", "rich==13.0", "six", "flask==3.0", "pytest==8.0"]


def private_imports() -> dict[str, set[str]]:
    """Top-level package -> the modules of carnet that import a private module or name from it."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "carnet").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules, names = node.module.split("."), [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                modules, names = [], []
                for alias in node.names:
                    if any(part.startswith("_") for part in alias.name.split(".")):
                        found.setdefault(alias.name.split(".")[0], set()).add(path.name)
                continue
            else:
                continue
            if modules[0] != "__future__" and any(p.startswith("_") for p in [*modules, *names]):
                found.setdefault(modules[0], set()).add(path.name)
    return found


def test_private_imports_have_upper_bounds(lowest) -> None:
    """A private module or name of a dependency may change in its next minor release: pyproject caps it."""
    bounded = {r.name for r in lowest.requirements() if any(s.operator in ("<", "<=") for s in r.specifier)}
    found = private_imports()
    assert {"timm", "torch", "pytorch_lightning"} <= set(found)  # the scan sees today's private imports
    distributions = importlib.metadata.packages_distributions()
    unbounded = {top: where for top, where in found.items() if not set(distributions[top]) & bounded}
    assert unbounded == {}, f"private imports from packages without an upper bound in pyproject.toml: {unbounded}"


def test_a_missing_browser_skips_here_and_fails_where_ci_requires_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no Chromium on PATH"):
        require_browser()
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_ENV} is set: no Chromium on PATH"):
        require_browser()
