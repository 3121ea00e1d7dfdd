"""Uploads: how the image bytes arrive (multipart field ``file`` or a raw image body, kept in memory), the
limits on them (size, read deadline, bytes held per process), and their decoding, checked before any pixel is
decoded."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np
from flask import Request, request
from PIL import Image, UnidentifiedImageError
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge, RequestTimeout

from carnet.data.decode import decode_image
from carnet.errors import BadImage, BadUpload, ServerBusy

DEFAULT_MAX_CONTENT_LENGTH = 10 * 1024 * 1024  # bytes of one request body
# A photo has a few megapixels; a tiny file that claims far more is a decompression bomb. 40 MP covers any
# camera photo while keeping one decoded image under ~120 MB of RAM.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# The pixel count alone does not bound memory: the eval view resizes the *shorter* side to ~image_size, so a
# 1,000,000 x 40 PNG (40 MP, 5 KB) would become a 1.8 M px wide strip (4,000,000 x 10 at 224 px: 16.7 GB).
# Each side and the aspect ratio are bounded too; the resize's output is then at most S x (10 S) pixels.
DEFAULT_MAX_IMAGE_SIDE = 16_384  # WebP's own limit; longer than a 100 MP sensor's long side
DEFAULT_MAX_ASPECT_RATIO = 10  # panoramas stay under ~8:1
# Requests decoded and classified at once in one process (others wait, up to the queue timeout): each one may
# hold a decoded 40 MP image (~120 MB, several times that while converting). Workers x this bounds the memory.
DEFAULT_MAX_CONCURRENT = 1
DEFAULT_QUEUE_TIMEOUT = 30.0  # seconds a request waits for its turn before it is answered 503
# Seconds a request body may take to arrive (then 408). A body is read before the request takes its turn, so a
# slow client holds a thread and its bytes, never the model; this frees the thread. 30 s fit a 3 MB phone photo
# on a 1 Mbit/s uplink.
DEFAULT_READ_TIMEOUT = 30.0
# Bodies being read or waiting for their turn, per process, in units of the body limit (8 x 10 MB by default):
# threads bound them under gunicorn (threads x body limit), nothing does under the development server's thread
# per connection. Bytes count as they arrive, so a client trickling its upload in holds what it sent, not what
# it announced.
DEFAULT_BODIES_IN_MEMORY = 8
READ_STEP = 64 * 1024  # bytes asked from the stream at a time while a body is read
# The page sends one field; anything with more parts than this is not a carnet client (Flask allows 1,000).
MAX_FORM_PARTS = 16
RAW_BODY_TYPES = ("image/", "application/octet-stream")


class BodyTooLarge(RequestEntityTooLarge):
    """The body is over MAX_CONTENT_LENGTH, also when it is chunked (no Content-Length to check up front)."""


class BodyTimeout(RequestTimeout):
    """The body did not arrive within the read deadline (answered as 408)."""


class BodyMemory:
    """The bytes of request bodies one process holds at once (being read, or read and waiting for their turn),
    bounded: a body that would take the total over ``limit`` is refused (503) instead of being read further."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def reserve(self) -> Iterator[Callable[[int], None]]:
        """A ``take(n)`` for one request's bytes as they arrive; all of them are given back on exit."""
        taken = 0

        def take(n: int) -> None:
            nonlocal taken
            with self._lock:
                if self.held + n > self.limit:
                    raise ServerBusy(f"server busy: request bodies in memory would exceed {self.limit:,} bytes "
                                     "in this process; retry")
                self.held += n
            taken += n

        try:
            yield take
        finally:
            with self._lock:
                self.held -= taken


class ReadDeadline:
    """Ends a body read at a deadline, however the server reads: ``seconds`` after entering, the read side of the
    client's socket is shut down, so a read blocked on it returns at once with end of file (``expired`` says so).

    Our own, because neither gunicorn nor werkzeug has one: gunicorn's ``timeout`` restarts a silent worker, and
    a socket timeout bounds each recv(), which a client sending a byte a second always satisfies. Without a socket
    (Flask's test client, a WSGI server that does not expose it) there is no deadline.
    """

    def __init__(self, sock: socket.socket | None, seconds: float) -> None:
        self.sock, self.seconds = sock, seconds
        self.expired = False
        self._lock = threading.Lock()
        self._done = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> ReadDeadline:
        if self.sock is not None:
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._done = True
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            # The plain socket's shutdown: SSLSocket.shutdown would also drop the TLS layer the 408 goes out on.
            # OSError: the client has closed it already.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self.sock, socket.SHUT_RD)


@dataclass(frozen=True)
class ImageLimits:
    """What an uploaded image may claim in its header: pixels, longest side, aspect ratio (checked undecoded)."""

    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_side: int = DEFAULT_MAX_IMAGE_SIDE
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO

    def check(self, width: int, height: int, fmt: str | None) -> None:
        """Raise :class:`BadImage` naming the size if the image is over any limit."""
        what = f"the {fmt or 'uploaded'} image claims {width}x{height}"
        if width * height > self.max_pixels:
            raise BadImage(f"decompression bomb: {what} = {width * height:,} pixels, more than the limit of "
                           f"{self.max_pixels:,}")
        if min(width, height) < 1 or max(width, height) / min(width, height) > self.max_aspect_ratio:
            ratio = max(width, height) / max(1, min(width, height))
            raise BadImage(f"unusable aspect ratio: {what} ({ratio:,.0f}:1); a car photo is at most "
                           f"{self.max_aspect_ratio:g}:1")
        if max(width, height) > self.max_side:
            raise BadImage(f"image too large: {what}; each side must be at most {self.max_side:,} px")


class InMemoryRequest(Request):
    """Multipart files stay in memory (Werkzeug spools parts over 500 KB to a temporary file on disk), and the
    body limits are enforced with messages that say which limit was hit.

    The body is bounded by MAX_CONTENT_LENGTH, so memory use per request is bounded too.
    """

    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None, content_length: int | None = None) -> IO[bytes]:
        return io.BytesIO()

    def body_over_limit(self) -> bool:
        """Whether the body is (or, chunked, reached) MAX_CONTENT_LENGTH: read up to the limit and no further."""
        limit = self.max_content_length
        if limit is None:
            return False
        if self.content_length is not None:
            return self.content_length > limit
        # Chunked: Werkzeug's stream stops at the limit without saying so (is_exhausted), and a read past it
        # would raise 413; the rest of the body is never read.
        return bool(getattr(self.__dict__.get("stream"), "is_exhausted", False))

    def read_body(self, take: Callable[[int], None], timeout: float) -> int:
        """Read the whole body into memory (then form parsing and :func:`upload_bytes` use it), within ``timeout``
        seconds (:class:`BodyTimeout` after), counting its bytes with ``take`` as they arrive (it raises
        :class:`ServerBusy` when the process holds too many) and refusing a body over the limit (413).

        The body is read before the request takes its inference slot, so a slow client never holds the model.
        Returns the number of bytes read.
        """
        stream = self.stream  # 413 here if the Content-Length is over the limit
        sock = self.environ.get("gunicorn.socket") or self.environ.get("werkzeug.socket")
        buf = io.BytesIO()
        with ReadDeadline(sock if isinstance(sock, socket.socket) else None, timeout) as deadline:
            try:
                while not getattr(stream, "is_exhausted", False):
                    chunk = stream.read(READ_STEP)
                    if not chunk:
                        break
                    take(len(chunk))
                    buf.write(chunk)
                # Under gunicorn werkzeug reads a body of known length like a chunked one (up to the limit, an end
                # of file is its end), so a body cut short ends without an error: check its length here.
                if self.content_length is not None and buf.tell() < self.content_length:
                    raise ClientDisconnected()
            except (ClientDisconnected, OSError):
                if not deadline.expired:
                    raise
                expected = f" of {self.content_length:,}" if self.content_length is not None else ""
                raise BodyTimeout(f"the upload did not arrive within {timeout:g} s ({buf.tell():,}{expected} bytes "
                                  "received); send it again over a faster connection") from None
        if self.body_over_limit():
            raise BodyTooLarge()  # chunked and cut at the limit: never classify the first 10 MB of something
        # What get_data(cache=True) would have stored: werkzeug parses forms from it and returns it as the data.
        self._cached_data = buf.getvalue()
        return len(self._cached_data)

    def _load_form_data(self) -> None:
        # Werkzeug answers every form limit with the same 413; only a body over the limit is "too large".
        try:
            super()._load_form_data()
        except RequestEntityTooLarge:
            if self.body_over_limit():
                raise BodyTooLarge() from None
            raise BadUpload(f"multipart upload with more than {self.max_form_parts} fields: send only the image, "
                            "as the field 'file'") from None


def upload_bytes() -> bytes:
    """The image bytes of the current request: multipart field ``file``, or a raw body with an image type."""
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("file")
        if upload is None:
            fields = sorted({*request.files.keys(), *request.form.keys()})
            raise BadImage(f"multipart upload without a 'file' field (got fields {fields}): "
                           "send the image as `-F file=@car.jpg`")
        return upload.read()
    if request.mimetype.startswith(RAW_BODY_TYPES):
        data = request.get_data(cache=False)
        if isinstance(request, InMemoryRequest) and request.body_over_limit():
            raise BodyTooLarge()  # chunked and cut at the limit: never classify the first 10 MB of something
        return data
    if not request.content_length and not request.mimetype:
        raise BadImage("empty request: expected a multipart field 'file' or an image body (Content-Type image/*)")
    raise BadImage(f"unsupported Content-Type {request.mimetype or '(none)'!r}: send multipart/form-data with a "
                   "field 'file', or the raw image with Content-Type image/jpeg (or another image/*)")


def decode_upload(data: bytes, max_pixels: int | ImageLimits = DEFAULT_MAX_IMAGE_PIXELS,
                  min_side: int | None = None) -> np.ndarray:
    """Decode uploaded bytes to RGB uint8 HxWx3 with :func:`carnet.data.decode.decode_image`, the function
    training and predict decode files with (upright by EXIF, 16 bits scaled, a JPEG at reduced scale down to
    ``min_side``, which the model's eval view fixes: :func:`carnet.data.transforms.decode_min_side`).

    The size a file claims (pixels, sides, aspect ratio: ``max_pixels`` or an :class:`ImageLimits`) is checked
    from its header before any pixel is decoded, so a decompression bomb costs nothing; a truncated file fails
    instead of being padded with grey (PIL's LOAD_TRUNCATED_IMAGES).
    """
    limits = max_pixels if isinstance(max_pixels, ImageLimits) else ImageLimits(max_pixels=max_pixels)
    if not data:
        raise BadImage("empty upload: expected the bytes of a JPEG/PNG/WebP/BMP image")
    header: list[str] = []  # the format, once the header is read and within the limits

    def check(img: Image.Image) -> None:
        limits.check(*img.size, img.format)
        header.append(img.format or "uploaded")

    try:
        with warnings.catch_warnings():  # PIL warns (at open) between its limit and twice that: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return decode_image(data, min_side, check)
    except BadUpload:
        raise
    except UnidentifiedImageError:
        raise BadImage(f"not an image: {len(data)} bytes that no image decoder recognises "
                       "(expected a JPEG, PNG, WebP or BMP file)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(f"decompression bomb: the image claims more than the {limits.max_pixels:,} pixels "
                       f"allowed (PIL: {err})") from None
    except Exception as err:  # PIL raises many types on malformed headers and on truncated or corrupt data
        what = f"{header[0]} image" if header else "image header"
        raise BadImage(f"truncated or corrupt {what} ({type(err).__name__}: {err})") from None
