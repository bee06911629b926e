"""The service's pixel budget: how many decoded pixels its requests may hold at once."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from indexer.errors import IndexerError, InputError


class BudgetTimeout(IndexerError):
    """The request waited its whole time for other images' pixels to be freed (503)."""


class PixelBudget:
    """At most `capacity` pixels decoded at once, across every request thread. A request
    states its image's size (from the header, before a pixel is decoded) and waits its turn:
    concurrent large uploads queue instead of multiplying the memory. An image larger than
    the whole budget waits for all of it and decodes alone."""

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
        """Hold `pixels` (at most the whole budget) while the block decodes; wait for them
        until `deadline` (time.monotonic()), then BudgetTimeout."""
        share = max(1, min(int(pixels), self.capacity))
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


def header_pixels(data: bytes) -> int:
    """The pixels an encoded image says it holds (its header only; nothing decoded). An
    image Pillow cannot open counts as 1: decoding it fails at once, without a budget."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # undecodable: decode_image says why, in the request's own error
        return 1
    return max(1, int(width) * int(height))


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
