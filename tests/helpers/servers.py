"""A real carnet HTTP server (gunicorn or carnet.serving.app) in a subprocess: start on a free loopback port, wait
until healthy, stop with its whole process group, read its memory; and the two kinds of POST a browser sends."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

from tests.helpers.paths import REPO
from tests.helpers.runs import child_env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> dict:
    """GET url/health until it answers (its JSON); fail with the server's output if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                return json.load(response)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise AssertionError(f"{url} not healthy after {timeout} s")


def start_server(args: list[str]) -> subprocess.Popen:
    """Start a server command in its own process group (output in proc.stdout); stop it with stop_server."""
    return subprocess.Popen(args, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def stop_server(proc: subprocess.Popen) -> str:
    """SIGTERM the server's process group (SIGKILL after 20 s); return everything it printed."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.stdout.read()


def post(url: str, data: bytes, content_type: str, timeout: float = 30) -> tuple[int, dict]:
    """POST a body; (status, JSON answer), error statuses included."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with one file field, as an HTML form sends it: (body, content type)."""
    boundary = "carnet-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def memory_kb(pid: int) -> dict[str, int]:
    """A live process's memory in kB from /proc/<pid>/status: VmRSS (now) and VmHWM (peak RSS so far)."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


class SlowUpload(threading.Thread):
    """A client that POSTs ``body`` to /predict one byte every ``interval`` seconds, as a dead mobile link or an
    attacker would, for at most ``seconds`` (then it hangs up). ``status`` is the server's answer if one came
    meanwhile (None if not), ``elapsed`` when it came, ``sent`` the body bytes sent."""

    def __init__(self, port: int, body: bytes, content_type: str = "image/jpeg", seconds: float = 30.0,
                 interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.port, self.body, self.content_type = port, body, content_type
        self.seconds, self.interval = seconds, interval
        self.status: int | None = None
        self.elapsed: float | None = None
        self.sent = 0
        self.started = threading.Event()  # set once the request line and headers are sent
        self._hang_up = threading.Event()

    def stop(self) -> None:
        """Hang up (within ``interval``) without waiting for an answer."""
        self._hang_up.set()

    def run(self) -> None:
        begin = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {self.content_type}\r\n"
                         f"Content-Length: {len(self.body)}\r\n\r\n".encode())
            self.started.set()
            while self.sent < len(self.body) and time.monotonic() - begin < self.seconds:
                if self._hang_up.is_set():
                    return
                if select.select([sock], [], [], self.interval)[0]:
                    break  # the server answered (or closed) before the body was complete
                try:
                    sock.sendall(self.body[self.sent:self.sent + 1])
                except OSError:
                    break
                self.sent += 1
            else:
                if not select.select([sock], [], [], 0.1)[0]:
                    return  # gave up: no answer within `seconds`
            self.status = read_status(sock)
            self.elapsed = time.monotonic() - begin


def read_status(sock: socket.socket, timeout: float = 10.0) -> int | None:
    """The status code of the HTTP answer on ``sock`` (None if the connection ends before a status line)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:  # reset after the answer: what arrived before still counts
        pass
    parts = data.split(b"\r\n", 1)[0].split()
    return int(parts[1]) if len(parts) >= 2 and parts[0].startswith(b"HTTP/") else None
