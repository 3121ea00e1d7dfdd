"""Image decoding: files to RGB uint8 arrays, at a reduced JPEG scale where the pipeline allows it.

:func:`decode_image` decodes a file or an upload's bytes for training, predict and the web service
(:func:`carnet.serving.upload.decode_upload`), at the reduced JPEG scale their transform allows
(:func:`carnet.data.transforms.decode_min_side`; the eval view's is :attr:`carnet.data.eval_view.EvalView.resize_to`);
:func:`pil_to_rgb` is the one place where a PIL image becomes the pixels a model sees. So a photo is the same array
on every path: shown upright (EXIF orientation), with 16-bit samples scaled to 8 bits. PIL and NumPy only: the
ONNX service decodes with this without torch.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Bumped whenever decode_image gives different pixels for the same file (2: EXIF orientation, 16-bit scaling), so
# that anything storing decoded images across runs (the data.cache=disk folder) can key on it.
DECODE_VERSION = 2
# 16-bit (and 32-bit integer) greyscale modes: PIL's convert("RGB") clips their samples at 255 instead of scaling.
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """The pixels of an opened PIL image as RGB uint8 HxWx3, upright: decodes (loads) it if not yet done.

    - EXIF orientation is applied (phones store portraits sideways and set the tag), as every viewer does.
    - 16-bit greyscale (PNG, TIFF: modes ``I;16*`` and ``I``) is scaled to 8 bits (``round(v / 257)``);
      PIL's ``convert("RGB")`` would clip every sample above 255 to white.
    - Everything else (palette, alpha, CMYK, greyscale, 16-bit RGB(A) PNGs, which PIL reads as 8 bits) goes
      through ``convert("RGB")``; an RGB image is not copied twice.

    Call :meth:`PIL.Image.Image.draft` before this for a reduced-scale JPEG decode: orientation is applied after
    decoding, so the draft size is that of the stored (unrotated) image.
    """
    img.load()
    ImageOps.exif_transpose(img, in_place=True)
    if img.mode in WIDE_GREY_MODES:
        samples = np.asarray(img).astype(np.int64)  # I;16B is big-endian; astype gives native ints
        grey = ((np.clip(samples, 0, 65535) + 128) // 257).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def decode_image(source: str | os.PathLike | bytes, min_side: int | None = None,
                  check: Callable[[Image.Image], None] | None = None) -> np.ndarray:
    """Decode an image file, or the bytes of one (an upload), to an RGB uint8 HxWx3 array (:func:`pil_to_rgb`:
    upright, 16 bits scaled). Training, predict and the web service all decode with this, so a photo gives the
    same pixels, and the same probabilities, on every path.

    With ``min_side``, JPEGs are decoded at a reduced DCT scale (PIL ``draft``) as long as the shorter side stays
    at least ``min_side``: 2-4x less decoding work for a 640x480 photo fed to a 224 px model, and a 36 MP upload
    costs what its model input needs, not 36 MP. The shorter side does not change with the orientation, so the
    draft size is right for rotated photos too. ``check`` sees the opened image before any pixel is decoded
    (size and format, from the header) and may raise to refuse it.
    """
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        if check is not None:
            check(img)
        if min_side and img.format == "JPEG":
            w, h = img.size
            scale = min_side / min(w, h)
            if scale < 1:
                img.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
        return pil_to_rgb(img)


def _undecodable(path: Path) -> str | None:
    """None if the image decodes (at 1/8 scale: every byte is still read), else why not."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (1, 1))
            img.load()
        return None
    except Exception as err:  # PIL raises many types for bad files; any of them means "left out"
        return f"{type(err).__name__}: {err}"


def find_undecodable(paths: Sequence[Path], workers: int = 8) -> dict[Path, str]:
    """Decode every image once (threads: PIL releases the GIL while decoding); return the broken ones."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(_undecodable, paths))
    return {p: r for p, r in zip(paths, reasons, strict=True) if r is not None}
