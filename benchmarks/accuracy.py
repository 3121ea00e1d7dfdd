"""Accuracy on real photos: carnet's fine-tuning recipe against a linear probe and a plain PyTorch fine-tune.

    python benchmarks/accuracy.py --data DIR --weights FILE [--model tf_efficientnet_lite0] [--seeds 0 1 2]
        [--methods probe headfit finetune carnet] [--phases head,unfreeze_half,...] [--via phases|pipeline]
        [--image-size 224] [--out outputs/accuracy] [--threads N] [--device cpu|cuda|auto]
        [--carnet-args OVERRIDE ... | PHASE:OVERRIDE ...] [--variant NAME OVERRIDE ... [--variant-repo NAME DIR]]

e.g. ``python benchmarks/accuracy.py --data ../shared/data/adsdev_fewshot
--weights ../shared/weights/tf_efficientnet_lite0.in1k.safetensors --out outputs/accuracy/fewshot``
(or ``make accuracy DATA=... WEIGHTS=... ACC_ARGS='--seeds 0'``).

DIR is in the Kaggle layout (``train/<k>/*.jpg``, ``test_upload/*.jpg``, ``sample-submission.csv``) plus
``test_labels.csv`` (``Id,Category``: the true class of each test photo) and ``classes.txt`` (class k's name on
line k+1; without it the classes are named by their folders). FILE is a local state dict of ``--model`` in timm's
key names (.safetensors or .pth): nothing is downloaded. For each seed, every method starts from those weights:

* ``probe``: frozen backbone features of every training photo (carnet's evaluation view:
  ``build_eval_transform`` with the model's timm data config at ``--image-size``), standardised, then multinomial
  logistic regression by full-batch L-BFGS with the L2 strength chosen by 5-fold cross-validation on the
  training photos and refitted on all of them: carnet's own solver (``carnet.training.head_fit``), i.e. what the
  head phase starts from. The seed only changes the folds. Validation figure: CV accuracy at the chosen L2.
* ``headfit``: the strongest cheap baseline, what a user could run instead of carnet: carnet's own head fit
  (``carnet.training.head_fit.fit_head``) on the frozen features of **all** training photos, in the evaluation view
  plus ``--headfit-views`` (4) augmented views of each (``--augment``, carnet's ``light``), L2 by 5-fold
  cross-validation over photos. No validation figure.
* ``finetune``: the plain baseline a reader would write, in plain PyTorch (no Lightning, no carnet training code):
  all layers, AdamW (lr 3e-4, weight decay 0.01), OneCycleLR, 8 epochs, batch 32, torchvision
  RandomResizedCrop (scale 0.5-1) + horizontal flip, on all training photos; the final weights. No validation.
* ``carnet``: the documented recipe exactly as a user runs it: one ``python train.py phase=NAME ...`` per phase of
  ``--phases`` (or, with ``--via pipeline``, one ``python -m carnet.training.pipeline`` command), then
  ``python predict.py ckpt=<last phase>.ckpt tta=false`` and ``tta=true``. carnet holds out 20 % of the training
  photos for validation (``data.val_fraction``; the split follows the seed), so it trains on 80 % of them.
  Validation figure: the last phase's ``best_val_acc`` (summary.json).

* ``--variant NAME OVERRIDE ...``: carnet again with those overrides added (e.g. ``--variant refit refit=true``),
  a method of its own; ``--variant-repo NAME DIR`` runs it from another checkout (e.g. the main branch). A variant
  named ``carnet`` with no overrides runs the plain recipe after the others.

The methods of a seed run one after another, so their wall times are measured side by side under the same load;
the table gives each method's training time (carnet: its commands; the baselines: everything), its whole time with
test predictions, and that time over the plain fine-tune's, with the load average before each method in the JSON.

Every method's test accuracy is reported plain and with TTA (original + horizontal flip, probabilities averaged):
the probe and the fine-tune see test photos in carnet's evaluation view, as predict.py shows them to carnet's
model. Test labels are only read to report; nothing is chosen with them.

``python benchmarks/accuracy.py --merge A/accuracy.json B/accuracy.json OUT`` joins runs (e.g. seeds run in
parallel) into one report in OUT.

Writes ``--out``/accuracy.md (the tables printed at the end, the last one the test photos any method missed, with
each seed's prediction) and ``--out``/accuracy.json (per-seed results with the photos missed, wall times, every
command line); carnet's runs go to ``--out``/<seed>/ (phase runs, ``phases/`` hand-offs, logs,
submissions).

Cost, on a quiet 2-core CPU with tf_efficientnet_lite0 at 224 px (docs/fine-tuning.md, "What the recipe
measured"): a seed of carnet's pipeline took 115-353 s on the 50-photo few-shot set and ~350 s on 365 photos,
the plain fine-tune 65 s and 312 s, headfit 22 s and 77 s. Use a GPU (``--device auto`` picks it), or start with
``--seeds 0 --methods headfit finetune``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from carnet.config import config_dir  # noqa: E402
from carnet.data.decode import decode_image  # noqa: E402
from carnet.data.layout import read_test, scan_train  # noqa: E402
from carnet.data.transforms import build_eval_transform, build_train_transform  # noqa: E402
from carnet.summary import read_summary  # noqa: E402
from carnet.training.head_fit import (  # noqa: E402
    choose_l2,
    fit_head,
    fit_logistic,
    photo_folds,
    single_thread,
    standardised,
)
from carnet.training.pipeline import phase_order, split_overrides  # noqa: E402

METHODS = ("probe", "headfit", "finetune", "carnet")
SUMMARY_KEYS = ("best_val_acc", "best_val_loss", "best_epoch", "start_val_acc", "start_val_loss", "kept_start",
                "seconds", "max_epochs", "steps_per_epoch", "planned_steps", "taken_steps", "stopped_early",
                "trained_on", "status")


# --- data ---------------------------------------------------------------------------------------------------------

def class_names_of(root: Path) -> list[str]:
    """``classes.txt`` (one name a line, class k on line k+1); without it the folder names of ``train/``."""
    path = root / "classes.txt"
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    folders = sorted((p.name for p in (root / "train").iterdir() if p.is_dir()), key=int)
    print(f"{path} not found: classes named after their folders {folders}")
    return folders


def test_labels(root: Path) -> pd.DataFrame:
    """The test photos in submission order with their true class (``test_labels.csv``), for reporting only."""
    path = root / "test_labels.csv"
    if not path.is_file():
        raise SystemExit(f"{path} not found: the benchmark needs the test photos' labels (Id,Category)")
    labels = pd.read_csv(path, dtype={"Id": str})
    frame = read_test(root).merge(labels, on="Id", how="left")
    if frame.Category.isna().any():
        missing = frame.Id[frame.Category.isna()].tolist()
        raise SystemExit(f"{path} has no label for {len(missing)} test photo(s), first: {missing[0]}")
    return frame.assign(Category=frame.Category.astype(int))


class Photos(Dataset):
    """Photos as RGB PIL images through ``transform``, with their labels."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform: Callable) -> None:
        self.paths, self.labels, self.transform = list(paths), [int(v) for v in labels], transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(decode_image(self.paths[index]))  # carnet's decoding: EXIF orientation, 16-bit
        return self.transform(image), self.labels[index]


class EvalView:
    """carnet's evaluation view (resize, centre crop, normalise) with the model's timm data config: the one view
    every method's test photos (and the probe's training photos) get, so that only training differs."""

    def __init__(self, data_config: dict[str, Any], image_size: int) -> None:
        self.transform = build_eval_transform(image_size, data_config.get("interpolation", "bicubic"),
                                              float(data_config.get("crop_pct", 1.0)))
        # carnet's view ends in uint8 pixels (its network normalises them); the baselines' plain timm models
        # take normalised floats, so normalise here, as carnet's Normalize does.
        self.mean = torch.tensor(data_config["mean"]).view(3, 1, 1) * 255
        self.std = torch.tensor(data_config["std"]).view(3, 1, 1) * 255

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return (self.transform(image=np.asarray(image))["image"].float() - self.mean) / self.std


def train_view(data_config: dict[str, Any], image_size: int) -> v2.Compose:
    """The plain fine-tune's augmentation, the usual torchvision way: random 50-100 % crop and mirror."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(data_config["mean"], data_config["std"]),
    ])


class AugmentedView(EvalView):
    """One of carnet's training views (conf/augment/<augment>.yaml, albumentations, as ``head_fit`` draws them),
    normalised like :class:`EvalView`. ``compose`` is reseeded in each loader worker (:func:`_seed_views`)."""

    def __init__(self, data_config: dict[str, Any], image_size: int, augment: str, seed: int) -> None:
        super().__init__(data_config, image_size)
        steps = OmegaConf.create({"image_size": image_size, "augment": OmegaConf.load(
            config_dir() / "augment" / f"{augment}.yaml")})
        self.transform = build_train_transform(OmegaConf.to_container(steps.augment.train, resolve=True), image_size,
                                               data_config.get("interpolation", "bicubic"),
                                               float(data_config.get("crop_pct", 1.0)))
        self.transform.set_random_seed(seed)


def _seed_views(worker_id: int) -> None:
    """Each loader worker draws its own augmentations (forked workers would replay the parent's stream)."""
    info = torch.utils.data.get_worker_info()
    view = getattr(info.dataset, "transform", None)
    if isinstance(view, AugmentedView):
        view.transform.set_random_seed(info.seed % 2**32)


def loader(dataset: Dataset, args: argparse.Namespace, shuffle: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    drop_last = shuffle and len(dataset) % args.batch_size == 1  # a batch of one breaks BatchNorm in training
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle, num_workers=args.workers,
                      generator=generator, drop_last=drop_last, persistent_workers=False,
                      worker_init_fn=_seed_views)


# --- models -------------------------------------------------------------------------------------------------------

def timm_name(model: str) -> str:
    """The timm name behind ``model``: conf/model/<model>.yaml's ``name`` (e.g. tf_efficientnet_lite0.in1k)."""
    path = config_dir() / "model" / f"{model}.yaml"
    return str(OmegaConf.load(path).get("name", model)) if path.is_file() else model


def load_backbone(model: str, weights: Path) -> nn.Module:
    """timm's model without classifier, with the local weights; the file's classifier keys are dropped, anything
    else must match exactly (a half-loaded backbone would train like a random one)."""
    net = timm.create_model(timm_name(model), pretrained=False, num_classes=0)
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    classifier = net.pretrained_cfg.get("classifier", "classifier")
    prefixes = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith(prefixes)})
    return net


def data_config_of(net: nn.Module, image_size: int) -> dict[str, Any]:
    """timm's data config (mean, std, interpolation, crop_pct) at ``image_size``, as carnet's module builds it."""
    return {**timm.data.resolve_model_data_config(net), "input_size": (3, image_size, image_size)}


def autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict_views(net: nn.Module, data: DataLoader, device: torch.device,
                  flip: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Outputs of ``net`` for the original and (``flip``) the mirrored view of every image (float32, on the CPU)."""
    net.eval()
    plain, flipped = [], []
    for images, _ in data:
        images = images.to(device, non_blocking=True)
        with autocast(device):
            plain.append(net(images).float().cpu())
            if flip:
                flipped.append(net(images.flip(-1)).float().cpu())
    return torch.cat(plain), torch.cat(flipped) if flip else None


def view_features(net: nn.Module, paths: Sequence[Path], labels: Sequence[int], views: Sequence[Callable],
                  args: argparse.Namespace, device: torch.device, seed: int = 0) -> torch.Tensor:
    """[view, photo, feature]: ``net``'s outputs for the photos in each of ``views``, the i-th view's loader seeded
    with ``seed + i``."""
    return torch.stack([predict_views(net, loader(Photos(paths, labels, view), args, seed=seed + i), device,
                                      flip=False)[0] for i, view in enumerate(views)])


def accuracy(probs: torch.Tensor, labels: np.ndarray) -> float:
    return float((probs.argmax(1).numpy() == labels).mean())


def missed(predicted: Sequence[int], ctx: dict[str, Any]) -> dict[str, int]:
    """``{test Id: predicted class}`` of the test photos a method got wrong (plain predictions), for the report's
    list of photos missed: whether the methods miss the same few photos says how far any of them can still go."""
    ids, labels = ctx["test"].Id.tolist(), ctx["test_labels"]
    return {i: int(p) for i, p, t in zip(ids, predicted, labels, strict=True) if int(p) != int(t)}


# --- methods ------------------------------------------------------------------------------------------------------

def cv_accuracy(z: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, seed: int,
                folds: int = 5) -> float | None:
    """Accuracy of the chosen L2 over the same folds ``choose_l2`` scored it on (None: too few photos a class)."""
    labels = y.numpy()
    folds = int(min(folds, np.bincount(labels).min()))
    if folds < 2:
        return None
    fold = torch.as_tensor(photo_folds(np.arange(len(labels)), labels, folds, seed))
    correct = 0
    for k in range(folds):
        weight, bias = fit_logistic(z[fold != k], y[fold != k], num_classes, l2)
        correct += int(((z[fold == k].double() @ weight + bias).argmax(1) == y[fold == k]).sum())
    return correct / len(labels)


def run_probe(seed: int, ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Linear probe with carnet's head solver on frozen eval-view features."""
    device, num_classes = ctx["device"], len(ctx["class_names"])
    net = load_backbone(args.model, args.weights).to(device)
    view = EvalView(data_config_of(net, args.image_size), args.image_size)
    x, _ = predict_views(net, loader(Photos(ctx["train_paths"], ctx["train_labels"], view), args), device)
    xt, xt_flip = predict_views(net, loader(Photos(ctx["test_paths"], ctx["test_labels"], view), args), device)
    y = torch.as_tensor(ctx["train_labels"])
    z, mean, std = standardised(x)  # as HeadFit does
    with single_thread(torch.device("cpu")):
        l2, losses = choose_l2(z, y, np.arange(len(y)), num_classes, seed=seed)
        weight, bias = fit_logistic(z, y, num_classes, l2)
        cv_acc = cv_accuracy(z, y, num_classes, l2, seed)

    def probs(features: torch.Tensor) -> torch.Tensor:
        return (((features - mean) / std).double() @ weight + bias).softmax(1)

    plain = probs(xt)
    labels = np.asarray(ctx["test_labels"])
    return {"test_acc": accuracy(plain, labels), "test_acc_tta": accuracy((plain + probs(xt_flip)) / 2, labels),
            "missed": missed(plain.argmax(1).tolist(), ctx),
            "val_acc": cv_acc, "l2": l2, "cv_loss": losses.get(l2), "train_photos": len(y)}


def run_headfit(seed: int, ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The strongest cheap baseline, what a user could run instead of carnet: carnet's own head fit
    (``carnet.training.head_fit.fit_head``: standardised features, L2 by cross-validation over photos, refitted on all)
    on the frozen features of **all** training photos, in the evaluation view plus ``--headfit-views`` augmented
    views of each (carnet's ``augment`` pipeline, as ``head_fit`` draws them)."""
    device, num_classes = ctx["device"], len(ctx["class_names"])
    net = load_backbone(args.model, args.weights).to(device)
    config = data_config_of(net, args.image_size)
    views = [EvalView(config, args.image_size)] + [AugmentedView(config, args.image_size, args.augment,
                                                                 seed * 1000 + v) for v in range(args.headfit_views)]
    x = view_features(net, ctx["train_paths"], ctx["train_labels"], views, args, device, seed)
    photos = len(ctx["train_labels"])
    y, groups = torch.as_tensor(ctx["train_labels"]).repeat(len(views)), np.tile(np.arange(photos), len(views))
    x = x.reshape(-1, x.shape[-1])
    started = time.perf_counter()
    weight, bias, info = fit_head(x, y, groups, num_classes)
    solver_seconds = time.perf_counter() - started
    view = EvalView(config, args.image_size)
    xt, xt_flip = predict_views(net, loader(Photos(ctx["test_paths"], ctx["test_labels"], view), args), device)
    plain, flipped = (xt @ weight.t() + bias).softmax(1), (xt_flip @ weight.t() + bias).softmax(1)
    labels_t = np.asarray(ctx["test_labels"])
    return {"test_acc": accuracy(plain, labels_t), "test_acc_tta": accuracy((plain + flipped) / 2, labels_t),
            "missed": missed(plain.argmax(1).tolist(), ctx),
            "val_acc": None, "train_photos": len(ctx["train_labels"]), "views": len(views),
            "solver_seconds": round(solver_seconds, 1), **info}


def run_finetune(seed: int, ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """All layers, AdamW + OneCycleLR, random crops and flips, plain PyTorch; the final weights are tested."""
    device, num_classes = ctx["device"], len(ctx["class_names"])
    torch.manual_seed(seed)
    backbone = load_backbone(args.model, args.weights)
    config = data_config_of(backbone, args.image_size)
    net = nn.Sequential(backbone, nn.Linear(backbone.num_features, num_classes)).to(device)
    train = loader(Photos(ctx["train_paths"], ctx["train_labels"], train_view(config, args.image_size)), args,
                   shuffle=True, seed=seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.ft_lr, weight_decay=args.ft_weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.ft_lr,
                                                    total_steps=args.ft_epochs * len(train))
    for _ in range(args.ft_epochs):
        net.train()
        for images, labels in train:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(device):
                loss = F.cross_entropy(net(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    view = EvalView(config, args.image_size)
    logits, logits_flip = predict_views(net, loader(Photos(ctx["test_paths"], ctx["test_labels"], view), args), device)
    plain, labels = logits.softmax(1), np.asarray(ctx["test_labels"])
    return {"test_acc": accuracy(plain, labels), "test_acc_tta": accuracy((plain + logits_flip.softmax(1)) / 2, labels),
            "missed": missed(plain.argmax(1).tolist(), ctx),
            "val_acc": None, "steps": args.ft_epochs * len(train), "final_train_loss": loss.item()}


def hydra_list(names: Sequence[str]) -> str:
    """A Hydra list override value; items that are not plain words are quoted (spaces, commas, or a name like
    ``2114`` or ``true`` that Hydra would read as a number or a boolean)."""
    def item(name: str) -> str:
        if re.fullmatch(r"[A-Za-z_][\w.\-]*", name) and name.lower() not in ("true", "false", "null", "nan", "inf"):
            return name
        return "'" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"

    return "[" + ",".join(item(n) for n in names) + "]"


def phase_sets_image_size(phase: str) -> bool:
    """Does conf/phase/<phase>.yaml choose its own image size (finetune_448)? Then --image-size leaves it alone."""
    path = config_dir() / "phase" / f"{phase}.yaml"
    return path.is_file() and "image_size" in OmegaConf.load(path)


def carnet_overrides(seed: int, out: Path, ctx: dict[str, Any], args: argparse.Namespace) -> tuple[list[str], ...]:
    """(overrides for every phase, ``PHASE:key=value`` ones) as a user would type them for this seed."""
    model = [f"model={args.model}"] if (config_dir() / "model" / f"{args.model}.yaml").is_file() \
        else [f"model.name={args.model}"]
    common = [*model, f"model.weights={args.weights}", f"data.root={args.data}",
              f"data.class_names={hydra_list(ctx['class_names'])}", f"seed={seed}",
              f"trainer={'gpu' if ctx['device'].type == 'cuda' else 'cpu'}", f"paths.output_dir={out}"]
    default_size = OmegaConf.load(config_dir() / "train.yaml").image_size
    sized = [] if args.image_size == default_size else \
        [f"{p}:image_size={args.image_size}" for p in args.phases if not phase_sets_image_size(p)]
    return common, [*sized, *args.carnet_args]


def shell_word(arg: str) -> str:
    """``arg`` for a shell, readably: double quotes around a Hydra list of quoted names instead of shlex's '"'"'."""
    if shlex.quote(arg) == arg or any(c in arg for c in '"$`\\!'):
        return shlex.quote(arg)
    return f'"{arg}"'


def run_command(command: list[str], log: Path, env: dict[str, str], repo: Path = REPO) -> tuple[str, float]:
    """Run one carnet command from the root of the checkout ``repo``, its output to ``log``; stop with its tail if
    it fails."""
    script = Path(command[1])
    shown = " ".join(shell_word(c) for c in ["python", str(script.relative_to(repo)) if script.is_absolute()
                                             else command[1], *command[2:]])
    print(f"  $ {shown}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(command, cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise SystemExit(f"{tail}\ncommand failed (exit {code}), full output in {log}:\n{shown}")
    return shown, time.perf_counter() - started


def submission_predictions(path: Path, ctx: dict[str, Any]) -> list[int]:
    """The submitted Category of each test photo, in test_labels.csv's order."""
    submission = pd.read_csv(path, dtype={"Id": str})
    merged = ctx["test"].merge(submission, on="Id", how="left", suffixes=("", "_predicted"))
    if merged.Category_predicted.isna().any():
        raise SystemExit(f"{path} misses {int(merged.Category_predicted.isna().sum())} test photo(s)")
    return merged.Category_predicted.astype(int).tolist()


def submission_accuracy(path: Path, ctx: dict[str, Any]) -> float:
    """Share of test photos whose submitted Category is their label in test_labels.csv."""
    return float(np.mean(np.asarray(submission_predictions(path, ctx)) == np.asarray(ctx["test_labels"])))


def phase_rows(run_dirs: dict[str, Path], phases: Sequence[str]) -> list[dict[str, Any]]:
    """summary.json facts of each phase run that exists (a pipeline may skip phases)."""
    rows = []
    for phase in phases:
        path = run_dirs.get(phase)
        summary = read_summary(path, missing_ok=True) if path is not None else None
        if summary is None:
            rows.append({"phase": phase, "run_dir": None, "skipped": True})
            continue
        rows.append({"phase": phase, "run_dir": str(path), **{k: getattr(summary, k) for k in SUMMARY_KEYS}})
    return rows


def run_carnet(seed: int, ctx: dict[str, Any], args: argparse.Namespace, name: str = "carnet") -> dict[str, Any]:
    """carnet's phases as subprocesses, then predict.py plain and with TTA; per-phase results from summary.json.

    ``name`` is ``carnet`` or a ``--variant``: its own overrides, and its own checkout with ``--variant-repo``."""
    repo = args.variant_repos.get(name, REPO)
    out = args.out / str(seed) / name
    phases_dir = out / "phases"
    for phase in args.phases:  # a stale hand-off from an earlier benchmark must never be picked up
        (phases_dir / f"{phase}.ckpt").unlink(missing_ok=True)
    (phases_dir / "pipeline.json").unlink(missing_ok=True)
    common, extra = carnet_overrides(seed, out, ctx, args)
    extra = [*extra, *args.variants.get(name, [])]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1", **ctx["thread_env"]}
    commands, seconds = [], {}
    refit_rows: list[dict[str, Any]] = []
    final: str | None = None
    if args.via == "pipeline":
        shutil.rmtree(out / "pipeline", ignore_errors=True)  # the pipeline keeps runs and hand-offs in --dir
        command = [sys.executable, "-m", "carnet.training.pipeline", "--dir", str(out / "pipeline"), "--phases",
                   ",".join(args.phases), *common, *extra]
        shown, seconds["pipeline"] = run_command(command, out / "logs" / "pipeline.log", env, repo)
        commands.append(shown)
        report = json.loads((out / "pipeline" / "pipeline.json").read_text())
        run_dirs = {row["phase"]: Path(row["run_dir"]) for row in report["phases"] if row.get("run_dir")}
        refit_dirs = {row["phase"]: Path(row["run_dir"]) for row in report.get("refit", []) if row.get("run_dir")}
        refit_rows = phase_rows(refit_dirs, list(refit_dirs))
        final = report.get("final_checkpoint")
    else:
        everywhere, per_phase = split_overrides(extra, args.phases)
        run_dirs = {}
        for phase in args.phases:
            run_dirs[phase] = out / phase
            shutil.rmtree(run_dirs[phase], ignore_errors=True)
            command = [sys.executable, str(repo / "train.py"), f"phase={phase}", *common, *everywhere,
                       *per_phase[phase], f"hydra.run.dir={run_dirs[phase]}"]
            shown, seconds[phase] = run_command(command, out / "logs" / f"{phase}.log", env, repo)
            commands.append(shown)
    phases = phase_rows(run_dirs, args.phases)
    ran = [p for p in phases if not p.get("skipped")]
    if final is None:
        last = ran[-1]
        final = read_summary(last["run_dir"]).phase_checkpoint or str(phases_dir / f"{last['phase']}.ckpt")
    result = {"val_acc": ran[-1]["best_val_acc"], "phases": phases, "refit": refit_rows, "checkpoint": final,
              "train_seconds": round(sum(seconds.values()), 1)}
    device = "cuda" if ctx["device"].type == "cuda" else "cpu"
    for key, tta in (("test_acc", "false"), ("test_acc_tta", "true")):
        submission = out / "predict" / ("tta" if tta == "true" else "plain") / "submission.csv"
        command = [sys.executable, str(repo / "predict.py"), f"ckpt={final}", f"out={submission}",
                   f"data.root={args.data}", f"tta={tta}", f"device={device}"]
        shown, seconds[f"predict_tta_{tta}"] = run_command(command, out / "logs" / f"predict_tta_{tta}.log", env,
                                                           repo)
        commands.append(shown)
        result[key] = submission_accuracy(submission, ctx)
        if tta == "false":
            result["missed"] = missed(submission_predictions(submission, ctx), ctx)
    return {**result, "commands": commands, "command_seconds": {k: round(v, 1) for k, v in seconds.items()}}


RUNNERS: dict[str, Callable[[int, dict[str, Any], argparse.Namespace], dict[str, Any]]] = {
    "probe": run_probe, "headfit": run_headfit, "finetune": run_finetune, "carnet": run_carnet}


# --- report -------------------------------------------------------------------------------------------------------

def spread(values: Sequence[float | None], digits: int = 3) -> str:
    """``mean ± sd (min–max)`` over seeds; one seed: the value; none: a dash."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return (f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} "
            f"({min(values):.{digits}f}–{max(values):.{digits}f})")


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


VAL_SOURCE = {"probe": "5-fold CV on train", "headfit": "—", "finetune": "—"}
CARNET_VAL = "last phase's best_val_acc (20 % held out)"


def method_table(runs: dict[str, list[dict[str, Any]]], reference_method: str = "finetune") -> str:
    """Accuracy and wall time per method. ``train s`` is training alone (carnet: its train.py or pipeline commands,
    the baselines: everything but scoring the test photos is not separated, so their whole time); ``s`` the whole
    method with test predictions; ``× ref`` the whole time over ``reference_method``'s, both measured in this run."""
    ref = runs.get(reference_method)
    ref_seconds = statistics.mean(r["seconds"] for r in ref) if ref else None
    rows = []
    for method, results in runs.items():
        seconds = statistics.mean(r["seconds"] for r in results)
        train = [r.get("train_seconds", r["seconds"]) for r in results]
        rows.append([method, str(len(results)), spread([r["test_acc"] for r in results]),
                     spread([r["test_acc_tta"] for r in results]), spread([r["val_acc"] for r in results]),
                     VAL_SOURCE.get(method, CARNET_VAL), f"{statistics.mean(train):.0f}", f"{seconds:.0f}",
                     f"{seconds / ref_seconds:.2f}" if ref_seconds else "—"])
    return markdown(["method", "seeds", "test acc", "test acc (TTA)", "val acc", "val from", "train s/seed",
                     "s/seed", f"× {reference_method}"], rows)


def reference(now: dict[str, Any], before: dict[str, Any] | None, key: str) -> float | None:
    """What a phase is compared with: the phase before it, or for the first phase its own start."""
    return before[f"best_{key}"] if before is not None else now.get(f"start_{key}")


def no_worse(value: float | None, ref: float | None, higher: bool) -> bool:
    """``value`` at least as good as ``ref``, up to float32 rounding (Lightning logs float32, the phase start's
    figures are float64)."""
    if value is None or ref is None:
        return False
    return math.isclose(value, ref, rel_tol=1e-5, abs_tol=1e-6) or (value > ref if higher else value < ref)


def phase_table(results: list[dict[str, Any]]) -> str:
    """Per phase over seeds: validation accuracy and loss, in how many seeds the phase ended at least as good as the
    one before it (the first phase: as its own start), kept its start, or was skipped by the pipeline; planned and
    taken optimizer steps."""
    rows = []
    for i, phase in enumerate(r["phase"] for r in results[0]["phases"]):
        pairs = []
        for r in results:
            before = [p for p in r["phases"][:i] if not p.get("skipped")]
            pairs.append((r["phases"][i], before[-1] if before else None))
        now = [n for n, _ in pairs if not n.get("skipped")]
        ran = [(n, b) for n, b in pairs if not n.get("skipped")]
        acc_ok = sum(no_worse(n["best_val_acc"], reference(n, b, "val_acc"), True) for n, b in ran)
        loss_ok = sum(no_worse(n["best_val_loss"], reference(n, b, "val_loss"), False) for n, b in ran)
        rows.append([phase, spread([n["best_val_acc"] for n in now]), spread([n["best_val_loss"] for n in now]),
                     f"{acc_ok}/{len(now)}", f"{loss_ok}/{len(now)}",
                     f"{sum(bool(n.get('kept_start')) for n in now)}/{len(now)}",
                     f"{len(pairs) - len(now)}/{len(pairs)}",
                     spread([n.get("planned_steps") for n in now], 0), spread([n.get("taken_steps") for n in now], 0),
                     spread([n.get("seconds") for n in now], 0)])
    return markdown(["phase", "val acc", "val loss", "acc ≥ previous", "loss ≤ previous", "kept start", "skipped",
                     "planned steps", "taken steps", "s"], rows)


def refit_table(results: list[dict[str, Any]]) -> str:
    """The refit runs (every photo, no validation): per phase, over seeds, the steps taken and the time."""
    phases = list(dict.fromkeys(p["phase"] for r in results for p in r.get("refit", [])))
    rows = []
    for phase in phases:
        now = [p for r in results for p in r.get("refit", []) if p["phase"] == phase and not p.get("skipped")]
        rows.append([phase, str(len(now)), spread([n.get("taken_steps") for n in now], 0),
                     spread([n.get("seconds") for n in now], 0)])
    return markdown(["refit phase", "runs", "taken steps", "s"], rows)


def missed_table(runs: dict[str, list[dict[str, Any]]], label: dict[str, int], class_names: Sequence[str]) -> str:
    """The test photos any method missed (plain predictions), most missed first: each photo's class and, per
    method, what each seed predicted (``·``: right). A photo every method misses bounds what any can reach."""
    ran = {m: results for m, results in runs.items() if results and all("missed" in r for r in results)}
    ids = {i for results in ran.values() for r in results for i in r["missed"]}
    if not ids:
        return ""
    count = {i: sum(i in r["missed"] for results in ran.values() for r in results) for i in ids}
    runs_in_all = sum(len(results) for results in ran.values())

    def predictions(results: list[dict[str, Any]], i: str) -> str:
        return " ".join(str(r["missed"][i]) if i in r["missed"] else "·" for r in results)

    rows = [[i, f"{label[i]} {class_names[label[i]]}", f"{count[i]}/{runs_in_all}",
             *(predictions(results, i) for results in ran.values())]
            for i in sorted(ids, key=lambda i: (-count[i], i))]
    return markdown(["test photo", "class", "missed by", *ran], rows)


def report(runs: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> str:
    text = [f"# Accuracy on {meta['data']}", "",
            f"{meta['model']} from {meta['weights']}, {meta['image_size']} px, seeds {meta['seeds']}, "
            f"device {meta['device']}, {meta.get('threads')} threads; test photos: {meta['test_photos']}, training "
            f"photos: {meta['train_photos']}.", "", method_table(runs)]
    for method, results in runs.items():
        if not results or "phases" not in results[0]:
            continue
        text += ["", f"{method} per phase ({meta['via']}, overrides {meta.get('variants', {}).get(method, [])}): "
                     "validation over seeds; 'previous' is the phase before (the first phase: its own start); s is "
                     "the run's own time from summary.json, without start-up.", "", phase_table(results)]
        if any(r.get("refit") for r in results):
            text += ["", refit_table(results)]
    if table := missed_table(runs, meta.get("test_labels", {}), meta["class_names"]):
        text += ["", "Test photos missed (plain predictions): the class each seed predicted, in seed order "
                 "(· right).", "", table]
    return "\n".join(text) + "\n"


# --- main ---------------------------------------------------------------------------------------------------------

def git_commit(repo: Path) -> str | None:
    """The checkout's commit (with ``+dirty`` for uncommitted changes), to say what was measured."""
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="Kaggle-layout folder with test_labels.csv")
    ap.add_argument("--weights", type=Path, required=True, help="local .safetensors/.pth of --model, timm key names")
    ap.add_argument("--model", default="tf_efficientnet_lite0", help="conf/model name (or a timm name)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--phases", default=",".join(phase_order()), help="carnet phases in order, comma-separated")
    ap.add_argument("--via", choices=("phases", "pipeline"), default="phases",
                    help="carnet: one train.py command per phase, or one carnet.training.pipeline command")
    ap.add_argument("--image-size", type=int, default=224, help="probe and fine-tune size; carnet phases that do "
                    "not set their own size (finetune_448 does) get it when it differs from conf/train.yaml's")
    ap.add_argument("--out", type=Path, default=Path("outputs/accuracy"))
    ap.add_argument("--threads", type=int, help="torch threads here and OMP_NUM_THREADS of carnet's commands")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                    help="loader workers of the probe and the plain fine-tune")
    ap.add_argument("--batch-size", type=int, default=32, help="probe and plain fine-tune batch")
    ap.add_argument("--ft-epochs", type=int, default=8)
    ap.add_argument("--ft-lr", type=float, default=3e-4)
    ap.add_argument("--ft-weight-decay", type=float, default=0.01)
    ap.add_argument("--carnet-args", nargs="+", action="extend", default=[], metavar="OVERRIDE",
                    help="Hydra overrides for every carnet phase, or PHASE:key=value for one phase")
    ap.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "OVERRIDE"),
                    help="another carnet recipe, run like carnet with these overrides added (e.g. --variant ema "
                         "ema.decay=0.99); each is a method of its own, run after --methods for every seed")
    ap.add_argument("--variant-repo", nargs=2, action="append", default=[], metavar=("NAME", "DIR"),
                    help="run variant NAME (or carnet) from another checkout of carnet, e.g. the main branch")
    ap.add_argument("--augment", default="light", help="conf/augment option of headfit's augmented views")
    ap.add_argument("--headfit-views", type=int, default=OmegaConf.load(config_dir() / "train.yaml").head_fit.views,
                    help="headfit's augmented views of each photo (default: head_fit.views' default)")
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    args = ap.parse_args(argv)
    args.phases = [p for p in args.phases.split(",") if p]
    known = sorted(p.stem for p in (config_dir() / "phase").glob("*.yaml"))
    if unknown := [p for p in args.phases if p not in known]:
        ap.error(f"--phases: unknown phase(s) {unknown}; conf/phase has {known}")
    args.variants = {name: overrides for name, *overrides in args.variant}
    args.variant_repos = {name: Path(repo).resolve() for name, repo in args.variant_repo}
    if clash := [n for n in args.variants if n in METHODS and n != "carnet"]:
        ap.error(f"--variant: {clash} are baseline names")
    if unknown := [n for n in args.variant_repos if n not in args.variants and n != "carnet"]:
        ap.error(f"--variant-repo: no --variant named {unknown}")
    args.data, args.weights, args.out = args.data.resolve(), args.weights.resolve(), args.out.resolve()
    if not args.weights.is_file():
        ap.error(f"--weights {args.weights}: file not found")
    return args


def merge(paths: Sequence[Path], out: Path) -> str:
    """One report from several runs' accuracy.json (e.g. seeds run in parallel, or on several machines)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    runs: dict[str, list[dict[str, Any]]] = {}
    for part in parts:
        for method, results in part["runs"].items():
            runs.setdefault(method, []).extend(results)
    meta = {**parts[0]["meta"], "seeds": sorted({r["seed"] for results in runs.values() for r in results}),
            "merged_from": [str(p) for p in paths]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    text = report(runs, meta)
    (out / "accuracy.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    if (argv is None and sys.argv[1:2] == ["--merge"]) or (argv and argv[0] == "--merge"):
        *inputs, out = (argv if argv is not None else sys.argv[1:])[1:]
        print(merge([Path(p) for p in inputs], Path(out)))
        return
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    thread_env = {}
    if args.threads:
        torch.set_num_threads(args.threads)
        thread_env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    class_names = class_names_of(args.data)
    train = scan_train(args.data, len(class_names))
    test = test_labels(args.data)
    ctx = {"device": device, "class_names": class_names, "thread_env": thread_env, "test": test,
           "train_paths": [args.data / p for p in train.path], "train_labels": train.label.tolist(),
           "test_paths": [args.data / p for p in test.path], "test_labels": test.Category.tolist()}
    meta = {"command": shlex.join(["python", *sys.argv]), "data": str(args.data), "weights": str(args.weights),
            "model": args.model, "timm_model": timm_name(args.model), "image_size": args.image_size,
            "seeds": args.seeds, "methods": args.methods, "phases": args.phases, "via": args.via,
            "carnet_args": args.carnet_args, "device": str(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__, "train_photos": len(train),
            "test_photos": len(test), "class_names": class_names,
            "test_labels": dict(zip(test.Id, map(int, test.Category), strict=True)),
            "finetune": {"epochs": args.ft_epochs, "lr": args.ft_lr, "weight_decay": args.ft_weight_decay,
                         "batch_size": args.batch_size},
            "variants": args.variants, "variant_repos": {k: str(v) for k, v in args.variant_repos.items()},
            "commit": git_commit(REPO)}
    print(f"{args.model} on {args.data}: {len(train)} training / {len(test)} test photos, {len(class_names)} "
          f"classes, device {device}, torch threads {torch.get_num_threads()}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    methods = [*args.methods, *(v for v in args.variants if v not in args.methods)]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    started = time.time()
    for seed in args.seeds:
        for method in methods:  # interleaved seed by seed: the methods of a seed share the machine's load
            print(f"seed {seed}: {method}", flush=True)
            runner = RUNNERS.get(method) or functools.partial(run_carnet, name=method)
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            result = runner(seed, ctx, args)
            runs[method].append({"seed": seed, **result, "seconds": round(time.perf_counter() - t0, 1),
                                 "load_before": round(load, 1), "load_after": round(os.getloadavg()[0], 1)})
            print(f"seed {seed}: {method}: test acc {result['test_acc']:.4f}, TTA {result['test_acc_tta']:.4f}, "
                  f"{runs[method][-1]['seconds']:.0f} s", flush=True)
            meta["seconds"] = round(time.time() - started, 1)
            (args.out / "accuracy.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    text = report(runs, meta)
    (args.out / "accuracy.md").write_text(text)
    print("\n" + text + f"\n{args.out / 'accuracy.md'}, {args.out / 'accuracy.json'}")


if __name__ == "__main__":
    main()
