"""Hydra composition of carnet's configs, as the entry points compose them."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tests.helpers.paths import CONF


def compose_cfg(overrides: list[str] | None = None, *, config_name: str = "train",
                return_hydra_config: bool = False) -> DictConfig:
    """Compose conf/<config_name>.yaml with overrides, as `python train.py ...` (or predict.py) would."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []),
                       return_hydra_config=return_hydra_config)
