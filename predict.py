"""Predict with checkpoints: `python predict.py ckpt=PATH [tta=true] [split=val|oof]` (conf/predict.yaml)."""

import re
import sys

import hydra
from omegaconf import DictConfig

from carnet.data import DataError
from carnet.net import CheckpointError
from carnet.predict import PredictError, predict
from carnet.tta import TTAError


def quote_tta_option(argv: list[str]) -> list[str]:
    """``tta=true`` / ``tta=false`` as the names of the tta group's options (conf/tta/true.yaml, false.yaml).

    Hydra's override grammar reads a bare true/false as a boolean and refuses it for a config group, so the
    value is quoted before Hydra parses the command line.
    """
    return [f"tta='{m[1].lower()}'" if (m := re.fullmatch(r"tta=(true|false)", a, re.IGNORECASE)) else a
            for a in argv]


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> float | None:
    """Returns the validation (split=val) or out-of-fold (split=oof) accuracy: what a TTA sweep would maximise."""
    try:
        result = predict(cfg)
    except (DataError, CheckpointError, PredictError, TTAError) as err:  # bad input: the message says it all
        print(f"predict.py: error: {err}", file=sys.stderr)
        sys.exit(1)
    for report in ("oof", "val"):
        if report in result:
            return result[report]["accuracy"]
    return None


if __name__ == "__main__":
    sys.argv = quote_tta_option(sys.argv)
    main()
