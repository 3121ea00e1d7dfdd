"""Every ``auto`` of a config, resolved once, from the device the run uses, into one object.

A training config says ``auto`` (or ``null``) where the right value depends on the machine: ``trainer.precision``,
``trainer.benchmark``, ``optimizer.fused``, ``model.channels_last``, ``model.compile``, ``checkpoint.async_save``,
``data.decode``, ``data.num_workers``, and the loaders' ``pin_memory``. :func:`resolve_runtime` decides all of them
from one fact, the device the Trainer trains on (:func:`run_device`), and returns a :class:`Runtime`: ``train()``
passes it to every builder and writes it to ``summary.json`` as ``resolved``, so a run says what it ran with. predict's
``device``, ``amp`` and ``data.num_workers`` resolve here too (:func:`inference_device`, :func:`inference_amp`,
:func:`resolve_workers`). docs/architecture.md has the table of every ``auto``.

Values other than ``auto`` pass through as typed: carnet.config_check has already checked them.

Beside the config, not in ``carnet.training``: predict resolves its own here, and inference does not import
training. No Lightning import, so predict's path stays without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from carnet.data.dataset import default_num_workers
from carnet.errors import ConfigError

log = logging.getLogger(__name__)

# data.decode as a user types it (conf/data); the datamodule takes what it resolves to: cpu, gpu or device.
DECODE_MODES = ("cpu", "gpu", "auto", "device")


def _auto(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == "auto"


def resolve_workers(num_workers: int | str) -> int:
    """``data.num_workers`` (train and predict): ``auto`` is :func:`default_num_workers`, a number stays."""
    return default_num_workers() if _auto(num_workers) else int(num_workers)


def run_device(accelerator: str) -> str:
    """The device type a Trainer with ``trainer.accelerator`` trains on, picked as Lightning picks it for ``auto``
    and ``gpu`` (CUDA, else Apple's MPS); every other ``auto`` follows from it."""
    accelerator = str(accelerator).lower()
    if accelerator not in ("auto", "gpu"):
        return accelerator  # cpu, cuda, mps, ...: check_device refuses one this machine does not have
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if _mps_available() else "cpu"


def _mps_available() -> bool:
    """Apple's GPU (MPS), where this torch has the backend."""
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def _precision(precision: Any, cuda: bool) -> str:
    """``auto``: bf16-mixed on CUDA GPUs that support it, 16-mixed on older ones, 32-true elsewhere (Lightning's
    names, as the Trainer reports them)."""
    if not _auto(precision):
        return str(precision)
    if not cuda:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def _decode(data: DictConfig, augment: list[Any], image_size: int, cuda: bool) -> str:
    """``data.decode`` -> where photos are decoded and augmented: ``cpu`` (loader workers), ``gpu`` (the run's CUDA
    device, from file bytes) or ``device`` (the byte path on whatever device the run uses: tests).

    ``auto`` is ``gpu`` for a CUDA run whose augment and cache the device pipeline can take, else ``cpu`` (saying
    why); ``gpu`` without CUDA says once that the CPU pipeline runs; ``gpu`` or ``device`` with an augment the
    device cannot do is an error.
    """
    from carnet.data.device_pipeline import why_not_on_device  # torchvision, albumentations: only when asked
    from carnet.data.layout import DataError
    from carnet.data.transforms import build_train_transform

    mode = str(data.decode)
    if mode == "cpu":
        return "cpu"
    if mode in ("gpu", "auto") and not cuda:
        if mode == "gpu":
            log.warning("data.decode=gpu: this run has no CUDA device; photos are decoded and augmented in the "
                        "loader workers on the CPU (data.decode=cpu)")
        return "cpu"
    # Whether the device can draw the views depends on the transforms' kinds and order, not on the model's
    # interpolation or crop: the training view is built with the defaults of build_train_transform.
    why = why_not_on_device([build_train_transform(augment, image_size)], str(data.cache))
    if why is None:
        log.info("data.decode=%s: loader workers read file bytes; photos are decoded and augmented on the run's "
                 "device", mode)
        return "device" if mode == "device" else "gpu"
    if mode == "auto":
        log.info("data.decode=auto: decoding and augmenting on the CPU: %s", why)
        return "cpu"
    raise DataError(f"data.decode={mode}: {why}; use data.decode=cpu")


def _key(name: str) -> Any:
    return field(metadata={"key": name})


@dataclass(frozen=True)
class Runtime:
    """What a training run runs with where its config says ``auto`` (or ``null``): resolved once, on the device
    the run trains on, by :func:`resolve_runtime`. Each field's ``key`` is its name in ``summary.json``'s
    ``resolved``: the config key it resolves, or a plain name where the user types none."""

    device: str = _key("device")  # cuda, cpu or mps: where the Trainer trains
    precision: str = _key("trainer.precision")
    benchmark: bool = _key("trainer.benchmark")  # cudnn.benchmark
    channels_last: bool = _key("model.channels_last")  # NHWC weights and activations
    compile: bool | str = _key("model.compile")  # False, True or "regional"
    fused: bool | None = _key("optimizer.fused")  # None: the optimizer has no fused kernel (sgd)
    async_save: bool = _key("checkpoint.async_save")
    decode: str = _key("data.decode")  # cpu, gpu or device
    num_workers: int = _key("data.num_workers")
    pin_memory: bool = _key("pin_memory")  # the loaders': page-locked batches copy faster to a GPU
    world_size: int = _key("world_size")  # processes that train (DDP), each on its share of the training photos

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def summary(self) -> dict[str, Any]:
        """``summary.json``'s ``resolved``: ``{key: value}`` in field order."""
        return {f.metadata["key"]: getattr(self, f.name) for f in fields(self)}


def resolve_runtime(cfg: DictConfig) -> Runtime:
    """The :class:`Runtime` of a training config on this machine. ``auto`` (``null`` for ``trainer.benchmark``)
    means, on a CUDA run: bf16 (16-mixed without bf16), cudnn.benchmark, the fused AdamW/Adam kernel, regional
    compilation, checkpoints written in the background, decoding on the GPU where the augment allows, and pinned
    loader memory; elsewhere all of them off and fp32. ``model.channels_last=auto`` is on for CPU and CUDA runs, where
    NHWC convolutions measured faster (docs/performance.md, "Measured where"), off elsewhere (mps).
    ``data.num_workers=auto`` is :func:`default_num_workers`."""
    device = run_device(cfg.trainer.accelerator)
    gpu_wanted = str(cfg.trainer.accelerator).lower() == "gpu" and device == "cpu"  # gpu: CUDA or MPS, else none
    check_device("cuda" if gpu_wanted else device, f"trainer.accelerator={cfg.trainer.accelerator}", "trainer=cpu")
    cuda = device == "cuda"
    fused = cfg.optimizer.get("fused")  # absent (sgd): no such option
    channels_last, compile_, async_save = cfg.model.channels_last, cfg.model.compile, cfg.checkpoint.async_save
    augment = OmegaConf.to_container(cfg.augment.train, resolve=True)
    return Runtime(
        device=device,
        precision=_precision(cfg.trainer.precision, cuda),
        benchmark=cuda if cfg.trainer.benchmark is None else bool(cfg.trainer.benchmark),
        channels_last=device in ("cpu", "cuda") if _auto(channels_last) else bool(channels_last),
        compile=("regional" if cuda else False) if _auto(compile_) else compile_,
        fused=cuda if _auto(fused) else fused,
        async_save=cuda if _auto(async_save) else bool(async_save),
        decode=_decode(cfg.data, augment, int(cfg.image_size), cuda),
        num_workers=resolve_workers(cfg.data.num_workers),
        pin_memory=cuda,
        world_size=world_size(cfg.trainer, device),
    )


def check_device(device: str, typed: str, instead: str) -> None:
    """Refuse, in one line naming what was typed, a device type this machine lacks (Lightning's and torch's own
    errors are 60-70 lines of traceback)."""
    try:
        kind = torch.device(device).type
    except RuntimeError:  # an accelerator torch has no device type for: Lightning's to judge
        return
    if (kind == "cuda" and not torch.cuda.is_available()) or (kind == "mps" and not _mps_available()):
        raise ConfigError(f"{typed}: this machine has no {kind.upper()} device (torch sees none); use {instead}")


def world_size(trainer: DictConfig, device: str) -> int:
    """The processes a Trainer of ``trainer`` trains in, as Lightning counts them (``trainer.world_size``, checked
    against this when the Trainer is built): its devices times its nodes. Each takes its share of an epoch's
    photos (DDP's DistributedSampler), which the step budget and the loader's batch rule must count with.
    Devices: a number, a list or a comma-separated string of indices; ``auto`` is every CUDA device on a CUDA run
    and one elsewhere, as is -1."""
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str) and devices.strip() not in ("auto", "-1"):
        devices = [d for d in devices.split(",") if d.strip()] if "," in devices else int(devices)
    if not isinstance(devices, int | str):
        count = len(devices)
    elif devices in ("auto", "-1", -1):  # -1 on a CPU: Lightning refuses it when it builds the Trainer
        count = torch.cuda.device_count() if device == "cuda" else 1
    else:
        count = int(devices)
    return max(1, count) * int(trainer.get("num_nodes") or 1)


def inference_device(device: str) -> str:
    """predict's ``device``: ``auto`` is ``cuda`` where CUDA is available, else ``cpu``; a named device stays, if
    this machine has its kind."""
    if _auto(device):
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(str(device), f"device={device}", "device=auto or device=cpu")
    return str(device)


def inference_amp(amp: bool | str, device: str) -> bool:
    """predict's ``amp``: ``auto`` is on for a CUDA device (bf16, else fp16), off elsewhere."""
    return torch.device(device).type == "cuda" if _auto(amp) else bool(amp)
