"""Train a car classifier: `python train.py [group=option ...] [key=value ...]` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from carnet.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns best val/acc, the value Hydra sweepers (Optuna) maximise."""
    return train(cfg).get("best_val_acc")


if __name__ == "__main__":
    main()
