"""Pretrained weights from the hub: a check in a second, before a run waits a minute on an unreachable hub.

timm downloads pretrained weights on first use (the Hugging Face hub, or a GitHub release URL for older models)
and caches them. Offline, the download retries for about a minute and ends in a long traceback that never says
what to do; :func:`check_pretrained_available` says it in one line, at once.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from timm.models import get_pretrained_cfg

from carnet.errors import PretrainedUnavailable

HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for in a hub repository, in its order


def _hf_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in HF_FILES)


def _url_cached(url: str) -> bool:
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)).is_file()


def _unreachable(url: str, timeout: float = 3.0) -> str | None:
    """None when a TCP connection to ``url``'s host opens within ``timeout`` seconds, else why not."""
    parts = urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
        return None
    except OSError as err:
        return f"{type(err).__name__}: {err}"


def check_pretrained_available(name: str) -> None:
    """Raise :class:`PretrainedUnavailable` when ``name``'s pretrained weights are not in the local caches and their
    source cannot be reached; return quietly when they are cached, reachable, or unknown to timm."""
    cfg = get_pretrained_cfg(name)
    if cfg is None or cfg.file:
        return
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        if _hf_cached(cfg.hf_hub_id.split("@")[0]):
            return
        source = f"{constants.ENDPOINT}/{cfg.hf_hub_id}"
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _unreachable(constants.ENDPOINT)
    elif cfg.url:
        if _url_cached(cfg.url):
            return
        source, why = cfg.url, _unreachable(cfg.url)
    else:
        return
    if why is not None:
        raise PretrainedUnavailable(
            f"model {name} starts from pretrained ImageNet weights, which are not in the local cache and cannot be "
            f"downloaded from {source} ({why}): offline, pass model.weights=PATH (a local .safetensors or .pth "
            f"state dict in timm's key names) or model.pretrained=false (random weights, fit for smoke tests only)")
