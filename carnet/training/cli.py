"""The ``carnet-train`` command (``python train.py``): Hydra's command line, then :func:`carnet.training.train.train`.

Apart from train.py so that the command line is read before the training stack is imported. Hydra composes the
config before it starts anything, so a mistyped option or key (``optimizer=adamx``, ``optimizer.lrr=1``) and
``--help`` answer in under a second, not after the 5-7 s that importing torch, Lightning, timm and albumentations
takes on a 2-core CPU. The run's own Hydra callbacks (conf/hydra) import Lightning before Hydra writes the run's
folder; the rest of the stack follows in the task, within a second (until then SIGTERM ends the process as it
would have before the run existed: no ``summary.json`` yet).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from carnet.config import config_dir, config_errors_in_one_line
from carnet.errors import exit_on_error


def command(*args: str) -> list[str]:
    """``carnet-train ARGS`` in a fresh interpreter, ``python -m carnet.training.cli ARGS``: how the pipeline states
    a phase's run (carnet.training.phase_process forks it from its own process where it can)."""
    return [sys.executable, "-m", __name__, *args]


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def _main(cfg: DictConfig) -> float | None:
    """Returns best val/acc, what Hydra sweepers maximise."""
    with exit_on_error("train"):
        from carnet.training.train import train  # the training stack, once the command line has been read

        return train(cfg).best_val_acc


def main() -> None:
    """``carnet-train [group=option ...] [key=value ...]`` (conf/train.yaml)."""
    with config_errors_in_one_line("train"):
        _main()


if __name__ == "__main__":
    main()
