"""The embedding step of a build: the model loaded while workers decode, batches into shards."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import sys
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from indexer.model import data_config_cache as configcache
from indexer.decode.gpu_share import CpuShare, WorkerTime
from indexer.collection.layout import CollectionPaths
from indexer.config import BuildConfig
from indexer.errors import IndexerError, InputError
from indexer.build.plan import Plan, Previous
from indexer.model.portable import Exported
from indexer.decode.preprocess import DataConfig, Preprocessor
from indexer.collection.shards import (
    ShardInfo,
    ShardWriter,
    column_array,
    embedding_array,
    int_array,
    rows_by_hash,
    text_array,
)
from indexer.sources import Item, Source
from indexer.build.stage_times import Stages

if TYPE_CHECKING:  # torch-heavy: imported only when a build has something to embed
    import torch

    from indexer.decode.item_dataset import ItemDataset
    from indexer.model.runtime_choice import Choice, Decision, RuntimePlan
    from indexer.build.early_start import EarlyStart
    from indexer.model.known_export import Entry
    from indexer.model.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawItem:
    """A JPEG a worker read and routed to the GPU, not decoded: decoded with its batch. Its
    bytes are [start, end) of the batch's raw_blob."""

    position: int
    start: int
    end: int
    route: Any  # jpegroute.Route
    hash: str
    meta: dict[str, Any]


@dataclass
class Batch:
    """What the DataLoader yields: good rows (aligned by position) and failed rows."""

    positions: list[int] = field(default_factory=list)
    pixels: torch.Tensor | None = None
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # position, stage, reason
    reused: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)  # pos, hash, meta
    vectors: np.ndarray | None = None  # already embedded (the Ray engine); else embed pixels
    labels: list[dict[str, Any]] = field(default_factory=list)  # with vectors, when asked for
    raw: list[RawItem] = field(default_factory=list)  # to decode on the GPU (--decode gpu)
    # the raw items' bytes, one after another: one tensor reaches the main process through
    # shared memory (a list of bytes would be pickled through the workers' pipe)
    raw_blob: torch.Tensor | None = None
    spent: WorkerTime = field(default_factory=WorkerTime)  # what the batch cost its worker
    share: CpuShare | None = None  # set in the main process: the GPU side reports to it

    def raw_bytes(self, item: RawItem) -> torch.Tensor:
        """A raw item's JPEG bytes: a uint8 view of raw_blob."""
        assert self.raw_blob is not None
        return self.raw_blob[item.start : item.end]

    def raw_views(self) -> list[torch.Tensor]:
        """Every raw item's bytes, in order: one split of raw_blob when the items lie end to
        end in it (as collate packs them), else a view each."""
        assert self.raw_blob is not None
        starts = [item.start for item in self.raw]
        ends = [item.end for item in self.raw]
        if starts and starts[0] == 0 and starts[1:] == ends[:-1] and ends[-1] == len(self.raw_blob):
            return list(self.raw_blob.split([e - s for s, e in zip(starts, ends, strict=True)]))
        return [self.raw_bytes(item) for item in self.raw]


def load_model_while_decoding(
    items: list[Item],
    sources: list[Source],
    cfg: BuildConfig,
    known: frozenset[str],
    positions: list[int],
    prev: Previous,
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
    from indexer.model.runtime_choice import recorded
    from indexer.decode.head_start import HeadStart
    from indexer.model.known_export import KnownExport, request_identity

    # a first build's request, by content (checkpoint sha256, sources): computed once here
    identity = request_identity(cfg.model) if recorded(prev.manifest) is None else None
    plan, known = resume_plan(runtime_plan(cfg, prev, identity), prev, known)
    if cfg.engine.kind == "ray":  # Ray decodes and embeds, with what the local engine would
        from indexer.build.ray_engine import ray_batches, ray_runtime

        runtime, plan = ray_runtime(cfg, plan, prev)
        return runtime, ray_batches(items, sources, cfg, known, positions, runtime), plan
    opening = portable_opening(cfg, plan, prev, trust_cache, identity)
    if opening is not None:  # decoding starts now (or started); the runtime loads, then torch
        recipe, open_runtime = opening
        loader = cfg.loader
        work = portable_work(items, sources, cfg, recipe, known, positions, carried)
        head = early.adopt(*work, loader.batch_size) if early is not None else None
        if head is None:
            head = HeadStart.start(*work, loader)
        try:
            portable = open_runtime()
            if portable is not None:
                from indexer.decode.loader import iter_batches  # torch loads meanwhile

                batches = iter_batches(items, sources, work[0].preprocess, loader, known,
                                       positions, head=head, carried=carried)  # fmt: skip
                if isinstance(portable, KnownExport):
                    portable.start()  # its thread starts once the workers are forked
                return portable, batches, plan
        except BaseException:  # interrupted (SIGTERM) or failed before the handover
            if head is not None:
                head.close()
            raise
        if head is not None:  # the runtime did not load: torch's path decodes
            head.close()
    if early is not None:
        early.close()  # its work is not this path's
    from indexer.decode.loader import iter_batches
    from indexer.model.timm_model import load_embedder

    model = replace(cfg.model, precision=plan.single.precision if plan.single else "fp32")
    gpu = gpu_decoding(cfg)  # --decode gpu was refused before the build began (check_decode)

    def start(data_config: DataConfig) -> Iterator[Batch]:
        loader = cfg.loader
        preprocess = Preprocessor(data_config, loader.preprocessing, loader.max_pixels,
                                  loader.allow_truncated)  # fmt: skip
        return iter_batches(items, sources, preprocess, cfg.loader, known, positions, gpu,
                            carried=carried)  # fmt: skip

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


def check_runtime(cfg: BuildConfig) -> None:
    """--runtime and --precision this machine cannot run natively (bf16 without AVX512-BF16 or
    AMX, onnxruntime in bf16, a runtime not installed) are refused before anything is
    written, without torch (CUDA as the driver shows it)."""
    from indexer.model.runtime_choice import NAME_OF, candidates, check_asked, this_machine
    from indexer.model.runtime import wants_cuda

    m = cfg.model
    candidates(m.runtime, m.precision, this_machine(wants_cuda(m.device)))
    if m.runtime in ("onnx", "openvino"):  # installed but broken: said now, not after decoding
        check_importable(NAME_OF[m.runtime])
    built = recorded_of(cfg)
    if built is not None:  # another runtime or precision than the collection's: a --rebuild
        check_asked(m.runtime, m.precision, built, cfg.out)


def check_importable(package: str) -> None:
    """InputError when the runtime's package cannot be imported here."""
    import importlib

    try:
        importlib.import_module(package)
    except Exception as exc:
        raise InputError(f"{package} cannot be imported here ({type(exc).__name__}: {exc}): "
                         f"reinstall it (pip install --force-reinstall {package}), or use "
                         "another --runtime") from exc  # fmt: skip


def recorded_of(cfg: BuildConfig) -> Any:
    """The published version's runtime and precision (decide.recorded), read without a lock
    for an early refusal; None for a first build, --rebuild, or a manifest not readable here
    (the build's own checks say why, under the lock)."""
    from indexer.collection.layout import CURRENT, read_manifest
    from indexer.model.runtime_choice import recorded

    if cfg.rebuild or cfg.partition is not None or not (cfg.out / CURRENT).exists():
        return None
    try:
        return recorded(read_manifest(cfg.out / CURRENT))
    except Exception:
        return None


def runtime_plan(
    cfg: BuildConfig, prev: Previous, identity: dict[str, Any] | None = None
) -> RuntimePlan:
    """The runtime and precision this run embeds with, or the candidates its first batch
    chooses among (the Ray engine's driver, on generated scenes): a later run keeps the
    collection's; a first build's choice is cached under its request's identity."""
    from indexer.model.runtime_choice import (
        cache_key,
        first_plan,
        later_plan,
        recorded,
        this_machine,
    )
    from indexer.model.runtime import embeds_on_cuda

    m = cfg.model
    machine = this_machine(embeds_on_cuda(m.device))
    built = recorded(prev.manifest)
    if built is not None:
        return later_plan(m.runtime, m.precision, machine, built, cfg.out)
    key = cache_key(identity, m.runtime, m.precision)
    return first_plan(m.runtime, m.precision, machine, key)


PRECHECK_ITEMS = 1000  # at most this many items are hashed here before a model is loaded
PRECHECK_CHUNK = 64  # read together at most (a bucket's or a list's: concurrently)


def already_stored(
    items: list[Item], sources: list[Source], positions: list[int], prev: Previous
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


def resume_plan(
    plan: RuntimePlan, prev: Previous, known: frozenset[str]
) -> tuple[RuntimePlan, frozenset[str]]:
    """A killed run's finished shards are reused only by a run embedding with the runtime
    they were made with: a first build takes it (when this machine offers it), a later run
    already has it; otherwise they are embedded again (never mixed)."""
    from indexer.model.runtime_choice import Choice, RuntimePlan
    from indexer.collection.versions import salvaged_runtime

    found = salvaged_runtime(prev.salvaged) if prev.salvaged else None
    if found is None:
        return plan, known
    choice = Choice(str(found.get("name")), str(found.get("precision")))
    offered = (*plan.candidates, *plan.others)
    if plan.how == "recorded" and plan.single == choice:
        return plan, known
    if plan.how != "recorded" and choice in offered:
        why = f"the killed run's choice: its {len(prev.salvaged)} finished shard(s) are reused"
        return RuntimePlan((choice,), "resumed", why, plan.key), known
    log.warning("the killed run embedded with %s, which this run does not (%s): its finished "
                "shards are embedded again", choice.label,
                ", ".join(c.label for c in plan.candidates))  # fmt: skip
    return plan, replace(prev, salvaged=[]).known_hashes()


def portable_work(
    items: list[Item],
    sources: list[Source],
    cfg: BuildConfig,
    recipe: dict[str, Any],
    known: frozenset[str],
    positions: list[int],
    carried: dict[int, Any],
) -> tuple[ItemDataset, list[int]]:
    """What the loader reads where a portable model's recipe says how to prepare pixels."""
    from indexer.decode.item_dataset import loader_work

    loader = cfg.loader
    preprocess = Preprocessor(DataConfig.from_dict(recipe["data_config"]), loader.preprocessing,
                              loader.max_pixels, loader.allow_truncated)  # fmt: skip
    return loader_work(items, sources, preprocess, loader, known, positions, carried=carried)


def portable_opening(
    cfg: BuildConfig,
    plan: RuntimePlan,
    prev: Previous,
    trust_cache: bool,
    identity: dict[str, Any] | None,
) -> tuple[dict[str, Any], Callable[[], Runtime | None]] | None:
    """Where a portable model embeds this run (the collection's, or a known export): its
    recipe, known without loading anything, and how to load it (None: torch after all)."""
    if portable_recorded(plan, prev):
        assert prev.manifest is not None
        return prev.manifest["model"], lambda: portable_runtime(plan, prev)
    found = known_entry(cfg, plan, identity) if trust_cache and identity is not None else None
    if found is None:
        return None
    entry, choice, known_plan = found
    return entry.recipe, lambda: known_runtime(cfg, entry, choice, known_plan)


def portable_recorded(plan: RuntimePlan, prev: Previous) -> bool:
    """The collection's recorded runtime runs its published portable model."""
    from indexer.model.runtime_choice import PORTABLE

    choice = plan.single
    if plan.how != "recorded" or choice is None or choice.runtime not in PORTABLE:
        return False
    return not (prev.folder is None or prev.manifest is None
                or "portable_model" not in prev.manifest)  # fmt: skip


def portable_runtime(plan: RuntimePlan, prev: Previous) -> Runtime | None:
    """The published version's portable model when the collection's recorded runtime runs it
    (None: torch loads; a damaged model file means torch, which exports it again and then
    embeds with the recorded runtime)."""
    from indexer.errors import CollectionError
    from indexer.model.portable import load_portable

    choice = plan.single
    if not portable_recorded(plan, prev) or choice is None:
        return None
    assert prev.folder is not None and prev.manifest is not None
    try:
        return load_portable(prev.folder, prev.manifest, choice.runtime, choice.precision)
    except CollectionError as exc:
        log.warning("%s; exporting it again with torch", exc)
        return None


def check_decode(cfg: BuildConfig) -> None:
    """--decode gpu refused before anything is written (and also when nothing changed): with
    exact preprocessing, without CUDA or a working nvJPEG, or in a Ray cluster without GPUs."""
    if cfg.loader.decode != "gpu":
        return
    if cfg.engine.kind != "ray":
        gpu_decoding(cfg)
        return
    from indexer.build.ray_engine import ray_plan

    ray_plan(cfg)


def gpu_decoding(cfg: BuildConfig) -> bool:
    """Whether this process decodes JPEGs on its GPU (choose_gpu_decoding; auto from the rates
    this machine measured for the model's input size, remembered from its last run: none
    known, the CPU). Never with the Ray engine: its GPU actors decide (rayengine)."""
    from indexer.build import decode_choice as decodechoice
    from indexer.model.timm_model import resolve_device

    if cfg.engine.kind == "ray":
        return False
    device = resolve_device(cfg.model.device)
    cuda = device.type == "cuda"

    def problem() -> str | None:
        from indexer.decode.gpu import unusable

        return unusable(device)

    exact = cfg.loader.preprocessing == "exact"
    rates: dict[str, float] = {}
    hint = configcache.lookup(cfg.model.name) if cuda and cfg.loader.decode == "auto" else None
    if hint is not None and not exact:  # the input size its last run resolved on this machine
        key = decodechoice.run_key(device, hint.input_size, cfg.loader)
        rates = {} if key is None else decodechoice.measured(key)
    return choose_gpu_decoding(cfg.loader.decode, cuda, exact, problem, measured=rates)


def choose_gpu_decoding(
    asked: str,
    cuda: bool,
    exact: bool,
    problem: Callable[[], str | None],
    needs: str = "a CUDA GPU",
    measured: Mapping[str, float] | None = None,
) -> bool:
    """decodechoice.choose_decoder: --decode gpu where nvJPEG passes its check (refused without
    CUDA, with exact preprocessing or failing the check); auto on the GPU only where this
    machine measured nvJPEG faster than the CPU path (`measured`, images/s by path). auto on
    CUDA logs why (a warning when nvJPEG fails its check or nothing is measured yet)."""
    from indexer.build.decode_choice import choose_decoder

    where = choose_decoder(asked, cuda, exact, problem, measured or {}, needs)
    if asked == "auto" and cuda and not exact:
        log.log(logging.WARNING if where.warn else logging.INFO, "decoding JPEGs on the %s: %s",
                "GPU" if where.gpu else "CPU", where.why)  # fmt: skip
    return where.gpu


def known_entry(
    cfg: BuildConfig, plan: RuntimePlan, identity: dict[str, Any]
) -> tuple[Entry, Choice, RuntimePlan] | None:
    """For a first build whose runtime is known (asked for, or timed before on this machine)
    and runs the exported model, an earlier build's export of exactly this request (model,
    weights, flags, versions, sources), if the cache holds a whole one; with the runtime it
    starts on and the plan it settles (auto: the export's runtimes, torch left out)."""
    from indexer.model.runtime_choice import PORTABLE

    if plan.how == "auto":  # several to time: those the export runs, without torch
        portable = tuple(c for c in plan.candidates if c.runtime in PORTABLE)
        plan = replace(plan, candidates=portable)
    choice = plan.single if plan.how != "auto" else next(iter(plan.candidates), None)
    if plan.how not in ("forced", "cached", "resumed", "auto") or choice is None:
        return None
    if choice.runtime not in PORTABLE:
        return None
    from indexer.model.known_export import lookup

    found = lookup(cfg.model, identity)
    return None if found is None else (found, choice, plan)


def known_runtime(
    cfg: BuildConfig, entry: Entry, choice: Choice, plan: RuntimePlan
) -> Runtime | None:
    """The known export loaded on its runtime (None: it does not load; torch's path says
    what to do)."""
    from indexer.model.known_export import KnownExport

    try:
        return KnownExport(cfg.model, entry, choice, plan)
    except IndexerError as exc:
        log.warning("the cached export cannot run on %s (%s); checking with torch first",
                    choice.label, exc)  # fmt: skip
        return None


@dataclass(frozen=True)
class EmbedJob:
    """What the embedding loop writes: items, their planned ids, and how rows are made."""

    items: list[Item]
    sources: list[Source]
    plan: Plan
    embedder: Runtime
    schema: pa.Schema
    prefix: str  # names of new shards of embedded rows: unique to this version
    reused_prefix: str  # and of rows whose vector was reused by content hash
    runtime_plan: RuntimePlan | None = None  # what the first batch settles (None: nothing)
    confirmed: Callable[[], None] | None = None  # called once a known export is confirmed


@dataclass(frozen=True)
class Embedded:
    """What the embedding loop made: new shards, error rows, items whose stored vector is
    reused, the first images embedded (a portable model is checked on them), the portable
    model exported during the run (if it was), the runtime that embedded, how it was
    decided, and the recipe it computed (its precision the decided one)."""

    shards: list[ShardInfo]
    errors: list[dict[str, Any]]
    reused: list[tuple[int, str, dict[str, Any]]]
    sample: np.ndarray | None
    exported: Exported | None = None
    runtime: str | None = None
    decision: Decision | None = None
    recipe: dict[str, Any] | None = None


SAMPLE = 64  # images kept for the portable model's fidelity check


class Embedding:
    """The run's runtime. A build that loaded torch settles its runtime on the first batch
    (trial.settle: each candidate checked against torch fp32, timed when auto has a choice)
    and embeds every batch, the first included, with the one it keeps; a run that loaded the
    recorded runtime (or a known export) embeds with it from the start."""

    def __init__(self, runtime: Runtime, plan: RuntimePlan | None, folder: Path) -> None:
        self.runtime, self.plan, self.folder = runtime, plan, folder
        self.sample: np.ndarray | None = None
        self.exported: Exported | None = None
        self.decision: Decision | None = None
        self.first_done = 0.0  # when the first batch was embedded
        self.after_first = 0  # images embedded since
        self.remote = False  # the Ray engine's actors embed (the driver settled beforehand)

    def __call__(self, pixels: Any) -> tuple[np.ndarray, list[dict[str, Any]]]:
        first = self.sample is None
        if first:
            head = pixels[:SAMPLE]
            self.sample = np.array(head.cpu().numpy() if hasattr(head, "cpu") else head)
            self._settle(self.sample)
        out = self.runtime.embed_with_labels(pixels)
        if first:
            self.first_done = time.perf_counter()
            log.info("first batch embedded (%s) %.2f s after the process started",
                     self.runtime.name, process_age())  # fmt: skip
        else:
            self.after_first += len(out[0])
        return out

    def _settle(self, sample: np.ndarray) -> None:
        from indexer.model.runtime_choice import Decision
        from indexer.model.known_export import KnownExport

        plan = self.plan
        if plan is None:
            return
        if self.runtime.name == "torch":
            from indexer.model.timm_model import Embedder
            from indexer.model.runtime_trial import settle

            assert isinstance(self.runtime, Embedder)
            self.runtime, self.decision, self.exported = settle(plan, self.runtime, sample,
                                                                self.folder)  # fmt: skip
        elif isinstance(self.runtime, KnownExport):  # timed among its runtimes, or the plan's
            self.decision = self.runtime.settle(sample)
        elif (single := plan.single) is not None:
            self.decision = Decision(single, plan.how, plan.why)
        if self.decision is not None:  # before the first shard: a re-run after a kill keeps it
            mark_runtime(self.folder, self.decision.choice)

    def settled(self) -> Decision | None:
        """How the runtime was decided: on the first batch, or by the plan when no batch was
        embedded here (the Ray engine's actors, a run whose items all failed: asked for or
        recorded, not a cached choice that no image confirmed)."""
        from indexer.model.runtime_choice import Decision

        plan = self.plan
        if self.decision is not None or plan is None or (single := plan.single) is None:
            return self.decision
        if plan.how == "cached" and not self.remote:  # nothing here confirmed it: the next
            return None  # run decides (the Ray driver checked it on generated scenes)
        return Decision(single, plan.how, plan.why)

    @property
    def names(self) -> str | None:
        return self.runtime.name if self.sample is not None or self.remote else None

    def log_rate(self) -> float | None:
        """Images/s after the first batch, logged (None: no image after it)."""
        if not self.after_first:
            return None
        seconds = time.perf_counter() - self.first_done
        rate = self.after_first / seconds
        log.info("after the first batch: %d images in %.2f s, %.0f images/s (%s)",
                 self.after_first, seconds, rate, self.names)  # fmt: skip
        return rate


@dataclass(frozen=True)
class Decoded:
    """A batch's raw items as nvJPEG left them (None: failed), and the seconds it took."""

    images: list[Any]
    seconds: float


class RawDecoding:
    """The batches' GPU-routed JPEGs decoded on the model's device; one the GPU cannot decode
    is decoded on the CPU here (an error row if that fails too), so none is lost.

    On CUDA the work runs on a stream of its own, waited for before the batch is handed on:
    the model's kernels never queue behind the next batch's decoding, nor its sync behind them.
    """

    def __init__(self, cfg: BuildConfig, stages: Stages | None = None) -> None:
        self.cfg = cfg
        self.stages = stages or Stages()
        self.decoder: Any = None
        self.cpu: Preprocessor | None = None
        self.stream: Any = None  # torch.cuda.Stream on CUDA
        self.share: CpuShare | None = None  # the loader's, once a batch brought it
        self.gpu, self.fallback = 0, 0

    def decode(self, batch: Batch, runtime: Runtime) -> None:
        """The batch's raw items decoded and added to its rows (both steps at once)."""
        self.prepare(batch, self.decode_only(batch, runtime))

    def decode_only(self, batch: Batch, runtime: Runtime) -> Decoded:
        """Step one: the raw items decoded by nvJPEG, which returns when done (and lets
        the GIL go meanwhile); a None for each item it could not decode."""
        if not batch.raw:
            return Decoded([], 0.0)
        if self.decoder is None:
            self._start(runtime)
        pairs = [
            (data, item.route) for data, item in zip(batch.raw_views(), batch.raw, strict=True)
        ]
        start = time.perf_counter()
        with self._on_stream():
            images = list(self.decoder.decode(pairs))
        seconds = time.perf_counter() - start
        self.stages.add("GPU decode", seconds)
        return Decoded(images, seconds)

    def prepare(self, batch: Batch, decoded: Decoded) -> None:
        """Step two: the decoded images oriented, resized and cropped, the failed ones
        decoded on the CPU, and all of them added to the batch's rows, in order. The GPU
        side's time is reported to the share of JPEGs the workers decode."""
        if not batch.raw:
            return
        start = time.perf_counter()
        with self._on_stream():
            routes = [item.route for item in batch.raw]
            pixels, good = self.decoder.prepare(decoded.images, routes)
            self._gather(batch, pixels, good)
            self._done(batch.pixels)
        seconds = time.perf_counter() - start
        self.stages.add("GPU resize", seconds)
        if batch.share is not None:  # the two steps overlap: the slower one sets the pace
            batch.share.update(batch.spent, len(good), max(decoded.seconds, seconds))
            self.share = batch.share

    def _start(self, runtime: Runtime) -> None:
        import torch

        from indexer.decode.gpu import GpuDecoder

        device = getattr(runtime, "device", "cuda")
        self.decoder = GpuDecoder(runtime.data_config, device)
        if self.decoder.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.decoder.device)
        loader = self.cfg.loader
        self.cpu = Preprocessor(runtime.data_config, loader.preprocessing, loader.max_pixels,
                                loader.allow_truncated)  # fmt: skip

    def _on_stream(self) -> Any:
        import torch

        return nullcontext() if self.stream is None else torch.cuda.stream(self.stream)

    def _gather(self, batch: Batch, decoded: Any, good: list[int]) -> None:
        """The batch's pixels: its CPU-decoded rows, then the GPU-decoded ones, then those
        the GPU failed on, decoded on the CPU here; each row added in the same order."""
        import torch

        device = self.decoder.device
        parts = [] if batch.pixels is None else [batch.pixels.to(device)]
        if decoded is not None:
            parts.append(decoded)
            for n in good:
                _add_row(batch, batch.raw[n])
        self.gpu += len(good)
        kept = set(good)
        fallen = []
        for item in (item for n, item in enumerate(batch.raw) if n not in kept):
            self.fallback += 1
            with self.stages.timed("CPU fallback"):
                image = self._on_cpu(batch, item)
            if image is not None:
                fallen.append(image)
                _add_row(batch, item)
        if fallen:
            parts.append(torch.stack(fallen).to(device))
        batch.pixels = (torch.cat(parts) if len(parts) > 1 else parts[0]) if parts else None
        batch.raw, batch.raw_blob = [], None

    def _done(self, pixels: Any) -> None:
        """The stream's work finished, and its output kept from reuse until the model's
        stream (the default one) is done with it."""
        import torch

        if self.stream is None:
            return
        if pixels is not None:
            pixels.record_stream(torch.cuda.default_stream(self.decoder.device))
        self.stream.synchronize()

    def _on_cpu(self, batch: Batch, item: RawItem) -> Any:
        import torch

        from indexer.decode.images import DecodeError

        assert self.cpu is not None
        try:
            pixels = self.cpu(batch.raw_bytes(item).numpy().tobytes()).pixels
            return torch.tensor(pixels)  # a copy: Pillow's array is read-only
        except DecodeError as exc:
            batch.errors.append((item.position, "decode", str(exc)))
        except Exception as exc:
            batch.errors.append((item.position, "preprocess", f"{type(exc).__name__}: {exc}"))
        return None

    def log_share(self) -> None:
        if self.gpu or self.fallback:
            taken = 0 if self.share is None else self.share.taken
            last = 0.0 if self.share is None else self.share.value
            log.info("decoded on the GPU: %d images; fell back to the CPU: %d; decoded by the "
                     "workers to keep pace: %d (share at the end %.2f)", self.gpu,
                     self.fallback, taken, last)  # fmt: skip


def _add_row(batch: Batch, item: RawItem) -> None:
    """A raw item's row, its size as the model saw it (after EXIF orientation)."""
    width, height = item.route.oriented_size
    batch.positions.append(item.position)
    batch.widths.append(width)
    batch.heights.append(height)
    batch.hashes.append(item.hash)
    batch.metadata.append(item.meta)


# The GIL's switch interval while the decode threads run (Python's default is 5 ms). Each of
# their many short torch calls lets the GIL go and must take it back, waiting up to the
# interval for a thread running Python (the main thread writing rows, the DataLoader's).
SWITCH_INTERVAL: float | None = 0.0005
JOIN_SECONDS = 10.0  # how long a stopped producer thread is waited for


def decoded_ahead(batches: Iterator[Batch], raw: RawDecoding, runtime: Runtime,
                  depth: int = 2) -> Iterator[Batch]:  # fmt: skip
    """The batches with their GPU-routed JPEGs decoded ahead by two threads of their own:
    one runs nvJPEG on a batch while the other resizes the batch before it, up to `depth`
    batches ahead of the model. Order is kept; errors are raised here, in order."""
    stages = raw.stages
    previous = sys.getswitchinterval()
    lowered = previous if SWITCH_INTERVAL is None else min(previous, SWITCH_INTERVAL)
    sys.setswitchinterval(lowered)
    taken = stages.each(batches, "waiting for workers")
    decoded = ahead(((b, raw.decode_only(b, runtime)) for b in taken), "gpu-decode", 1,
                    lambda: stages.timed("decode waiting for resize"))  # fmt: skip
    prepared = ahead(_prepared(decoded, raw), "gpu-resize", depth,
                     lambda: stages.timed("waiting for the model"))  # fmt: skip
    try:
        yield from prepared
    finally:
        prepared.close()
        if sys.getswitchinterval() == lowered:  # unless another run changed it meanwhile
            sys.setswitchinterval(previous)


def ahead_if_routed(batches: Iterator[Batch], raw: RawDecoding,
                    runtime: Runtime) -> Iterator[Batch]:  # fmt: skip
    """decoded_ahead's threads where the loader routes JPEGs to the GPU (its batches carry the
    workers' share, or raw items); else the batches as they come, so the CPU path runs as
    with --decode cpu (the path whose rate --decode auto compares)."""
    try:
        first = next(batches, None)
        if first is None:
            return
        rest = itertools.chain([first], batches)
        if first.share is not None or first.raw:
            yield from decoded_ahead(rest, raw, runtime)
        else:
            yield from rest
    finally:
        close(batches)


def _prepared(decoded: Iterator[tuple[Batch, Decoded]], raw: RawDecoding) -> Iterator[Batch]:
    try:
        for batch, images in decoded:
            raw.prepare(batch, images)
            yield batch
    finally:
        close(decoded)  # its thread stops and is joined now, not when it is collected


def ahead(items: Iterator[Any], name: str, depth: int,
          waiting: Any = nullcontext) -> Generator[Any, None, None]:  # fmt: skip
    """items, produced by a thread of their own up to `depth` ahead of the consumer; an
    error raised producing them is raised here, in order. The producer stops (and closes
    items) when the consumer does. `waiting()` times the producer's waits for room."""
    import queue
    import threading

    ready: queue.Queue[Any] = queue.Queue(depth)
    end, stop = object(), threading.Event()

    def hand_over(item: Any) -> None:
        with waiting():
            while not stop.is_set():  # the consumer gone (an error, Ctrl-C): the thread ends
                try:
                    ready.put(item, timeout=0.5)
                    return
                except queue.Full:
                    continue

    def work() -> None:
        try:
            for item in items:
                hand_over(item)
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            hand_over(exc)
        finally:
            hand_over(end)
            close(items)

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # a producer still inside torch when the interpreter exits aborts the process: it
        # sees `stop` within one item (or half a second of waiting for room)
        thread.join(JOIN_SECONDS)


def mark_runtime(folder: Path, choice: Any) -> None:
    """publish.mark_runtime for a decide.Choice."""
    from indexer.collection.versions import mark_runtime as mark

    mark(folder, {"name": choice.runtime, "precision": choice.precision})


def process_age() -> float:
    """Seconds since this process started (from /proc; 0 where there is none)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def embed_items(
    job: EmbedJob, batches: Iterator[Batch], paths: CollectionPaths, cfg: BuildConfig
) -> Embedded:
    """Stream batches through the model into new shards; failures become error rows, and
    items whose bytes are already embedded are set aside to reuse their vectors."""
    errors: list[dict[str, Any]] = []
    reused: list[tuple[int, str, dict[str, Any]]] = []
    embed = Embedding(job.embedder, job.runtime_plan, paths.root)
    if cfg.engine.kind == "ray" and job.runtime_plan and (ray := job.runtime_plan.single):
        mark_runtime(paths.root, ray)  # its actors embed: no first batch settles it here
        embed.remote = True
    stages = Stages()
    raw = RawDecoding(cfg, stages)
    if job.embedder.on_cuda and cfg.loader.decode != "cpu":
        batches = ahead_if_routed(batches, raw, job.embedder)
    bar = tqdm(total=len(job.plan.check), unit="img", disable=_no_bar(cfg.loader.progress))
    writer = ShardWriter(paths.shards, job.schema, cfg.shard_size, prefix=job.prefix)
    pending = job.confirmed
    with writer, bar, closing_iterator(batches):
        for batch in stages.each(batches, "waiting for batches"):
            if batch.raw:
                raw.decode(batch, job.embedder)
            if batch.positions:
                vectors, labels = batch.vectors, batch.labels
                if vectors is None:
                    assert batch.pixels is not None
                    with stages.timed("embedding" if embed.sample is not None else "first batch"):
                        vectors, labels = embed(batch.pixels)
                with stages.timed("writing"):
                    writer.write(rows_table(job, new_rows(batch, labels), vectors))
                if pending is not None and pending_confirmed(job.embedder):
                    pending()  # a killed run's shards may be salvaged from now on
                    pending = None
            errors += [error_row(job, *error) for error in batch.errors]
            reused += batch.reused
            bar.update(len(batch.positions) + len(batch.errors) + len(batch.reused))
        rate = embed.log_rate()
        raw.log_share()
        if job.embedder.on_cuda and rate is not None:  # what --decode auto compares
            from indexer.build.decode_choice import record_run

            path = "gpu" if raw.gpu or raw.fallback else "cpu"  # nvJPEG decoded, or only the CPU
            record_run(getattr(job.embedder, "device", None), job.embedder.data_config.input_size,
                       cfg.loader, path, rate, embed.after_first)  # fmt: skip
        log.info("seconds by stage: %s", stages.summary())
        decision = embed.settled()
        return Embedded(writer.close(), errors, reused, embed.sample, embed.exported,
                        embed.names, decision, embed.runtime.recipe)  # fmt: skip


def pending_confirmed(runtime: Any) -> bool:
    """Whether a known export this build embeds with is confirmed by now (asked without
    waiting); never for other runtimes (they need no confirmation)."""
    early = getattr(runtime, "confirmed_early", None)
    return bool(early()) if early is not None else False


@contextmanager
def closing_iterator(items: Iterator[Any]) -> Iterator[None]:
    """Closes a generator on the way out, an error included: its threads and workers stop
    now, not when the error's traceback lets it go (an interpreter exiting while a decode
    thread is inside torch aborts)."""
    try:
        yield
    finally:
        close(items)


def close(items: Iterator[Any]) -> None:
    """A generator closed (its finally blocks run now); other iterators need nothing."""
    method = getattr(items, "close", None)
    if method is not None:
        method()


def new_rows(batch: Batch, labels: list[dict[str, Any]]) -> list[NewRow]:
    """A batch's embedded rows, their labels merged into their metadata."""
    metas = batch.metadata
    if labels:
        metas = [{**m, **lab} for m, lab in zip(metas, labels, strict=True)]
    return [
        NewRow(p, h, w, ht, m)
        for p, h, w, ht, m in zip(batch.positions, batch.hashes, batch.widths, batch.heights,
                                  metas, strict=True)
    ]  # fmt: skip


def error_row(job: EmbedJob, position: int, stage: str, reason: str) -> dict[str, Any]:
    """The errors-file row of an item that failed."""
    item = job.items[position]
    source = job.sources[item.source]
    size, mtime = (item.fingerprint or (None, None))[:2]  # (size, mtime_ns[, etag])
    known = getattr(source, "row_metadata", None)  # what the source knows without reading
    etag = {"etag": item.fingerprint[2]} if item.fingerprint and len(item.fingerprint) > 2 else {}
    return {**(known(item.locator) if known is not None else {}), **etag,
            "key": item.key, "source": source.label, "stage": stage, "error": reason,
            "file_size": size, "mtime_ns": mtime, "url": source.url(item.locator)}  # fmt: skip


def write_reused(
    job: EmbedJob,
    reused: list[tuple[int, str, dict[str, Any]]],
    prev: Previous,
    paths: CollectionPaths,
    shard_size: int,
) -> list[ShardInfo]:
    """Rows for renamed, duplicated or touched files, with the vector already stored."""
    if not reused:
        return []
    stored = rows_by_hash(prev.stored_shards(), {digest for _, digest, _ in reused})
    carried = ("label_index", "label_name", "label_prob")  # the stored vector's labels too
    rows = [
        NewRow(p, digest, stored[digest]["width"], stored[digest]["height"],
               {**meta, **{c: stored[digest][c] for c in carried if c in stored[digest]}})
        for p, digest, meta in reused
    ]  # fmt: skip
    vectors = np.array([stored[r.hash]["embedding"] for r in rows], dtype=np.float32)
    with ShardWriter(paths.shards, job.schema, shard_size, prefix=job.reused_prefix) as writer:
        writer.write(rows_table(job, rows, vectors))
        return writer.close()


def _no_bar(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # tqdm: None = only on a terminal


@dataclass(frozen=True)
class NewRow:
    position: int
    hash: str
    width: int
    height: int
    meta: dict[str, Any]


def rows_table(job: EmbedJob, rows: list[NewRow], vectors: np.ndarray) -> pa.Table:
    """Shard rows for items, with the ids the plan gave them."""
    items = [job.items[r.position] for r in rows]
    columns: dict[str, Any] = {
        "id": int_array([job.plan.ids[r.position] for r in rows], pa.int64()),
        "key": text_array([item.key for item in items]),
        "source": text_array([job.sources[item.source].label for item in items]),
        "embedding": embedding_array(vectors),
        "width": int_array([r.width for r in rows], pa.int32()),
        "height": int_array([r.height for r in rows], pa.int32()),
        "content_hash": text_array([r.hash for r in rows]),
        "file_size": int_array([it.fingerprint[0] if it.fingerprint else None for it in items],
                               pa.int64()),
        "mtime_ns": int_array([it.fingerprint[1] if it.fingerprint else None for it in items],
                              pa.int64()),
    }  # fmt: skip
    for name in job.schema.names[len(columns) :]:
        values = [r.meta.get(name) for r in rows]
        columns[name] = column_array(values, job.schema.field(name).type)
    return pa.Table.from_arrays(list(columns.values()), names=list(columns))  # not pa.table:
    # it imports pandas (shards.as_numpy)
