"""The ``carnet-predict`` command (``python predict.py``): Hydra's command line, then
:func:`carnet.inference.predict.predict`.

Apart from predict.py so that the command line is read before torch, timm and albumentations are imported (4-6 s
on a 2-core CPU): a mistyped option or key (``tta=tru``) and ``--help`` answer in under a second.
"""

from __future__ import annotations

import re
import sys

import hydra
from omegaconf import DictConfig

from carnet.config import config_dir, config_errors_in_one_line
from carnet.errors import exit_on_error


def quote_tta_option(argv: list[str]) -> list[str]:
    """``tta=true`` / ``tta=false`` as the names of the tta group's options (conf/tta/true.yaml, false.yaml).

    Hydra's override grammar reads a bare true/false as a boolean and refuses it for a config group, so the
    value is quoted before Hydra parses the command line.
    """
    return [f"tta='{m[1].lower()}'" if (m := re.fullmatch(r"tta=(true|false)", a, re.IGNORECASE)) else a
            for a in argv]


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="predict")
def _main(cfg: DictConfig) -> float | None:
    """Returns the validation (split=val) or out-of-fold (split=oof) accuracy: what a TTA sweep would maximise."""
    with exit_on_error("predict"):
        from carnet.inference.predict import predict  # torch and the rest, once the command line has been read

        result = predict(cfg)
    for report in ("oof", "val"):
        if report in result:
            return result[report]["accuracy"]
    return None


def main() -> None:
    """``carnet-predict ckpt=PATH [tta=true] [split=val|oof]`` (conf/predict.yaml)."""
    sys.argv = quote_tta_option(sys.argv)
    with config_errors_in_one_line("predict"):
        _main()


if __name__ == "__main__":
    main()
