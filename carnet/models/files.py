"""Reading the files a user hands us, checkpoints and weights: tensors and plain values only (nothing in them can run
code), and a one-line error naming the file when it is not what it should be.

Apart from checkpoint.py, which builds networks from what it reads, so that network.py can read a weights file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from carnet.errors import CarnetError, CheckpointError, WeightsError

STATE_DICT_WRAPPERS = ("state_dict", "model", "state_dict_ema")  # where training checkpoints keep the weights


def load_weights_only(path: Path, label: str, *, mmap: bool = False, kind: str = "checkpoint",
                      error: type[CarnetError] = CheckpointError) -> Any:
    """``torch.load`` with ``weights_only=True``, and a one-line ``error`` that starts with ``label`` (``checkpoint
    PATH``, ``resume=PATH``, ``model.weights=PATH``) when it fails: either the file holds pickled Python objects
    beyond tensors and plain values, which carnet refuses to unpickle because loading them could run code, or it is
    no ``kind`` of file at all (random bytes, a truncated or foreign file).

    torch raises ``UnpicklingError`` with six lines of advice in both cases; which one it is comes from
    ``torch.serialization.get_unsafe_globals_in_checkpoint``, which lists the objects a ``torch.save`` archive
    would import, without importing them.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError as err:
        raise error(f"{label} cannot be read ({err.strerror or err})") from None
    except Exception:  # whatever torch raises for a foreign file; which case it is comes from the archive itself
        unsafe = _unsafe_globals(path)
        if unsafe:
            shown = ", ".join(unsafe[:3]) + (", ..." if len(unsafe) > 3 else "")
            raise error(f"{label} holds Python objects beyond tensors and plain values ({shown}); carnet "
                        "refuses to unpickle them, since loading could run code") from None
        # torch's own text here is about weights_only or zip internals, not about this file: left out
        raise error(f"{label} is not a {kind} carnet can read: not a file written by torch.save, or a "
                    "truncated or damaged one") from None


def _unsafe_globals(path: Path) -> list[str]:
    """The Python objects (``module.name``) a ``torch.save`` archive would import; [] if it is no such archive."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a torch.save zip archive at all: the caller says so
        return []


def read_state_dict(path: Path, label: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of a state dict saved with ``torch.save`` (taken out of a training
    checkpoint's ``state_dict``, ``model`` or ``state_dict_ema``); a one-line :class:`WeightsError` starting with
    ``label`` when the file is neither."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"{label} is not a safetensors file carnet can read ({err})") from None
    state = load_weights_only(path, label, kind="weights file", error=WeightsError)
    for key in STATE_DICT_WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{label} holds a {type(state).__name__}, not a state dict: expected parameter names "
                           "mapped to tensors, in timm's key names")
    return state
