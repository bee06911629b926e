"""JPEGs decoded in GPU batches (nvJPEG), oriented, resized and cropped as the CPU path does."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from indexer.config import DataConfig
from indexer.decode.jpeg_route import Route
from indexer.decode.preprocess import crop_box, resized_size

Decode = Callable[[list[torch.Tensor]], list[torch.Tensor]]
MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


def nvjpeg(device: str | torch.device) -> Decode:
    """torchvision's batched JPEG decoder on `device` (nvJPEG on CUDA), RGB out."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device))

    return decode


CHECK_LEVELS = 8.0  # mean difference from Pillow's pixels a working decoder stays within (a
# swapped channel or a flipped image is ~65 levels off on the test image; a 3x3 blur ~10)


def unusable(device: str | torch.device, decode: Decode | None = None) -> str | None:
    """None when the decoder works on `device` (nvJPEG on CUDA): a small baseline and a
    progressive JPEG of one scene decode in one batch to Pillow's pixels, within a few levels
    (their upsampling and IDCT differ slightly). Otherwise why not, in a line; never raises."""
    import io

    import numpy as np
    from PIL import Image

    from indexer.synthetic import scene

    blobs, want = [], []
    for progressive in (False, True):
        buffer = io.BytesIO()
        scene(5, (64, 48)).save(buffer, "JPEG", quality=95, progressive=progressive)
        blobs.append(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
        want.append(np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32))
    try:
        got = list((decode or nvjpeg(device))(blobs))
        return _unlike(got, want)
    except Exception as exc:  # not built with nvJPEG, no decode_jpeg, a driver error, ...
        return _one_line(exc)


def _unlike(got: list[Any], want: list[Any]) -> str | None:
    """Why decoded test images are not the expected pixels, or None."""
    import numpy as np

    images = [image for image in got if isinstance(image, torch.Tensor) and _is_chw(image)]
    if len(images) != len(want) or any(image.dtype != torch.uint8 for image in images):
        return "the decoder returned other images than it was given"
    for image, pixels in zip(images, want, strict=True):
        hwc = image.detach().expand(3, -1, -1).permute(1, 2, 0).cpu().numpy().astype(np.float32)
        if hwc.shape != pixels.shape:
            return f"a test image decoded to {hwc.shape[1]}x{hwc.shape[0]}, not 64x48"
        if not float(np.abs(hwc - pixels).mean()) <= CHECK_LEVELS:
            return "its pixels differ from Pillow's on a test image"
    return None


def _one_line(exc: Exception) -> str:
    try:
        text = (str(exc).strip().splitlines() or [""])[0]
    except Exception:  # an exception whose message itself fails
        text = ""
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:300]


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
    return _to_nhwc(_resized(image.unsqueeze(0), cfg))[0]


def _resized(images: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """resize_crop's resize and crop for NCHW uint8 images of one shape, by one interpolate;
    float NCHW out, not yet rounded."""
    _, crop_h, crop_w = cfg.input_size
    height, width = int(images.shape[-2]), int(images.shape[-1])
    new_w, new_h = resized_size(width, height, cfg)
    mode = MODES.get(cfg.interpolation, "bicubic")
    smooth = mode != "nearest"
    x = torch.nn.functional.interpolate(images.float(), size=(new_h, new_w), mode=mode,
                                        antialias=smooth)  # fmt: skip
    top, left = round((new_h - crop_h) / 2.0), round((new_w - crop_w) / 2.0)
    return x[..., top : top + crop_h, left : left + crop_w]


def _to_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


CHUNK_BYTES = 1 << 30  # float32 padded images resized at once, at most
RESIZE = "roi"  # how GpuDecoder resizes a batch: "roi" (resize_crop_batch) or "groups"


def resize_crop_groups(images: list[torch.Tensor], cfg: DataConfig) -> torch.Tensor:
    """resize_crop for many CHW uint8 images: each run of one shape (sorted by shape) resized
    by one interpolate, as resize_crop does alone: within a level of the CPU path, where
    resize_crop_batch's one roi_align is ~1.3 levels off on average (ImageNet photos, here).
    NHWC uint8, 3 channels, in the order given."""
    _, crop_h, crop_w = cfg.input_size
    order = sorted(range(len(images)), key=lambda n: tuple(images[n].shape[::-1]))
    ordered = [images[n] for n in order]
    out = ordered[0].new_empty((len(ordered), 3, crop_h, crop_w), dtype=torch.float32)
    for first, end in _runs(ordered):
        height, width = _size(ordered[first])
        new_w, new_h = resized_size(width, height, cfg)  # float32, before and after
        step = max(1, CHUNK_BYTES // (3 * max(height * width, new_h * new_w) * 4))
        for start in range(first, end, step):
            stop = min(end, start + step)
            run = ordered[start].unsqueeze(0) if stop - start == 1 else torch.stack(
                ordered[start:stop])  # fmt: skip
            out[start:stop] = _resized(run, cfg)  # grey: broadcast to the 3 channels
    return _in_order(_to_nhwc(out), order)


def _in_order(pixels: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Rows made in `order` (row k is image order[k]) put back in the images' order."""
    if order == sorted(order):
        return pixels.contiguous()
    back = [0] * len(order)
    for place, n in enumerate(order):
        back[n] = place
    return pixels[torch.tensor(back, device=pixels.device)].contiguous()


def resize_crop_batch(images: list[torch.Tensor], cfg: DataConfig) -> torch.Tensor:
    """resize_crop for many CHW uint8 images at once: each one's crop box (in its own
    coordinates) sampled by one roi_align over the images padded into a batch, an adaptive
    number of samples per output pixel averaging as an antialiased downscale does. NHWC uint8,
    in the order given.

    The images are laid into the batch sorted by size, each run of one size copied at once:
    a few copies per batch instead of one per image (collections resized to one size, as
    img2dataset writes them, need one)."""
    from torchvision.ops import roi_align

    _, crop_h, crop_w = cfg.input_size
    order = sorted(range(len(images)), key=lambda n: tuple(images[n].shape[::-1]))
    ordered = [images[n] for n in order]
    out, start = [], 0
    while start < len(ordered):
        chunk = _chunk(ordered, start)
        height = max(_size(t)[0] for t in chunk)
        width = max(_size(t)[1] for t in chunk)
        batch = chunk[0].new_zeros((len(chunk), 3, height, width), dtype=torch.float32)
        boxes = []
        for first, end in _runs(chunk):
            h, w = _size(chunk[first])
            run = chunk[first] if end - first == 1 else torch.stack(chunk[first:end])
            batch[first:end, :, :h, :w] = run
            box = crop_box(w, h, cfg)
            _pad_edges(batch[first:end], h, w, box)
            boxes += [[n, *box] for n in range(first, end)]
        rois = torch.tensor(boxes, dtype=torch.float32, device=batch.device)
        pixels = roi_align(batch, rois, (crop_h, crop_w), 1.0, sampling_ratio=0, aligned=True)
        out.append(pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
        start += len(chunk)
    return _in_order(torch.cat(out) if len(out) > 1 else out[0], order)


def _pad_edges(batch: torch.Tensor, h: int, w: int, box: tuple[float, ...]) -> None:
    """Where the crop box reaches an h x w image's last row or column (crop_pct 1), the row
    or column past it in the padded batch made a copy of it: a bilinear sample there then
    reads what it would read alone (roi_align clamps at a tensor's edge), not padding zeros.
    A sample lies before the box's end, so a box ending by h - 1 reads no further than h - 1.
    """
    if box[3] > h - 1 and h < batch.shape[-2]:
        batch[:, :, h, :w] = batch[:, :, h - 1, :w]
    if box[2] > w - 1 and w < batch.shape[-1]:
        batch[:, :, : h + 1, w] = batch[:, :, : h + 1, w - 1]


def _is_chw(image: torch.Tensor | None) -> bool:
    return (
        image is not None
        and image.dim() == 3
        and int(image.shape[0]) in (1, 3)
        and image.shape[1] > 0
        and image.shape[2] > 0
    )


def _size(image: torch.Tensor) -> tuple[int, int]:
    return int(image.shape[-2]), int(image.shape[-1])


def _runs(images: list[torch.Tensor]) -> list[tuple[int, int]]:
    """[first, end) of each run of images of one shape."""
    runs: list[tuple[int, int]] = []
    for n, image in enumerate(images):
        if runs and images[runs[-1][0]].shape == image.shape:
            runs[-1] = (runs[-1][0], n + 1)
        else:
            runs.append((n, n + 1))
    return runs


def _chunk(images: list[torch.Tensor], start: int) -> list[torch.Tensor]:
    """As many images from start as fit CHUNK_BYTES padded (at least one)."""
    end, height, width = start, 0, 0
    while end < len(images):
        h, w = max(height, int(images[end].shape[-2])), max(width, int(images[end].shape[-1]))
        if end > start and (end - start + 1) * 3 * h * w * 4 > CHUNK_BYTES:
            break
        end, height, width = end + 1, h, w
    return images[start:end]


def _as_tensor(data: torch.Tensor | bytes) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data
    if not data:  # frombuffer refuses an empty buffer; the decoder fails on it, in its turn
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class GpuDecoder:
    """uint8 NHWC model inputs for routed JPEGs, decoded and prepared on the device; None for
    an item to decode on the CPU instead."""

    def __init__(self, cfg: DataConfig, device: Any, decode: Decode | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self._decode = decode or nvjpeg(self.device)

    def __call__(
        self, items: Sequence[tuple[torch.Tensor | bytes, Route]]
    ) -> list[torch.Tensor | None]:
        """Each item's JPEG bytes (a 1-d uint8 tensor, or bytes) and route."""
        pixels, good = self.prepare(self.decode(items), [r for _, r in items])
        out: list[torch.Tensor | None] = [None] * len(items)
        if pixels is not None:
            for n, row in zip(good, pixels, strict=True):
                out[n] = row
        return out

    def decode(
        self, items: Sequence[tuple[torch.Tensor | bytes, Route]]
    ) -> list[torch.Tensor | None]:
        """The images as decoded (CHW uint8 on the device); None where the GPU failed, or
        returned something else than 1 or 3 channels of a non-empty image."""
        decoded = decode_split([_as_tensor(data) for data, _ in items], self._decode)
        return [image if _is_chw(image) else None for image in decoded]

    def prepare(
        self, decoded: list[torch.Tensor | None], routes: list[Route]
    ) -> tuple[torch.Tensor | None, list[int]]:
        """The decoded images oriented, resized and cropped: one NHWC uint8 tensor of model
        inputs, and the index of the image each row is (the failed ones left out)."""
        good = [n for n, image in enumerate(decoded) if image is not None]
        oriented = []
        for n in good:
            image = decoded[n]
            assert image is not None
            if image.device != self.device:
                image = image.to(self.device)
            oriented.append(orient(image, routes[n].orientation))
        if not oriented:
            return None, []
        resize = resize_crop_groups if RESIZE == "groups" else resize_crop_batch
        return resize(oriented, self.cfg), good
