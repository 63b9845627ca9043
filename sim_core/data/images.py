"""Reading image files the way every part of simbench sees them.

One function decodes pixels (:func:`read_image_rgb`) and one reads only the
size (:func:`image_size`); both apply the EXIF orientation, because COCO-style
annotations are drawn on the image as a viewer shows it, and a size check
against the json must compare the same thing the training code will decode.

All images become 8-bit RGB so the detector sees one format:
- grayscale (``L``, ``1``, ``LA``) is replicated to three channels;
- palette (``P``/``PA``) images are expanded through their palette;
- RGBA / LA: the alpha channel is dropped (the stored colour is kept, not
  composited onto a background), so a transparent pixel keeps its colour;
- 16-bit grayscale (``I;16*``, and ``I`` which Pillow uses for 16-bit PNGs) is
  scaled to 8 bit by ``round(v / 257)`` (65535 -> 255), not clipped as
  ``Image.convert`` would; 32-bit float (``F``) is clipped to [0, 255];
- CMYK / YCbCr and other colour modes go through Pillow's ``convert("RGB")``.

A file Pillow cannot identify or decode raises :class:`InputError` naming it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sim_core.errors import InputError

EXIF_ORIENTATION_TAG = 0x0112
# Orientations 5-8 rotate by 90 or 270 degrees and so swap width and height.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}

_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise InputError(path, "image file does not exist") from None
    except _DECODE_ERRORS as exc:
        raise InputError(path, f"cannot decode image file ({type(exc).__name__}: {exc})") from None


def _header_orientation(img: Image.Image) -> int:
    """EXIF orientation readable without decoding the pixels (1 when absent).

    For PNG, Pillow's ``getexif`` would decode the whole image to look for an
    eXIf chunk after the pixel data; only a chunk found in the header is used
    here. :func:`read_image_rgb` reports any disagreement this could cause.
    """
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = img.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a corrupt EXIF block is ignored, as viewers do
        return 1
    return int(value) if isinstance(value, int) else 1


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of the image as displayed (after EXIF orientation).

    Reads only the file header, so it is cheap enough to check every image of
    COCO before training. A file that cannot be identified raises InputError.
    """
    path = Path(path)
    with _open(path) as img:
        width, height = img.size
        if _header_orientation(img) in _SWAPPING_ORIENTATIONS:
            width, height = height, width
    return int(height), int(width)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(img).astype(np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("P", "PA"):
        # A palette with a transparency entry converts to RGBA first so that
        # Pillow does not warn; the alpha is dropped like any other alpha.
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def read_image_rgb(path: str | Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file to an ``[H, W, 3]`` uint8 RGB array, EXIF-oriented.

    ``expected_size`` (``(height, width)``, e.g. from the COCO json) is
    checked against the decoded size; a mismatch raises InputError naming the
    file, so a wrong size can never silently misplace boxes and masks.
    """
    path = Path(path)
    with _open(path) as img:
        try:
            img.load()
            oriented = ImageOps.exif_transpose(img)
            array = _to_rgb_array(oriented)
        except _DECODE_ERRORS as exc:
            raise InputError(path, f"cannot decode image file ({type(exc).__name__}: {exc})") from None
    if expected_size is not None and tuple(array.shape[:2]) != tuple(expected_size):
        exp_h, exp_w = expected_size
        raise InputError(
            path,
            f"decoded image is {array.shape[1]}x{array.shape[0]} (width x height, after EXIF "
            f"orientation) but the annotations say {exp_w}x{exp_h}",
        )
    return array
