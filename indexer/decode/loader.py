"""Collate + DataLoader: uint8 image batches tied to their items, plus error rows."""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from indexer.config import LoaderConfig
from indexer.decode.batch import Batch, RawItem
from indexer.decode.gpu_share import CpuShare, WorkerTime
from indexer.decode.head_start import HeadStart
from indexer.decode.item_dataset import ItemDataset, loader_work, reason
from indexer.decode.preprocess import Preprocessor
from indexer.sources import Item, Source

log = logging.getLogger(__name__)
PREFETCH = 4  # batches per worker decoded ahead (uint8, ~77 KB an image at 160x160)
WORKER_NICE = 5  # measured: -0.3 s of 3.7 s on 500 photos, 2 cores (the import goes first)
GRACE = 5.0  # seconds an isolated decode may outlive its own alarm before it is killed
SHARE = (
    True  # the workers decode a share of the GPU's JPEGs to keep pace (indexer.decode.gpu_share)
)


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
    head: HeadStart | None = None,
    carried: dict[int, Any] | None = None,
) -> Iterator[Batch]:
    """Batches in item order (DataLoader keeps order across workers): with a head start,
    its batches first (from the front of the items), then the DataLoader's.

    Workers start, and decode up to ``PREFETCH`` batches each, as soon as this is called. A
    worker that crashes (a segfault in a native decoder) or hangs past ``decode_timeout``
    costs only its item: the batch being waited for is decoded again item by item, each in
    a process of its own, the item that kills its process becomes an error row, and a new
    loader goes on with the rest.
    """
    if head is not None:  # its own dataset: the same items, preprocessing and timeout
        taken = head.stop()
        log.info("%d of %d items decoded while torch loaded (the head start)", taken,
                 len(head.todo))  # fmt: skip
        rest = head.todo[taken:]
        later = _resilient(head.dataset, rest, cfg, _loader(head.dataset, rest, cfg))
        return AfterHead(head, _after_head(head, cfg, later if rest else iter(())))
    gpu_pixels = preprocess.max_pixels if gpu_decode and preprocess.cfg.geometry_supported else None
    share = CpuShare(cfg.workers) if gpu_pixels is not None and SHARE else None
    dataset, todo = loader_work(items, sources, preprocess, cfg, known_hashes, positions,
                                gpu_pixels, share, carried)  # fmt: skip
    return _with_share(_resilient(dataset, todo, cfg, _loader(dataset, todo, cfg)), share)


class AfterHead:
    """The head start's batches, then the DataLoader's. close() stops the head start's
    process even before the first batch was asked for (a generator closed before it started
    runs no finally block): a build failing in between leaves nothing decoding."""

    def __init__(self, head: HeadStart, batches: Iterator[Batch]) -> None:
        self._head, self._batches = head, batches

    def __iter__(self) -> AfterHead:
        return self

    def __next__(self) -> Batch:
        return next(self._batches)

    def close(self) -> None:
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()
        self._head.close()


def _after_head(head: HeadStart, cfg: LoaderConfig, later: Iterator[Batch]) -> Iterator[Batch]:
    """The head start's batches, then the DataLoader's (whose workers are decoding already).
    A batch the head start's process died before delivering is decoded again item by item,
    each in a process of its own, as a dead worker's is; the batches an early start's
    process never took, by a loader of their own."""
    timeout = head.dataset.decode_timeout
    try:
        for delivered in head.results():
            if delivered.samples is not None:
                yield collate(delivered.samples)
                continue
            if not delivered.claimed:
                todo = delivered.positions
                yield from _resilient(head.dataset, todo, cfg, _loader(head.dataset, todo, cfg))
                continue
            log.warning("the first batches' decoding process died; decoding %d items one by one",
                        len(delivered.positions))  # fmt: skip
            yield collate([isolated(head.dataset, p, timeout) for p in delivered.positions])
    finally:
        head.close()
    yield from later


def _with_share(batches: Iterator[Batch], share: CpuShare | None) -> Iterator[Batch]:
    """The batches, each carrying the share its GPU side reports back to."""
    for batch in batches:
        batch.share = share
        yield batch


def _loader(dataset: ItemDataset, todo: list[int], cfg: LoaderConfig) -> Iterator[Batch]:
    loader: DataLoader[dict[str, Any]] = DataLoader(
        cast("Dataset[dict[str, Any]]", dataset),  # map-style: __len__, __getitem(s)__
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
    """dataset[position] in a forked process of its own: a crash or hang fails this item only.
    An object store's item is fetched here first, as a batch's is before its alarm: the
    alarm times decoding, not the store (nor a client loading in a fresh process)."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    fetched = dataset.fetch([position]).get(position) if dataset.reads_many() else None
    child = context.Process(target=_decode_child,
                            args=(dataset, position, timeout, send, fetched))  # fmt: skip
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


def _decode_child(
    dataset: ItemDataset, position: int, timeout: float, send: Any, fetched: Any
) -> None:
    faulthandler.disable()  # a crash here is expected and reported as the item's error
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    if timeout > 0:
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        result = dataset._prepare(position, fetched)
    except BaseException as exc:  # anything the dataset did not already turn into an error
        result = {"position": position, "error": ("decode", reason(exc))}
    signal.setitimer(signal.ITIMER_REAL, 0)
    send.send(result)
    send.close()


def _death(exitcode: int | None, timeout: float) -> str:
    if exitcode == -signal.SIGALRM or exitcode is None:
        return f"decoding took longer than {timeout:g}s (--decode-timeout); the item was skipped"
    if exitcode is not None and exitcode < 0:
        return f"the decoder crashed ({signal.Signals(-exitcode).name}); the item was skipped"
    return f"the decoding process exited with code {exitcode}; the item was skipped"
