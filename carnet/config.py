"""Where carnet's Hydra configs live, the OmegaConf resolvers they use, and what a run asks of Hydra and OmegaConf.

``conf/`` sits at the top of a source checkout and is installed inside the package (``carnet/conf``, package
data), so a plain ``pip install`` trains, predicts and runs the pipeline with the same configs.

Resolvers are registered when ``carnet`` is imported, before Hydra composes a config.

``${carnet.phases_dir:BASE}``: where phase runs hand their best checkpoint to the next phase. A single run uses
``BASE/phases`` (shared by the separate runs of a phase chain); a job of a multirun sweep uses
``<its own job dir>/phases`` so that the jobs of one sweep never overwrite each other's hand-off files.
``carnet-pipeline`` bypasses it: it gives each phase ``paths.phases=<its own folder>/phases``
(carnet/training/pipeline.py), for the same reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from carnet.errors import CarnetError

PACKAGE = Path(__file__).resolve().parent


def config_dir() -> Path:
    """``conf/``: the installed copy inside the package, else the source checkout's top-level folder."""
    for candidate in (PACKAGE / "conf", PACKAGE.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"carnet's configs are neither in {PACKAGE / 'conf'} nor in {PACKAGE.parent / 'conf'}: "
                            "reinstall carnet (`pip install .`)")


def phases_dir(base: str) -> str:
    """``BASE/phases``, or the sweep job's own ``phases`` folder in multirun mode."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN and hydra_cfg.runtime.output_dir:
            return f"{hydra_cfg.runtime.output_dir}/phases"
    return f"{base}/phases"


def plain(value: Any) -> Any:
    """OmegaConf containers as plain dicts and lists (resolved), anything else as it is: what checkpoints, hparams
    and comparisons keep, so that they stay simple to read and compare."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def run_dir_of(cfg: DictConfig) -> Path:
    """The Hydra run (or sweep job) directory; ``cfg.run_dir`` when called outside ``@hydra.main``."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise CarnetError("no run directory: call train() from @hydra.main or set run_dir=PATH in the config")


def overrides_of(cfg: DictConfig) -> list[str]:
    """The command-line overrides of this run (for reports that compare runs)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def register() -> None:
    """Register carnet's resolvers once (idempotent: safe on re-import)."""
    if not OmegaConf.has_resolver("carnet.phases_dir"):
        OmegaConf.register_new_resolver("carnet.phases_dir", phases_dir)
