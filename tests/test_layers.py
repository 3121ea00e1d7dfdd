"""The package's structure holds (docs/architecture.md, "Layers" and "A run's lifecycle"): every carnet import
points down the layer table, the data layer's plain modules and predict on a folder of photos load no Lightning
(nor matplotlib, for the data layer), every error class is a CarnetError in carnet/errors.py, and the lifecycle
table names every hook carnet's callbacks implement."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl

from tests.helpers.paths import REPO

ARCHITECTURE = REPO / "docs" / "architecture.md"
PACKAGE = REPO / "carnet"


def doc_section(title: str) -> str:
    text = ARCHITECTURE.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def table_rows(section: str) -> list[list[str]]:
    """The cells of a markdown table's body rows."""
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows[2:]]


def layer_table() -> tuple[dict[str, str], dict[str, set[str]]]:
    """(module prefix -> layer, layer -> the layers it may import from) as docs/architecture.md states them."""
    layer_of, allowed = {}, {}
    for layer, modules, imports in table_rows(doc_section("Layers")):
        for module in re.findall(r"`([\w.]+)`", modules):
            layer_of[module] = layer
        allowed[layer] = {name.strip() for name in imports.split(",")} | {layer}
    return layer_of, allowed


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str, layer_of: dict[str, str]) -> str | None:
    """The layer of the longest table prefix of ``module`` (``carnet`` alone is the package's __init__)."""
    for prefix in sorted(layer_of, key=len, reverse=True):
        if module == prefix or (prefix != "carnet" and module.startswith(prefix + ".")):
            return layer_of[prefix]
    return None


def carnet_imports(path: Path) -> set[str]:
    """The carnet modules ``path`` imports, at its top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        found |= {name for name in names if name == "carnet" or name.startswith("carnet.")}
    return found


def test_every_carnet_import_follows_the_layer_table() -> None:
    layer_of, allowed = layer_table()
    assert set(allowed) >= {"foundation", "data", "models", "training", "inference", "serving", "tools"}
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mine = layer(module_name(path), layer_of)
        if mine is None:
            wrong.append(f"{module_name(path)}: in no layer of docs/architecture.md's table")
            continue
        for target in sorted(carnet_imports(path)):
            theirs = layer(target, layer_of)
            if theirs not in allowed[mine]:
                wrong.append(f"{module_name(path)} ({mine}) imports {target} ({theirs})")
    assert not wrong, "\n".join(wrong)


# The data layer's modules without Lightning, then predict on a folder of photos; what each has loaded.
LOADED = """
import json, sys
heavy = ("pytorch_lightning", "lightning", "lightning_fabric", "matplotlib")
loaded = lambda: sorted(m for m in heavy if m in sys.modules)
import carnet.data.layout, carnet.data.decode, carnet.data.splits, carnet.data.cache, carnet.data.transforms
import carnet.data.sources, carnet.data.dedup, carnet.data.device_pipeline, carnet.data.dataset
data = loaded()
from carnet.inference.predict import predict
from tests.helpers.config import compose_cfg
predict(compose_cfg([f"ckpt={sys.argv[1]}", f"images={sys.argv[2]}", f"out={sys.argv[3]}", "data.num_workers=0"],
                    config_name="predict"))
print(json.dumps({"data": data, "predict": loaded()}))
"""


def test_the_data_layer_and_predict_on_photos_load_no_lightning(tiny_checkpoint: Path, tiny_data: Path,
                                                                 tmp_path: Path) -> None:
    """Importing the data layer's plain modules loads neither matplotlib nor Lightning; predicting a folder of
    photos (import, checkpoint, loader, TTA, the CSV) loads no Lightning. In a fresh interpreter: this one has
    loaded everything."""
    out = tmp_path / "predictions.csv"
    proc = subprocess.run([sys.executable, "-c", LOADED, str(tiny_checkpoint), str(tiny_data / "test_upload"),
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["data"] == [], f"the data layer's plain modules load {loaded['data']}"
    assert not {"pytorch_lightning", "lightning", "lightning_fabric"} & set(loaded["predict"]), loaded["predict"]
    assert out.is_file()


def test_every_error_class_is_a_carnet_error_defined_in_errors_py() -> None:
    """One home for error classes (docs/architecture.md): another module may raise and catch them, not define
    them; each is a CarnetError, printed as one line, except RunInterrupted (an exit status of its own)."""
    import carnet.errors as errors

    ours = [obj for _, obj in inspect.getmembers(errors, inspect.isclass)
            if obj.__module__ == errors.__name__ and issubclass(obj, BaseException)]
    assert {cls.__name__ for cls in ours if not issubclass(cls, errors.CarnetError)} == {"RunInterrupted"}
    elsewhere = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            bases = [ast.unparse(b).rsplit(".", 1)[-1] for b in getattr(node, "bases", [])]
            if isinstance(node, ast.ClassDef) and any(hasattr(errors, b) and isinstance(getattr(errors, b), type)
                                                      and issubclass(getattr(errors, b), Exception) for b in bases):
                elsewhere.append(f"{module_name(path)}.{node.name}")
    assert not elsewhere, f"error classes outside carnet/errors.py: {elsewhere}"


HOOKS = {name for name, value in vars(pl.Callback).items() if not name.startswith("_") and callable(value)}


def carnet_callbacks() -> dict[str, type]:
    """carnet's Lightning callbacks (every pl.Callback subclass defined in carnet.training), by class name."""
    import carnet.training

    found = {}
    for info in pkgutil.iter_modules(carnet.training.__path__, "carnet.training."):
        module = importlib.import_module(info.name)
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ == module.__name__ and issubclass(obj, pl.Callback):
                found[name] = obj
    return found


def test_the_lifecycle_table_names_every_hook_carnet_implements() -> None:
    callbacks = carnet_callbacks()
    documented = set()
    for hook, names, _ in table_rows(doc_section("A run's lifecycle")):
        hook = hook.strip("`")
        for name in re.findall(r"`(\w+)`", names):
            cls = callbacks.get(name) or getattr(pl.callbacks, name, None)
            assert cls is not None, f"the lifecycle table names {name}, which is no callback"
            assert hook in HOOKS and getattr(cls, hook) is not getattr(pl.Callback, hook), \
                f"the lifecycle table says {name} acts at {hook}, which it does not implement"
            documented.add((name, hook))
    implemented = {(name, hook) for name, cls in callbacks.items() for hook in HOOKS
                   if any(hook in vars(base) for base in cls.__mro__ if base.__module__.startswith("carnet."))}
    assert implemented <= documented, f"hooks missing from the lifecycle table: {sorted(implemented - documented)}"
