"""Decode one image to oriented RGB (EXIF, modes, size limit, JPEG draft); build and query alike."""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from indexer.config import DEFAULT_MAX_PIXELS

BACKGROUND = (255, 255, 255)  # alpha is composited on white, as most viewers show it
EXIF_ORIENTATION = 0x0112
BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


class DecodeError(Exception):
    """An image could not be decoded; the message is stored in the errors table."""


@dataclass(frozen=True)
class Decoded:
    """An oriented RGB image, possibly reduced by a JPEG draft, and its full oriented size."""

    image: Image.Image
    width: int
    height: int


DraftSize = Callable[[int, int], tuple[int, int]]


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: DraftSize | None = None,
    allow_truncated: bool = False,
) -> Decoded:
    """Decode bytes to an oriented RGB image, or raise DecodeError with the reason.

    ``draft`` maps the stored size to the smallest size the caller needs; a JPEG is then
    decoded at a reduced scale (1/2, 1/4 or 1/8, in the DCT domain) no smaller than that.
    A truncated file is an error unless ``allow_truncated`` (then its missing part is grey).
    """
    if not data:
        raise DecodeError("empty file")
    before, bomb = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated
    if bomb is not None and max_pixels > bomb:  # a limit raised past Pillow's is ours to keep
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        return _decode(data, max_pixels, draft)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = before, bomb


def _decode(data: bytes, max_pixels: int, draft: DraftSize | None) -> Decoded:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise DecodeError(
                    f"image is {width}x{height}, over the limit of {max_pixels} pixels"
                )
            if draft is not None and img.format == "JPEG":
                img.draft(img.mode, draft(width, height))
            img.seek(0)  # animated images: the first frame
            img.load()
            if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
            return Decoded(to_rgb(ImageOps.exif_transpose(img)), width, height)
    except DecodeError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DecodeError(f"image too large: {exc}") from exc
    except Exception as exc:  # Pillow raises many types for bad data; all mean "cannot decode"
        text = BUFFER_REPR.sub("the file", str(exc))  # the same reason in every run
        raise DecodeError(f"cannot decode image: {type(exc).__name__}: {text}") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: alpha composited, 16-bit scaled, CMYK via Pillow."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _wide_grey_to_rgb(img)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, BACKGROUND)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def _wide_grey_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float greyscale to 8 bits (not clamp)."""
    arr = np.asarray(img)
    if img.mode == "F":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    else:
        scaled = arr.astype(np.float64) / 257.0  # 0..65535 -> 0..255
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")
