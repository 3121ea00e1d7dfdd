"""Web service: upload a car photo, get the class and top-k probabilities as JSON (Flask, gunicorn-ready).

::

    carnet-serve --ckpt best.ckpt --host 127.0.0.1 --port 8000        # development server
    gunicorn -c python:carnet.serving.gunicorn_conf 'carnet.serving.app:create_app(ckpt="best.ckpt")'  # production

The model is loaded once per process, never per request, and only on the CPU: gunicorn (without
``--preload``) calls :func:`create_app` in each worker after the fork, so every worker loads its own copy and
the master never imports a model. Should a loaded model be forked anyway (``--preload``), the first request in
the child loads a fresh copy (the holder remembers the process id), because thread pools do not survive a fork.

The parts: :mod:`~carnet.serving.upload` (request bytes, limits, decoding), :mod:`~carnet.serving.classifier`
(eval transform, flip TTA, the per-process holder), :mod:`~carnet.serving.backends` (torch or onnxruntime) and
``page.html``, the upload page, and :mod:`~carnet.serving.gunicorn_conf`, the gunicorn settings. Uploads stay
in memory; nothing is written to disk.

Memory is bounded per request (body size; an image's pixels, sides and aspect ratio, checked before decoding)
and per process (the bytes of bodies held at once; ``max_concurrent`` requests decoded and classified at once,
the others wait up to ``queue_timeout`` seconds, then get 503). A body is read before its request takes a turn,
within ``read_timeout`` seconds (then 408), so a client sending slowly holds a thread, never the model.
A 500 tells the client an error id, never the exception's text (it can name files and library internals); the
log has the details under that id.
"""

from __future__ import annotations

import argparse
import ast
import errno
import inspect
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, cast

import numpy as np
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from carnet.errors import BadUpload, CarnetError, ModelLoadError, ModelNotLoaded, ModelUnavailable, ServerBusy
from carnet.serving.backends import BACKENDS, check_model_file
from carnet.serving.classifier import Classifier, ModelHolder
from carnet.serving.upload import (
    DEFAULT_BODIES_IN_MEMORY,
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_CONCURRENT,
    DEFAULT_MAX_CONTENT_LENGTH,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_IMAGE_SIDE,
    DEFAULT_QUEUE_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    MAX_FORM_PARTS,
    BodyMemory,
    ImageLimits,
    InMemoryRequest,
    decode_upload,
    upload_bytes,
)

log = logging.getLogger(__name__)


def index_page() -> str:
    """The upload page. Self-contained on purpose (inline CSS and JS, no CDN): it must work on an offline machine."""
    return resources.files("carnet.serving").joinpath("page.html").read_text(encoding="utf-8")


def _error(status: int, message: str) -> tuple[Any, int]:
    return jsonify({"error": message, "status": status}), status


def load_failure(err: Exception) -> str:
    """Why the model is not loaded, for a client: carnet's own one-line errors, else just the exception type."""
    if isinstance(err, CarnetError):
        return f"model not loaded: {err}"
    return f"model not loaded ({type(err).__name__}); the server log has the details"


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class PlainText(logging.Filter):
    """Strips the ANSI colours werkzeug's development server puts in its request log (for a terminal) from
    records, so a log file or a pipe gets plain text."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\x1b[" in message:
            record.msg, record.args = ANSI_ESCAPE.sub("", message), None
        return True


def create_app(ckpt: str | os.PathLike, backend: str = "torch", tta: bool = False, top_k: int = 3, *,
               max_content_length: int = DEFAULT_MAX_CONTENT_LENGTH,
               max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
               max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO, max_concurrent: int = DEFAULT_MAX_CONCURRENT,
               queue_timeout: float = DEFAULT_QUEUE_TIMEOUT, read_timeout: float = DEFAULT_READ_TIMEOUT,
               max_body_memory: int | None = None, num_threads: int | None = None, lazy: bool = False) -> Flask:
    """The Flask app serving ``ckpt`` (a carnet ``.ckpt``, or an ``.onnx`` file with ``backend="onnx"``).

    The model loads here, in the calling process (a gunicorn worker), unless ``lazy``: then on the first
    request or health check. ``num_threads`` caps the backend's intra-op threads per process (give
    ``cores / workers`` to gunicorn workers so they do not oversubscribe the CPU). A request's body is read first,
    within ``read_timeout`` seconds (408 after), with at most ``max_body_memory`` bytes of bodies in the process
    at once (default: 8 x ``max_content_length``; 503 over it). Then ``max_concurrent`` requests per process are
    decoded and classified at once (each may hold a decoded 40 MP image); the rest wait up to ``queue_timeout``
    seconds, then get 503.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if top_k < 1:
        raise ValueError(f"top_k={top_k}: expected a positive integer")
    if max_concurrent < 1:
        raise ValueError(f"max_concurrent={max_concurrent}: expected a positive integer")
    if max_aspect_ratio < 1 or max_image_side < 1:
        raise ValueError(f"max_aspect_ratio={max_aspect_ratio}, max_image_side={max_image_side}: expected a "
                         "ratio >= 1 and a positive side in pixels")
    if max_body_memory is None:
        max_body_memory = DEFAULT_BODIES_IN_MEMORY * max_content_length
    if max_body_memory < max_content_length or read_timeout <= 0:
        raise ValueError(f"max_body_memory={max_body_memory}, read_timeout={read_timeout}: expected room for one "
                         f"body of max_content_length={max_content_length} bytes and a positive deadline")
    limits = ImageLimits(max_image_pixels, max_image_side, max_aspect_ratio)
    bodies = BodyMemory(max_body_memory)
    slots = threading.BoundedSemaphore(max_concurrent)
    ckpt = Path(ckpt)
    holder = ModelHolder(lambda: Classifier(ckpt, backend, tta, num_threads))
    if not lazy:
        try:
            holder.get()
        except CarnetError as err:  # bad input (the file); anything else is a bug and keeps its traceback
            raise ModelNotLoaded(load_failure(err)) from err
    page = index_page()

    app = Flask(__name__)
    app.request_class = InMemoryRequest
    # MAX_FORM_MEMORY_SIZE at the body limit: a text field cannot hit it before the body does, so a 413 from the
    # form parser means the body (see InMemoryRequest), and too many fields are a 400 that says so.
    app.config.update(MAX_CONTENT_LENGTH=max_content_length, MAX_FORM_MEMORY_SIZE=max_content_length,
                      MAX_FORM_PARTS=MAX_FORM_PARTS)
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

    @app.errorhandler(BadUpload)
    def bad_upload(err: BadUpload) -> tuple[Any, int]:
        return _error(400, str(err))

    @app.errorhandler(ServerBusy)
    def server_busy(err: ServerBusy) -> tuple[Any, int]:
        response, status = _error(503, str(err))
        response.headers["Retry-After"] = "5"
        return response, status

    @app.errorhandler(ModelUnavailable)
    def model_unavailable(err: ModelUnavailable) -> tuple[Any, int]:
        return _error(503, str(err))

    @app.errorhandler(Exception)
    def internal_error(err: Exception) -> tuple[Any, int]:
        # One broken request (model failure, out of memory) must not take the worker down: log, answer 500.
        # The exception's text stays in the log: it can name server files and library internals.
        error_id = uuid.uuid4().hex[:12]
        log.exception("error id %s while serving %s %s", error_id, request.method, request.path)
        return _error(500, f"internal error while predicting (error id {error_id}); the server log has the "
                           "details")

    @app.get("/")
    def index() -> tuple[str, int, dict[str, str]]:
        return page, 200, {"Content-Type": "text/html; charset=utf-8"}

    @app.get("/health")
    def health() -> tuple[Any, int]:
        try:
            model = holder.get()
        except Exception as err:
            log.exception("model failed to load")
            return _error(503, load_failure(err))
        return jsonify({"status": "ok", "model": model.model_name, "num_classes": len(model.class_names),
                        "class_names": model.class_names, "backend": model.backend.name, "tta": model.tta,
                        "image_size": model.meta["image_size"], "pid": os.getpid()}), 200

    @app.post("/predict")
    def predict() -> tuple[Any, int]:
        started = time.perf_counter()
        with bodies.reserve() as take:
            # The body first, then the slot: a client sending slowly holds its thread and the bytes it sent (both
            # bounded), never the model. A waiting request holds its body, not a decoded image.
            cast(InMemoryRequest, request).read_body(take, read_timeout)
            if not slots.acquire(timeout=queue_timeout):
                raise ServerBusy(f"server busy: {max_concurrent} request(s) in progress in this process and none "
                                 f"finished within {queue_timeout:g} s; retry")
            try:
                try:
                    model = holder.get()
                except Exception as err:
                    log.exception("model failed to load")
                    raise ModelUnavailable(load_failure(err)) from err
                image = decode_upload(upload_bytes(), limits, model.min_side)
                probs = model.predict_proba(image)
                del image
            finally:
                slots.release()
        order = np.argsort(-probs, kind="stable")[: min(top_k, len(probs))]
        names = model.class_names
        ranked = [{"class_id": int(k), "class_name": names[k], "probability": float(probs[k])} for k in order]
        return jsonify({**ranked[0], "top_k": ranked, "model": model.model_name,
                        "ms": round((time.perf_counter() - started) * 1000, 2)}), 200

    return app


def precheck(app_uri: str) -> None:
    """Check the model file of a gunicorn app URI ``carnet.serving.app:create_app(...)`` without loading anything
    (:func:`carnet.serving.backends.check_model_file`: it exists and fits the backend), as gunicorn's master does
    before forking workers (:mod:`carnet.serving.gunicorn_conf`). :class:`ModelNotLoaded` if it does not,
    ``ValueError`` for an unknown backend. Other URIs, and calls gunicorn refuses itself (arguments that are not
    literals or do not fit), are left alone: the workers report those.
    """
    module, _, call = app_uri.partition(":")
    if module != __name__:
        return
    try:  # parsed as gunicorn parses it (gunicorn.util.import_app), bound as Python would call create_app
        node = ast.parse(call.strip(), mode="eval").body
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "create_app"):
            return
        bound = inspect.signature(create_app).bind(*[ast.literal_eval(a) for a in node.args],
                                                   **{k.arg: ast.literal_eval(k.value) for k in node.keywords})
    except (SyntaxError, ValueError, TypeError):
        return
    bound.apply_defaults()
    try:
        check_model_file(bound.arguments["ckpt"], bound.arguments["backend"])
    except ModelLoadError as err:
        raise ModelNotLoaded(load_failure(err)) from None


def _number(kind: type, low: float, text: str, what: str) -> Any:
    """An argparse type: ``text`` as a ``kind`` (int or float) of at least ``low``, else an error saying so."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _port(text: str) -> int:
    """``--port``: 0-65535, 0 for any free port (werkzeug would listen on another port for 99999: 34463)."""
    port = _number(int, 0, text, "a port number 0-65535 (0: any free one)")
    if port > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535 (0: any free one), got {text!r}")
    return port


def check_address(host: str, port: int) -> None:
    """Raise OSError when nothing can listen on ``host:port`` (a port in use, a host this machine is not), as
    werkzeug would bind it (SO_REUSEADDR), so that the server says so before spending seconds on the model."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)


def main(argv: list[str] | None = None) -> None:
    """``carnet-serve``: the development server (use gunicorn in production)."""
    positive_int = partial(_number, int, 1, what="a whole number >= 1")
    positive = partial(_number, float, sys.float_info.min, what="a number > 0")
    parser = argparse.ArgumentParser(prog="carnet-serve", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="carnet checkpoint (.ckpt), or .onnx with --backend onnx")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="torch or onnx (default: onnx for a .onnx file, else torch)")
    parser.add_argument("--tta", action="store_true", help="average the image and its horizontal mirror")
    parser.add_argument("--top-k", type=positive_int, default=3)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=_port, default=8000)
    parser.add_argument("--max-mb", type=positive, default=DEFAULT_MAX_CONTENT_LENGTH / 2**20,
                        help="largest accepted request body in MB (413 above)")
    parser.add_argument("--threads", type=positive_int, default=None, help="intra-op threads of the backend")
    parser.add_argument("--max-concurrent", type=positive_int, default=DEFAULT_MAX_CONCURRENT,
                        help="requests decoded and classified at once (others wait, then 503)")
    parser.add_argument("--read-timeout", type=positive, default=DEFAULT_READ_TIMEOUT,
                        help="seconds a request body may take to arrive (408 after)")
    args = parser.parse_args(argv)
    try:
        check_address(args.host, args.port)
    except OSError as err:
        instead = ("a --host of this machine (127.0.0.1; 0.0.0.0 for all its interfaces)"
                   if isinstance(err, socket.gaierror) or err.errno == errno.EADDRNOTAVAIL else "another --port")
        parser.exit(2, f"error: cannot listen on {args.host}:{args.port} ({err.strerror or err}); pass {instead}\n")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not sys.stderr.isatty():
        logging.getLogger("werkzeug").addFilter(PlainText())
    backend = args.backend or ("onnx" if args.ckpt.endswith(".onnx") else "torch")
    try:
        app = create_app(args.ckpt, backend, args.tta, args.top_k, max_content_length=int(args.max_mb * 2**20),
                         max_concurrent=args.max_concurrent, read_timeout=args.read_timeout,
                         num_threads=args.threads)
    except (ModelLoadError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
