"""OmegaConf resolvers used by conf/ (registered when ``carnet`` is imported, before Hydra composes a config).

``${carnet.phases_dir:BASE}``: where phase runs hand their best checkpoint to the next phase. A single run uses
``BASE/phases`` (shared by the separate runs of a phase chain); a job of a multirun sweep uses
``<its own job dir>/phases`` so that the jobs of one sweep never overwrite each other's hand-off files.
"""

from __future__ import annotations

from omegaconf import OmegaConf


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
