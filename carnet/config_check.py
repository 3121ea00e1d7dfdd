"""The values a user types, checked before anything is built: one table of (key, rule, what the value is).

A wrong value used to surface wherever it was first used: ``data.batch_size=0`` as a ZeroDivisionError while the
epochs were planned, ``optimizer.lr=abc`` as a TypeError once training had started, ``image_size=0`` as an
albumentations error about ``data.augment0``. :func:`check_train_config` (first thing in ``train()``) and
:func:`check_predict_config` (first thing in ``predict()``) check every value of :data:`TRAIN` and :data:`PREDICT`
and name each bad one in a single line: ``optimizer.lr='abc': expected a number >= 0 (the head's learning rate)``.

Why our own table and not OmegaConf structured configs: the defaults live in YAML groups whose options have different
keys (``scheduler=cosine`` has ``warmup_fraction``, ``plateau`` has ``patience``), typed configs check types but not
ranges, and the message must say what to type. The rules are data (:class:`Number`, :class:`OneOf`, ...), so moving
them next to typed defaults later moves rows, not logic. A key a config does not have is skipped (an option of
another group); Hydra has already refused keys that do not exist.

Lightning's own Trainer arguments (``accelerator``, ``devices``, ``precision``) are not here: Lightning checks them.
``trainer.max_epochs`` is, because Lightning accepts 0 and -1 (endless), with which a run would end at once as
``completed`` without a checkpoint, or never.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import timm
import torch
from omegaconf import DictConfig, OmegaConf

from carnet.config import plain
from carnet.data.cache import CACHE_MODES
from carnet.errors import ConfigError
from carnet.runtime import DECODE_MODES


class Rule(Protocol):
    def accepts(self, value: Any) -> bool: ...

    def expected(self, value: Any) -> str:
        """What the key expects, e.g. ``a whole number >= 1``; may use the bad value (close matches)."""
        ...


def _number_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def shown(value: Any) -> str:
    """A value as the user would type it back: strings quoted, true/false/null in YAML's words."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class Number:
    """A finite int or float (never a bool or a numeric string) within bounds; ``whole``: an int."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    whole: bool = False

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.whole else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def expected(self, value: Any = None) -> str:
        kind = "a whole number" if self.whole else "a number"
        if self.lo is not None and self.hi is not None:
            return (f"{kind} in {'(' if self.lo_open else '['}{_number_text(self.lo)}, "
                    f"{_number_text(self.hi)}{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {_number_text(self.lo)}"
        if self.hi is not None:
            return f"{kind} {'<' if self.hi_open else '<='} {_number_text(self.hi)}"
        return kind


@dataclass(frozen=True)
class OneOf:
    """One of ``values``, of the same type (``1`` is not ``true``)."""

    values: tuple[Any, ...]

    def accepts(self, value: Any) -> bool:
        return any(value == v and type(value) is type(v) for v in self.values)

    def expected(self, value: Any = None) -> str:
        words = [shown(v) if not isinstance(v, str) else v for v in self.values]
        return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


@dataclass(frozen=True)
class Either:
    """Any of several rules (``auto`` or a whole number, null or a fraction)."""

    rules: tuple[Rule, ...]

    def accepts(self, value: Any) -> bool:
        return any(rule.accepts(value) for rule in self.rules)

    def expected(self, value: Any = None) -> str:
        return " or ".join(rule.expected(value) for rule in self.rules)


@dataclass(frozen=True)
class ListOf:
    """A non-empty list whose every item ``rule`` accepts."""

    rule: Rule

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (list, tuple)) and len(value) > 0 and all(self.rule.accepts(v) for v in value)

    def expected(self, value: Any = None) -> str:
        return f"a list of one or more of: {self.rule.expected()}"


FLAG = OneOf((True, False))
NULL = OneOf((None,))
AUTO = OneOf(("auto",))
FRACTION = Number(0, 1, hi_open=True)  # dropout, smoothing: 1 would leave nothing
POSITIVE = Number(0, lo_open=True)
NON_NEGATIVE = Number(0)
COUNT = Number(1, whole=True)


def optional(rule: Rule) -> Either:
    return Either((NULL, rule))


class TimmModel:
    """A model name timm knows (``timm.is_model``), and a pretrained tag after the dot that timm lists."""

    def accepts(self, value: Any) -> bool:
        if not isinstance(value, str) or not timm.is_model(value):
            return False
        return "." not in value or value in timm.list_pretrained(value)

    def expected(self, value: Any = None) -> str:
        name = str(value)
        architecture = name.split(".", 1)[0]
        if "." in name and timm.is_model(architecture):
            return f"one of timm's pretrained tags of {architecture}: {', '.join(timm.list_pretrained(architecture))}"
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        return (f"a model name timm {timm.__version__} knows (timm.list_models())"
                + (f"; close: {', '.join(close)}" if close else ""))


class ClassNames:
    """At least two distinct class names (a one-class classifier has nothing to tell apart)."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, list) and len(value) >= 2 and len(set(map(str, value))) == len(value)

    def expected(self, value: Any = None) -> str:
        return "a list of at least 2 distinct class names"


class TorchDevice:
    """``auto`` or a device torch can name (``cpu``, ``cuda``, ``cuda:1``)."""

    def accepts(self, value: Any) -> bool:
        if value == "auto":
            return True
        try:
            torch.device(value)
        except (RuntimeError, TypeError):
            return False
        return isinstance(value, str)

    def expected(self, value: Any = None) -> str:
        return "auto or a torch device (cpu, cuda, cuda:1)"


# Choice lists of training keys, here rather than beside their code so that predict, which checks its values here
# too, imports no training (docs/architecture.md, "Layers").
# What BatchNorm layers do while the backbone is (partly) frozen (carnet.training.finetune.ProgressiveUnfreezing):
#   frozen:    every backbone BatchNorm keeps its running statistics; unfrozen blocks' scale and shift still train
#   per_block: BatchNorm of unfrozen blocks re-estimate their statistics, frozen blocks keep theirs
#   train:     every BatchNorm re-estimates its statistics and trains, frozen blocks too (fastai's train_bn)
BN_POLICIES = ("frozen", "per_block", "train")
TUNE_MODES = ("lr_find",)  # tune.mode (carnet.training.tune)
SEARCH_MODES = ("exponential", "linear")  # tune.search: how the range test raises the rate
# What CarClassifier logs once per validation epoch: what checkpoints and ReduceLROnPlateau can follow.
MONITORED = ("val/loss", "val/acc")
# torch.optim.lr_scheduler.CyclicLR's modes (torch keeps no public list of them).
CYCLIC_MODES = ("triangular", "triangular2", "exp_range")

Check = tuple[str, Rule, str]  # key, rule, what the value is (said after what is expected; "" for nothing)

# conf/train.yaml and its groups: the keys README "Configuration" lists, and the numbers inside the groups.
TRAIN: tuple[Check, ...] = (
    ("seed", Number(0, 2**32 - 1, whole=True), "NumPy and torch take 32-bit seeds"),
    ("image_size", Number(32, whole=True), "pixels; the backbones downsample by 32"),
    ("label_smoothing", FRACTION, ""),
    ("mixup.mixup_alpha", NON_NEGATIVE, "the Beta distribution's alpha; 0: no mixup"),
    ("mixup.cutmix_alpha", NON_NEGATIVE, "the Beta distribution's alpha; 0: no CutMix"),
    ("mixup.prob", Number(0, 1), "the share of batches mixed"),
    ("mixup.switch_prob", Number(0, 1), "the share of mixed batches that use CutMix"),
    ("backbone_lr_mult", NON_NEGATIVE, "the backbone's learning rate over the head's"),
    ("layer_decay", optional(Number(0, 1, lo_open=True)), "each backbone layer's rate over the layer above it's"),
    ("bn", OneOf(BN_POLICIES), ""),
    ("model.name", TimmModel(), ""),
    ("model.pretrained", FLAG, ""),
    ("model.drop_rate", FRACTION, ""),
    ("model.drop_path_rate", FRACTION, ""),
    ("model.channels_last", OneOf((True, False, "auto")), ""),
    ("model.compile", OneOf((True, False, "regional", "auto")), ""),
    ("model.scales", ListOf(Number(1, 4)), "multiples of image_size the network predicts at"),
    ("head.dropout", FRACTION, ""),
    ("head.hidden_dim", COUNT, ""),
    ("optimizer.lr", NON_NEGATIVE, "the head's learning rate"),
    ("optimizer.weight_decay", NON_NEGATIVE, ""),
    ("optimizer.momentum", FRACTION, ""),
    ("optimizer.fused", OneOf((True, False, "auto")), ""),
    ("scheduler.monitor", OneOf(MONITORED), ""),
    ("scheduler.factor", Number(0, 1, lo_open=True, hi_open=True), "the cut of the learning rate"),
    ("scheduler.patience", Number(0, whole=True), "epochs"),
    ("scheduler.min_lr", NON_NEGATIVE, ""),
    ("scheduler.warmup_fraction", FRACTION, "of the run's steps"),
    ("scheduler.min_lr_ratio", Number(0, 1), ""),
    ("scheduler.mode", OneOf(CYCLIC_MODES), ""),
    ("scheduler.base_lr_ratio", Number(0, 1, lo_open=True), ""),
    ("scheduler.epochs_per_half_cycle", POSITIVE, ""),
    ("scheduler.gamma", Number(0, 1, lo_open=True), ""),
    ("scheduler.pct_start", Number(0, 1, lo_open=True, hi_open=True), "of the run's steps"),
    ("scheduler.div_factor", POSITIVE, ""),
    ("scheduler.final_div_factor", POSITIVE, ""),
    ("data.class_names", ClassNames(), ""),
    ("data.val_fraction", Number(0, 1, lo_open=True, hi_open=True), "of the photos that validate"),
    ("data.batch_size", COUNT, "images per step"),
    ("data.num_workers", Either((AUTO, Number(0, whole=True))), "loader processes"),
    ("data.strict", FLAG, ""),
    ("data.verify", FLAG, ""),
    ("data.num_folds", Number(2, whole=True), ""),
    ("data.fold", optional(Number(0, whole=True)), ""),
    ("data.dedup", FLAG, ""),
    ("data.dedup_threshold", Number(0, 64, whole=True), "bits of a 64-bit hash"),
    ("data.cache", OneOf(CACHE_MODES), ""),
    ("data.decode", OneOf(DECODE_MODES), ""),
    ("trainer.max_epochs", COUNT, "epochs; budget.min_steps may add more"),
    ("trainer.accumulate_grad_batches", COUNT, ""),
    ("trainer.gradient_clip_val", optional(NON_NEGATIVE), ""),
    ("trainer.log_every_n_steps", COUNT, ""),
    ("trainer.num_sanity_val_steps", Number(-1, whole=True), "-1: all of validation"),
    ("budget.min_steps", Number(0, whole=True), "optimizer steps"),
    ("early_stop.patience_steps", optional(COUNT), "optimizer steps without improvement before a run stops"),
    ("early_stop.min_delta", NON_NEGATIVE, "the least change of checkpoint.monitor that counts as improving"),
    ("refit", OneOf((True, False, "auto")), "train again on every photo once validation has chosen"),
    ("pipeline.skip_after_kept_start", FLAG, ""),
    ("pipeline.fork_phases", FLAG, ""),
    ("pipeline.soup", FLAG, ""),
    ("checkpoint.monitor", OneOf(MONITORED), ""),
    ("checkpoint.mode", OneOf(("min", "max")), ""),
    ("checkpoint.async_save", OneOf((True, False, "auto")), ""),
    ("head_fit.enabled", FLAG, ""),
    ("head_fit.views", Number(0, whole=True), "augmented views per photo"),
    ("head_fit.folds", Number(2, whole=True), "cross-validation folds"),
    ("head_fit.max_images", optional(COUNT), "images whose features the head is fitted on"),
    ("head_fit.pad_batches", FLAG, ""),
    ("head_fit.pseudo_label", optional(Number(0, 1, hi_open=True)), "the probability above which the head learns "
     "from an unlabelled photo"),
    ("ema.decay", optional(Number(0, 1, lo_open=True, hi_open=True)), ""),
    ("tune.mode", OneOf(TUNE_MODES), ""),
    ("tune.min_lr", POSITIVE, ""),
    ("tune.max_lr", POSITIVE, ""),
    ("tune.num_training", COUNT, "batches"),
    ("tune.search", OneOf(SEARCH_MODES), ""),
    ("tune.early_stop_threshold", optional(POSITIVE), ""),
)

# conf/predict.yaml (split, out, report_dir and pseudo_label are checked with the outputs, also before loading).
PREDICT: tuple[Check, ...] = (
    ("top_k", COUNT, "classes listed per photo"),
    ("data.batch_size", COUNT, "images per step"),
    ("data.num_workers", Either((AUTO, Number(0, whole=True))), "loader processes"),
    ("data.draft", FLAG, ""),
    ("device", TorchDevice(), ""),
    ("channels_last", FLAG, ""),
    ("amp", OneOf((True, False, "auto")), ""),
)

_ABSENT = object()


def _value(cfg: DictConfig, key: str) -> Any:
    return plain(OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False))


def problems(cfg: DictConfig, checks: Sequence[Check]) -> list[str]:
    """One ``key=value: expected ...`` text per value of ``cfg`` that breaks its rule in ``checks``."""
    found = []
    for key, rule, what in checks:
        value = _value(cfg, key)
        if value is _ABSENT or rule.accepts(value):
            continue
        found.append(f"{key}={shown(value)}: expected {rule.expected(value)}" + (f" ({what})" if what else ""))
    return found


def _check(cfg: DictConfig, checks: Sequence[Check]) -> None:
    found = problems(cfg, checks)
    if found:
        raise ConfigError("; ".join(found))


def check_train_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming every value of :data:`TRAIN` that ``cfg`` gets wrong (one line)."""
    _check(cfg, TRAIN)
    fold, folds = _value(cfg, "data.fold"), _value(cfg, "data.num_folds")
    if isinstance(fold, int) and isinstance(folds, int) and fold >= folds:
        raise ConfigError(f"data.fold={fold}: expected a fold index 0..{folds - 1} (data.num_folds={folds})")


def check_predict_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming every value of :data:`PREDICT` that ``cfg`` gets wrong (one line)."""
    _check(cfg, PREDICT)
