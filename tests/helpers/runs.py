"""Running carnet's entry points: a script in a fresh interpreter, or predict() in this process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers.config import compose_cfg
from tests.helpers.overrides import PREDICT
from tests.helpers.paths import REPO


def child_env() -> dict[str, str]:
    """The environment for a carnet subprocess: this one, no albumentations update check, unbuffered output."""
    return {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a top-level entry point (train.py, predict.py) in a fresh interpreter; fail with its output."""
    proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd or REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def run_predict(*overrides: str) -> dict[str, Any]:
    """predict() in this process on conf/predict.yaml with PREDICT plus overrides, as `python predict.py ...`
    composes it."""
    from carnet.inference.predict import predict

    return predict(compose_cfg([*PREDICT, *overrides], config_name="predict"))
