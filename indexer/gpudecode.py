"""JPEGs decoded in GPU batches (nvJPEG), oriented, resized and cropped as the CPU path does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from indexer.jpegroute import Route
from indexer.preprocess import DataConfig, resized_size

Decode = Callable[[list[torch.Tensor]], list[torch.Tensor]]
MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


def nvjpeg(device: str | torch.device) -> Decode:
    """torchvision's batched JPEG decoder on `device` (nvJPEG on CUDA), RGB out."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device))

    return decode


def decode_split(blobs: list[torch.Tensor], decode: Decode) -> list[torch.Tensor | None]:
    """Each blob decoded (CHW uint8), in order; a batch that fails is split in halves until
    the items that fail alone are found: those are None (the CPU path decodes them)."""
    if not blobs:
        return []
    try:
        out = decode(blobs)
        if len(out) != len(blobs):
            raise RuntimeError("the decoder returned another number of images")
        return list(out)
    except Exception:
        if len(blobs) == 1:
            return [None]
        half = len(blobs) // 2
        return decode_split(blobs[:half], decode) + decode_split(blobs[half:], decode)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A CHW image turned as EXIF orientation 1-8 says (as PIL's exif_transpose does)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1).flip(-2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return image.rot90(-1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return image.rot90(1, dims=(-2, -1))
    return image


def resize_crop(image: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """timm's eval geometry on a CHW uint8 image: resize (antialiased) as resized_size says,
    centre crop to the input size; HWC uint8 out, like the CPU path's pixels."""
    _, crop_h, crop_w = cfg.input_size
    height, width = int(image.shape[-2]), int(image.shape[-1])
    new_w, new_h = resized_size(width, height, cfg)
    mode = MODES.get(cfg.interpolation, "bicubic")
    x = image.unsqueeze(0).float()
    smooth = mode != "nearest"
    x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode=mode, antialias=smooth)
    top, left = round((new_h - crop_h) / 2.0), round((new_w - crop_w) / 2.0)
    x = x[..., top : top + crop_h, left : left + crop_w]
    return x.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0)


class GpuDecoder:
    """uint8 NHWC model inputs for routed JPEGs, decoded and prepared on the device; None for
    an item to decode on the CPU instead."""

    def __init__(self, cfg: DataConfig, device: Any, decode: Decode | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self._decode = decode or nvjpeg(self.device)

    def __call__(self, items: list[tuple[bytes, Route]]) -> list[torch.Tensor | None]:
        blobs = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data, _ in items]
        decoded = decode_split(blobs, self._decode)
        out: list[torch.Tensor | None] = []
        for image, (_, routed) in zip(decoded, items, strict=True):
            if image is None:
                out.append(None)
                continue
            image = orient(image.to(self.device), routed.orientation)
            out.append(resize_crop(image, self.cfg))
        return out
