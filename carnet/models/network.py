"""The network: pixel normalisation, a timm backbone without its classifier and a replaceable head (:class:`CarNet`).

The network takes uint8 (or float 0..255) NCHW pixels and normalises them itself (:class:`Normalize`): loader
workers hand over 4x smaller uint8 batches, the normalisation runs on the model's device in its precision and memory
format, and training, predict, serving and the exported files share that one definition of the input.

No Lightning import here: a web-service worker saves ~300 MB and seconds of start-up.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from carnet.errors import CarnetError, WeightsError
from carnet.models.files import read_state_dict


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a local ``.safetensors`` / ``.pth`` state dict in timm's key names into a headless backbone.

    The original classifier's keys are ignored (carnet brings its own head); any other missing or unexpected
    key is an error that names them, because a silently half-loaded backbone trains like a random one.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"model.weights={path}: file not found (expected a .safetensors or .pth state dict)")
    state = read_state_dict(path, f"model.weights={path}")
    classifier = getattr(backbone, "pretrained_cfg", {}).get("classifier", "classifier")
    classifiers = [classifier] if isinstance(classifier, str) else list(classifier)
    state = {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in classifiers)}
    result = backbone.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"model.weights={path} does not fit {type(backbone).__name__}: missing keys "
            f"{result.missing_keys[:10]}{' ...' if len(result.missing_keys) > 10 else ''}, unexpected keys "
            f"{result.unexpected_keys[:10]}{' ...' if len(result.unexpected_keys) > 10 else ''}"
        )


def create_backbone(name: str, pretrained: bool = False, weights: str | None = None, **kwargs: Any) -> nn.Module:
    """A timm model without classifier (``num_classes=0``: it returns pooled features)."""
    backbone = timm.create_model(name, pretrained=pretrained and not weights, num_classes=0, **kwargs)
    if weights:
        load_backbone_weights(backbone, weights)
    return backbone


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in evaluation mode (BatchNorm's running statistics, no dropout) for a pass outside the Trainer's
    loops (the head fit's features, a phase's start score), then back in the mode it was in, also on an error."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class Normalize(nn.Module):
    """Pixels (uint8 or float in 0..255, NCHW) -> the backbone's normalised float input: ``(x - 255 mean) / 255 std``.

    mean and std are non-persistent buffers: they follow the module to its device and dtype but stay out of the
    state dict, so checkpoints keep their keys (older ones load) and the values come from the model's data config
    or the checkpoint's metadata. The output has the parameters' dtype, or autocast's (bf16/fp16), which the first
    convolution would cast to anyway; ``channels_last`` converts the uint8 input (cheapest) before the arithmetic,
    which keeps its memory format.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.register_buffer("offset", torch.tensor(self.mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("scale", 1 / (torch.tensor(self.std).view(1, -1, 1, 1) * 255), persistent=False)

    def forward(self, images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # A fresh copy (uint8 -> float) is normalised in place: no further batch-sized allocation, 2x faster on a
        # CPU. A tensor already in that dtype is the caller's: never written.
        x = images.to(self.scale.dtype)
        x = (x - self.offset) * self.scale if x is images else x.sub_(self.offset).mul_(self.scale)
        kind = x.device.type
        if torch.is_autocast_enabled(kind):
            x = x.to(torch.get_autocast_dtype(kind))
        return x

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


class CarNet(nn.Module):
    """Normalisation + backbone + head: the plain ``nn.Module`` that training, inference, serving and export use.

    Input: uint8 (or float 0..255) NCHW pixels, any size the backbone accepts. mean/std default to the
    backbone's timm data config (what its pretrained weights expect).

    ``scales`` (multiples of the input's size, each >= 1): in training the network looks at each batch at one of
    them, drawn at random; in evaluation at every scale, and its output is the log of the mean of their class
    probabilities (a mixture, so ``softmax`` of the output is that mean and cross-entropy its log-loss). A CNN that
    sees a car at several apparent sizes, with a head fitted on all of them (carnet.training.head_fit), is right on
    photos one scale misses; docs/fine-tuning.md has the measurement. ``(1.0,)``: the plain network.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, scales: Sequence[float] = (1.0,)) -> None:
        super().__init__()
        if mean is None or std is None:
            config = timm.data.resolve_model_data_config(backbone)
            mean = config["mean"] if mean is None else mean
            std = config["std"] if std is None else std
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.head = head
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or min(self.scales) < 1:  # upsampling only: antialiased downsampling exports to no ONNX
            raise ValueError(f"scales: expected one or more numbers >= 1, got {list(scales)}")

    def uses_channels_last(self) -> bool:
        """Whether the weights are in channels_last (``net.to(memory_format=torch.channels_last)``): the input is
        then converted too, so no caller has to remember it. Read from the first 4-D weight (the stem)."""
        for param in self.backbone.parameters():
            if param.dim() == 4:
                return param.is_contiguous(memory_format=torch.channels_last) and not param.is_contiguous()
        return False

    def features(self, images: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Pooled backbone features of pixel batches at ``scale`` x their size (what the head sees;
        carnet.training.head_fit fits on them)."""
        x = self.normalize(images, self.uses_channels_last())
        if scale != 1.0:  # after normalising: it is affine per channel, so resampling commutes with it
            x = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
        return self.backbone(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if len(self.scales) == 1:
            return self.head(self.features(images, self.scales[0]))
        if self.training:  # one scale a batch, drawn from torch's seeded generator: the head learns every scale
            return self.head(self.features(images, self.scales[int(torch.randint(len(self.scales), ()))]))
        probs = torch.stack([self.head(self.features(images, s)).float().softmax(1) for s in self.scales]).mean(0)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()

    def extra_repr(self) -> str:
        return "" if self.scales == (1.0,) else f"scales={self.scales}"


# --------------------------------------------------------------------------------------------------------------
# torch.compile: whole network or per block, and where its caches live

# Containers of a backbone's stages or blocks, in timm's names (EfficientNet/MobileNet/ViT `blocks`, ConvNeXt/
# NFNet `stages`, Swin `layers`); ResNet-likes name their stages layer1..layer4, RegNet s1..s4.
_STAGE_CONTAINERS = ("blocks", "stages", "layers")
_STAGE_NAMES = re.compile(r"(layer|s|stage)\d+")


def compile_regions(backbone: nn.Module) -> list[nn.Module]:
    """The modules regional compilation compiles, input side first: each block of each stage where the stages are
    plain containers (EfficientNet's ``blocks.S.R``, ResNet's ``layerN.K``, ViT's ``blocks.K``), else each stage
    (ConvNeXt's, RegNet's), else the whole backbone. Stem and head conv stay eager (one call each per step).
    """
    stages: list[nn.Module] = []
    for name in _STAGE_CONTAINERS:
        container = getattr(backbone, name, None)
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container):
            stages = list(container)
            break
    else:
        stages = [m for n, m in backbone.named_children() if _STAGE_NAMES.fullmatch(n)]
    regions: list[nn.Module] = []
    for stage in stages:
        if isinstance(stage, (nn.Sequential, nn.ModuleList)):
            regions.extend(stage.children())
        else:
            regions.append(stage)
    return regions or [backbone]


def use_compile_cache(path: str | os.PathLike | None = None) -> Path:
    """Point inductor's on-disk caches (FX graphs, AOTAutograd, Triton kernels: TORCHINDUCTOR_CACHE_DIR) at a folder
    that outlives the machine's /tmp, so that a second run finds its compiled code; return the folder.

    ``path`` (``model.compile_cache``) names it outright; else a TORCHINDUCTOR_CACHE_DIR the user set is kept; else
    ``$XDG_CACHE_HOME/carnet/inductor`` (``~/.cache/carnet/inductor``). Set before the first compilation.
    """
    if path is None:
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
            return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "carnet" / "inductor"
    path = Path(path).expanduser()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def _raise_recompile_limit(entries: int) -> None:
    """Regional compilation shares one code object (the block class's forward) between blocks of different shapes
    and modes (train/eval, frozen/not), each a cache entry: dynamo's default limit of 8 would send the rest of
    the blocks back to eager, silently but for a warning."""
    import torch._dynamo  # here, not at the top: 1.3 s of import a serving worker never needs

    config = torch._dynamo.config
    for name, value in (("recompile_limit", entries), ("cache_size_limit", entries),
                        ("accumulated_recompile_limit", 2 * entries),
                        ("accumulated_cache_size_limit", 2 * entries)):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), value))


def compile_network(net: CarNet, mode: bool | str, backend: Any = "inductor") -> list[nn.Module]:
    """Compile ``net`` in place (``nn.Module.compile``: state-dict keys, checkpoints and load_checkpoint unchanged);
    return the compiled modules. ``mode``: ``True``/``"full"``, the whole network, one graph (fastest steps, the
    longest warm-up); ``"regional"``, each backbone block (:func:`compile_regions`) with static shapes: the blocks
    that repeat share compiled code, so the warm-up is a fraction of the whole network's.
    """
    import torch._dynamo

    if isinstance(backend, str) and backend not in (names := torch._dynamo.list_backends(exclude_tags=())):
        raise CarnetError(f"model.compile_backend={backend!r}: expected one of {', '.join(names)}")
    use_compile_cache()
    if mode is True or mode == "full":
        net.compile(backend=backend)
        return [net]
    if mode != "regional":
        raise CarnetError(f"model.compile={mode!r}: expected true, false or regional")
    regions = compile_regions(net.backbone)
    _raise_recompile_limit(16 * len(regions))
    for module in regions:
        module.compile(backend=backend, dynamic=False)
    return regions


def compile_status(net: nn.Module) -> str | None:
    """``"full"`` if ``net`` itself is compiled, ``"regional"`` if only modules inside it are, else None."""
    if getattr(net, "_compiled_call_impl", None) is not None:
        return "full"
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in net.modules()):
        return "regional"
    return None
