"""Micro-batches: uploads decoded apart, then embedded together within a few milliseconds."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_BATCH = 32


@dataclass
class _Job:
    owner: Any  # the Collection whose model embeds it (a version: batches never mix them)
    pixels: np.ndarray
    done: Future[np.ndarray]


class Batcher:
    """embed() from many request threads: requests arriving within `window` seconds of the
    first (up to MAX_BATCH images) are embedded in one call of their collection's model; a
    batch waits only while other uploads are in flight. A window of 0 embeds each request
    alone, in its own thread."""

    def __init__(self, window: float, on_batch: Callable[[int], None] | None = None) -> None:
        self.window = window
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._inflight = 0  # uploads being decoded or embedded: the others a batch may get
        self._lock = threading.Lock()
        self._on_batch = on_batch or (lambda size: None)
        if window > 0:
            threading.Thread(target=self._run, name="micro-batcher", daemon=True).start()

    @contextmanager
    def request(self) -> Iterator[None]:
        """Around an upload's decoding and embedding: while it is the only one, a batch
        does not wait for others."""
        with self._lock:
            self._inflight += 1
        try:
            yield
        finally:
            with self._lock:
                self._inflight -= 1

    def embed(self, collection: Any, pixels: np.ndarray) -> np.ndarray:
        """The embeddings of these prepared images (uint8 NHWC), by the collection's model."""
        if self.window <= 0:
            self._on_batch(len(pixels))
            return np.asarray(collection.embedder.embed(pixels))
        job = _Job(collection, pixels, Future())
        self._jobs.put(job)
        return job.done.result()

    def _run(self) -> None:
        while True:
            batch = [self._jobs.get()]
            deadline = time.monotonic() + self.window
            while sum(len(j.pixels) for j in batch) < MAX_BATCH and self._inflight > len(batch):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self._jobs.get(timeout=left))
                except queue.Empty:
                    break
            for owner in {id(j.owner): j.owner for j in batch}.values():
                self._embed([j for j in batch if j.owner is owner])

    def _embed(self, jobs: list[_Job]) -> None:
        try:
            vectors = jobs[0].owner.embedder.embed(np.concatenate([j.pixels for j in jobs]))
        except BaseException as exc:  # each waiting request hears of it
            for job in jobs:
                job.done.set_exception(exc)
            return
        self._on_batch(len(vectors))
        start = 0
        for job in jobs:
            job.done.set_result(vectors[start : start + len(job.pixels)])
            start += len(job.pixels)
