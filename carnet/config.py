"""Where carnet's Hydra configs live, and the OmegaConf resolvers they use.

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

from omegaconf import OmegaConf

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


def register() -> None:
    """Register carnet's resolvers once (idempotent: safe on re-import)."""
    if not OmegaConf.has_resolver("carnet.phases_dir"):
        OmegaConf.register_new_resolver("carnet.phases_dir", phases_dir)
