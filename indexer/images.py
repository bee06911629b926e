"""Decode one image to RGB and preprocess it to uint8 pixels; the same rules for build and query."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

# Pillow's own default limit: past it Pillow only warns (and errors at twice the value).
DEFAULT_MAX_PIXELS = 89_478_485
BACKGROUND = (255, 255, 255)  # alpha is composited on white, as most viewers show it


class DecodeError(Exception):
    """An image could not be decoded; the message is stored in the errors table."""


@dataclass(frozen=True)
class DataConfig:
    """The model's resolved preprocessing (timm's data config), as recorded in the manifest."""

    input_size: tuple[int, int, int]
    interpolation: str
    crop_pct: float
    crop_mode: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        return cls(
            input_size=(int(d["input_size"][0]), int(d["input_size"][1]), int(d["input_size"][2])),
            interpolation=str(d["interpolation"]),
            crop_pct=float(d["crop_pct"]),
            crop_mode=str(d.get("crop_mode") or "center"),
            mean=(float(d["mean"][0]), float(d["mean"][1]), float(d["mean"][2])),
            std=(float(d["std"][0]), float(d["std"][1]), float(d["std"][2])),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
            "mean": list(self.mean),
            "std": list(self.std),
        }


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode bytes to an oriented RGB image, or raise DecodeError with the reason."""
    if not data:
        raise DecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise DecodeError(
                    f"image is {img.width}x{img.height}, over the limit of {max_pixels} pixels"
                )
            img.seek(0)  # animated images: the first frame
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except DecodeError:
        raise
    except Image.DecompressionBombWarning as exc:
        raise DecodeError(f"image too large: {exc}") from exc
    except Exception as exc:  # Pillow raises many types for bad data; all mean "cannot decode"
        raise DecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


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


def make_preprocess(cfg: DataConfig) -> Callable[[Image.Image], Any]:
    """timm's own eval transform for this data config, ending in uint8 CHW (normalised later)."""
    from timm.data import create_transform

    return create_transform(
        input_size=cfg.input_size,
        is_training=False,
        use_prefetcher=True,
        interpolation=cfg.interpolation,
        crop_pct=cfg.crop_pct,
        crop_mode=cfg.crop_mode,
        mean=cfg.mean,
        std=cfg.std,
    )
