"""Which runtime a build embeds with: its plan, and the portable model or known export opened."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from indexer.config import BuildConfig, DataConfig
from indexer.decode.preprocess import Preprocessor
from indexer.errors import IndexerError, InputError
from indexer.query.model_check import (
    CHEAP_SAMPLE,
    RESERVE,
    compare,
    refuse_unless_reproduced,
    stored_sample,
)
from indexer.sources import Item, Source

if TYPE_CHECKING:  # torch-heavy: imported only when a build has something to embed
    from indexer.decode.item_dataset import ItemDataset
    from indexer.model.known_export import Entry
    from indexer.model.runtime import Runtime
    from indexer.model.runtime_choice import Choice, RuntimePlan


from typing import TYPE_CHECKING

from indexer.model.runtime_choice import Choice

if TYPE_CHECKING:
    from indexer.build.plan import PublishedVersion
    from indexer.decode.preprocess import Preprocessor
    from indexer.model.runtime import Runtime
    from indexer.sources import Item, Source

log = logging.getLogger(__name__)


def check_runtime(cfg: BuildConfig) -> None:
    """--runtime and --precision this machine cannot run natively (bf16 without AVX512-BF16 or
    AMX, onnxruntime in bf16, a runtime not installed) are refused before anything is
    written, without torch (CUDA as the driver shows it)."""
    from indexer.model.runtime import wants_cuda
    from indexer.model.runtime_choice import NAME_OF, candidates, check_asked, this_machine

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
    cfg: BuildConfig, prev: PublishedVersion, identity: dict[str, Any] | None = None
) -> RuntimePlan:
    """The runtime and precision this run embeds with, or the candidates its first batch
    chooses among (the Ray engine's driver, on generated scenes): a later run keeps the
    collection's; a first build's choice is cached under its request's identity."""
    from indexer.model.runtime import embeds_on_cuda
    from indexer.model.runtime_choice import (
        cache_key,
        first_plan,
        later_plan,
        recorded,
        this_machine,
    )

    m = cfg.model
    machine = this_machine(embeds_on_cuda(m.device))
    built = recorded(prev.manifest)
    if built is not None:
        return later_plan(m.runtime, m.precision, machine, built, cfg.out)
    key = cache_key(identity, m.runtime, m.precision)
    return first_plan(m.runtime, m.precision, machine, key)


def resume_plan(
    plan: RuntimePlan, prev: PublishedVersion, known: frozenset[str]
) -> tuple[RuntimePlan, frozenset[str]]:
    """A killed run's finished shards are reused only by a run embedding with the runtime
    they were made with: a first build takes it (when this machine offers it), a later run
    already has it; otherwise they are embedded again (never mixed)."""
    from indexer.collection.versions import salvaged_runtime
    from indexer.model.runtime_choice import Choice, RuntimePlan

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
    prev: PublishedVersion,
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


def portable_recorded(plan: RuntimePlan, prev: PublishedVersion) -> bool:
    """The collection's recorded runtime runs its published portable model."""
    from indexer.model.runtime_choice import PORTABLE

    choice = plan.single
    if plan.how != "recorded" or choice is None or choice.runtime not in PORTABLE:
        return False
    return not (prev.folder is None or prev.manifest is None
                or "portable_model" not in prev.manifest)  # fmt: skip


def portable_runtime(plan: RuntimePlan, prev: PublishedVersion) -> Runtime | None:
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


def mark_runtime(folder: Path, choice: Any) -> None:
    """publish.mark_runtime for a decide.Choice."""
    from indexer.collection.versions import mark_runtime as mark

    mark(folder, {"name": choice.runtime, "precision": choice.precision})


def check_before_adding(
    runtime: Runtime,
    prev: PublishedVersion,
    sources: list[Source],
    items: list[Item],
    root: Path,
    unchanged: set[str] | None = None,
) -> None:
    """An incremental build embedding with the collection's stored portable model: refused
    (ModelMismatchError, before anything is written) unless that model reproduces
    CHEAP_SAMPLE stored vectors. Items are read from this run's own sources and listing;
    given `unchanged` (the keys the plan keeps as they are), only those: a changed item's
    bytes are not the stored ones, and the build reads them anyway."""
    from indexer.model.portable import PortableEmbedder
    from indexer.query.stored_items import ItemReader

    if not isinstance(runtime, PortableEmbedder) or prev.folder is None or prev.manifest is None:
        return
    rows = stored_sample(prev.folder, prev.manifest, CHEAP_SAMPLE * RESERVE)
    rows = [row for row in rows if unchanged is None or row.key in unchanged]
    if not rows:
        log.info("the stored model is not checked: none of the %d stored items sampled is "
                 "unchanged", CHEAP_SAMPLE * RESERVE)  # fmt: skip
        return
    reader = ItemReader.listed(sources, items, {row.key for row in rows})
    found = compare(rows, runtime, reader.read, prev.manifest, CHEAP_SAMPLE)
    log.info("%s", found.summary())
    refuse_unless_reproduced(found, root)
