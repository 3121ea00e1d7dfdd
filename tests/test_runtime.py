"""Every `auto` resolved once, from the device the run trains on (carnet/runtime.py, issue 19 item 3): what each
resolves to on the CPU and on a (faked) CUDA machine, that the built objects run with exactly that, and that
summary.json says so."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch

from carnet.errors import ConfigError, DataError
from carnet.inference.runner import Runner
from carnet.runtime import Runtime, default_num_workers, resolve_runtime
from carnet.training.builders import build_datamodule, build_module
from carnet.training.train import train
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import ONE_BATCH, TINY
from tests.helpers.paths import REPO


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> callable:
    """Make torch report a CUDA device (only the resolvers look; nothing runs on it)."""

    def make(bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)

    return make


def resolved(*overrides: str) -> Runtime:
    return resolve_runtime(compose_cfg(list(overrides)))


def test_precision_resolves_per_device(fake_gpu: callable) -> None:
    if not torch.cuda.is_available():
        assert resolved("trainer.precision=auto").precision == "32-true"  # Lightning's name for fp32
    assert resolved("trainer.accelerator=cpu", "trainer.precision=auto").precision == "32-true"
    fake_gpu(bf16=True)
    assert resolved("trainer.accelerator=gpu", "trainer.precision=16-mixed").precision == "16-mixed"  # kept
    assert resolved("trainer.precision=auto").precision == "bf16-mixed"
    assert resolved("trainer=cpu", "trainer.precision=auto").precision == "32-true"  # trainer=cpu on a GPU machine
    fake_gpu(bf16=False)
    assert resolved("trainer=gpu", "trainer.precision=auto").precision == "16-mixed"


def test_benchmark_compile_fused_and_async_save_resolve_per_device(fake_gpu: callable) -> None:
    autos = ("trainer.benchmark=null", "model.compile=auto", "optimizer.fused=auto", "checkpoint.async_save=auto")
    if not torch.cuda.is_available():
        here = resolved(*autos)
        assert (here.device, here.benchmark, here.compile, here.fused, here.async_save) == ("cpu", False, False,
                                                                                            False, False)
    assert resolved("trainer=cpu", "trainer.benchmark=true", "model.compile=regional").benchmark is True
    assert resolved("optimizer=sgd").fused is None  # no such option, nothing passed
    fake_gpu()
    explicit = resolved("trainer=gpu", "trainer.benchmark=false", "model.compile=true", "optimizer.fused=true",
                        "checkpoint.async_save=true")
    assert (explicit.benchmark, explicit.compile, explicit.fused, explicit.async_save) == (False, True, True, True)
    gpu = resolved(*autos)
    assert (gpu.device, gpu.benchmark, gpu.compile, gpu.fused, gpu.async_save) == ("cuda", True, "regional", True,
                                                                                   True)
    cpu = resolved("trainer=cpu", *autos)
    assert (cpu.device, cpu.benchmark, cpu.compile, cpu.fused, cpu.async_save) == ("cpu", False, False, False, False)


def test_gpu_paths_not_yet_measured_on_a_gpu_are_opt_in(fake_gpu: callable) -> None:
    """On a CUDA machine the default config turns on only what was measured there (docs/performance.md, "Measured
    where"): bf16, channels_last, cudnn.benchmark and fused AdamW, not GPU decoding, regional compile or background
    checkpoint writes."""
    fake_gpu()
    runtime = resolved()
    assert (runtime.device, runtime.precision, runtime.benchmark, runtime.fused) == ("cuda", "bf16-mixed", True, True)
    assert runtime.channels_last is True
    assert (runtime.compile, runtime.async_save, runtime.decode) == (False, False, "cpu")
    assert runtime.pin_memory is True


def test_channels_last_is_on_where_it_measured_faster(fake_gpu: callable) -> None:
    """model.channels_last=auto: NHWC on CPU and CUDA runs (both measured faster), typed values as typed."""
    assert resolved("trainer=cpu").channels_last is True
    assert resolved("trainer=cpu", "model.channels_last=false").channels_last is False
    fake_gpu()
    assert resolved("trainer=gpu").channels_last is True
    assert resolved("trainer=gpu", "model.channels_last=false").channels_last is False
    assert resolved("trainer=cpu").channels_last is True  # trainer=cpu on a GPU machine


def test_loaders_pin_memory_only_for_a_cuda_run(fake_gpu: callable, tiny_data: Path) -> None:
    """trainer=cpu on a GPU machine: no page-locked batches (they used to follow torch.cuda.is_available())."""
    fake_gpu()
    cfg = compose_cfg([*TINY, f"data.root={tiny_data}", "data.verify=false"])
    runtime = resolve_runtime(cfg)
    datamodule = build_datamodule(cfg, build_module(cfg, runtime), runtime)
    datamodule.setup("fit")
    assert runtime.device == "cpu" and datamodule.train_dataloader().pin_memory is False


def test_num_workers_auto_is_the_usable_cores_up_to_8() -> None:
    assert resolved("data.num_workers=auto").num_workers == default_num_workers() == min(8, len(
        os.sched_getaffinity(0)))
    assert resolved("data.num_workers=3").num_workers == 3


def test_decode_gpu_without_cuda_says_so_once_and_keeps_the_cpu_pipeline(caplog: pytest.LogCaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with caplog.at_level(logging.INFO, logger="carnet.runtime"):
        assert resolved("data.decode=gpu").decode == "cpu"
    lines = [r.getMessage() for r in caplog.records if "data.decode" in r.getMessage()]
    assert len(lines) == 1 and "no CUDA device" in lines[0] and lines[0].count("\n") == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="carnet.runtime"):
        assert resolved("data.decode=auto").decode == "cpu"
    assert not [r for r in caplog.records if "data.decode" in r.getMessage()]  # auto picks the CPU silently


def test_decode_auto_on_cuda_follows_the_augment_and_the_cache(fake_gpu: callable,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    fake_gpu()
    assert resolved("data.decode=auto").decode == "gpu"  # augment=light: the device can draw it
    assert resolved("data.decode=gpu", "augment=none").decode == "gpu"
    with caplog.at_level(logging.INFO, logger="carnet.runtime"):
        assert resolved("data.decode=auto", "augment=heavy").decode == "cpu"
        assert resolved("data.decode=auto", "data.cache=memory").decode == "cpu"
    why = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data.decode=auto")]
    assert "augment has" in why[0] and "Affine" in why[0] and "data.cache=memory keeps decoded images" in why[1]
    with pytest.raises(DataError, match=r"^data\.decode=gpu: augment has .*Affine.*; use data\.decode=cpu$"):
        resolved("data.decode=gpu", "augment=heavy")
    assert resolved("trainer=cpu", "data.decode=auto").decode == "cpu"


def test_decode_device_runs_the_byte_path_anywhere() -> None:
    assert resolved("data.decode=device").decode == "device"
    with pytest.raises(DataError, match=r"^data\.decode=device: augment has .*Affine"):
        resolved("data.decode=device", "augment=heavy")


def test_predict_resolves_device_amp_and_workers(fake_gpu: callable) -> None:
    """conf/predict.yaml's device=auto, amp=auto and data.num_workers=auto, resolved once into predict's Runner."""
    cfg = compose_cfg(["ckpt=x.ckpt"], config_name="predict")
    if not torch.cuda.is_available():
        assert Runner.from_config(cfg) == Runner(device="cpu", batch_size=32, num_workers=default_num_workers(),
                                                 channels_last=True, amp=False, draft=True)
    fake_gpu()
    gpu = Runner.from_config(cfg)
    assert (gpu.device, gpu.amp) == ("cuda", True)
    cpu = Runner.from_config(compose_cfg(["ckpt=x.ckpt", "device=cpu", "data.num_workers=0"], config_name="predict"))
    assert (cpu.device, cpu.amp, cpu.num_workers) == ("cpu", False, 0)
    assert Runner.from_config(compose_cfg(["ckpt=x.ckpt", "device=cpu", "amp=true"], config_name="predict")).amp


def test_summary_json_says_what_the_run_ran_with(tiny_data: Path, tmp_path: Path) -> None:
    """summary.json's `resolved` holds every auto as resolved, and the run's own objects (Trainer, network,
    optimizer, loader) ran with exactly that."""
    run_dir, probe = tmp_path / "run", tmp_path / "what_ran.json"
    train(compose_cfg([*ONE_BATCH, f"data.root={tiny_data}", f"run_dir={run_dir}", "trainer.precision=auto",
                       "data.num_workers=auto", "checkpoint.async_save=auto",
                       f"+callbacks.what_ran={{_target_: tests.helpers.probes.WhatRan, path: '{probe}'}}"]))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resolved"] == json.loads(probe.read_text())
    if not torch.cuda.is_available():
        assert summary["resolved"] == {
            "device": "cpu", "trainer.precision": "32-true", "trainer.benchmark": False, "model.channels_last": True,
            "model.compile": False, "optimizer.fused": False, "checkpoint.async_save": False, "data.decode": "cpu",
            "data.num_workers": default_num_workers(), "pin_memory": False, "world_size": 1}


def test_the_docs_table_lists_every_resolved_value() -> None:
    """docs/architecture.md's table of `auto` values names every key of summary.json's `resolved`."""
    text = (REPO / "docs" / "architecture.md").read_text()
    table = text[text.index("## Every `auto`"):]
    keys = set(re.findall(r"`resolved\.([\w.]+)`", table))
    assert keys == set(resolved().summary()), keys


@pytest.mark.parametrize("trainer", [["trainer=cpu"], ["trainer=ddp", "trainer.accelerator=cpu"],
                                     ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=3"],
                                     ["trainer=ddp", "trainer.accelerator=cpu", "+trainer.num_nodes=2"],
                                     ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices='2'"],
                                     ["trainer.accelerator=cpu", "trainer.devices=2"]])
def test_world_size_is_the_processes_lightning_trains_in(trainer: list[str]) -> None:
    """The budget plans one process's steps before the Trainer exists: its count of processes is Lightning's
    (build_trainer checks the two agree on every run)."""
    import pytorch_lightning as pl

    cfg = compose_cfg(trainer)
    built = pl.Trainer(**{k: cfg.trainer[k] for k in ("accelerator", "devices", "num_nodes", "strategy")
                          if k in cfg.trainer},
                       logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert resolve_runtime(cfg).world_size == built.world_size


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused_in_one_line() -> None:
    """trainer=gpu and predict's device=cuda were 60-70 lines of Lightning's and torch's traceback here."""
    with pytest.raises(ConfigError) as err:
        resolved("trainer=gpu")
    assert str(err.value) == ("trainer.accelerator=gpu: this machine has no CUDA device (torch sees none); use "
                              "trainer=cpu")
    with pytest.raises(ConfigError) as err:
        Runner.from_config(compose_cfg(["ckpt=x.ckpt", "device=cuda:1"], config_name="predict"))
    assert str(err.value) == ("device=cuda:1: this machine has no CUDA device (torch sees none); use device=auto or "
                              "device=cpu")
