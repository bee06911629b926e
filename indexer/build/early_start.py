"""A first build from buckets: listed and its first batches decoded while torch loads."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import signal
from typing import TYPE_CHECKING, Any

from indexer.config import BuildConfig
from indexer.decode.head_start import POLL, HeadStart, Running, Sender, head_chunks, run_head_start
from indexer.errors import IndexerError

if TYPE_CHECKING:
    from indexer.build.plan import Planned
    from indexer.decode.item_dataset import ItemDataset

log = logging.getLogger(__name__)
Listings = dict[str, dict[str, dict[str, Any]]]  # a prefix's objects, by the SOURCE given


class EarlyStart:
    """A process forked as a first build from object-store prefixes begins, before anything
    is listed: it lists the prefixes and sends their listings, then plans as the main process
    will and, where a known export's recipe says how to decode, decodes the head start's
    batches. The main process imports torch meanwhile (a bucket's client, its listing and
    torch's import no longer come one after the other), plans from the listings it is sent
    and adopts the decoding if its own work is the same (else the process is stopped)."""

    def __init__(self, cfg: BuildConfig) -> None:
        context = multiprocessing.get_context("fork")
        self._claimed = context.Value("i", 0)
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_early, args=(cfg, self._claimed, send, self._receive, os.getpid()),
            name="indexer-early-start", daemon=True,
        )  # fmt: skip
        self._process.start()
        send.close()
        self._done = False

    @classmethod
    def start(cls, cfg: BuildConfig) -> EarlyStart | None:
        """Started where wanted(cfg); None otherwise."""
        return cls(cfg) if wanted(cfg) else None

    def listings(self) -> Listings | None:
        """The prefixes' listings; None when the process could not list them (the main
        process lists them itself); the store's refusal (an IndexerError) is raised here."""
        message = self._next()
        if message is None or message[0] == "failed":
            log.info("the early start did not list the sources: listing them here")
            self.close()
            return None
        if message[0] == "error":
            self.close()
            raise message[1]
        listed: Listings = message[1]
        log.info("%d object-store prefix(es) listed while torch loaded (the early start)",
                 len(listed))  # fmt: skip
        return listed

    def adopt(self, dataset: ItemDataset, todo: list[int], batch_size: int) -> HeadStart | None:
        """The process as this build's head start, if it decodes exactly this work (the same
        items, in the same order, prepared the same way); else it is stopped (None)."""
        message = self._next()
        ours = work_digest(dataset, todo, batch_size)
        if message is None or message[0] != "work" or message[1] != ours:
            if message is not None and message[1] is not None:
                log.info("the early start decoded other work than this build's: stopped")
            self.close()
            return None
        log.info("the early start's decoding is this build's head start")
        self._done = True
        return HeadStart(dataset, todo, batch_size,
                         Running(self._process, self._claimed, self._receive))  # fmt: skip

    def close(self) -> None:
        """Stop the process (unless a head start adopted it: that one stops it)."""
        if self._done:  # adopted, or closed already
            return
        self._done = True  # (killed, not told to stop: a process that died holding the
        if self._process.is_alive():  # claims' lock would leave it held)
            self._process.kill()
        self._process.join()
        self._receive.close()

    def _next(self) -> tuple[str, Any] | None:
        """The process's next message; None once it died without sending one."""
        if self._done:
            return None
        while self._process.is_alive() or self._receive.poll(0):
            if not self._receive.poll(POLL):
                continue
            try:
                message: tuple[str, Any] = self._receive.recv()
                return message
            except (EOFError, OSError):
                break
        return None


def wanted(cfg: BuildConfig) -> bool:
    """A first build (nothing published, nothing left by a killed one: a later run lists in
    the main process, which must not load torch before it knows something changed) whose
    every source is an object-store prefix, on the local engine with worker processes."""
    from indexer.collection.layout import CURRENT, VERSIONS
    from indexer.sources.bucket import is_bucket_url

    fresh = not (cfg.out / CURRENT).exists() and not (cfg.out / VERSIONS).exists()
    buckets = bool(cfg.sources) and all(is_bucket_url(s.location) for s in cfg.sources)
    local = cfg.engine.kind == "local" and cfg.loader.workers > 0 and not cfg.drop_shards
    return fresh and buckets and local


def work_digest(dataset: ItemDataset, todo: list[int], batch_size: int) -> str:
    """What a head start decodes: its share's items (keys and locators, in order, of the
    batches it may take, not the whole work list) and how each is read and prepared; equal
    digests, equal samples."""
    prep = dataset.preprocess
    share = [p for chunk in head_chunks(dataset, todo, batch_size) for p in chunk]
    items = [(dataset.items[p].key, repr(dataset.items[p].locator)) for p in share]
    how = (repr(prep.cfg), prep.fast, prep.max_pixels, prep.allow_truncated,
           sorted(dataset.known_hashes), dataset.decode_timeout, dataset.hook)  # fmt: skip
    return hashlib.sha256(repr((items, how, batch_size)).encode()).hexdigest()


def _early(cfg: BuildConfig, claimed: Any, send: Any, receive: Any, parent: int) -> None:
    """The process: list, send the listings, plan, send the work's digest, decode."""
    receive.close()  # the main process's end (a write to a pipe whose reader died fails)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides what ^C means
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    silenced = logging.root.manager.disable  # (a host program's level, kept)
    logging.disable(logging.CRITICAL)  # the main process says what the listing and plan say
    sender = Sender(send)  # (the main process reads only once torch has loaded)
    try:
        listed = list_prefixes(cfg)
    except IndexerError as exc:
        sender.put(("error", exc))
        sender.close()
        return
    except Exception:  # the main process lists again and meets it itself
        sender.put(("failed", None))
        sender.close()
        return
    sender.put(("listed", listed))
    if os.getppid() != parent:  # orphaned while it listed
        sender.close()
        return
    work = first_work(cfg, listed)
    digest = None if work is None else work_digest(*work, cfg.loader.batch_size)
    sender.put(("work", digest))
    logging.disable(silenced)
    if work is None:
        sender.close()
        return
    dataset, todo = work
    dataset.owned_by(parent)  # its decode alarm armed here, as in any forked reader
    run_head_start(dataset, head_chunks(dataset, todo, cfg.loader.batch_size), claimed, send,
                   receive, parent, sender)  # fmt: skip


def list_prefixes(cfg: BuildConfig) -> Listings:
    """Each prefix's listing, as open_bucket would list it."""
    from indexer.sources.bucket import bucket_of

    return {spec.location: bucket_of(spec, cfg.loader.max_pixels).listing()
            for spec in cfg.sources}  # fmt: skip


def first_work(cfg: BuildConfig, listed: Listings) -> tuple[ItemDataset, list[int]] | None:
    """The head start's work, as the main process will find it: None unless every prefix
    holds images (tars are indexed and Parquet files copied by the main process alone) and
    a known export's recipe says how to decode; nothing is written."""
    from indexer.build.plan import plan_build
    from indexer.build.runtime_setup import (
        portable_opening,
        portable_work,
        resume_plan,
        runtime_plan,
    )
    from indexer.model.known_export import request_identity
    from indexer.sources.bucket import bucket_of

    try:
        kinds = {bucket_of(spec, cfg.loader.max_pixels, None, listed[spec.location]).holds()[0]
                 for spec in cfg.sources}  # fmt: skip
        if kinds != {"images"}:
            return None
        planned: Planned = plan_build(cfg, listed)
        prev = planned.prev
        identity = request_identity(cfg.model)
        plan, known = resume_plan(runtime_plan(cfg, prev, identity), prev, prev.known_hashes())
        opening = portable_opening(cfg, plan, prev, True, identity)
    except Exception:  # the main process meets it (or decodes without a head start)
        return None
    if opening is None:
        return None
    return portable_work(planned.items, planned.sources, cfg, opening[0], known,
                         planned.plan.check, {})  # fmt: skip
