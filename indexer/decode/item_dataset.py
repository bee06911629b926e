"""Reads and prepares one item by position, in whichever process decodes it; torch-free."""

from __future__ import annotations

import hashlib
import importlib
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from indexer.config import LoaderConfig
from indexer.decode.gpu_share import CpuShare
from indexer.decode.images import DecodeError
from indexer.decode.jpeg_route import route
from indexer.decode.preprocess import Preprocessor, enlarges
from indexer.sources import Item, Source
from indexer.sources.base import SampleFailed, read_together


def loader_work(
    items: list[Item],
    sources: list[Source],
    preprocess: Preprocessor,
    cfg: LoaderConfig,
    known_hashes: frozenset[str] = frozenset(),
    positions: list[int] | None = None,
    gpu_pixels: int | None = None,
    share: CpuShare | None = None,
    carried: dict[int, Any] | None = None,
) -> tuple[ItemDataset, list[int]]:
    """The dataset a build's decoding processes read (the decode alarm armed where there are
    worker processes), and the positions to read: every item unless given. `carried`: the
    bytes of items fetched already (by the pre-check), not fetched again."""
    timeout = cfg.decode_timeout if cfg.workers > 0 else 0.0
    dataset = ItemDataset(items, sources, preprocess, known_hashes, timeout, cfg.decode_hook,
                          gpu_pixels, share, carried)  # fmt: skip
    return dataset, list(range(len(items))) if positions is None else list(positions)


class ItemDataset:
    """Reads and prepares items by position; never substitutes one item for another. A map-style
    dataset for torch's DataLoader that needs no torch itself (the head start uses it first)."""

    def __init__(
        self,
        items: list[Item],
        sources: list[Source],
        preprocess: Preprocessor,
        known_hashes: frozenset[str] = frozenset(),
        decode_timeout: float = 0.0,
        hook: str | None = None,
        gpu_pixels: int | None = None,
        share: CpuShare | None = None,
        carried: dict[int, Any] | None = None,
    ) -> None:
        self.items = items
        self.carried = carried or {}  # fetched already: (bytes, metadata) by position
        self.gpu_pixels = gpu_pixels  # JPEGs the GPU may decode are passed on undecoded
        self.share = share  # except this share of them, decoded here to keep pace
        self.sources = sources
        self.preprocess = preprocess
        self.known_hashes = known_hashes  # bytes already embedded: their vector is reused
        self.decode_timeout = decode_timeout
        self.hook = hook
        self._owner = os.getpid()  # a process forked from it (a worker) arms the decode alarm

    def owned_by(self, pid: int) -> None:
        """Arm the decode alarm in every process but pid's (a dataset made in the process that
        reads it, the early start's, belongs to the main process)."""
        self._owner = pid

    def _armed(self) -> bool:
        return self.decode_timeout > 0 and os.getpid() != self._owner

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict[str, Any]:
        """One item; in a worker process an alarm kills the worker if it takes too long
        (iter_batches then isolates the batch, so the item alone fails)."""
        armed = self._armed()
        if armed:
            signal.setitimer(signal.ITIMER_REAL, self.decode_timeout)
        try:
            return self._prepare(position, self.carried.get(position))
        finally:
            if armed:
                signal.setitimer(signal.ITIMER_REAL, 0)

    def __getitems__(self, positions: list[int]) -> list[dict[str, Any]]:
        """A batch: the items of sources that read many at once (object stores) fetched
        together first, concurrently, then each item prepared as __getitem__ prepares it."""
        return self.prepare_many(positions, self.fetch(positions))

    def reads_many(self) -> bool:
        """Whether a source fetches a batch at once (an object store, a URL list)."""
        return any(hasattr(source, "read_many") for source in self.sources)

    def fetch(self, positions: list[int]) -> dict[int, Any]:
        """The bytes (or exception) of those items whose source reads many at once (those
        fetched already are not fetched again)."""
        rest = [p for p in positions if p not in self.carried]
        return {**read_together(self.items, self.sources, rest),
                **{p: self.carried[p] for p in positions if p in self.carried}}  # fmt: skip

    def prepare_many(self, positions: list[int], fetched: dict[int, Any]) -> list[dict[str, Any]]:
        """The batch's samples, from what fetch() returned for it (the rest read one by one)."""
        armed = self._armed()
        samples = []
        for position in positions:
            if armed:
                signal.setitimer(signal.ITIMER_REAL, self.decode_timeout)
            try:
                samples.append(self._prepare(position, fetched.get(position)))
            finally:
                if armed:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        return samples

    def _prepare(self, position: int, fetched: Any = None) -> dict[str, Any]:
        start = time.perf_counter()
        sample = self._sample(position, fetched)
        sample["seconds"] = time.perf_counter() - start
        return sample

    def _sample(self, position: int, fetched: Any = None) -> dict[str, Any]:
        item = self.items[position]
        if self.hook:
            _resolve_hook(self.hook)(item.key)
        try:
            if isinstance(fetched, BaseException):
                raise fetched
            data, meta = fetched or self.sources[item.source].read(item.locator)
        except SampleFailed as exc:  # never fetched upstream: nothing to read
            return {"position": position, "error": ("fetch", str(exc))}
        except Exception as exc:  # a read failure is this item's error row, not the run's end
            return {"position": position, "error": ("read", reason(exc))}
        digest = hashlib.sha256(data).hexdigest()
        if digest in self.known_hashes:
            return {"position": position, "reuse": digest, "meta": meta}
        shared = False  # a JPEG the GPU could decode, decoded here to keep pace with it
        if self.gpu_pixels is not None:
            routed = route(data, self.gpu_pixels)
            # an image the resize enlarges is the CPU's: cheap to decode, and the GPU's
            # batched resize is made for shrinking (Pillow's bicubic enlarges otherwise)
            gpu = routed.gpu and not enlarges(routed.width, routed.height, self.preprocess.cfg)
            shared = gpu and self.share is not None and self.share.takes(position)
            if gpu and not shared:  # read and routed here; decoded on the GPU
                return {"position": position, "raw": data, "route": routed, "hash": digest,
                        "meta": meta}  # fmt: skip
        start = time.perf_counter()
        try:
            prepared = self.preprocess(data)
        except DecodeError as exc:
            return {"position": position, "error": ("decode", str(exc))}
        except Exception as exc:
            return {"position": position, "error": ("preprocess", reason(exc))}
        return {
            "position": position,
            "pixels": prepared.pixels,
            "width": prepared.width,
            "height": prepared.height,
            "hash": digest,
            "meta": meta,
            "shared": time.perf_counter() - start if shared else None,
        }


def reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _resolve_hook(spec: str) -> Callable[[str], None]:
    module, _, name = spec.partition(":")
    hook: Callable[[str], None] = getattr(importlib.import_module(module), name)
    return hook
