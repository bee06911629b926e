"""The first batches, decoded in a process forked before torch loads (its import hides behind)."""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

from indexer.config import LoaderConfig
from indexer.decode.item_dataset import ItemDataset

log = logging.getLogger(__name__)
MAX_ITEMS = 1024  # at most this many items (ImageNet photos: ~2.4 core-s, longer than the import)
MAX_BYTES = 128 << 20  # and at most this many bytes of pixels waiting for the main process
NICE = 5  # as the loader's workers: the main process's import goes first
POLL = 0.5  # seconds between checks that the other side is still alive


class Running(NamedTuple):
    """A head start's process, its claimed-batches counter and the receiving end of its pipe."""

    process: Any
    claimed: Any
    receive: Any


def head_chunks(dataset: ItemDataset, todo: list[int], batch_size: int) -> list[list[int]]:
    """The batches a head start may decode, from the front of todo: at most MAX_ITEMS items
    and MAX_BYTES of pixels."""
    _, height, width = dataset.preprocess.cfg.input_size
    most = max(batch_size, min(MAX_ITEMS, MAX_BYTES // (3 * height * width)))
    limit = -(-min(len(todo), most) // batch_size)
    return [todo[i * batch_size : (i + 1) * batch_size] for i in range(limit)]


@dataclass(frozen=True)
class Delivered:
    """One batch of the head start: its positions, and its samples (None: the process died
    before it delivered them; the loader decodes them again, one process per item). Not
    `claimed`: batches an early start's process died before it took (it had its whole share
    to decode), all the rest at once: the loader decodes them as its own."""

    positions: list[int]
    samples: list[dict[str, Any]] | None
    claimed: bool = True


class HeadStart:
    """A process, forked from a process without torch, that decodes batches from the front
    of ``todo`` until stop() says how many it took; those come back in order from results(),
    the rest is the DataLoader's. Each batch is claimed under a lock before it is decoded,
    so no item is decoded twice and none is skipped."""

    def __init__(self, dataset: ItemDataset, todo: list[int], batch_size: int,
                 running: Running | None = None) -> None:  # fmt: skip
        """Fork the process now, or take one forked earlier (`running`, the early start's),
        which decodes its whole share: the main process is ready sooner there than the
        loader's workers, forked without the store's client loaded, could take over."""
        self.dataset, self.todo = dataset, todo
        self._whole = running is not None
        self._batch_size = batch_size
        self._chunks = head_chunks(dataset, todo, batch_size)
        if running is None:  # forked now
            context = multiprocessing.get_context("fork")
            claimed = context.Value("i", 0)  # batches taken; a negative count: stopped
            receive, send = context.Pipe(duplex=False)
            process = context.Process(
                target=run_head_start,
                args=(dataset, self._chunks, claimed, send, receive, os.getpid()),
                name="indexer-head-start", daemon=True,
            )  # fmt: skip
            process.start()
            send.close()  # ours: the pipe ends (EOFError) when the process does
            running = Running(process, claimed, receive)
        self._process, self._claimed, self._receive = running  # or forked earlier (earlystart)
        self._taken: int | None = None

    @classmethod
    def start(cls, dataset: ItemDataset, todo: list[int], cfg: LoaderConfig) -> HeadStart | None:
        """Start decoding the first batches now (before torch loads); None where there are no
        worker processes to hand over to (--workers 0) or nothing to decode."""
        if cfg.workers <= 0 or not todo:
            return None
        return cls(dataset, todo, cfg.batch_size)

    def stop(self) -> int:
        """Claim no more batches (an early start's: all of its share); the number of items
        claimed (the DataLoader takes the rest)."""
        if self._taken is None and self._whole:
            self._taken = min(len(self._chunks) * self._batch_size, len(self.todo))
        if self._taken is None:
            with self._claimed.get_lock():
                taken = self._claimed.value
                self._claimed.value = -1 - taken
            self._taken = min(taken * self._batch_size, len(self.todo))
        return self._taken

    def results(self) -> Iterator[Delivered]:
        """The claimed batches in order; after the process dies, those it did not deliver."""
        chunks = self._chunks[: -(-self.stop() // self._batch_size)]
        try:
            for n, positions in enumerate(chunks):
                samples = self._receive_one()
                if samples is None and self._whole and n >= self._claimed.get_obj().value:
                    yield Delivered([p for c in chunks[n:] for p in c], None, claimed=False)
                    return
                yield Delivered(positions, samples)
        finally:
            self.close()

    def _receive_one(self) -> list[dict[str, Any]] | None:
        while self._process.is_alive() or self._receive.poll(0):
            if not self._receive.poll(POLL):
                continue
            try:
                samples: list[dict[str, Any]] = self._receive.recv()
                return samples
            except (EOFError, OSError):
                break
        return None

    def close(self) -> None:
        """Stop the process now (the build ended or failed early) and wait for it."""
        self.stop()
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        self._receive.close()


def run_head_start(
    dataset: ItemDataset,
    chunks: list[list[int]],
    claimed: Any,
    send: Any,
    receive: Any,
    parent: int,
    sender: Sender | None = None,
) -> None:
    """The head start's process: claim a batch, decode it, hand it to a sending thread (so a
    full pipe never stalls decoding), until stopped, out of batches, or orphaned."""
    receive.close()  # the main process's end: with it closed here, a write to a pipe whose
    # reader died fails (EPIPE) instead of waiting forever
    os.nice(NICE)
    faulthandler.disable()  # a decoder's crash is reported as its item's error row
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the decode alarm ends the process
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides what ^C means
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a group's SIGTERM ends it quietly
    sender = sender or Sender(send)
    ahead = 1 if dataset.reads_many() else 0  # an object store's next batch is fetched
    pending: deque[tuple[int, Future[dict[int, Any]]]] = deque()  # while this one decodes
    with ThreadPoolExecutor(1) as fetcher:
        while True:
            while len(pending) <= ahead and os.getppid() == parent:
                number = _claim(claimed, len(chunks))
                if number is None:
                    break
                pending.append((number, fetcher.submit(dataset.fetch, chunks[number])))
            if not pending or os.getppid() != parent:  # (orphaned: what it fetched is dropped)
                break
            number, fetched = pending.popleft()
            sender.put(dataset.prepare_many(chunks[number], fetched.result()))
    sender.close()


class Sender:
    """A thread sending what it is handed down a pipe, in order, so that a full pipe (a main
    process busy elsewhere) never stalls the process handing it over."""

    def __init__(self, send: Any) -> None:
        self._ready: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=_send, args=(self._ready, send), daemon=True)
        self._thread.start()

    def put(self, message: Any) -> None:
        self._ready.put(message)

    def close(self) -> None:
        """Wait until everything handed over is sent (or the pipe's reader is gone)."""
        self._ready.put(None)
        self._thread.join()


def _claim(claimed: Any, batches: int) -> int | None:
    """The next batch's number, taken; None when stopped or out of batches."""
    with claimed.get_lock():
        number = claimed.value
        if number < 0 or number >= batches:
            return None
        claimed.value = number + 1
    return int(number)


def _send(ready: queue.SimpleQueue[Any], send: Any) -> None:
    while (message := ready.get()) is not None:
        try:
            send.send(message)
        except OSError:  # the main process is gone or stopped listening
            return
