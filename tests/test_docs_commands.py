"""Every shell command of the README and docs/ works as written (issue 23).

A command is a line (continuation lines joined, comment dropped) of a ```bash block in README.md or docs/*.md.

- Every command not in :data:`NOT_RUN` runs in the slow test, on a tiny carnet-demo dataset in a folder laid out
  like a checkout (``data/`` is the demo data), with the substitutions of :func:`as_run`: the tiny model and image
  size instead of ImageNet weights, one epoch, and the docs' placeholders (``ckpt=…``, ``best.ckpt``, a sweep's
  ``multirun/<date>/<time>``, port 8000) replaced by what the commands before it made. A server (``carnet-serve``,
  ``gunicorn``) runs until it answers ``/health``, the ``curl`` lines after it run against it, then it stops.
- The fast tests check that every command is run or listed in :data:`NOT_RUN` with its reason (so a new command is
  never skipped silently), and that every command parses: Hydra overrides compose and pass carnet's value checks,
  each tool's arguments parse with its own argument parser, make targets exist, gunicorn's app factory takes the
  arguments given.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomllib

from tests.helpers.config import compose_cfg
from tests.helpers.paths import REPO
from tests.helpers.runs import child_env
from tests.helpers.servers import free_port, stop_server, wait_healthy

# The order the slow test runs the files in: later commands use what earlier ones made (the phases' hand-offs,
# a k-fold sweep, a pseudo-label source, an ONNX export).
FILES = ["README.md", "docs/runs.md", "docs/fine-tuning.md", "docs/prediction.md", "docs/data.md", "docs/scale.md",
         "docs/serving.md", "docs/architecture.md", "docs/performance.md", "docs/inspection.md"]

INSPECTED = ("tests/test_inspect.py runs carnet-inspect on a run, a k-fold sweep and a checkpoint with a data root, "
             "and opens the page in Chromium")
CORRECTED = "needs an edited label_issues.csv; tests/test_corrections.py trains with one"
# Documented commands that the slow test does not run, and why. Every other documented command runs.
NOT_RUN = {
    "source .venv/bin/activate": "the test runs this checkout's interpreter itself",
    "make demo": "creates .venv and trains for minutes; its commands (carnet-demo, train.py experiment=demo) are "
                 "tested in test_demo.py and test_recipe.py, and `make demo` on a fresh clone by hand",
    "make test": "the test suite itself",
    "make pipeline MODEL=tf_efficientnet_lite0": "runs `carnet-pipeline data.root=data model=...`, which runs below",
    "make pipeline MODEL=tf_efficientnet_lite0 ARGS=trainer.max_epochs=2": "the same (its carnet-pipeline line runs)",
    "make data": "downloads the competition from Kaggle (credentials, network)",
    "make data DATA=/big/disk/cars": "downloads the competition from Kaggle (credentials, network)",
    "python train.py trainer=ddp trainer.devices=4": "needs 4 GPUs",
    "python train.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1 "
    "hydra.launcher.timeout_min=240 hydra.launcher.mem_gb=32 hydra.launcher.account=myproj optimizer=adam,adamw,sgd":
        "needs a SLURM cluster",
    "python train.py -m hydra/launcher=submitit_slurm hydra.launcher.gpus_per_node=4 hydra.launcher.tasks_per_node=4 "
    "trainer=ddp trainer.devices=4 hparams_search=optuna": "needs a SLURM cluster with GPUs",
    "python train.py -m hydra/launcher=submitit_slurm hydra.launcher.timeout_min=240 "
    "hydra.launcher.max_num_timeout=5 ...": "needs a SLURM cluster",
    "tensorboard --logdir multirun/2026-11-30/10-00-00.000000": "a UI server that runs until stopped",
    "mlflow ui --backend-store-uri outputs/DATE/TIME/mlruns": "a UI server that runs until stopped",
    "python benchmarks/accuracy.py --data adsdev_fewshot --weights tf_efficientnet_lite0.safetensors --seeds 0 1 2 "
    "--methods headfit carnet --phases head,unfreeze_half,unfreeze_3q,unfreeze_all --via pipeline "
    "--variant before --variant-repo before ../carnet-before --threads 2 --device cpu":
        "needs real photos and ImageNet weights; tests/test_accuracy_benchmark.py runs the benchmark on tiny data",
    # carnet-inspect (docs/inspection.md) and the file it writes for data.corrections
    "carnet-inspect outputs/demo": INSPECTED,
    "carnet-inspect outputs/2026-12-02/10-00-00.000000": INSPECTED,
    "carnet-inspect multirun/2026-12-02/10-00-00.000000": INSPECTED,
    "carnet-inspect outputs/phases/head.ckpt --data data": INSPECTED,
    "carnet-inspect --data data --model tf_efficientnet_lite0": INSPECTED,
    "make inspect RUN=outputs/demo": "runs `carnet-inspect outputs/demo`, " + INSPECTED,
    "python train.py data.corrections=outputs/run/inspect/label_issues.csv": CORRECTED,
    "python train.py phase=head data.corrections=outputs/.../inspect/label_issues.csv": CORRECTED,
}

# Commands with nothing of carnet's to parse (another program's command line).
NOT_PARSED = ("source", "curl", "tensorboard", "mlflow")

# `python train.py` is `carnet-train`, `python predict.py` is `carnet-predict`.
ENTRY_POINTS = {"train.py": "carnet-train", "predict.py": "carnet-predict"}
# The console scripts of pyproject.toml, run here as `python -m <module>` so that this checkout's code runs.
SCRIPTS = {name: target.split(":")[0] for name, target in
           tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"].items()}


@dataclass(frozen=True)
class Command:
    file: str
    line: int
    words: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.words)


def documented_commands() -> list[Command]:
    """Every command of the ```bash blocks of README.md and docs/*.md, in :data:`FILES` order."""
    commands = []
    for name in FILES:
        text = (REPO / name).read_text()
        for block in re.finditer(r"^( *)```bash\n(.*?)^\1```", text, re.S | re.M):
            first = text[: block.start(2)].count("\n") + 1
            pending, start = "", first
            for i, raw in enumerate(block[2].splitlines()):
                line = raw[len(block[1]):]
                if not pending:
                    start = first + i
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                words = shlex.split(pending + line, comments=True)
                pending = ""
                if words:
                    commands.append(Command(name, start, tuple(words)))
    return commands


COMMANDS = documented_commands()


def test_every_documented_command_runs_or_says_why_not() -> None:
    docs = {str(p.relative_to(REPO)) for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")]}
    assert docs == set(FILES), "a new page: give it its place in FILES"
    texts = {c.text for c in COMMANDS}
    assert len(COMMANDS) > 50
    stale = sorted(set(NOT_RUN) - texts)
    assert not stale, f"NOT_RUN lists commands the docs no longer have: {stale}"


def test_the_architecture_page_names_every_module() -> None:
    """docs/architecture.md walks the package folder by folder; a module it leaves out is one a reader cannot
    place (issue 23 item 11: device_pipeline, hub, optim and gunicorn_conf were missing)."""
    page = (REPO / "docs" / "architecture.md").read_text()
    modules = [p.relative_to(REPO / "carnet") for p in (REPO / "carnet").rglob("*.py") if p.name != "__init__.py"]
    missing = [str(m) for m in modules if f"`{m.name}`" not in page and f"`carnet/{m}`" not in page]
    assert not missing, f"docs/architecture.md does not name: {missing}"


# ------------------------------------------------------------------------------------------------- parsing


class _Parsed(Exception):
    """Raised right after a tool's own argument parser accepted a command line."""


def _parse_with_the_tools_parser(module: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Call the tool's ``main(args)`` and stop it right after its argparse parser accepted ``args`` (a rejected
    argument is argparse's SystemExit(2), with its message on stderr)."""
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, *a: Any, **k: Any) -> argparse.Namespace:
        real(self, *a, **k)
        raise _Parsed

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        with pytest.raises(_Parsed):
            importlib.import_module(module).main(args)


def _compositions(overrides: list[str]) -> list[list[str]]:
    """A sweep's overrides (``-m optimizer=adam,sgd``) as single runs: every value of each swept key once."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    sweeps = [i for i, o in enumerate(parsed) if o.is_sweep_override()]
    if not sweeps:
        return [overrides]
    runs = []
    for i in sweeps:
        key = parsed[i].get_key_element()
        for value in parsed[i].sweep_string_iterator():
            run = [f"{key}={value}" if j == i else (
                f"{parsed[j].get_key_element()}={next(parsed[j].sweep_string_iterator())}" if j in sweeps else o)
                for j, o in enumerate(overrides)]
            runs.append(run)
    return runs


def _check_hydra(config_name: str, overrides: list[str]) -> None:
    from carnet.config_check import check_predict_config, check_train_config

    overrides = [o for o in overrides if o not in ("-m", "--multirun", "...")]
    for run in _compositions(overrides):
        cfg = compose_cfg(run, config_name=config_name,
                          return_hydra_config=any(o.lstrip("+~").startswith("hydra") for o in run))
        (check_train_config if config_name == "train" else check_predict_config)(cfg)


def _check_gunicorn(args: list[str]) -> None:
    """``-c python:MODULE`` imports; ``MODULE:factory(kwargs)`` names a factory that takes those arguments."""
    spec = args[-1]
    for i, arg in enumerate(args[:-1]):
        if arg == "-c" and args[i + 1].startswith("python:"):
            importlib.import_module(args[i + 1].removeprefix("python:"))
    module, _, call = spec.partition(":")
    node = ast.parse(call, mode="eval").body
    assert isinstance(node, ast.Call), spec
    factory = getattr(importlib.import_module(module), node.func.id)
    inspect.signature(factory).bind(*(ast.literal_eval(a) for a in node.args),
                                    **{k.arg: ast.literal_eval(k.value) for k in node.keywords})


def as_parsed(words: tuple[str, ...]) -> list[str]:
    """A command with its placeholders filled for parsing: ``[--opt N]`` optional flags included, N a number, ``…``
    (a path the reader fills in) a file name."""
    text = re.sub(r"\[(--[^\]]*)\]", r"\1", " ".join(shlex.quote(w) for w in words)).replace("…", "x.ckpt")
    return ["17" if w == "N" else w for w in shlex.split(text)]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.words[0] not in NOT_PARSED],
                         ids=lambda c: f"{c.file}:{c.line}")
def test_every_documented_command_parses(command: Command, monkeypatch: pytest.MonkeyPatch) -> None:
    words = as_parsed(command.words)
    program, args = words[0], words[1:]
    if program == "python" and args[0] in ENTRY_POINTS:
        program, args = ENTRY_POINTS[args[0]], args[1:]
    if program == "python" and re.fullmatch(r"benchmarks/\w+\.py", args[0]):  # a benchmark's own parser
        _parse_with_the_tools_parser(args[0].removesuffix(".py").replace("/", "."), args[1:], monkeypatch)
    elif program == "carnet-train":
        _check_hydra("train", args)
    elif program == "carnet-predict":
        from carnet.inference.cli import quote_tta_option

        _check_hydra("predict", quote_tta_option(args))
    elif program == "carnet-pipeline":
        from carnet.training.pipeline import phase_order, plan_pipeline

        _parse_with_the_tools_parser(SCRIPTS[program], args, monkeypatch)
        phases = args[args.index("--phases") + 1].split(",") if "--phases" in args else None
        overrides = [a for a in args if "=" in a]
        _, commands = plan_pipeline(overrides, phases or phase_order(), folder="outputs/pipeline/x")
        for _, _, phase_command in commands:
            _check_hydra("train", [a for a in phase_command[3:] if "=" in a and not a.startswith("hydra.")])
    elif program in SCRIPTS:
        _parse_with_the_tools_parser(SCRIPTS[program], args, monkeypatch)
    elif program == "make":
        proc = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    elif program == "gunicorn":
        _check_gunicorn(args)
    else:
        pytest.fail(f"{command.file}:{command.line}: no parse check for {program!r}: add one, or add it to "
                    "NOT_PARSED")


# ----------------------------------------------------------------------------------------------- running

PHASE_CKPT = "outputs/phases/finetune_448.ckpt"  # the docs' own example checkpoint, made by the phase commands
# A training run in seconds (keys a command sets itself are left as it sets them).
TINY_TAIL = {"model": "test_efficientnet", "model.pretrained": "false", "trainer.accelerator": "cpu",
             "trainer.max_epochs": "1", "image_size": "64", "data.batch_size": "8", "data.num_workers": "0",
             "budget.min_steps": "0", "head_fit.views": "1", "head_fit.folds": "2"}


def _newest(pattern: str, sandbox: Path) -> str:
    found = sorted(sandbox.glob(pattern), key=lambda p: p.stat().st_mtime)
    assert found, f"nothing matches {pattern} yet: a command that makes it must come first"
    return str(found[-1].relative_to(sandbox))


def _fold_sweep(sandbox: Path) -> Path:
    """The 5-fold sweep that docs/prediction.md's ``split=oof`` line reads: the one docs/data.md documents, run here
    first when prediction.md's line comes before it."""
    def found() -> Path | None:
        return next((p.parent.parent for p in sorted((sandbox / "multirun").glob("*/*/4/summary.json"))
                     if '"fold": 4' in p.read_text()), None)

    if (sweep := found()) is None:
        argv = as_run(("python", "train.py", "-m", "data.fold=0,1,2,3,4"), sandbox, 0)
        env = {**child_env(), "PYTHONPATH": str(REPO)}
        proc = subprocess.run(argv, cwd=sandbox, env=env, capture_output=True, text=True, timeout=1800)
        sweep = found()
        assert proc.returncode == 0 and sweep is not None, f"the k-fold sweep: {proc.stderr[-3000:]}"
    return sweep


def as_run(words: tuple[str, ...], sandbox: Path, port: int) -> list[str]:
    """The command as the slow test runs it: placeholders replaced by what earlier commands made, the tiny model
    and image sizes, one epoch, a free port; optional ``[--flags]`` left out."""
    kept, optional = [], False
    for word in words:  # "[--opset N]": an optional flag and its value, shown for reference
        if word.startswith("[--") or optional:
            optional = not word.endswith("]")
            continue
        kept.append(word)
    words = [w for w in kept if w != "..."]  # "..." stands for the rest of the same command
    folds = None
    if any("f0/checkpoints/best.ckpt" in w for w in words):
        sweep = _fold_sweep(sandbox)
        folds = ",".join(str((sweep / str(k) / "checkpoints" / "best.ckpt").relative_to(sandbox)) for k in range(5))
    replace = [
        ("model=tf_efficientnet_lite0", "model=test_efficientnet"),  # no ImageNet weights offline: the tiny model
        ("image_size=224,300", "image_size=64,72"), ("image_size=300", "image_size=72"),
        ("hydra.sweeper.n_trials=30", "hydra.sweeper.n_trials=2"),
        ("pseudo_label.threshold=0.95", "pseudo_label.threshold=0.05"),  # the one-epoch model is never that sure
        ("/fast/disk/cache", "outputs/image_cache_fast"),
        ("ckpt=[a.ckpt,b.ckpt,c.ckpt]", "ckpt=[outputs/phases/head.ckpt,outputs/phases/unfreeze_half.ckpt,"
                                        "outputs/phases/unfreeze_3q.ckpt]"),
        ("ckpt=[a.ckpt,b.ckpt]", "ckpt=[outputs/phases/head.ckpt,outputs/phases/unfreeze_half.ckpt]"),
        ("ckpt=[f0/checkpoints/best.ckpt,f1/…]", f"ckpt=[{folds}]"),
        ("ckpt=…", f"ckpt={PHASE_CKPT}"),
        ('"best.ckpt"', f'"{PHASE_CKPT}"'),
        ("127.0.0.1:8000", f"127.0.0.1:{port}"),
    ]
    out = []
    for word in words:
        for old, new in replace:
            word = word.replace(old, new)
        if word == "best.ckpt":
            word = PHASE_CKPT
        if re.fullmatch(r"multirun/\d{4}-\d\d-\d\d/[\d.-]+", word):
            word = _newest("multirun/*/*", sandbox)
        if re.fullmatch(r"outputs/pipeline/\d{4}-\d\d-\d\d_[\d-]+", word):
            word = _newest("outputs/pipeline/*", sandbox)
        out.append(word)
    program = ENTRY_POINTS.get(out[1], out[0]) if out[0] == "python" else out[0]
    if program == "carnet-serve":
        out = [w for i, w in enumerate(out) if "--port" not in out[i - 1:i + 1]] + ["--port", str(port)]
    if out[0] == "python":
        out[0] = sys.executable
    elif program in SCRIPTS:
        out[:1] = [sys.executable, "-m", SCRIPTS[program]]
    elif program == "gunicorn":
        out[:1] = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}"]
    if program in ("carnet-train", "carnet-pipeline"):
        given = {w.split("=", 1)[0].split(":")[-1].lstrip("+~") for w in out if "=" in w}
        out += [f"{k}={v}" for k, v in TINY_TAIL.items() if k not in given]
        if "tune=lr_find" in out:
            out.append("tune.num_training=12")
    return out


def _sandbox(root: Path, env: dict[str, str]) -> Path:
    """A folder laid out like a checkout after `make demo`: the entry points, examples/, data/ (and demo_data/) = a
    tiny carnet-demo dataset (with the example extra source's photos in data/extra/my_photos/<label>/), the demo
    run in outputs/demo/ (make demo's train.py line, on the tiny settings), my_photos/ and car.jpg."""
    import shutil

    from carnet.tools.demo import make_dataset

    sandbox = root / "checkout"
    sandbox.mkdir()
    for name in ("train.py", "predict.py"):
        (sandbox / name).symlink_to(REPO / name)
    shutil.copytree(REPO / "examples", sandbox / "examples")
    make_dataset(sandbox / "data", per_class=5, test=6, seed=0)
    more = make_dataset(root / "more", per_class=2, test=4, seed=1)
    for label, k in (("priora", 0), ("focus", 1), ("2107", 4), ("niva", 5), ("blurry", 2), ("unlisted", 3)):
        (sandbox / "data" / "extra" / "my_photos" / label).mkdir(parents=True)
        for photo in (more / "train" / str(k)).iterdir():
            shutil.copy(photo, sandbox / "data" / "extra" / "my_photos" / label / photo.name)
    tests = sorted((more / "test_upload").iterdir())
    (sandbox / "my_photos" / "trip").mkdir(parents=True)
    shutil.copy(tests[0], sandbox / "my_photos" / "IMG_0042.jpg")
    shutil.copy(tests[1], sandbox / "my_photos" / "trip" / "a.jpg")
    shutil.copy(tests[2], sandbox / "car.jpg")
    (sandbox / "demo_data").symlink_to("data")
    demo = as_run(("python", "train.py", "experiment=demo", "data.root=demo_data", "hydra.run.dir=outputs/demo"),
                  sandbox, 0)
    proc = subprocess.run(demo, cwd=sandbox, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"the demo run: {shlex.join(demo)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return sandbox


@pytest.mark.slow
def test_documented_commands_run_on_the_demo_data(tmp_path: Path) -> None:
    """Every documented command not in NOT_RUN, in FILES order, as :func:`as_run` rewrites it; the first that
    fails fails the test with its output."""
    env = {**child_env(), "PYTHONPATH": str(REPO)}
    sandbox = _sandbox(tmp_path, env)
    server: subprocess.Popen | None = None
    port = free_port()
    try:
        for command in COMMANDS:
            if command.text in NOT_RUN:
                continue
            where = f"{command.file}:{command.line}: {command.text}"
            if command.words[0] != "curl" and server is not None:
                stop_server(server)
                server = None
            argv = as_run(command.words, sandbox, port)
            if command.words[0] in ("carnet-serve", "gunicorn"):
                server = subprocess.Popen(argv, cwd=sandbox, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
                wait_healthy(f"http://127.0.0.1:{port}", server, timeout=600)
                continue
            assert command.words[0] != "curl" or server is not None, f"{where}: no server is running"
            proc = subprocess.run(argv, cwd=sandbox, env=env, capture_output=True, text=True, timeout=1800)
            assert proc.returncode == 0, (f"{where}\nran: {shlex.join(argv)}\nexit {proc.returncode}\n--- stdout ---\n"
                                          f"{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}")
            if command.words[0] == "curl":
                assert '"class_name"' in proc.stdout, f"{where}: {proc.stdout}"
    finally:
        if server is not None:
            stop_server(server)


def test_the_readme_is_a_first_screen_not_the_manual() -> None:
    """The README says what carnet is, the two commands and the way through; the depth lives in docs/ (issue 19)."""
    readme = (REPO / "README.md").read_text()
    assert len(readme) <= 12_000, f"README.md is {len(readme):,} characters: move depth into docs/"
    first_screen = readme[:2_500]
    assert "make demo" in first_screen and "make test" in first_screen
