"""Decode one image to oriented RGB (EXIF, modes, size limit, JPEG draft); build and query alike."""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile

from indexer.config import DEFAULT_MAX_PIXELS

BACKGROUND = (255, 255, 255)  # alpha is composited on white, as most viewers show it
EXIF_ORIENTATION = 0x0112
TRANSPOSE = {  # EXIF orientation -> the transpose that shows the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SWAPS = {Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
         Image.Transpose.ROTATE_90}  # fmt: skip
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
    bomb = Image.MAX_IMAGE_PIXELS
    if bomb is not None and max_pixels > bomb:
        # a limit raised past Pillow's bomb check is ours to keep: Pillow's only grows (never
        # put back, which a thread decoding with the raised limit could meet), and each call
        # checks its own limit on the header's size before any pixel is decoded
        Image.MAX_IMAGE_PIXELS = max_pixels
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated
    try:
        return _decode(data, max_pixels, draft)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _decode(data: bytes, max_pixels: int, draft: DraftSize | None) -> Decoded:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow on odd metadata: not ours
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
            orientation = _orientation(img)
            turn = TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
            if turn is None:
                return Decoded(to_rgb(img), width, height)
            if turn in SWAPS:
                width, height = height, width
            # as ImageOps.exif_transpose turns it, without rewriting the EXIF (which fails
            # on some odd tags, and the pixels do not need)
            return Decoded(to_rgb(img.transpose(turn)), width, height)
    except DecodeError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DecodeError(f"image too large: {exc}") from exc
    except Exception as exc:  # Pillow raises many types for bad data; all mean "cannot decode"
        text = BUFFER_REPR.sub("the file", str(exc))  # the same reason in every run
        raise DecodeError(f"cannot decode image: {type(exc).__name__}: {text}") from exc


def _orientation(img: Image.Image) -> object:
    """The image's EXIF (or XMP) orientation as Pillow reads it; 1 where its EXIF cannot be
    read at all (not TIFF), as Pillow itself then reads it when the file has no JFIF density:
    the pixels are whole either way."""
    try:
        return img.getexif().get(EXIF_ORIENTATION, 1)
    except SyntaxError:  # "not a TIFF file"
        return 1


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
