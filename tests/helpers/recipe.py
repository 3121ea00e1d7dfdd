"""carnet's objects with conf/'s recipe, for tests that build them directly.

The constructors take no defaults (each value is stated once, in conf/), so a test builds the object train.py
would build and changes only the arguments it is about: ``classifier(image_size=72)``,
``data_module(root, names, num_workers=0)``.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import OmegaConf

from carnet.data.datamodule import CarDataModule
from carnet.runtime import resolve_runtime
from carnet.training.builders import build_module
from carnet.training.module import CarClassifier
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import TINY

# timm's data config of the model a datamodule feeds (build_datamodule takes it from the model): test_efficientnet's.
DATA_CONFIG = {"interpolation": "bicubic", "crop_pct": 0.95}


@functools.cache
def _module_recipe() -> dict[str, Any]:
    cfg = compose_cfg(TINY)
    # Every constructor argument, as built from conf/. The build draws random weights: on the RNG's own fork, so
    # the first classifier() after a test's seed gets the weights that seed gives, as every later one does.
    with torch.random.fork_rng():
        return dict(build_module(cfg, resolve_runtime(cfg)).hparams)


def classifier(**changes: Any) -> CarClassifier:
    """The CarClassifier train.py builds from conf/ with the TINY overrides (test_efficientnet at 64 px, random
    weights, the competition's 10 classes, AdamW, plateau schedule, label smoothing 0.1), with ``changes``."""
    return CarClassifier(**{**copy.deepcopy(_module_recipe()), **changes})


def data_module(root: str | os.PathLike, class_names: Sequence[str], **changes: Any) -> CarDataModule:
    """The CarDataModule train.py builds from conf/ (data=kaggle_cars, augment=light at ``image_size``, seed 42,
    its ``auto`` values resolved on this machine) over ``root``, with ``changes``."""
    size = changes.get("image_size")
    cfg = compose_cfg([f"data.root={root}", *([f"image_size={size}"] if size is not None else [])])
    runtime = resolve_runtime(cfg)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.pop("_target_")
    recipe = {**data, "class_names": list(class_names), "image_size": cfg.image_size, "seed": cfg.seed,
              "augment": OmegaConf.to_container(cfg.augment.train, resolve=True), "data_config": DATA_CONFIG,
              "num_workers": runtime.num_workers, "decode": runtime.decode, "pin_memory": runtime.pin_memory}
    return CarDataModule(**{**recipe, **changes})
