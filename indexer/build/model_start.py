"""What embeds a build, loaded while workers decode, and the batches it embeds."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from indexer.build.plan import PublishedVersion
from indexer.config import BuildConfig, DataConfig
from indexer.decode.preprocess import Preprocessor
from indexer.model import data_config_cache as configcache
from indexer.sources import Item, Source

if TYPE_CHECKING:  # torch-heavy: imported only when a build has something to embed
    from indexer.build.early_start import EarlyStart
    from indexer.model.runtime import Runtime
    from indexer.model.runtime_choice import RuntimePlan
from typing import TYPE_CHECKING

from indexer.build.gpu_decoding import gpu_decoding
from indexer.decode.batch import Batch

if TYPE_CHECKING:
    from indexer.build.plan import PublishedVersion
    from indexer.decode.item_dataset import ItemDataset
    from indexer.decode.preprocess import Preprocessor
    from indexer.model.runtime import Runtime
    from indexer.sources import Item, Source
from indexer.build.runtime_setup import portable_opening, portable_work, resume_plan, runtime_plan

log = logging.getLogger(__name__)


def load_model_while_decoding(
    items: list[Item],
    sources: list[Source],
    cfg: BuildConfig,
    known: frozenset[str],
    positions: list[int],
    prev: PublishedVersion,
    trust_cache: bool = True,
    early: EarlyStart | None = None,
) -> tuple[Runtime, Iterator[Batch], RuntimePlan | None]:
    """What embeds, the batches, and what the first batch settles (None: nothing). Nothing,
    when every item to read holds stored bytes; the collection's portable model when its
    recorded runtime runs it (no timm: its data config is the recorded one); a first build's
    cached export of the same request when the runtime is known (confirmed by a thread
    before anything is published); else torch, its loader started with the remembered data
    config while it loads, and the runtime chosen on the first batch (decide, trial).

    Importing timm and creating the model take seconds; the workers decode meanwhile. If the
    remembered config differs from the model's own, that work is discarded and decoding
    restarts with the right one: the hint only saves time, it never decides the pixels.
    `early`: a first build's early start, adopted as the head start if its work is this one.
    """
    stored, carried = already_stored(items, sources, positions, prev)
    if stored is not None and prev.manifest is not None:
        from indexer.model.runtime import RecordedRecipe

        return RecordedRecipe(prev.manifest), iter([Batch(reused=stored)]), None
    from indexer.model.known_export import request_identity
    from indexer.model.runtime_choice import recorded

    # a first build's request, by content (checkpoint sha256, sources): computed once here
    identity = request_identity(cfg.model) if recorded(prev.manifest) is None else None
    plan, known = resume_plan(runtime_plan(cfg, prev, identity), prev, known)
    if cfg.engine.kind == "ray":  # Ray decodes and embeds, with what the local engine would
        from indexer.build.ray_engine import ray_batches, ray_runtime

        runtime, plan = ray_runtime(cfg, plan, prev)
        return runtime, ray_batches(items, sources, cfg, known, positions, runtime), plan
    opening = portable_opening(cfg, plan, prev, trust_cache, identity)
    if opening is not None:  # decoding starts now (or started); the runtime loads, then torch
        read = ToRead(items, sources, cfg, known, positions, carried)
        work = portable_work(items, sources, cfg, opening[0], known, positions, carried)
        started = portable_batches(read, work, opening[1], early)
        if started is not None:
            return started[0], started[1], plan
    if early is not None:
        early.close()  # its work is not this path's
    return torch_batches(ToRead(items, sources, cfg, known, positions, carried), plan)


@dataclass(frozen=True)
class ToRead:
    """What a build's loader reads: the items at `positions` (the hashes in `known` and the
    bytes `carried` from the pre-check need no second read), as `cfg` says."""

    items: list[Item]
    sources: list[Source]
    cfg: BuildConfig
    known: frozenset[str]
    positions: list[int]
    carried: dict[int, Any]


def portable_batches(
    read: ToRead,
    work: tuple[ItemDataset, list[int]],
    open_runtime: Callable[[], Runtime | None],
    early: EarlyStart | None,
) -> tuple[Runtime, Iterator[Batch]] | None:
    """The portable runtime (or known export) and its batches, their decoding started by the
    early start (adopted) or a head start while it loads; None when it does not load (the
    early start then closed: torch's path decodes with the model's own data config)."""
    from indexer.decode.head_start import HeadStart
    from indexer.model.known_export import KnownExport

    loader = read.cfg.loader
    head = early.adopt(*work, loader.batch_size) if early is not None else None
    if head is None:
        head = HeadStart.start(*work, loader)
    try:
        portable = open_runtime()
        if portable is not None:
            from indexer.decode.loader import iter_batches  # torch loads meanwhile

            batches = iter_batches(read.items, read.sources, work[0].preprocess, loader,
                                   read.known, read.positions, head=head,
                                   carried=read.carried)  # fmt: skip
            if isinstance(portable, KnownExport):
                portable.start()  # its thread starts once the workers are forked
            return portable, batches
    except BaseException:  # interrupted (SIGTERM) or failed before the handover
        if head is not None:
            head.close()
        raise
    if head is not None:  # the runtime did not load: torch's path decodes
        head.close()
    return None


def torch_batches(read: ToRead, plan: RuntimePlan) -> tuple[Runtime, Iterator[Batch], RuntimePlan]:
    """timm's model, loaded while the workers decode with the remembered data config (the
    work discarded and decoding restarted if the model's own config differs)."""
    from indexer.decode.loader import iter_batches
    from indexer.model.timm_model import load_embedder

    cfg = read.cfg
    model = replace(cfg.model, precision=plan.single.precision if plan.single else "fp32")
    gpu = gpu_decoding(cfg)  # --decode gpu was refused before the build began (check_decode)

    def start(data_config: DataConfig) -> Iterator[Batch]:
        loader = cfg.loader
        preprocess = Preprocessor(data_config, loader.preprocessing, loader.max_pixels,
                                  loader.allow_truncated)  # fmt: skip
        return iter_batches(read.items, read.sources, preprocess, cfg.loader, read.known,
                            read.positions, gpu, carried=read.carried)  # fmt: skip

    hint = configcache.lookup(cfg.model.name)
    hinted = start(hint) if hint is not None else None
    try:
        embedder = load_embedder(model)  # fails here, before anything is written
    except BaseException:
        del hinted  # shuts its workers down now rather than at garbage collection
        raise
    configcache.store(cfg.model.name, embedder.data_config)
    if hinted is not None and hint == embedder.data_config:
        return embedder, hinted, plan
    if hinted is not None:
        log.warning("remembered data config of %s was out of date; decoding again", cfg.model.name)
        del hinted  # shuts its workers down
    return embedder, start(embedder.data_config), plan


PRECHECK_ITEMS = 1000  # at most this many items are hashed here before a model is loaded
PRECHECK_CHUNK = 64  # read together at most (a bucket's or a list's: concurrently)


def already_stored(
    items: list[Item], sources: list[Source], positions: list[int], prev: PublishedVersion
) -> tuple[list[tuple[int, str, dict[str, Any]]] | None, dict[int, Any]]:
    """When every item the plan must read holds bytes already stored (touched, renamed or
    copied files), those items with their hashes, read here: the run then needs no model, no
    torch and no workers. None as soon as one does not (or cannot be read here); with it,
    what was fetched from an object store or a URL list on the way (the loader takes those
    bytes rather than fetching them again)."""
    carried: dict[int, Any] = {}
    if prev.manifest is None or not positions or len(positions) > PRECHECK_ITEMS:
        return None, carried
    from indexer.sources.base import read_together

    known = prev.known_hashes()
    found = []
    done, size = 0, 1  # 1 item first (a run with new bytes stops there), then 2, 4 ... 64
    while done < len(positions):
        chunk = positions[done : done + size]
        fetched = read_together(items, sources, chunk)  # a store's: concurrently
        carried.update(fetched)  # (a failure too: fetched with its retries, it is the row)
        for position in chunk:
            item = items[position]
            try:
                got = fetched.get(position) or sources[item.source].read(item.locator)
                if isinstance(got, BaseException):
                    raise got
            except Exception:  # the loader reads it again and makes its error row
                return None, carried
            data, meta = got
            digest = hashlib.sha256(data).hexdigest()
            if digest not in known:
                return None, carried
            found.append((position, digest, meta))
        done, size = done + len(chunk), min(2 * size, PRECHECK_CHUNK)
    return found, carried
