"""Web service: upload a car photo, get the class and top-k probabilities as JSON (Flask, gunicorn-ready).

::

    carnet-serve --ckpt best.ckpt --host 127.0.0.1 --port 8000        # development server
    gunicorn -w 2 -b 127.0.0.1:8000 'carnet.serving.app:create_app(ckpt="best.ckpt")'  # production

The model is loaded once per process, never per request, and only on the CPU: gunicorn (without
``--preload``) calls :func:`create_app` in each worker after the fork, so every worker loads its own copy and
the master never imports a model. Should a loaded model be forked anyway (``--preload``), the first request in
the child loads a fresh copy (the holder remembers the process id), because thread pools do not survive a fork.

Preprocessing is the training evaluation view: the image decoded like :func:`carnet.data.decode_image` (full
decode, RGB) and fed through :func:`carnet.data.transforms.build_eval_transform` with the checkpoint's own
size / normalisation / interpolation / crop. Uploads stay in memory; nothing is written to disk.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
from flask import Flask, Request, jsonify, request
from PIL import Image, UnidentifiedImageError
from werkzeug.exceptions import HTTPException

from carnet.data.transforms import build_eval_transform
from carnet.errors import CarnetError

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")
DEFAULT_MAX_CONTENT_LENGTH = 10 * 1024 * 1024  # bytes of one request body
# A photo has a few megapixels; a tiny file that claims far more is a decompression bomb. 40 MP covers any
# camera photo while keeping one decoded image under ~120 MB of RAM.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
RAW_BODY_TYPES = ("image/", "application/octet-stream")


class BadImage(CarnetError):
    """The uploaded bytes are not a usable image; the message says why (answered as 400)."""


class ModelLoadError(CarnetError):
    """The checkpoint / ONNX file cannot be served; the message names the file."""


# --------------------------------------------------------------------------------------------------------------
# Decoding and preprocessing


def decode_upload(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode uploaded bytes to RGB uint8 HxWx3, exactly as :func:`carnet.data.decode_image` does for files.

    The size a file claims is checked from its header before any pixel is decoded, so a decompression bomb
    costs nothing; a truncated file fails instead of being padded with grey (PIL's LOAD_TRUNCATED_IMAGES).
    """
    if not data:
        raise BadImage("empty upload: expected the bytes of a JPEG/PNG/WebP/BMP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage(f"not an image: {len(data)} bytes that no image decoder recognises "
                       "(expected a JPEG, PNG, WebP or BMP file)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(f"decompression bomb: the image claims more than the {max_pixels:,} pixels allowed "
                       f"(PIL: {err})") from None
    except Exception as err:  # PIL raises many types on malformed headers
        raise BadImage(f"truncated or corrupt image header ({type(err).__name__}: {err})") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise BadImage(f"decompression bomb: the {img.format} image claims {width}x{height} = "
                           f"{width * height:,} pixels, more than the limit of {max_pixels:,}")
        try:
            img.load()
            return np.asarray(img.convert("RGB"))
        except Exception as err:  # truncated or corrupt data: OSError, SyntaxError, zlib.error, ...
            raise BadImage(f"truncated or corrupt {img.format} image ({type(err).__name__}: {err})") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, so ONNX and torch probabilities are compared without float32 rounding."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def hflip_tta(run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray) -> np.ndarray:
    """Test-time augmentation: the image and its horizontal mirror in one batch of 2N, merged like predict.py's
    ``tta=true`` (:func:`carnet.inference.tta.merge_probs`, mean). Views are applied to the numpy batch so the
    ONNX backend gets them too.
    """
    import torch

    from carnet.inference.tta import merge_probs

    n = len(batch)
    probs = softmax(run(np.concatenate([batch, batch[..., ::-1]])))
    return merge_probs(torch.from_numpy(probs).view(2, n, -1)).numpy()


# --------------------------------------------------------------------------------------------------------------
# Backends: (N, 3, H, W) float32 -> (N, C) logits


class TorchBackend:
    """A carnet checkpoint run with PyTorch on the CPU (:func:`carnet.models.checkpoint.load_checkpoint`)."""

    name = "torch"

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None) -> None:
        import torch

        from carnet.models.checkpoint import load_checkpoint

        if num_threads:
            torch.set_num_threads(num_threads)
        self._torch = torch
        self.net, self.meta = load_checkpoint(path)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.net(self._torch.from_numpy(np.ascontiguousarray(batch))).float().numpy()


class OnnxBackend:
    """An ONNX file written by ``carnet-export``, run with onnxruntime on the CPU."""

    name = "onnx"

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None) -> None:
        import onnxruntime as ort

        from carnet.inference.export import read_onnx_meta

        self.meta = read_onnx_meta(path)
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


class Classifier:
    """Image array -> probabilities: the checkpoint's eval transform, the backend, optional flip TTA."""

    def __init__(self, path: str | os.PathLike, backend: str = "torch", tta: bool = False,
                 num_threads: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"ckpt={path}: file not found")
        if backend == "torch" and path.suffix == ".onnx":
            raise ModelLoadError(f"ckpt={path} is an ONNX file: serve it with backend='onnx' (--backend onnx)")
        if backend == "onnx" and path.suffix != ".onnx":
            raise ModelLoadError(f"backend='onnx' needs a .onnx file, got {path}: write one with "
                                 f"`carnet-export --ckpt {path} --out model.onnx`")
        self.backend = TorchBackend(path, num_threads) if backend == "torch" else OnnxBackend(path, num_threads)
        self.meta = self.backend.meta
        self.tta = tta
        m = self.meta
        self._transform_lock = threading.Lock()
        self.transform = build_eval_transform(m["image_size"], m["mean"], m["std"], m["interpolation"],
                                              m["crop_pct"])

    @property
    def model_name(self) -> str:
        return self.meta["model_name"]

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        # albumentations keeps per-call state on its transform objects; the dev server is threaded, and the
        # lock costs nothing next to the forward pass.
        with self._transform_lock:
            return self.transform(image=image)["image"].numpy()[None]

    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        """Class probabilities (float64, length C) of one RGB uint8 image."""
        batch = self.preprocess(image)
        probs = hflip_tta(self.backend, batch) if self.tta else softmax(self.backend(batch))
        return probs[0]


class ModelHolder:
    """Loads the classifier once per process (thread-safe), and again only in a process forked after loading."""

    def __init__(self, factory: Callable[[], Classifier]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._model: Classifier | None = None
        self._pid: int | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None and self._pid == os.getpid()

    def get(self) -> Classifier:
        if not self.loaded:
            with self._lock:
                if not self.loaded:
                    started = time.perf_counter()
                    self._model, self._pid = self._factory(), os.getpid()
                    log.info("pid %d loaded %s (%s) in %.1f s", self._pid, self._model.model_name,
                             self._model.backend.name, time.perf_counter() - started)
        assert self._model is not None
        return self._model


# --------------------------------------------------------------------------------------------------------------
# The Flask app


class InMemoryRequest(Request):
    """Multipart files stay in memory (Werkzeug spools parts over 500 KB to a temporary file on disk).

    The body is already bounded by MAX_CONTENT_LENGTH, so memory use per request is bounded too.
    """

    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None, content_length: int | None = None) -> IO[bytes]:
        return io.BytesIO()


def _error(status: int, message: str) -> tuple[Any, int]:
    return jsonify({"error": message, "status": status}), status


def _upload_bytes() -> bytes:
    """The image bytes of a request: multipart field ``file``, or a raw body with an image content type."""
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("file")
        if upload is None:
            fields = sorted({*request.files.keys(), *request.form.keys()})
            raise BadImage(f"multipart upload without a 'file' field (got fields {fields}): "
                           "send the image as `-F file=@car.jpg`")
        return upload.read()
    if request.mimetype.startswith(RAW_BODY_TYPES):
        return request.get_data(cache=False)
    if not request.content_length and not request.mimetype:
        raise BadImage("empty request: expected a multipart field 'file' or an image body (Content-Type image/*)")
    raise BadImage(f"unsupported Content-Type {request.mimetype or '(none)'!r}: send multipart/form-data with a "
                   "field 'file', or the raw image with Content-Type image/jpeg (or another image/*)")


def create_app(ckpt: str | os.PathLike, backend: str = "torch", tta: bool = False, top_k: int = 3, *,
               max_content_length: int = DEFAULT_MAX_CONTENT_LENGTH,
               max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, num_threads: int | None = None,
               lazy: bool = False) -> Flask:
    """The Flask app serving ``ckpt`` (a carnet ``.ckpt``, or an ``.onnx`` file with ``backend="onnx"``).

    The model loads here, in the calling process (a gunicorn worker), unless ``lazy``: then on the first
    request or health check. ``num_threads`` caps the backend's intra-op threads per process (give
    ``cores / workers`` to gunicorn workers so they do not oversubscribe the CPU).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if top_k < 1:
        raise ValueError(f"top_k={top_k}: expected a positive integer")
    ckpt = Path(ckpt)
    holder = ModelHolder(lambda: Classifier(ckpt, backend, tta, num_threads))
    if not lazy:
        holder.get()

    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config.update(MAX_CONTENT_LENGTH=max_content_length, MAX_FORM_MEMORY_SIZE=max_content_length,
                      MAX_IMAGE_PIXELS=max_image_pixels)
    app.json.sort_keys = False  # keep the documented key order: class_id, class_name, probability, ...
    app.extensions["carnet"] = holder

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException) -> tuple[Any, int]:
        code = err.code or 500
        if code == 413:
            limit = app.config["MAX_CONTENT_LENGTH"]
            return _error(413, f"request body too large: the limit is {limit:,} bytes ({limit / 2**20:.1f} MB)")
        if code == 405:
            allowed = ", ".join(sorted(err.valid_methods or [])) if hasattr(err, "valid_methods") else ""
            return _error(405, f"method {request.method} not allowed on {request.path}"
                               + (f"; use {allowed}" if allowed else ""))
        return _error(code, f"{err.name}: {err.description}")

    @app.errorhandler(BadImage)
    def bad_image(err: BadImage) -> tuple[Any, int]:
        return _error(400, str(err))

    @app.errorhandler(Exception)
    def internal_error(err: Exception) -> tuple[Any, int]:
        # One broken request (model failure, out of memory) must not take the worker down: log, answer 500.
        log.exception("error while serving %s %s", request.method, request.path)
        return _error(500, f"internal error while predicting: {type(err).__name__}: {err}")

    @app.get("/")
    def index() -> tuple[str, int, dict[str, str]]:
        return INDEX_HTML, 200, {"Content-Type": "text/html; charset=utf-8"}

    @app.get("/health")
    def health() -> tuple[Any, int]:
        try:
            model = holder.get()
        except Exception as err:
            log.exception("model failed to load")
            return _error(503, f"model not loaded: {type(err).__name__}: {err}")
        return jsonify({"status": "ok", "model": model.model_name, "num_classes": len(model.class_names),
                        "class_names": model.class_names, "backend": model.backend.name, "tta": model.tta,
                        "image_size": model.meta["image_size"], "pid": os.getpid()}), 200

    @app.post("/predict")
    def predict() -> tuple[Any, int]:
        started = time.perf_counter()
        image = decode_upload(_upload_bytes(), app.config["MAX_IMAGE_PIXELS"])
        model = holder.get()
        probs = model.predict_proba(image)
        order = np.argsort(-probs, kind="stable")[: min(top_k, len(probs))]
        names = model.class_names
        ranked = [{"class_id": int(k), "class_name": names[k], "probability": float(probs[k])} for k in order]
        return jsonify({**ranked[0], "top_k": ranked, "model": model.model_name,
                        "ms": round((time.perf_counter() - started) * 1000, 2)}), 200

    return app


# Self-contained on purpose (inline CSS and JS, no CDN): the page must work on an offline machine.
INDEX_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>carnet: which car is this?</title>
<style>
 body{font-family:system-ui,sans-serif;max-width:44rem;margin:2rem auto;padding:0 1rem;color:#222}
 h1{font-size:1.4rem} form{display:flex;gap:.5rem;align-items:center;flex-wrap:wrap}
 #preview{max-width:100%;max-height:18rem;margin-top:1rem;display:none;border-radius:4px}
 table{border-collapse:collapse;margin-top:1rem} td{padding:.3rem .6rem;vertical-align:middle}
 td:last-child{text-align:right}
 .bar{background:#3b7dd8;height:.9rem;border-radius:2px} .track{background:#e6e9ef;width:14rem;border-radius:2px}
 #status{margin-top:1rem;color:#555} .error{color:#b00020 !important} #model{color:#777;font-size:.85rem}
</style></head>
<body>
<h1>carnet &mdash; upload a car photo</h1>
<form id="form"><input id="file" name="file" type="file" accept="image/*" required>
<button id="submit" type="submit">Classify</button></form>
<img id="preview" alt="uploaded photo">
<div id="status"></div>
<table id="result" hidden><tbody></tbody></table>
<div id="model"></div>
<script>
const $ = (id) => document.getElementById(id);
$("file").addEventListener("change", () => {
  const f = $("file").files[0];
  if (f) { $("preview").src = URL.createObjectURL(f); $("preview").style.display = "block"; }
});
$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const f = $("file").files[0];
  if (!f) return;
  const body = new FormData(); body.append("file", f);
  $("status").className = ""; $("status").textContent = "classifying ..."; $("result").hidden = true;
  try {
    const response = await fetch("predict", {method: "POST", body});
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    const rows = $("result").tBodies[0]; rows.replaceChildren();
    for (const k of data.top_k) {
      const tr = rows.insertRow(), pct = (100 * k.probability).toFixed(1);
      tr.className = "prediction"; tr.insertCell().textContent = k.class_name;
      const track = document.createElement("div"), bar = document.createElement("div");
      track.className = "track"; bar.className = "bar"; bar.style.width = pct + "%"; track.append(bar);
      tr.insertCell().append(track); tr.insertCell().textContent = pct + " %";
    }
    $("result").hidden = false;
    $("status").textContent = data.class_name + " (" + (100 * data.probability).toFixed(1) + " %)";
    $("model").textContent = "model " + data.model + ", " + data.ms + " ms";
  } catch (err) {
    $("status").className = "error"; $("status").textContent = "error: " + err.message;
  }
});
</script>
</body></html>
"""


def main(argv: list[str] | None = None) -> None:
    """``carnet-serve``: the development server (use gunicorn in production)."""
    parser = argparse.ArgumentParser(prog="carnet-serve", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="carnet checkpoint (.ckpt), or .onnx with --backend onnx")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="torch or onnx (default: onnx for a .onnx file, else torch)")
    parser.add_argument("--tta", action="store_true", help="average the image and its horizontal mirror")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-mb", type=float, default=DEFAULT_MAX_CONTENT_LENGTH / 2**20,
                        help="largest accepted request body in MB (413 above)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads of the backend")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backend = args.backend or ("onnx" if args.ckpt.endswith(".onnx") else "torch")
    try:
        app = create_app(args.ckpt, backend, args.tta, args.top_k, max_content_length=int(args.max_mb * 2**20),
                         num_threads=args.threads)
    except (ModelLoadError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
