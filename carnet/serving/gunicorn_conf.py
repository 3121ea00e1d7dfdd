"""gunicorn settings for the carnet service, shipped with the package (docs/serving.md, "Production")::

    gunicorn -c python:carnet.serving.gunicorn_conf 'carnet.serving.app:create_app(ckpt="best.ckpt", num_threads=2)'

(``best.ckpt``: your checkpoint's path.) Flags on the command line override these (``-w 4 -b 0.0.0.0:8000``), and
so does ``GUNICORN_CMD_ARGS``. A model file that is missing or does not fit its backend stops the master before it
forks a worker (:func:`on_starting`).

Memory: each worker holds its own model (~1 GB with torch for EfficientNet-B0 and friends; ~0.2 GB serving ONNX)
plus the bodies its threads read or hold while they wait their turn (<= threads x 10 MB) and, per request in
progress, one decoded image: a JPEG at the reduced scale the model input needs (a 36 MP JPEG: +8 MB peak RSS,
+109 MB if progressive), other formats whole (<= 40 MP: ~120 MB, a few times that while it is converted: a
39 MP PNG, +0.37 GB). The app decodes and classifies ``max_concurrent`` requests per worker at once (default 1),
so the peak is about ``workers x (model + threads x 10 MB + max_concurrent x ~0.5 GB)`` however many clients
upload at once (docs/serving.md has the measurements).
"""

import sys

from gunicorn.arbiter import Arbiter

bind = "127.0.0.1:8000"
# Two workers keep one model busy while the other reads and decodes the next upload; give each
# create_app(num_threads=cores // workers) so their intra-op threads do not oversubscribe the CPU.
workers = 2
# gthread: a client sending its upload slowly ties up one thread while its body arrives (the app reads the body
# before the request takes its turn at the model, and cuts it off with 408 after its read_timeout, 30 s), not the
# worker: threads - 1 such clients on one worker delay nobody. The app's max_concurrent bounds the real work, and
# threads x the body limit (8 x 10 MB) the bodies a worker holds. Many more slow clients: a reverse proxy that
# buffers request bodies (nginx does by default) in front.
worker_class = "gthread"
threads = 8
# A worker imports torch and loads the model after the fork: that can take a minute on a small machine.
timeout = 120
graceful_timeout = 30
keepalive = 5
# The model loads in each worker, never in the master (create_app(lazy=True) if you turn this on).
preload_app = False
# Restart a worker now and then: large decoded images fragment the heap, and the RSS creeps up.
max_requests = 2000
max_requests_jitter = 200
# An upload needs a short request line and a handful of headers.
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190


def on_starting(server: Arbiter) -> None:
    """In the master, before any worker is forked: a model file that is missing or does not fit its backend stops
    gunicorn at once with one line and exit status 4 (gunicorn's "App failed to load"). Otherwise every worker
    would import its backend to find out, print the same line, and gunicorn's master can crash with a traceback of
    its own when two workers fail at once (it reaps the second while stopping). A file that exists but cannot be
    loaded is reported by the workers, in one line each (:class:`carnet.serving.app.ModelNotLoaded`).

    The check imports the app's modules into the master (~65 MB: Flask, NumPy, OpenCV; no torch, no model), which
    the workers then share instead of importing them each."""
    from carnet.serving.app import precheck

    try:
        precheck(getattr(server.app, "app_uri", None) or "")
    except ValueError as err:  # a CarnetError (the file), or an unknown backend
        print(err, file=sys.stderr, flush=True)
        sys.exit(4)
