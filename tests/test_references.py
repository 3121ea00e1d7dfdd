"""Every ``carnet/...`` path and ``carnet.x.y`` module (and the name after it) that the code, the configs, the docs
and the commands' ``--help`` name exists: a module moved without its mentions fails here, not in a reader's hands.

Read as text and resolved on disk with ``ast`` (nothing is imported but the commands that print ``--help``).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from tests.helpers.paths import REPO

# What the checkout says in words: code, configs, docs, build files. (Generated and third-party files are not ours.)
TEXT_FILES = ("carnet/**/*.py", "carnet/**/*.html", "tests/**/*.py", "benchmarks/**/*", "conf/**/*.yaml",
              "docs/*.md", "examples/**/*.yaml", "*.md", "*.py", "Makefile", "pyproject.toml", ".ci/run")
PATH = re.compile(r"(?<![\w/.-])carnet/[\w/.-]*[\w/]")
# Not after `${` (an OmegaConf resolver, ${carnet.phases_dir:...}) nor inside a longer dotted name or a path.
MODULE = re.compile(r"(?<![\w.{/-])carnet(?:\.[A-Za-z_]\w*)+")
FILE_NAMES = {"carnet.json"}  # the TorchScript export's extra file (carnet/inference/export.py)
# OmegaConf resolvers are named carnet.* too (carnet/config.py registers them).
RESOLVERS = set(re.findall(r'register_new_resolver\("([\w.]+)"', (REPO / "carnet" / "config.py").read_text()))


def text_files() -> Iterator[Path]:
    seen = set()
    for pattern in TEXT_FILES:
        for path in sorted(REPO.glob(pattern)):
            if path.is_file() and path not in seen and "__pycache__" not in path.parts and path.suffix != ".png" \
                    and path != Path(__file__).resolve():  # this file's examples of what it finds
                seen.add(path)
                yield path


def help_texts() -> Iterator[tuple[str, str]]:
    """``--help`` of every command in pyproject.toml that takes ``argv`` (the Hydra ones print conf/, read above)."""
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    for command, module, name in sorted(re.findall(r'^([\w-]+) = "([\w.]+):(\w+)"', section, re.M)):
        main = getattr(importlib.import_module(module), name)
        if "argv" not in inspect.signature(main).parameters:
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            main(["--help"])
        yield f"{command} --help", out.getvalue()


@cache
def top_level_names(module_file: Path) -> frozenset[str]:
    """Names a module defines or imports at its top level (functions, classes, assignments, imports)."""
    names: set[str] = set()
    for node in ast.parse(module_file.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return frozenset(names)


def module_problem(dotted: str) -> str | None:
    """Why ``carnet.a.b.name`` names nothing (None when it does): the longest prefix that is a module or package of
    the checkout, then the first name after it must be defined there (or be one of its submodules)."""
    if dotted in FILE_NAMES | RESOLVERS:
        return None
    parts = dotted.split(".")
    if parts[:2] == ["carnet", "conf"]:  # the installed copy of conf/ (pyproject.toml's package-dir)
        target = REPO.joinpath("conf", *parts[2:])
        return None if target.is_dir() or target.with_suffix(".yaml").is_file() else f"no conf/{'/'.join(parts[2:])}"
    for cut in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            break
    else:
        return "no such module"
    if cut == len(parts):
        return None
    name = parts[cut]
    if name.startswith("__") or name in top_level_names(module):  # a dunder: what every module has
        return None
    if module.name == "__init__.py" and (base / name).exists():  # a subpackage or data folder
        return None
    return f"{'.'.join(parts[:cut])} has no {name}"


def dangling(text: str) -> list[str]:
    """The ``carnet/...`` paths and ``carnet.x`` names in ``text`` that do not exist."""
    found = []
    for match in PATH.finditer(text):
        path = match.group(0).rstrip(".")
        if any(ch in path for ch in "*<>{}") or (REPO / path).exists():
            continue
        if path.startswith("carnet/conf") and (REPO / path.replace("carnet/conf", "conf", 1)).exists():
            continue
        found.append(f"{path}: no such file or folder")
    for match in MODULE.finditer(text):
        if (why := module_problem(match.group(0))) is not None:
            found.append(f"{match.group(0)}: {why}")
    return found


def test_every_carnet_path_and_module_named_in_the_checkout_exists() -> None:
    problems = [f"{path.relative_to(REPO)}: {problem}" for path in text_files()
                for problem in dangling(path.read_text(errors="replace"))]
    problems += [f"{command}: {problem}" for command, text in help_texts() for problem in dangling(text)]
    assert not problems, "\n".join(problems)


def test_the_check_finds_a_moved_module_a_missing_name_and_a_missing_file() -> None:
    """The check itself: it is no use if it passes everything."""
    assert dangling("see carnet.data.datamodule.CarDataModule and carnet/training/train.py") == []
    assert dangling("see carnet.nowhere, carnet.training.resume.no_such_name, carnet/no_such_file.py") == [
        "carnet/no_such_file.py: no such file or folder", "carnet.nowhere: carnet has no nowhere",
        "carnet.training.resume.no_such_name: carnet.training.resume has no no_such_name"]
    assert dangling('${carnet.phases_dir:x} "carnet.phases_dir" carnet.json carnet.conf.phase tests.carnet.x '
                    "carnet.training.__path__") == []
