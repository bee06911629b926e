"""Where an embedding run's time goes: seconds per stage and thread, logged when it ends."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

# the stages in the order they are reported; a stage belongs to one thread, so two threads
# never add to the same total
ORDER = (
    "waiting for workers",  # the thread that takes batches from the DataLoader
    "GPU decode",  # nvJPEG, synchronous
    "GPU resize",  # orientation, resize and crop, until the stream is done
    "CPU fallback",  # routed items the GPU could not decode
    "waiting for the model",  # the decode thread, its queue full
    "waiting for batches",  # the main thread
    "first batch",  # the model's first call: CUDA and cuDNN warm up
    "embedding",
    "writing",
)


class Stages:
    """Seconds spent per stage; `timed` adds to one."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def each(self, items: Iterable[T], stage: str) -> Iterator[T]:
        """items, the wait for each one added to stage."""
        it = iter(items)
        while True:
            with self.timed(stage):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def summary(self) -> str:
        """'stage 1.23 s, ...' in ORDER (stages never timed left out), then any others."""
        names = [s for s in ORDER if s in self.seconds]
        names += sorted(set(self.seconds) - set(ORDER))
        return ", ".join(f"{name} {self.seconds[name]:.2f} s" for name in names)
