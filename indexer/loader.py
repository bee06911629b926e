"""Dataset + collate + DataLoader: uint8 image batches tied to their items, plus error rows."""

from __future__ import annotations

import faulthandler
import hashlib
import importlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from indexer.balance import CpuShare, WorkerTime
from indexer.config import LoaderConfig
from indexer.embed import Batch, RawItem
from indexer.images import DecodeError
from indexer.jpegroute import route
from indexer.preprocess import Preprocessor, enlarges
from indexer.sources import Item, Source
from indexer.sources.base import SampleFailed

log = logging.getLogger(__name__)
PREFETCH = 4  # batches per worker decoded ahead (uint8, ~77 KB an image at 160x160)
WORKER_NICE = 5  # measured: -0.3 s of 3.7 s on 500 photos, 2 cores (the import goes first)
GRACE = 5.0  # seconds an isolated decode may outlive its own alarm before it is killed
SHARE = True  # the workers decode a share of the GPU's JPEGs to keep pace (indexer.balance)


class ItemDataset(Dataset):
    """Reads and prepares items by position; never substitutes one item for another."""

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
    ) -> None:
        self.items = items
        self.gpu_pixels = gpu_pixels  # JPEGs the GPU may decode are passed on undecoded
        self.share = share  # except this share of them, decoded here to keep pace
        self.sources = sources
        self.preprocess = preprocess
        self.known_hashes = known_hashes  # bytes already embedded: their vector is reused
        self.decode_timeout = decode_timeout
        self.hook = hook

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict[str, Any]:
        """One item; in a worker process an alarm kills the worker if it takes too long
        (iter_batches then isolates the batch, so the item alone fails)."""
        armed = self.decode_timeout > 0 and get_worker_info() is not None
        if armed:
            signal.setitimer(signal.ITIMER_REAL, self.decode_timeout)
        try:
            return self._prepare(position)
        finally:
            if armed:
                signal.setitimer(signal.ITIMER_REAL, 0)

    def __getitems__(self, positions: list[int]) -> list[dict[str, Any]]:
        """A batch: the items of sources that read many at once (object stores) fetched
        together first, concurrently, then each item prepared as __getitem__ prepares it."""
        fetched = self._fetch_many(positions)
        armed = self.decode_timeout > 0 and get_worker_info() is not None
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

    def _fetch_many(self, positions: list[int]) -> dict[int, Any]:
        by_source: dict[int, list[int]] = {}
        for position in positions:
            by_source.setdefault(self.items[position].source, []).append(position)
        fetched: dict[int, Any] = {}
        for index, chunk in by_source.items():
            read_many = getattr(self.sources[index], "read_many", None)
            if read_many is None:
                continue
            try:
                results = read_many([self.items[p].locator for p in chunk])
            except Exception as exc:  # the whole request failed: each item's error row
                results = [exc] * len(chunk)
            fetched.update(zip(chunk, results, strict=True))
        return fetched

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
            return {"position": position, "error": ("read", _reason(exc))}
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
            return {"position": position, "error": ("preprocess", _reason(exc))}
        return {
            "position": position,
            "pixels": prepared.pixels,
            "width": prepared.width,
            "height": prepared.height,
            "hash": digest,
            "meta": meta,
            "shared": time.perf_counter() - start if shared else None,
        }


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _resolve_hook(spec: str) -> Callable[[str], None]:
    module, _, name = spec.partition(":")
    hook: Callable[[str], None] = getattr(importlib.import_module(module), name)
    return hook


def collate(samples: list[dict[str, Any]]) -> Batch:
    shared = [s["shared"] for s in samples if s.get("shared") is not None]
    batch = Batch(spent=WorkerTime(sum(s.get("seconds", 0.0) for s in samples), len(shared),
                                   sum(shared)))  # fmt: skip
    good = []
    for s in samples:
        if "error" in s:
            stage, reason = s["error"]
            batch.errors.append((s["position"], stage, reason))
            continue
        if "reuse" in s:
            batch.reused.append((s["position"], s["reuse"], s["meta"]))
            continue
        if "raw" in s:
            batch.raw.append(RawItem(s["position"], 0, len(s["raw"]), s["route"], s["hash"],
                                     s["meta"]))  # fmt: skip
            continue
        batch.positions.append(s["position"])
        batch.widths.append(s["width"])
        batch.heights.append(s["height"])
        batch.hashes.append(s["hash"])
        batch.metadata.append(s["meta"])
        good.append(s["pixels"])
    if good:
        batch.pixels = torch.from_numpy(np.stack(good))  # uint8 NHWC
    if batch.raw:
        batch.raw, batch.raw_blob = pack_raw(batch.raw, [s["raw"] for s in samples if "raw" in s])
    return batch


def pack_raw(raw: list[RawItem], datas: list[bytes]) -> tuple[list[RawItem], torch.Tensor]:
    """The raw items' bytes laid end to end in one uint8 tensor, each item its slice."""
    blob = np.empty(sum(len(d) for d in datas), np.uint8)
    packed, offset = [], 0
    for item, data in zip(raw, datas, strict=True):
        blob[offset : offset + len(data)] = np.frombuffer(data, np.uint8)
        packed.append(replace(item, start=offset, end=offset + len(data)))
        offset += len(data)
    return packed, torch.from_numpy(blob)


def _init_worker(_worker_id: int) -> None:
    """Decoding fills the cores the main process leaves idle (importing, then the model); the
    decode alarm's default action ends the worker, whatever native code it is stuck in."""
    os.nice(WORKER_NICE)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)


def iter_batches(
    items: list[Item],
    sources: list[Source],
    preprocess: Preprocessor,
    cfg: LoaderConfig,
    known_hashes: frozenset[str] = frozenset(),
    positions: list[int] | None = None,
    gpu_decode: bool = False,
) -> Iterator[Batch]:
    """Batches in item order (DataLoader keeps order across workers).

    Workers start, and decode up to ``PREFETCH`` batches each, as soon as this is called. A
    worker that crashes (a segfault in a native decoder) or hangs past ``decode_timeout``
    costs only its item: the batch being waited for is decoded again item by item, each in
    a process of its own, the item that kills its process becomes an error row, and a new
    loader goes on with the rest.
    """
    timeout = cfg.decode_timeout if cfg.workers > 0 else 0.0
    gpu_pixels = preprocess.max_pixels if gpu_decode and preprocess.cfg.geometry_supported else None
    share = CpuShare(cfg.workers) if gpu_pixels is not None and SHARE else None
    dataset = ItemDataset(items, sources, preprocess, known_hashes, timeout, cfg.decode_hook,
                          gpu_pixels, share)  # fmt: skip
    todo = list(range(len(items))) if positions is None else list(positions)
    return _with_share(_resilient(dataset, todo, cfg, _loader(dataset, todo, cfg)), share)


def _with_share(batches: Iterator[Batch], share: CpuShare | None) -> Iterator[Batch]:
    """The batches, each carrying the share its GPU side reports back to."""
    for batch in batches:
        batch.share = share
        yield batch


def _loader(dataset: ItemDataset, todo: list[int], cfg: LoaderConfig) -> Iterator[Batch]:
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=todo,
        num_workers=cfg.workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=PREFETCH if cfg.workers > 0 else None,
        persistent_workers=False,
        worker_init_fn=_init_worker,
        generator=torch.Generator(),  # its own: never draws from torch's global generator,
    )  # which a model being created with a seed may be using meanwhile (knownexport)
    batches = iter(loader)
    if cfg.workers > 0 and threading.current_thread() is threading.main_thread():
        # torch's SIGCHLD handler raises a dead worker's error wherever the main thread is
        # (inside the model, say); without it the loader notices within 5 s while we wait
        # for a batch, where _resilient can act on it.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return batches


def _resilient(
    dataset: ItemDataset, todo: list[int], cfg: LoaderConfig, current: Iterator[Batch]
) -> Iterator[Batch]:
    done = 0  # items of `todo` yielded so far (batches come in order, batch_size each)
    while True:
        try:
            for batch in current:
                done += cfg.batch_size
                yield batch
            return
        except RuntimeError as exc:
            if "exited unexpectedly" not in str(exc) and "killed by signal" not in str(exc):
                raise
        del current  # the broken loader's other workers are shut down
        chunk = todo[done : done + cfg.batch_size]
        log.warning("a decoding worker died; decoding %d items one by one", len(chunk))
        yield collate([isolated(dataset, position, cfg.decode_timeout) for position in chunk])
        done += len(chunk)
        if done >= len(todo):
            return
        current = _loader(dataset, todo[done:], cfg)


def isolated(dataset: ItemDataset, position: int, timeout: float) -> dict[str, Any]:
    """dataset[position] in a forked process of its own: a crash or hang fails this item only."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_decode_child, args=(dataset, position, timeout, send))
    child.start()
    send.close()
    limit = timeout + GRACE if timeout > 0 else None
    result = None
    if receive.poll(limit):
        try:
            result = receive.recv()
        except EOFError:  # the process died before it could answer
            result = None
    child.join(GRACE)
    if child.is_alive():
        child.kill()
        child.join()
    if result is not None:
        return result
    return {"position": position, "error": ("decode", _death(child.exitcode, timeout))}


def _decode_child(dataset: ItemDataset, position: int, timeout: float, send: Any) -> None:
    faulthandler.disable()  # a crash here is expected and reported as the item's error
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    if timeout > 0:
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        result = dataset._prepare(position)
    except BaseException as exc:  # anything the dataset did not already turn into an error
        result = {"position": position, "error": ("decode", _reason(exc))}
    signal.setitimer(signal.ITIMER_REAL, 0)
    send.send(result)
    send.close()


def _death(exitcode: int | None, timeout: float) -> str:
    if exitcode == -signal.SIGALRM or exitcode is None:
        return f"decoding took longer than {timeout:g}s (--decode-timeout); the item was skipped"
    if exitcode is not None and exitcode < 0:
        return f"the decoder crashed ({signal.Signals(-exitcode).name}); the item was skipped"
    return f"the decoding process exited with code {exitcode}; the item was skipped"
