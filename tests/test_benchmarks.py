"""benchmarks/gpu.py --end-to-end, benchmarks/gpu_suite.sh and benchmarks/gpu_check.py, smoke-tested on the CPU with a
tiny model (the rates mean nothing here; the GPU numbers come from running the suite on a GPU machine)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO

SMOKE = ["--device", "cpu", "--model", "test_efficientnet", "--image-size", "64", "--steps", "2", "--warmup", "1",
         "--workers", "0", "--predict-images", "8", "--views", "2"]


def table_rows(text: str) -> list[list[str]]:
    """The data rows of the Markdown tables in ``text`` (header and separator rows left out)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| card")]
    return [r for r in rows if not r[0].startswith("---")]


def close(ratio: float, num: float, den: float) -> bool:
    """``ratio`` (2 decimals) is num/den, given that both rates are printed rounded to whole images/s."""
    return abs(ratio - num / den) <= 0.006 + num / den * (0.5 / num + 0.5 / den)


def check_tables(text: str, batch_sizes: list[int]) -> None:
    rows = table_rows(text)
    assert len(rows) == 2 * len(batch_sizes), text  # a training row and a predict row per batch size
    train, predict = rows[:len(batch_sizes)], rows[len(batch_sizes):]
    for row, batch_size in zip(train, batch_sizes, strict=True):
        assert row[0].startswith("CPU") and int(row[1]) == batch_size
        model_only, loader, e2e, e2e_ratio, loader_ratio = map(float, row[2:])
        assert min(model_only, loader, e2e) > 0
        assert close(e2e_ratio, e2e, model_only) and close(loader_ratio, loader, model_only)
    for row in predict:
        raw, plain, ratio, tta, tta_ratio = map(float, row[2:])
        assert min(raw, plain, tta) > 0 and close(ratio, plain, raw) and close(tta_ratio, plain, 2 * tta)


@pytest.mark.slow  # ~20-25 s on 2 shared cores: a fit, a loader pass and four predict runs
def test_end_to_end_mode_runs_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """Model-only, loader alone, carnet's train() and predict (plain, TTA) over demo JPEGs written on the fly."""
    spec = importlib.util.spec_from_file_location("carnet_bench_gpu", REPO / "benchmarks" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gpu  # train() builds gpu.StepTimer by its import path
    try:
        spec.loader.exec_module(gpu)
        gpu.main(["--end-to-end", *SMOKE, "--batch-size", "4"])
    finally:
        del sys.modules[spec.name]
    out = capsys.readouterr().out
    check_tables(out, [4])
    assert "end-to-end / model-only" in out and "TTA 2 / (2 x plain)" in out


@pytest.mark.slow
def test_gpu_suite_script_smoke(tmp_path) -> None:
    """The suite script as the GPU machine runs it (here with the venv's packages, so no wheels are unpacked)."""
    env = {**os.environ, "PYTHON": str(REPO / ".venv" / "bin" / "python"), "CARNET_WHEELS": str(tmp_path)}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), *SMOKE, "--batch-size", "4", "8"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_tables(proc.stdout, [4, 8])
    assert re.search(r"gpu_suite.sh: \d+ s", proc.stdout)


@pytest.mark.slow
def test_gpu_check_script_smoke() -> None:
    """benchmarks/gpu_check.py on a CPU: real train.py runs of each pixel pipeline, compared epoch by epoch with the
    reference run of the same pipeline. The same seed and code on one machine must give the same losses, and a
    tolerance of 0 says so; a run given no time is stopped and reported with where it was."""
    script = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--epochs", "2",
              "--per-class", "4", "--image-size", "64"]
    proc = subprocess.run([*script, "--tolerance", "0"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("reference: CPU fp32") == 2 and proc.stdout.count("\nok data.decode=") == 2
    assert "gpu_check: all runs agree with the CPU" in proc.stdout
    hung = subprocess.run([*script, "--decode", "cpu", "--run-limit", "1"], capture_output=True, text=True, timeout=600)
    assert hung.returncode == 1 and "gpu_check: FAILED: the CPU reference run" in hung.stdout
    assert "still running after 1 s; its stacks:" in hung.stdout and "File " in hung.stdout  # a Python stack


@pytest.mark.slow  # ~35 s on 2 shared cores: three train.py runs
def test_head_fit_cost_script_smoke() -> None:
    """benchmarks/head_fit_cost.py on a CPU: the phase with and without the head fit, and the table's cost is the
    difference of the two runs' seconds; a --variant's overrides reach its own run (fewer images), in a row of its
    own against the same run without the head fit."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "head_fit_cost.py"), "--device", "cpu",
                           "--model", "test_efficientnet", "--image-size", "64", "--photos", "40", "--workers", "0",
                           "--variant", "head_fit.max_images=10 head_fit.pseudo_label=null"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| 64 |")]
    assert [cells[1] for cells in rows] == ["defaults", "head_fit.max_images=10 head_fit.pseudo_label=null"]
    images = [int(cells[4].replace(",", "")) for cells in rows]
    assert images[0] > 10 and 0 < images[1] <= 10, images
    for cells in rows:
        logged, run, without, cost = map(float, cells[8:12])
        assert logged > 0 and cost == pytest.approx(run - without, abs=0.11)
    assert float(rows[0][9]) > float(rows[0][10])  # the defaults' head fit of 480 images costs time
    assert rows[0][10] == rows[1][10]  # one run without the head fit for both
