"""Resize and crop a decoded image as the model's data config says, to uint8 HWC pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from indexer.config import DataConfig
from indexer.decode.images import DEFAULT_MAX_PIXELS, decode_image

MODES = ("fast", "exact")
DRAFT_FACTOR = 2  # a JPEG draft keeps at least 2x the resized size, so resampling still antialiases
REDUCING_GAP = 3.0  # fast mode: Pillow first reduces by an integer factor when shrinking >= 3x
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass
class Prepared:
    """One image ready for the model: uint8 HWC pixels and the image's full oriented size."""

    pixels: np.ndarray
    width: int
    height: int


def resized_size(width: int, height: int, cfg: DataConfig) -> tuple[int, int]:
    """The size timm's eval transform resizes to before its centre crop (torchvision's rules)."""
    _, crop_h, crop_w = cfg.input_size
    if cfg.crop_mode == "squash":
        return math.floor(crop_w / cfg.crop_pct), math.floor(crop_h / cfg.crop_pct)
    short = math.floor(crop_h / cfg.crop_pct)
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def enlarges(width: int, height: int, cfg: DataConfig) -> bool:
    """Whether timm's eval resize makes this image larger (a side smaller than the input's)."""
    new_w, new_h = resized_size(width, height, cfg)
    return new_w > width or new_h > height


def crop_box(width: int, height: int, cfg: DataConfig) -> tuple[float, float, float, float]:
    """The centre crop of the resized image, in the original image's coordinates."""
    _, crop_h, crop_w = cfg.input_size
    new_w, new_h = resized_size(width, height, cfg)
    top = round((new_h - crop_h) / 2.0)  # Python rounding, as torchvision's center_crop
    left = round((new_w - crop_w) / 2.0)
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)


class Preprocessor:
    """bytes -> Prepared. 'exact' equals timm's transform; 'fast' adds JPEG draft and reduce.

    Resizing only the crop box in one step gives the same pixels as timm's resize-then-crop
    (Pillow computes each output pixel from the same filter window either way).
    """

    def __init__(
        self,
        cfg: DataConfig,
        mode: str,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        allow_truncated: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"preprocessing mode must be one of {MODES}, not {mode!r}")
        self.cfg = cfg
        self.fast = mode == "fast"
        self.max_pixels = max_pixels
        self.allow_truncated = allow_truncated
        self._timm_transform: Any = None

    def __call__(self, data: bytes) -> Prepared:
        if not self.cfg.geometry_supported:
            return self._with_timm(data)
        draft = self._draft_size if self.fast else None
        decoded = decode_image(data, self.max_pixels, draft, self.allow_truncated)
        img = decoded.image
        fx, fy = img.width / decoded.width, img.height / decoded.height
        x0, y0, x1, y1 = crop_box(decoded.width, decoded.height, self.cfg)
        _, crop_h, crop_w = self.cfg.input_size
        out = img.resize(
            (crop_w, crop_h),
            RESAMPLE[self.cfg.interpolation],
            box=(x0 * fx, y0 * fy, x1 * fx, y1 * fy),
            reducing_gap=REDUCING_GAP if self.fast else None,
        )
        return Prepared(np.asarray(out), decoded.width, decoded.height)

    def _draft_size(self, width: int, height: int) -> tuple[int, int]:
        new_w, new_h = resized_size(width, height, self.cfg)
        return DRAFT_FACTOR * new_w, DRAFT_FACTOR * new_h

    def _with_timm(self, data: bytes) -> Prepared:
        if self._timm_transform is None:
            from timm.data import create_transform

            c = self.cfg
            self._timm_transform = create_transform(
                input_size=c.input_size, interpolation=c.interpolation, crop_pct=c.crop_pct,
                crop_mode=c.crop_mode, mean=c.mean, std=c.std, use_prefetcher=True,
            )  # fmt: skip
        decoded = decode_image(data, self.max_pixels, None, self.allow_truncated)
        chw = self._timm_transform(decoded.image)
        return Prepared(chw.permute(1, 2, 0).numpy(), decoded.width, decoded.height)
