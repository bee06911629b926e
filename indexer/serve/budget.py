"""The service's pixel budget: how many decoded pixels its requests may hold at once."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from indexer.errors import IndexerError, InputError


class OverBudget(InputError):
    """One image needs more than the whole budget: refused (422), never decoded."""


class BudgetTimeout(IndexerError):
    """The request waited its whole time for other images' pixels to be freed (503)."""


class PixelBudget:
    """At most `capacity` pixels decoded at once, across every request thread (a pixel of a
    wide or alpha mode counts several: header_pixels). A request states its image's size
    (from the header, before a pixel is decoded) and waits its turn:
    concurrent large uploads queue instead of multiplying the memory. An image that needs
    more than the whole budget is refused (OverBudget), so memory stays within it."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise InputError(f"--max-decode-pixels {capacity}: give a positive number of pixels")
        self.capacity = capacity
        self._held = 0
        self._ready = threading.Condition()

    @property
    def held(self) -> int:
        return self._held

    @contextmanager
    def reserve(self, pixels: int, deadline: float) -> Iterator[None]:
        """Hold `pixels` while the block decodes; wait for them until `deadline`
        (time.monotonic()), then BudgetTimeout; more than the budget: OverBudget."""
        share = max(1, int(pixels))
        if share > self.capacity:
            raise OverBudget(
                f"decoding this image needs {share:,} pixel units (its pixels, weighed by its "
                f"mode), over the server's --max-decode-pixels {self.capacity:,}: send a "
                "smaller image, or 8-bit RGB"
            )
        with self._ready:
            while self._held + share > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0 or not self._ready.wait(left):
                    if self._held + share <= self.capacity:
                        break
                    raise BudgetTimeout(
                        "the server is decoding other large images: try again, or send a "
                        "smaller image"
                    )
            self._held += share
        try:
            yield
        finally:
            with self._ready:
                self._held -= share
                self._ready.notify_all()


WIDE_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N", "I;16S", "RGB;16", "RGBA;16")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


def header_pixels(data: bytes) -> int:
    """What decoding an encoded image costs the budget, from its header alone (nothing is
    decoded): its pixels, weighed by what its mode makes Pillow hold per pixel next to an
    8-bit RGB image's 4 bytes (bench: a 16-bit PNG or an I TIFF ~30 bytes a pixel at its
    peak, LA or lossless WebP ~16, RGB ~4). An image Pillow cannot open counts as 1:
    decoding it fails at once."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            mode, kind = image.mode, image.format
    except Exception:  # undecodable: decode_image says why, in the request's own error
        return 1
    weight = 8 if mode in WIDE_MODES else 4 if mode in ALPHA_MODES or kind == "WEBP" else 1
    return max(1, int(width) * int(height) * weight)


def return_large_buffers(threshold: int = 1 << 20) -> bool:
    """Have glibc map buffers over `threshold` bytes on their own, so that a decoded image's
    memory goes back to the system when it is freed. By default glibc raises that threshold
    after each large free and keeps later images in per-thread arenas: 16 uploads of a 9400 x
    9400 PNG left 1.4 GiB held after (bench/hostile.py). False where this is not glibc."""
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(m_mmap_threshold, threshold))
    except (OSError, AttributeError):
        return False
