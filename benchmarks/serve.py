"""Load test of the web service on loopback: gunicorn (default) or the Flask dev server, torch and ONNX.

    python benchmarks/serve.py --ckpt best.ckpt --image car.jpg [--requests 2000] [--clients 8] [--workers 2]

For each backend it starts the service on a free 127.0.0.1 port, waits for /health, then
  1. sends 200 requests from one client: the unloaded latency and the server's CPU per request, compared
     with the raw model forward (batch 1, same image, same thread count, in this process, timed just before
     and after) -- goal: p50 ratio <= 1.3 for torch;
  2. sends --requests requests from --clients concurrent clients (a bounded count, and a --max-seconds cap):
     requests/s, p50/p99 latency, errors, and the server's RSS (master + workers) before and after.
The ONNX file is exported from the checkpoint into a temporary folder unless --onnx gives one. Each request
posts the image as a raw ``image/jpeg`` body on a fresh connection (gunicorn's sync workers close each one).
Only loopback addresses are used; every loop is bounded.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

HOST = "127.0.0.1"


def synthetic_jpeg(width: int = 640, height: int = 480) -> bytes:
    """A photo-sized JPEG (the Kaggle photos are 640x480) when no --image is given."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / width
    pixels = np.stack([np.sin(x * rng.uniform(3, 12) + y * rng.uniform(3, 12)) for _ in range(3)], -1)
    noise = rng.normal(0, 0.1, pixels.shape)
    buf = io.BytesIO()
    Image.fromarray(((pixels + noise + 1) * 120).clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class RawForward:
    """``net(x)`` at batch 1 on the preprocessed image, in this process, with the workers' thread count.

    It is timed right before and right after each backend's one-client phase, so that both see the same load
    from whatever else runs on the machine. CPU time is reported too: on a shared machine wall-clock latencies
    swing with other people's load, while the CPU a request costs does not.
    """

    def __init__(self, ckpt: Path, image: bytes, threads: int) -> None:
        import torch

        from carnet.data.eval_view import EvalView
        from carnet.models.checkpoint import load_checkpoint
        from carnet.serving.upload import decode_upload

        torch.set_num_threads(threads)
        self.torch = torch
        self.net, meta = load_checkpoint(ckpt)
        view = EvalView.of(meta)
        # The service's decode (reduced-scale JPEG down to what the eval view needs) and view: what it classifies.
        self.x = torch.from_numpy(view.batch(decode_upload(image, min_side=view.resize_to)))

    def time(self, runs: int) -> tuple[list[float], list[float]]:
        """(wall ms, CPU ms) of ``runs`` forwards after 5 warm-up ones."""
        wall, cpu = [], []
        with self.torch.inference_mode():
            for i in range(runs + 5):
                started, cpu_started = time.perf_counter(), time.process_time()
                self.net(self.x)
                if i >= 5:
                    wall.append((time.perf_counter() - started) * 1000)
                    cpu.append((time.process_time() - cpu_started) * 1000)
        return wall, cpu


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def tree_memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MB of a process and all its descendants (gunicorn master + workers), from /proc.

    RSS counts the shared libraries (torch's alone are ~0.7 GB) once per process; PSS splits shared pages
    between the processes that map them, so it is what the tree really costs.
    """
    totals, stack = [0, 0], [pid]
    while stack:
        p = stack.pop()
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()
            for i, key in enumerate(("Rss:", "Pss:")):
                totals[i] += next(int(line.split()[1]) for line in rollup if line.startswith(key))
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError, StopIteration):
            continue
    return totals[0] / 1024, totals[1] / 1024


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by a process and its descendants (from /proc/<pid>/stat)."""
    total, stack, tick = 0.0, [pid], os.sysconf("SC_CLK_TCK")
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def start_server(server: str, ckpt: Path, backend: str, workers: int, threads: int, port: int) -> subprocess.Popen:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO)}
    if server == "gunicorn":
        factory = f"carnet.serving.app:create_app(ckpt={str(ckpt)!r}, backend={backend!r}, num_threads={threads})"
        args = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"{HOST}:{port}", "--timeout", "120",
                "--log-level", "warning", factory]
    else:
        args = [sys.executable, "-m", "carnet.serving.app", "--ckpt", str(ckpt), "--backend", backend, "--host", HOST,
                "--port", str(port), "--threads", str(threads)]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "image/jpeg"} if body else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}: {proc.stderr.read().decode()[-3000:]}")
        try:
            status, body = request(port, "GET", "/health")
            if status == 200:
                return json.loads(body)
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server on port {port} not healthy after {timeout:.0f} s")


def drive(port: int, image: bytes, total: int, clients: int, max_seconds: float, progress=None) -> dict:
    """``total`` POST /predict from ``clients`` threads (stops early at ``max_seconds``): latencies and errors."""
    lock = threading.Lock()
    state = {"next": 0, "errors": 0, "first_error": None}
    latencies: list[float] = []
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                if state["next"] >= total:
                    return
                state["next"] += 1
            started = time.perf_counter()
            try:
                status, body = request(port, "POST", "/predict", image)
                ok = status == 200 and "class_id" in json.loads(body)
                error = None if ok else f"HTTP {status}: {body[:200]!r}"
            except Exception as err:  # connection reset, timeout: counted, never fatal to the benchmark
                error = f"{type(err).__name__}: {err}"
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                latencies.append(elapsed)
                if error:
                    state["errors"] += 1
                    state["first_error"] = state["first_error"] or error
            if progress is not None:
                progress()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    return {"requests": len(latencies), "errors": state["errors"], "first_error": state["first_error"],
            "seconds": seconds, "rps": len(latencies) / seconds, "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99)}


def bench_backend(args: argparse.Namespace, backend: str, model_path: Path, image: bytes,
                  forward: RawForward) -> dict:
    from rich.progress import Progress

    port = free_port()
    proc = start_server(args.server, model_path, backend, args.workers, args.threads, port)
    try:
        started = time.monotonic()
        health = wait_healthy(port, proc)
        boot = time.monotonic() - started
        drive(port, image, 10 * args.workers, args.workers, 120)  # warm-up: every worker has served
        rss_before = tree_memory_mb(proc.pid)
        wall_before, cpu_before = forward.time(args.forward_runs)
        cpu_started = tree_cpu_seconds(proc.pid)
        single = drive(port, image, args.single_requests, 1, args.max_seconds)
        single["cpu_ms"] = (tree_cpu_seconds(proc.pid) - cpu_started) * 1000 / max(1, single["requests"])
        wall_after, cpu_after = forward.time(args.forward_runs)
        single["forward_ms"] = statistics.median(wall_before + wall_after)
        single["forward_cpu_ms"] = statistics.median(cpu_before + cpu_after)
        with Progress(transient=True) as bar:
            task = bar.add_task(f"{backend}: {args.requests} requests, {args.clients} clients", total=args.requests)
            loaded = drive(port, image, args.requests, args.clients, args.max_seconds,
                           progress=lambda: bar.advance(task))
        rss_after = tree_memory_mb(proc.pid)
    finally:
        stop_server(proc)
    return {"backend": backend, "model": health["model"], "boot_s": boot, "single": single, "loaded": loaded,
            "rss_before": rss_before, "rss_after": rss_after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="carnet checkpoint (.ckpt)")
    parser.add_argument("--image", type=Path, default=None, help="JPEG to send (default: a synthetic 640x480 one)")
    parser.add_argument("--onnx", type=Path, default=None, help="ONNX file (default: exported from --ckpt)")
    parser.add_argument("--backends", nargs="+", choices=["torch", "onnx"], default=["torch", "onnx"])
    parser.add_argument("--server", choices=["gunicorn", "dev"], default="gunicorn")
    parser.add_argument("--requests", type=int, default=2000, help="requests of the concurrent phase")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--single-requests", type=int, default=200, help="requests of the one-client phase")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (the dev server has one process)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads per worker "
                        "(default: CPU cores / workers)")
    parser.add_argument("--forward-runs", type=int, default=100,
                        help="raw forwards timed before and after each one-client phase")
    parser.add_argument("--max-seconds", type=float, default=600, help="cap on each phase's duration")
    args = parser.parse_args()
    if args.server == "dev":
        args.workers = 1
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    image = args.image.read_bytes() if args.image else synthetic_jpeg()

    forward = RawForward(args.ckpt, image, args.threads)
    print(f"server: {args.server}, {args.workers} worker(s) x {args.threads} thread(s); {args.clients} clients; "
          f"image {args.image or 'synthetic 640x480'} ({len(image) / 1024:.0f} KB)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            path = args.ckpt
            if backend == "onnx":
                path = args.onnx
                if path is None:
                    from carnet.inference.export import export_onnx

                    path = Path(tmp) / "model.onnx"
                    export_onnx(args.ckpt, path)
            results.append(bench_backend(args, backend, path, image, forward))

    print(f"\n{'backend':8} {'model':28} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>9} "
          f"{'RSS MB before->after':>21} {'PSS MB before->after':>21}")
    for r in results:
        c = r["loaded"]
        print(f"{r['backend']:8} {r['model']:28} {c['rps']:7.1f} {c['p50']:8.2f} {c['p99']:8.2f} "
              f"{c['errors']:>4}/{c['requests']:<4} {r['rss_before'][0]:11.0f} -> {r['rss_after'][0]:<6.0f} "
              f"{r['rss_before'][1]:11.0f} -> {r['rss_after'][1]:<6.0f}")
    print(f"\none client ({args.single_requests} requests) vs the raw torch forward at batch 1 timed around it:")
    print(f"{'backend':8} {'p50 ms':>8} {'forward p50':>12} {'ratio':>6}   {'CPU ms/request':>14} {'forward CPU':>12} "
          f"{'ratio':>6}")
    for r in results:
        s = r["single"]
        print(f"{r['backend']:8} {s['p50']:8.2f} {s['forward_ms']:12.2f} {s['p50'] / s['forward_ms']:6.2f}   "
              f"{s['cpu_ms']:14.2f} {s['forward_cpu_ms']:12.2f} {s['cpu_ms'] / s['forward_cpu_ms']:6.2f}")
    for r in results:
        for phase in (r["single"], r["loaded"]):
            if phase["first_error"]:
                print(f"  first error ({r['backend']}): {phase['first_error']}")
    by = {r["backend"]: r for r in results}
    if "torch" in by:
        s = by["torch"]["single"]
        ratio = s["p50"] / s["forward_ms"]
        print(f"\ntorch: 1-client p50 / raw forward p50 = {ratio:.2f} (goal <= 1.3: "
              f"{'met' if ratio <= 1.3 else 'NOT met'}); under {args.clients} clients p50 / forward = "
              f"{by['torch']['loaded']['p50'] / s['forward_ms']:.2f} "
              f"(includes queueing: {args.clients} clients share {args.workers} worker(s))")
    if "torch" in by and "onnx" in by:
        print(f"onnx / torch throughput: {by['onnx']['loaded']['rps'] / by['torch']['loaded']['rps']:.2f}x")
    total_errors = sum(r["loaded"]["errors"] + r["single"]["errors"] for r in results)
    short = [r["backend"] for r in results if r["loaded"]["requests"] < args.requests]
    if short:
        print(f"stopped at --max-seconds before {args.requests} requests: {short}")
    sys.exit(1 if total_errors else 0)


if __name__ == "__main__":
    main()
