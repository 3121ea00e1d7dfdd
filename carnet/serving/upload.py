"""Uploads: how the image bytes arrive (multipart field ``file`` or a raw image body, kept in memory), the
limits on them, and their decoding, checked before any pixel is decoded."""

from __future__ import annotations

import io
import warnings
from typing import IO

import numpy as np
from flask import Request, request
from PIL import Image, UnidentifiedImageError

from carnet.errors import CarnetError

DEFAULT_MAX_CONTENT_LENGTH = 10 * 1024 * 1024  # bytes of one request body
# A photo has a few megapixels; a tiny file that claims far more is a decompression bomb. 40 MP covers any
# camera photo while keeping one decoded image under ~120 MB of RAM.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
RAW_BODY_TYPES = ("image/", "application/octet-stream")


class BadImage(CarnetError):
    """The uploaded bytes are not a usable image; the message says why (answered as 400)."""


class InMemoryRequest(Request):
    """Multipart files stay in memory (Werkzeug spools parts over 500 KB to a temporary file on disk).

    The body is already bounded by MAX_CONTENT_LENGTH, so memory use per request is bounded too.
    """

    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None, content_length: int | None = None) -> IO[bytes]:
        return io.BytesIO()


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
        return request.get_data(cache=False)
    if not request.content_length and not request.mimetype:
        raise BadImage("empty request: expected a multipart field 'file' or an image body (Content-Type image/*)")
    raise BadImage(f"unsupported Content-Type {request.mimetype or '(none)'!r}: send multipart/form-data with a "
                   "field 'file', or the raw image with Content-Type image/jpeg (or another image/*)")


def decode_upload(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode uploaded bytes to RGB uint8 HxWx3, exactly as :func:`carnet.data.decode.decode_image` does for files.

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
