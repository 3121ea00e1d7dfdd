"""GPU fast paths for the competition recipe: tf_efficientnet_b6 training at 448 px, fp32 vs bf16 vs channels_last
vs torch.compile.

    python benchmarks/gpu.py [--model tf_efficientnet_b6] [--image-size 448] [--batch-size 16] [--steps 20]
                             [--no-compile] [--no-max-batch] [--train-images 15561]

For each variant: training images/s (forward, label-smoothed cross-entropy, backward, AdamW step; the network is
carnet's CarNet with its linear head and the B6 config's dropout / drop path), peak GPU memory at
``--batch-size``, the largest batch that fits (doubling, then bisection to a multiple of 8; not for the compiled
variant, whose every new batch size recompiles), and the epoch time this rate gives for ``--train-images``
(15,561: the competition's training set). Batches are random tensors already on the GPU, so these are the
model's rates: the loader must deliver as many images/s (see benchmarks/loader.py for images/s per CPU core).
cudnn.benchmark is on, as carnet turns it on for GPU runs. Needs a CUDA GPU; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from carnet.models.heads import build_head  # noqa: E402
from carnet.models.network import CarNet, create_backbone  # noqa: E402

NUM_CLASSES = 10
DEVICE = "cuda"  # a module constant so the step code can be smoke-tested on a CPU
HEAD = {"_target_": "carnet.models.heads.LinearHead", "dropout": 0.5}


@dataclass
class Variant:
    name: str
    dtype: torch.dtype | None  # autocast dtype; None = fp32
    channels_last: bool
    compile: bool


def build_net(model: str, variant: Variant) -> CarNet:
    backbone = create_backbone(model, pretrained=False, drop_rate=0.5, drop_path_rate=0.2)
    net = CarNet(backbone, build_head(HEAD, backbone.num_features, NUM_CLASSES)).to(DEVICE).train()
    if variant.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if variant.compile:
        net.compile()  # in place, as carnet's model.compile=true does
    return net


Step = Callable[[torch.Tensor, torch.Tensor], None]


def make_step(net: CarNet, variant: Variant) -> tuple[Step, torch.optim.Optimizer]:
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(DEVICE, enabled=variant.dtype is torch.float16)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        if variant.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast(DEVICE, dtype=variant.dtype) if variant.dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            loss = F.cross_entropy(net(images), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step, optimizer


def batch(size: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(size, 3, image_size, image_size, device=DEVICE),
            torch.randint(0, NUM_CLASSES, (size,), device=DEVICE))


def free() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def measure(model: str, variant: Variant, batch_size: int, image_size: int, steps: int, warmup: int) -> dict:
    """images/s over ``steps`` steps after ``warmup`` (compile happens there: its time is reported apart)."""
    net = build_net(model, variant)
    step, optimizer = make_step(net, variant)
    images, labels = batch(batch_size, image_size)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(warmup):
        step(images, labels)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        step(images, labels)
    end.record()
    torch.cuda.synchronize()
    seconds = begin.elapsed_time(end) / 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30
    del net, optimizer, step, images, labels
    free()
    return {"rate": batch_size * steps / seconds, "peak_gib": peak, "warmup_s": warmup_s}


def fits(model: str, variant: Variant, size: int, image_size: int) -> bool:
    """Whether two training steps at batch ``size`` run without running out of GPU memory."""
    net = step = optimizer = images = labels = None
    try:
        net = build_net(model, variant)
        step, optimizer = make_step(net, variant)
        images, labels = batch(size, image_size)
        for _ in range(2):  # the second step also holds AdamW's state
            step(images, labels)
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del net, step, optimizer, images, labels
        free()


def largest_batch(model: str, variant: Variant, image_size: int, start: int, limit: int = 4096) -> int:
    """Doubling from ``start`` until a batch does not fit, then bisection down to a multiple of 8."""
    if not fits(model, variant, start, image_size):
        lo, hi = 0, start
    else:
        lo, hi = start, start * 2
        while hi <= limit and fits(model, variant, hi, image_size):
            lo, hi = hi, hi * 2
    while hi - lo > 8:
        mid = (lo + hi) // 2 // 8 * 8 or (lo + hi) // 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if fits(model, variant, mid, image_size) else (lo, mid)
    return lo


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tf_efficientnet_b6")
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile needs them)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch search")
    ap.add_argument("--train-images", type=int, default=15561, help="images per epoch for the epoch-time estimate")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(f"benchmarks/gpu.py needs a CUDA GPU, and torch {torch.__version__} sees none here "
                 f"(torch.cuda.is_available() is False). Run it on a GPU machine: python benchmarks/gpu.py")

    torch.backends.cudnn.benchmark = True  # what carnet's trainer.benchmark=null gives on a GPU
    low = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    low_name = "bf16" if low is torch.bfloat16 else "fp16"
    variants = [
        Variant("fp32", None, False, False),
        Variant(low_name, low, False, False),
        Variant(f"{low_name}+channels_last", low, True, False),
    ]
    if not a.no_compile:
        variants.append(Variant(f"{low_name}+channels_last+compile", low, True, True))
    name = torch.cuda.get_device_name()
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(f"{name} ({total:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}; {a.model} at "
          f"{a.image_size} px, batch {a.batch_size}, AdamW, label smoothing 0.1", flush=True)

    rows = []
    for variant in variants:
        warmup = a.warmup + (10 if variant.compile else 0)
        result = measure(a.model, variant, a.batch_size, a.image_size, a.steps, warmup)
        if not a.no_max_batch and not variant.compile:
            result["max_batch"] = largest_batch(a.model, variant, a.image_size, a.batch_size)
        rows.append((variant, result))
        print(f"  {variant.name}: {result['rate']:.1f} images/s, peak {result['peak_gib']:.1f} GiB, "
              f"warm-up {result['warmup_s']:.0f} s", flush=True)

    base = rows[0][1]["rate"]
    print(f"\n{'variant':<28} {'images/s':>9} {'vs fp32':>8} {'peak GiB':>9} {'max batch':>10} "
          f"{'epoch (' + str(a.train_images) + ' img)':>20}")
    for variant, r in rows:
        epoch = a.train_images / r["rate"]
        max_batch = str(r.get("max_batch", "-"))
        print(f"{variant.name:<28} {r['rate']:>9.1f} {r['rate'] / base:>7.2f}x {r['peak_gib']:>9.1f} "
              f"{max_batch:>10} {f'{epoch / 60:.1f} min':>20}")
    print(f"peak GiB at batch {a.batch_size}; max batch: largest that trains (multiple of 8); epoch: training "
          f"images / rate, model only (no loader stalls, no validation); compile warm-up includes compilation")


if __name__ == "__main__":
    main()
