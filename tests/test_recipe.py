"""The fine-tuning recipe's parts: the head fitted on features, a phase that keeps its start, EMA in checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from carnet.inference.export import export_onnx
from carnet.models.checkpoint import load_checkpoint
from carnet.runtime import resolve_runtime
from carnet.summary import read_summary
from carnet.training.builders import build_module
from carnet.training.head_fit import choose_l2, fit_head, fit_logistic, fit_logistic_folds
from carnet.training.train import train
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import ONE_BATCH, TINY
from tests.helpers.recipe import classifier


def blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int,
          draw: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters (fixed by ``seed``; ``draw`` picks the sample) with a per-feature scale and offset, as
    pooled CNN features have."""
    gen = torch.Generator().manual_seed(seed)
    centres, scale, offset = torch.randn(classes, dim, generator=gen), torch.rand(dim, generator=gen) * 5 + 0.1, \
        torch.randn(dim, generator=gen) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=torch.Generator().manual_seed(1000 + draw))
    return x * scale + offset, y


def test_lbfgs_finds_the_optimum_that_gradient_descent_approaches() -> None:
    """Same objective (mean cross-entropy + l2/2 ||W||^2): L-BFGS vs 2,000 Adam steps from zero. The biases are
    compared up to a common constant, which softmax ignores and the (unpenalised) bias cannot pin down."""
    x, y = blobs(20, 4, 16, spread=1.5, seed=0)
    x = (x - x.mean(0)) / x.std(0)
    weight, bias = fit_logistic(x, y, 4, l2=0.05)
    w = torch.zeros(16, 4, dtype=torch.double, requires_grad=True)
    b = torch.zeros(4, dtype=torch.double, requires_grad=True)
    optimizer = torch.optim.Adam([w, b], lr=0.05)
    for step in range(2000):
        for group in optimizer.param_groups:
            group["lr"] = 0.05 * (1 - step / 2000) + 1e-4
        optimizer.zero_grad()
        loss = F.cross_entropy(x.double() @ w + b, y) + 0.025 * (w * w).sum()
        loss.backward()
        optimizer.step()
    assert torch.allclose(weight, w.detach(), atol=2e-3)
    assert torch.allclose(bias - bias.mean(), b.detach() - b.detach().mean(), atol=2e-3)


def test_fitted_head_works_on_raw_features_and_generalises() -> None:
    """fit_head folds the standardisation back into the layer: its logits on raw features are the solver's."""
    x, y = blobs(15, 5, 32, spread=0.7, seed=1)
    weight, bias, info = fit_head(x, y, np.arange(len(y)), 5)
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    w, b = fit_logistic(z, y, 5, info["l2"])
    assert torch.allclose(x @ weight.t() + bias, (z.double() @ w + b).float(), atol=1e-3)
    held_x, held_y = blobs(15, 5, 32, spread=0.7, seed=1, draw=1)  # same clusters and scales, new draws
    assert ((held_x @ weight.t() + bias).argmax(1) == held_y).float().mean() > 0.9


def test_cross_validation_regularises_noise_more_than_signal() -> None:
    x, y = blobs(12, 3, 24, spread=0.5, seed=2)
    groups = np.arange(len(y))
    signal, _ = choose_l2((x - x.mean(0)) / x.std(0), y, groups, 3)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    noise, _ = choose_l2((x - x.mean(0)) / x.std(0), shuffled, groups, 3)
    assert noise > signal


def test_the_folds_solved_together_reach_each_folds_own_optimum() -> None:
    """The GPU's way (one L-BFGS run for every fold) and the CPU's (a run a fold) give each fold the same head,
    so cross-validation scores every L2 alike and chooses the same one."""
    x, y = blobs(12, 4, 48, spread=1.2, seed=3)
    z = (x - x.mean(0)) / x.std(0)
    fold = torch.arange(len(y)) % 3
    weights, biases = fit_logistic_folds(z, y, fold, 3, 4, l2=0.1)
    for k in range(3):
        weight, bias = fit_logistic(z[fold != k], y[fold != k], 4, l2=0.1)
        assert torch.allclose(weights[k], weight, atol=1e-4) and torch.allclose(biases[k], bias, atol=1e-4)
    groups = np.arange(len(y))
    together, together_losses = choose_l2(z, y, groups, 4, together=True)
    apart, apart_losses = choose_l2(z, y, groups, 4, together=False)
    assert together == apart and together_losses.keys() == apart_losses.keys() and len(apart_losses) >= 3
    assert all(abs(together_losses[l2] - apart_losses[l2]) < 1e-4 for l2 in apart_losses)


def test_head_phase_fits_the_head_and_keeps_its_start_when_training_cannot_beat_it(tiny_data: Path,
                                                                                   tmp_path: Path) -> None:
    """optimizer.lr=0: no epoch can beat the fitted head, so the phase hands on its start (best_epoch 0)."""
    cfg = compose_cfg([*TINY, f"data.root={tiny_data}", "phase=head", "optimizer.lr=0", "head_fit.views=1",
                       f"paths.output_dir={tmp_path / 'out'}", f"run_dir={tmp_path / 'run'}"])
    summary = train(cfg)
    assert summary.head_fit["photos"] == summary.num_train and summary.head_fit["views"] == 2
    assert summary.kept_start is True and summary.best_epoch == 0
    assert summary.best_val_loss == summary.start_val_loss
    handed = torch.load(summary.phase_checkpoint, map_location="cpu", weights_only=True)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for key, value in handed["state_dict"].items():  # lr 0: the start is also where training ended
        assert torch.equal(value, last["state_dict"][key]), key
    assert not (tmp_path / "run" / "checkpoints" / "start.ckpt").exists()


def test_ema_weights_are_checkpointed_and_resumed(tiny_data: Path, tmp_path: Path) -> None:
    """ema.decay: checkpoints hold the averaged weights (the raw ones beside them), and a resumed run carries its
    average on instead of restarting it (one update a step: 3 after 3 one-batch epochs, cut after 2 or not)."""
    common = [*ONE_BATCH, f"data.root={tiny_data}", "ema.decay=0.5", "optimizer.lr=0.01", "scheduler=none"]
    train(compose_cfg([*common, "trainer.max_epochs=3", f"run_dir={tmp_path / 'full'}"]))
    train(compose_cfg([*common, "trainer.max_epochs=2", f"run_dir={tmp_path / 'cut'}"]))
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    train(compose_cfg([*common, "trainer.max_epochs=3", f"resume={last}", f"run_dir={tmp_path / 'cut'}"]))
    for run in ("full", "cut"):
        checkpoint = torch.load(tmp_path / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        key = "net.head.1.weight"
        assert not torch.equal(checkpoint["state_dict"][key], checkpoint["current_model_state"][key]), run
        assert int(checkpoint["averaging_state"]["n_averaged"]) == 3, run
    assert read_summary(tmp_path / "cut").epochs_run == 3


def test_ema_ends_a_run_that_takes_no_step_with_the_weights_it_started_from(tiny_data: Path, tmp_path: Path) -> None:
    """The refit of a head phase that kept its start takes no step. With ema.decay it must still end with the head
    fitted on every photo, as without: the average used to hold the weights from before the head fit (on the
    365-photo dev set, a random head)."""
    common = [*TINY, f"data.root={tiny_data}", "phase=head", "head_fit.views=1", "data.verify=false"]
    selection = train(compose_cfg([*common, "optimizer.lr=0", f"paths.output_dir={tmp_path / 'out'}",
                                   f"run_dir={tmp_path / 'selection'}"]))
    assert selection.kept_start is True
    ends = {}
    for name, extra in (("plain", []), ("ema", ["ema.decay=0.5"])):
        refit = train(compose_cfg([*common, *extra, f"refit_from={tmp_path / 'selection'}",
                                   f"paths.output_dir={tmp_path / name / 'out'}", f"run_dir={tmp_path / name}"]))
        assert refit.status == "completed" and refit.taken_steps == 0 and refit.head_fit is not None
        ends[name] = torch.load(tmp_path / name / "checkpoints" / "best.ckpt", map_location="cpu",
                                weights_only=True)["state_dict"]
    assert ends["plain"].keys() == ends["ema"].keys()
    for key, value in ends["plain"].items():
        assert torch.equal(value, ends["ema"][key]), key


def test_a_phase_that_changes_image_size_competes_with_its_predecessor_at_its_own_size(tiny_data: Path,
                                                                                      tmp_path: Path) -> None:
    """finetune_448-style: the predecessor is judged at the size it was validated at, the new phase at its own; if
    training at the new size never beats the predecessor, the phase hands on the predecessor itself.

    Everything frozen (lr 0, no unfrozen blocks, BatchNorm statistics kept): the network cannot change, so which
    side wins is decided by the two sizes alone; on random weights that can go either way, and both are checked."""
    common = [*TINY, f"data.root={tiny_data}", "head_fit.views=0", f"paths.output_dir={tmp_path / 'out'}"]
    train(compose_cfg([*common, "phase=head", f"run_dir={tmp_path / 'head'}"]))
    summary = train(compose_cfg([*common, "phase=finetune_448", "init_from=head", "image_size=48", "optimizer.lr=0",
                                 "unfreeze=0.0", "bn=frozen", f"run_dir={tmp_path / 'big'}"]))
    assert summary.start_image_size == 64 and summary.image_size == 48
    new_size_loss = pd.read_csv(tmp_path / "big" / "metrics.csv")["val/loss"].min()
    assert summary.kept_start == bool(new_size_loss >= summary.start_val_loss)
    handed = torch.load(summary.phase_checkpoint, map_location="cpu", weights_only=True)
    head = torch.load(tmp_path / "out" / "phases" / "head.ckpt", map_location="cpu", weights_only=True)
    assert all(torch.equal(v, handed["state_dict"][k]) for k, v in head["state_dict"].items())  # nothing trained
    if summary.kept_start:
        assert summary.best_epoch == 0 and handed["carnet"]["image_size"] == 64
    else:
        assert summary.best_epoch == 1 and handed["carnet"]["image_size"] == 48


@pytest.mark.parametrize("total_steps", range(1, 13))
def test_onecycle_runs_for_any_number_of_steps(total_steps: int) -> None:
    """A tiny dataset's run may take 4 steps: at pct_start 0.25 torch's warm-up would be 0 steps long and divide
    by it (ZeroDivisionError in the demo's one-cycle recipe on a few photos)."""
    from carnet.training.schedulers import onecycle

    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scheduler = onecycle(optimizer, total_steps, 1, pct_start=0.25)["scheduler"]
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(total_steps - 1):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert all(0 < r <= 0.1 + 1e-9 for r in rates)


MIXUP_ONLY = {"mixup_alpha": 1.0, "cutmix_alpha": 0.0, "prob": 1.0, "switch_prob": 0.5}


def seen_by_the_network(module: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """The batch the network received in one training step, and that step's loss."""
    seen = []
    hook = module.net.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().float()))
    try:
        loss = module.training_step((images, labels), 0)
    finally:
        hook.remove()
    return seen[0], loss.detach()


def test_mixup_trains_on_blended_pairs_with_blended_labels() -> None:
    """mixup.*: each image is blended with its mirror in the batch by one weight lam, and the loss is the
    cross-entropy against labels blended by the same lam (timm's Mixup); an odd batch trains unmixed."""
    torch.manual_seed(0)
    module = classifier(mixup=MIXUP_ONLY, label_smoothing=0.0)
    module.log = lambda *args, **kwargs: None  # no Trainer here: Lightning's logging is not what is tested
    images = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    seen, loss = seen_by_the_network(module, images, labels)
    x, mirror = images.float(), images.flip(0).float()
    lam = float(((seen - mirror) * (x - mirror)).sum() / ((x - mirror) ** 2).sum())  # least squares for lam
    assert 0.0 < lam < 1.0 and torch.allclose(seen, lam * x + (1 - lam) * mirror, atol=1e-3)
    targets = lam * F.one_hot(labels, 10) + (1 - lam) * F.one_hot(labels.flip(0), 10)
    with torch.no_grad():
        expected = F.cross_entropy(module(seen), targets.float())
    assert torch.allclose(loss, expected, atol=1e-5)

    seen_odd, _ = seen_by_the_network(module, images[:5], labels[:5])
    assert torch.equal(seen_odd, images[:5].float())
    plain = classifier(label_smoothing=0.0)
    plain.log = lambda *args, **kwargs: None
    assert plain.mix is None and torch.equal(seen_by_the_network(plain, images, labels)[0], x)


def test_a_run_with_mixup_and_cutmix_trains(tiny_data: Path, tmp_path: Path) -> None:
    """mixup.* from the command line reach the module, and a run mixing every batch completes."""
    cfg = compose_cfg([*ONE_BATCH, f"data.root={tiny_data}", f"run_dir={tmp_path}", "mixup.mixup_alpha=0.2",
                       "mixup.cutmix_alpha=1.0", "data.batch_size=8"])
    mix = build_module(cfg, resolve_runtime(cfg)).mix
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.mix_prob) == (0.2, 1.0, 1.0)
    train(cfg)
    summary = read_summary(tmp_path)
    assert summary.status == "completed" and np.isfinite(summary.best_val_loss)


def test_layer_decay_gives_each_backbone_layer_its_rate_and_the_optimizer_uses_it() -> None:
    """layer_decay=0.5: the head at the optimizer's rate, the backbone's top layer at backbone_lr_mult times it and
    each layer below at half the rate of the one above, every backbone weight in one group, frozen ones too (so
    unfreezing needs no new group). One AdamW step moves a weight by about its group's rate (the first step's
    update is the gradient's sign), which shows the rates reach the optimizer."""
    cfg = compose_cfg([*TINY, "layer_decay=0.5", "backbone_lr_mult=0.5", "optimizer.lr=0.01",
                       "optimizer.weight_decay=0", "scheduler=none"])
    module = build_module(cfg, resolve_runtime(cfg))
    module.backbone.requires_grad_(False)  # as the head phase leaves it: still in the groups
    groups = module.param_groups()
    module.backbone.requires_grad_(True)
    backbone = groups[1:]
    assert groups[0]["name"] == "head" and groups[0]["lr"] == 0.01 and len(backbone) > 3
    assert backbone[-1]["lr"] == pytest.approx(0.005)
    assert [g["lr"] for g in backbone[:-1]] == pytest.approx([g["lr"] / 2 for g in backbone[1:]])
    grouped = [id(p) for g in backbone for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in module.backbone.parameters())  # each once
    optimizer = torch.optim.AdamW(groups, lr=0.01, weight_decay=0)
    before = [[p.detach().clone() for p in g["params"]] for g in groups]
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    F.cross_entropy(module(x), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    for group, old in zip(groups, before, strict=True):
        moved = max(float((p.detach() - o).abs().max()) for p, o in zip(group["params"], old, strict=True))
        assert moved == pytest.approx(group["lr"], rel=0.05), group["name"]


def test_a_run_with_layer_decay_trains(tiny_data: Path, tmp_path: Path) -> None:
    """layer_decay from the command line reaches a run of an unfreezing phase, whose rates metrics.csv logs."""
    cfg = compose_cfg([*ONE_BATCH, f"data.root={tiny_data}", f"run_dir={tmp_path}", "layer_decay=0.8", "unfreeze=1.0"])
    train(cfg)
    summary = read_summary(tmp_path)
    assert summary.status == "completed" and np.isfinite(summary.best_val_loss)


def test_a_multi_scale_network_predicts_the_mean_of_its_scales_with_a_head_fitted_on_all(tiny_data: Path,
                                                                                         tmp_path: Path) -> None:
    """model.scales: the head fit has a row per photo, view and scale; the checkpoint rebuilds the network with its
    scales, and in evaluation its output is the log of the mean of the per-scale probabilities."""
    cfg = compose_cfg([*TINY, f"data.root={tiny_data}", "phase=head", "head_fit.views=1", "model.scales=[1,1.5]",
                       f"paths.output_dir={tmp_path / 'out'}", f"run_dir={tmp_path / 'run'}"])
    summary = train(cfg)
    assert summary.status == "completed"
    assert summary.head_fit["scales"] == 2 and summary.head_fit["images"] == summary.num_train * 2 * 2
    net, meta = load_checkpoint(summary.phase_checkpoint)
    assert meta["scales"] == [1.0, 1.5] and net.scales == (1.0, 1.5)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        at_scale = [net.head(net.features(images, s)).softmax(1) for s in net.scales]
        assert net.features(images, 1.5).shape == net.features(images).shape  # pooled: any input size
        mixture = net(images).softmax(1)
    assert torch.allclose(mixture, (at_scale[0] + at_scale[1]) / 2, atol=1e-5)
    assert not torch.allclose(mixture, at_scale[0], atol=1e-5)  # the second scale counts
    sizes = []  # in training, each batch at one of the scales
    net.backbone.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[-1]))
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(12):
            net.train()(images)
    assert sorted(set(sizes)) == [64, 96] and len(sizes) == 12
    net.eval()
    exported = export_onnx(summary.phase_checkpoint, tmp_path / "net.onnx")  # onnxruntime agrees, or it raises
    assert exported["scales"] == [1.0, 1.5] and exported["max_abs_diff"] <= 1e-4
