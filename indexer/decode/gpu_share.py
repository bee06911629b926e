"""The share of GPU-decodable JPEGs the workers decode themselves, so neither side waits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PHI = 0.6180339887498949  # positions times PHI, modulo 1, spread evenly over [0, 1)
START = 0.25  # the share before anything is measured (the workers' decode time among it)
MAX_SHARE = 0.9
SMOOTHING = 0.25  # how far each batch moves the share toward what it measured


def balanced_share(eligible: int, gpu: float, workers: int, base: float, cpu: float) -> float:
    """Of a batch's `eligible` JPEGs (the GPU could decode them all), the share its worker
    decodes so that the workers and the GPU keep pace.

    A worker prepares a whole batch, `workers` of them at once; the GPU side takes `gpu`
    seconds an image. With `base` seconds of the worker's other work on the batch (reading,
    hashing, images the GPU cannot decode) and `cpu` seconds to decode one of these JPEGs, x
    of them on the workers balances (base + x * cpu) / workers = (eligible - x) * gpu.
    """
    if eligible <= 0 or workers <= 0 or cpu <= 0 or gpu <= 0:
        return 0.0
    x = (eligible * gpu * workers - base) / (cpu + gpu * workers)
    return min(MAX_SHARE, max(0.0, x / eligible))


@dataclass(frozen=True)
class WorkerTime:
    """What a batch cost its worker: seconds for all of its items, and of that, the seconds
    spent decoding the `shared` GPU-decodable JPEGs it decoded itself."""

    seconds: float = 0.0
    shared: int = 0
    shared_seconds: float = 0.0


class CpuShare:
    """The share, in shared memory: the main process sets it as batches come back, the
    workers (which inherit it) read it for each item."""

    def __init__(self, workers: int, start: float = START) -> None:
        from multiprocessing.sharedctypes import RawValue

        self.workers = workers
        self._value: Any = RawValue("d", start if workers > 0 else 0.0)
        self._cpu = 0.0  # smoothed seconds a worker takes to decode one of these JPEGs
        self._gpu = 0.0  # smoothed seconds the GPU side takes an image
        self.taken = 0  # JPEGs the workers decoded instead of the GPU

    @property
    def value(self) -> float:
        return float(self._value.value)

    def takes(self, position: int) -> bool:
        """Whether the worker decodes this GPU-decodable item itself. Positions times PHI
        spread evenly, so every run of consecutive positions holds about the share."""
        return (position * PHI) % 1.0 < self._value.value

    def update(self, spent: WorkerTime, gpu_images: int, gpu_seconds: float) -> None:
        """Move the share toward the balance a batch measured: its worker's time, and the
        seconds the GPU side took for its gpu_images."""
        self.taken += spent.shared
        if self.workers <= 0 or not _usable(spent.seconds, spent.shared_seconds, gpu_seconds):
            return  # a clock that went wrong says nothing: the share stays where it is
        if spent.shared:
            self._cpu = _smooth(self._cpu, spent.shared_seconds / spent.shared)
        if gpu_images:
            self._gpu = _smooth(self._gpu, gpu_seconds / gpu_images)
        if self._cpu <= 0 or self._gpu <= 0:
            return
        base = max(0.0, spent.seconds - spent.shared_seconds)
        eligible = gpu_images + spent.shared
        target = balanced_share(eligible, self._gpu, self.workers, base, self._cpu)
        self._value.value = self.value + SMOOTHING * (target - self.value)


def _usable(*seconds: float) -> bool:
    return all(math.isfinite(s) and s >= 0 for s in seconds)


def _smooth(previous: float, measured: float) -> float:
    return measured if previous <= 0 else previous + SMOOTHING * (measured - previous)
