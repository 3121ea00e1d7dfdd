"""The web service: endpoints and bad input via Flask's test client, real HTTP via gunicorn, the page in Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from flask import Flask

from carnet.errors import ModelLoadError
from carnet.models.checkpoint import load_checkpoint
from carnet.serving.app import create_app
from carnet.serving.app import main as serve_main
from carnet.serving.upload import DEFAULT_MAX_CONTENT_LENGTH
from tests.helpers.devtools import ARTIFACTS, DevTools, require_browser
from tests.helpers.images import photo
from tests.helpers.paths import REPO
from tests.helpers.reference import eval_batch, reference_logits
from tests.helpers.runs import child_env
from tests.helpers.servers import free_port, multipart, post, start_server, stop_server, wait_healthy
from tests.helpers.tolerances import PROBS_ABS

RESPONSE_KEYS = ["class_id", "class_name", "probability", "top_k", "model", "ms"]


def in_process_probs(ckpt: Path, data: bytes) -> np.ndarray:
    """The reference: load_checkpoint + the training eval transform on the decoded image, normalised by hand (the
    old float pipeline), no service code."""
    net, meta = load_checkpoint(ckpt)
    return torch.softmax(reference_logits(net, eval_batch(meta, [data]), meta).double(), 1)[0].numpy()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG of a few hundred bytes whose header claims width x height pixels (10 G by default)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\0" * (width + 1) * 4)  # only a few rows: the decoder must never get that far
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def app(tiny_checkpoint: Path) -> Flask:
    return create_app(tiny_checkpoint, top_k=3)


@pytest.fixture
def client(app: Flask):
    return app.test_client()


def assert_error(response, status: int, *words: str) -> str:
    """A JSON error with this status whose message mentions every word (case-insensitive)."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    message = response.get_json()["error"]
    for word in words:
        assert word.lower() in message.lower(), message
    return message


# ---- endpoints ---------------------------------------------------------------------------------------------


def test_index_page_is_self_contained(client) -> None:
    response = client.get("/")
    assert response.status_code == 200 and response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert '<input id="file" name="file" type="file"' in page and 'fetch("predict"' in page
    # offline: no external scripts, styles, fonts or images
    assert "http://" not in page and "https://" not in page and "<link" not in page


def test_health_reports_model_and_classes(client, tiny_checkpoint: Path) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    _, meta = load_checkpoint(tiny_checkpoint)
    assert body["status"] == "ok" and body["model"] == meta["model_name"] == "test_efficientnet"
    assert body["num_classes"] == len(meta["class_names"]) == 10 and body["backend"] == "torch"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_predict_multipart_matches_in_process_eval(client, tiny_checkpoint: Path, seed: int) -> None:
    data = photo(seed)
    response = client.post("/predict", data={"file": (io.BytesIO(data), "car.jpg")})
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert list(body) == RESPONSE_KEYS
    expected = in_process_probs(tiny_checkpoint, data)
    order = np.argsort(-expected)[:3]
    assert body["class_id"] == int(order[0])
    assert body["class_name"] == f"car {order[0]}"
    assert body["probability"] == pytest.approx(expected[order[0]], abs=1e-5)
    assert [k["class_id"] for k in body["top_k"]] == order.tolist()
    assert [k["probability"] for k in body["top_k"]] == pytest.approx(expected[order].tolist(), abs=1e-5)
    assert body["model"] == "test_efficientnet" and body["ms"] > 0


def test_predictions_depend_on_the_image(client) -> None:
    """Guards the tests above: the fixture model must not give every picture the same answer."""
    answers = {client.post("/predict", data=photo(s), content_type="image/jpeg").get_json()["class_id"]
               for s in range(1, 9)}
    assert len(answers) >= 2


@pytest.mark.parametrize("fmt,content_type", [("JPEG", "image/jpeg"), ("PNG", "image/png"),
                                              ("JPEG", "application/octet-stream")])
def test_predict_raw_body_equals_multipart(client, fmt: str, content_type: str) -> None:
    data = photo(4, fmt=fmt)
    raw = client.post("/predict", data=data, content_type=content_type).get_json()
    multipart = client.post("/predict", data={"file": (io.BytesIO(data), "x")}).get_json()
    assert raw["top_k"] == multipart["top_k"]


def test_top_k_is_configurable(tiny_checkpoint: Path) -> None:
    app = create_app(tiny_checkpoint, top_k=20)  # more than the classes: all of them, most likely first
    probs = [k["probability"] for k in app.test_client().post("/predict", data=photo(5),
                                                               content_type="image/jpeg").get_json()["top_k"]]
    assert len(probs) == 10 and probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0)


def test_tta_averages_image_and_mirror(tiny_checkpoint: Path) -> None:
    data = photo(6)
    body = create_app(tiny_checkpoint, tta=True, top_k=10).test_client().post(
        "/predict", data=data, content_type="image/jpeg").get_json()
    net, meta = load_checkpoint(tiny_checkpoint)
    x = eval_batch(meta, [data])
    expected = (torch.softmax(reference_logits(net, x, meta).double(), 1)
                + torch.softmax(reference_logits(net, x.flip(3), meta).double(), 1))[0] / 2
    got = {k["class_id"]: k["probability"] for k in body["top_k"]}
    assert [got[k] for k in range(10)] == pytest.approx(expected.tolist(), abs=PROBS_ABS)


# ---- bad input ---------------------------------------------------------------------------------------------


def test_not_an_image(client) -> None:
    text = b"hello, this is a text file and not a photo of a car\n" * 10
    assert_error(client.post("/predict", data={"file": (io.BytesIO(text), "car.jpg")}), 400, "not an image")
    assert_error(client.post("/predict", data=text, content_type="image/jpeg"), 400, "not an image")


def test_empty_body(client) -> None:
    assert_error(client.post("/predict"), 400, "empty")
    assert_error(client.post("/predict", data=b"", content_type="image/jpeg"), 400, "empty")
    assert_error(client.post("/predict", data={"file": (io.BytesIO(b""), "car.jpg")}), 400, "empty")


def test_truncated_jpeg(client) -> None:
    data = photo(7, size=(320, 240))
    assert_error(client.post("/predict", data=data[: len(data) // 2], content_type="image/jpeg"), 400, "truncated")


def test_decompression_bomb(client) -> None:
    bomb = bomb_png()
    assert len(bomb) < 2000
    message = assert_error(client.post("/predict", data={"file": (io.BytesIO(bomb), "bomb.png")}), 400,
                           "decompression bomb")
    assert "10000000000 pixels" in message


def test_image_over_the_pixel_limit(tiny_checkpoint: Path) -> None:
    """A real, fully decodable picture is refused too when it has more pixels than the configured limit."""
    client = create_app(tiny_checkpoint, max_image_pixels=100 * 80).test_client()
    assert_error(client.post("/predict", data=photo(8, size=(101, 80)), content_type="image/jpeg"), 400,
                 "decompression bomb", "101x80")
    assert client.post("/predict", data=photo(8, size=(100, 80)), content_type="image/jpeg").status_code == 200


def test_missing_file_field_and_wrong_content_type(client) -> None:
    assert_error(client.post("/predict", data={"image": (io.BytesIO(photo(1)), "car.jpg")}), 400, "'file'",
                 "image")
    assert_error(client.post("/predict", data=photo(1), content_type="text/plain"), 400, "text/plain")


def test_body_over_max_content_length(client) -> None:
    too_big = b"\xff" * (DEFAULT_MAX_CONTENT_LENGTH + 1)
    assert_error(client.post("/predict", data=too_big, content_type="image/jpeg"), 413, "10.0 MB")
    assert_error(client.post("/predict", data={"file": (io.BytesIO(too_big), "big.jpg")}), 413, "too large")


def test_wrong_method(client) -> None:
    assert_error(client.get("/predict"), 405, "GET", "POST")
    assert_error(client.post("/"), 405, "POST")
    assert_error(client.delete("/health"), 405, "DELETE")
    assert_error(client.get("/nope"), 404, "not found")


def test_uploads_are_not_written_to_disk(client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Werkzeug spools multipart files over 500 KB to a temporary file; the service must keep them in memory."""
    import tempfile

    from werkzeug import formparser

    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was about to be written to a temporary file")

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, no_disk)
        if hasattr(formparser, name):
            monkeypatch.setattr(formparser, name, no_disk)
    big = photo(9, size=(1600, 1200), fmt="PNG")
    assert len(big) > 1024 * 500
    assert client.post("/predict", data={"file": (io.BytesIO(big), "big.png")}).status_code == 200


def test_model_failure_is_500_and_service_recovers(app: Flask, client) -> None:
    net = app.extensions["carnet"].get().backend.net

    def fail(module, inputs):
        raise RuntimeError("simulated out of memory")

    hook = net.register_forward_pre_hook(fail)
    try:
        message = assert_error(client.post("/predict", data=photo(1), content_type="image/jpeg"), 500,
                               "internal error", "error id")
        assert "simulated" not in message  # the exception's text stays in the server log
    finally:
        hook.remove()
    assert client.post("/predict", data=photo(1), content_type="image/jpeg").status_code == 200
    assert client.get("/health").status_code == 200


# ---- the factory -------------------------------------------------------------------------------------------


def test_factory_errors_name_the_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"missing\.ckpt: file not found"):
        create_app(tmp_path / "missing.ckpt")
    with pytest.raises(ModelLoadError, match=r"carnet-export"):
        create_app(tiny_checkpoint, backend="onnx")
    with pytest.raises(ValueError, match="backend='tf'"):
        create_app(tiny_checkpoint, backend="tf")


def test_lazy_app_loads_on_first_health_check_once(tiny_checkpoint: Path) -> None:
    app = create_app(tiny_checkpoint, lazy=True)
    holder = app.extensions["carnet"]
    assert not holder.loaded
    client = app.test_client()
    assert client.get("/health").status_code == 200 and holder.loaded
    model = holder.get()
    client.post("/predict", data=photo(1), content_type="image/jpeg")
    assert holder.get() is model  # never reloaded per request


def test_lazy_app_with_broken_checkpoint_reports_503(tmp_path: Path) -> None:
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    client = create_app(broken, lazy=True).test_client()
    assert_error(client.get("/health"), 503, "broken.ckpt")
    assert_error(client.post("/predict", data=photo(1), content_type="image/jpeg"), 503, "broken.ckpt")


def test_carnet_serve_of_an_onnx_file_imports_no_torch(tiny_onnx: Path) -> None:
    """``carnet-serve --ckpt model.onnx --tta`` starts, answers /health and classifies a photo (decode, eval view,
    flip TTA, onnxruntime) without importing torch, timm, Hydra, albumentations or Lightning: an ONNX worker is
    then ~0.15 GB instead of ~0.9 GB, and ready in a third of the time (docs/serving.md). A fresh interpreter runs
    the command's own main(), with the development server's loop replaced by the requests a client would send."""
    code = ("import sys\n"
            "import flask\n"
            "from tests.helpers.images import photo\n"
            "def serve(app, **kwargs):\n"
            "    client = app.test_client()\n"
            "    assert client.get('/health').get_json()['backend'] == 'onnx'\n"
            "    answer = client.post('/predict', data=photo(1, (640, 480)), content_type='image/jpeg')\n"
            "    assert answer.status_code == 200 and answer.get_json()['model'] == 'test_efficientnet', answer.data\n"
            "flask.Flask.run = serve\n"
            "from carnet.serving.app import main\n"
            f"main(['--ckpt', {str(tiny_onnx)!r}, '--tta'])\n"
            "heavy = ('torch', 'torchvision', 'timm', 'hydra', 'albumentations', 'pytorch_lightning', 'lightning')\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
            "assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---- real HTTP ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_gunicorn_serves_correct_predictions(tiny_checkpoint: Path, workers: int) -> None:
    """The production command of the README on a free loopback port, over real HTTP."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server([sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}",
                         "--timeout", "120",
                         f"carnet.serving.app:create_app(ckpt={str(tiny_checkpoint)!r}, num_threads=1)"])
    try:
        health = wait_healthy(url, proc)
        assert health["model"] == "test_efficientnet" and health["num_classes"] == 10
        data = photo(11)
        expected = in_process_probs(tiny_checkpoint, data)
        status, body = post(url + "/predict", *multipart("file", "car.jpg", data))
        assert status == 200, body
        assert body["class_id"] == int(np.argmax(expected))
        assert body["probability"] == pytest.approx(expected.max(), abs=1e-5)
        status, body = post(url + "/predict", data[:200], "image/jpeg")
        assert status == 400 and "truncated" in body["error"]
        pids = set()
        for _ in range(4 * workers):  # answered by the workers, each with its own model
            with urllib.request.urlopen(url + "/health", timeout=10) as response:
                pids.add(json.load(response)["pid"])
        assert proc.pid not in pids  # the model lives in the workers, not in the gunicorn master
    finally:
        log = stop_server(proc)
    assert log.count("Booting worker") == workers, log


@pytest.mark.parametrize("name", ["missing.ckpt", "model.onnx", "broken.onnx"])
def test_gunicorn_stops_in_one_line_when_its_model_cannot_load(tmp_path: Path, name: str) -> None:
    """The production command with the shipped settings and a model that cannot be served: one line naming the
    file and why, no traceback, and gunicorn's "App failed to load" status 4 (before: a traceback from each of the
    2 workers, then "Worker failed to boot", status 3, sometimes a third traceback from gunicorn's master).
    A missing file, or one that does not fit the backend (an ONNX file without backend="onnx"), is found before any
    worker is forked; a file that is no model is found by the worker that loads it (one worker here: with two,
    gunicorn's master may add a traceback of its own when both fail at once)."""
    ckpt = tmp_path / name
    if name == "model.onnx":
        ckpt.write_bytes(b"")
    if name == "broken.onnx":
        ckpt.write_bytes(b"not an ONNX file")
    factory = f"carnet.serving.app:create_app(ckpt={str(ckpt)!r}, num_threads=1"
    factory += ", backend='onnx')" if name == "broken.onnx" else ")"
    workers = ["-w", "1"] if name == "broken.onnx" else []
    proc = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "python:carnet.serving.gunicorn_conf", *workers,
                           "-b", f"127.0.0.1:{free_port()}", factory],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 4, output
    assert "Traceback" not in output and "Worker failed to boot" not in output, output
    ours = [line for line in output.splitlines() if not line.startswith("[")]  # gunicorn's own: [time] [pid] ...
    assert len(ours) == 1, output
    why = {"missing.ckpt": "file not found", "model.onnx": "is an ONNX file: serve it with backend='onnx'",
           "broken.onnx": "cannot be read as ONNX"}[name]
    assert ours[0].startswith("model not loaded: ") and str(ckpt) in ours[0] and why in ours[0], ours[0]
    assert ("Booting worker" in output) == (name == "broken.onnx"), output  # the master checked the others


def test_carnet_serve_refuses_what_it_cannot_listen_on_before_loading_the_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--port 99999`` served on port 34463 (werkzeug's wrap-around), ``--threads 0`` ran, and a port in use was
    found only after the model had loaded, in werkzeug's 5 lines. Each is now the last line of argparse's usage, or
    one line, exit 2; the checkpoint here does not exist, so none of them reached the model."""
    missing = str(tmp_path / "missing.ckpt")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = {("--port", "99999"): "carnet-serve: error: argument --port: expected a port number 0-65535 (0: any "
                                      "free one), got '99999'",
                 ("--threads", "0"): "carnet-serve: error: argument --threads: expected a whole number >= 1, got '0'",
                 ("--max-mb", "-1"): "carnet-serve: error: argument --max-mb: expected a number > 0, got '-1'",
                 ("--port", str(port)): f"error: cannot listen on 127.0.0.1:{port} (Address already in use); pass "
                                        "another --port"}
        for args, line in cases.items():
            with pytest.raises(SystemExit) as stopped:
                serve_main(["--ckpt", missing, *args])
            assert stopped.value.code == 2
            assert capsys.readouterr().err.strip().splitlines()[-1] == line


# ---- the page in a real browser ----------------------------------------------------------------------------
# Chromium is driven over the DevTools protocol (tests/helpers/devtools.py); without it the test skips, except
# under CARNET_REQUIRE_BROWSER=1 (.ci/run), where it fails. The screenshot is kept in test-artifacts/. Environment
# overrides, for a screenshot worth showing: CARNET_BROWSER_CKPT (checkpoint to serve), CARNET_BROWSER_IMAGE (photo
# to upload), CARNET_SCREENSHOT (where to keep the PNG instead, e.g. docs/serve_screenshot.png).


def test_upload_page_classifies_a_photo_in_chromium(tiny_checkpoint: Path, tmp_path: Path) -> None:
    binary = require_browser()
    ckpt = Path(os.environ.get("CARNET_BROWSER_CKPT", tiny_checkpoint))
    image = Path(os.environ["CARNET_BROWSER_IMAGE"]) if os.environ.get("CARNET_BROWSER_IMAGE") else None
    if image is None:
        image = tmp_path / "car.jpg"
        image.write_bytes(photo(21, size=(320, 240)))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server([sys.executable, "-m", "carnet.serving.app", "--ckpt", str(ckpt), "--host", "127.0.0.1",
                           "--port", str(port)])
    browser = None
    try:
        wait_healthy(url, server)
        status, expected = post(url + "/predict", image.read_bytes(), "image/jpeg")
        assert status == 200, expected
        browser = DevTools(binary, Path(tempfile.mkdtemp(dir=tmp_path, prefix="chromium-profile-")))
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        browser.session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.send("Emulation.setDeviceMetricsOverride", width=760, height=640, deviceScaleFactor=1, mobile=False)
        browser.send("Page.navigate", url=url + "/")
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
        assert browser.evaluate("document.title").startswith("carnet")

        root = browser.send("DOM.getDocument")["root"]["nodeId"]
        file_input = browser.send("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        browser.send("DOM.setFileInputFiles", files=[str(image.resolve())], nodeId=file_input)
        browser.evaluate("document.getElementById('file').dispatchEvent(new Event('change')); "
                         "document.getElementById('submit').click(); true")
        browser.wait_for("document.querySelectorAll('#result tr.prediction').length > 0 "
                         "|| document.getElementById('status').className === 'error'")
        assert browser.evaluate("document.getElementById('status').className") != "error", \
            browser.evaluate("document.getElementById('status').textContent")
        rows = browser.evaluate("[...document.querySelectorAll('#result tr.prediction')]"
                                ".map(r => [...r.cells].map(c => c.textContent))")
        assert [r[0] for r in rows] == [k["class_name"] for k in expected["top_k"]]
        assert rows[0][2] == f"{100 * expected['probability']:.1f} %"
        assert browser.evaluate("document.getElementById('preview').naturalWidth") > 0  # the photo is shown

        png = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
        assert png.startswith(b"\x89PNG")
        screenshot = Path(os.environ.get("CARNET_SCREENSHOT") or ARTIFACTS / "serve_screenshot.png")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(png)
        print(f"screenshot: {screenshot}")
    finally:
        if browser is not None:
            browser.close()
        stop_server(server)
