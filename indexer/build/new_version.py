"""A build's new version: started, kept shards carried in, completed (manifest, index)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from indexer.build.embed import Embedded
from indexer.build.failures import count_reasons, count_stages
from indexer.build.plan import (
    Plan,
    PublishedVersion,
)
from indexer.build.shard_rows import EmbedJob, write_reused
from indexer.collection.layout import (
    SCHEMA_VERSION,
    SHARDS,
    CollectionPaths,
    read_manifest,
    write_json_atomic,
)
from indexer.collection.shards import (
    LABEL_SCHEMA,
    ShardInfo,
    carry_over,
    merge_metadata_schemas,
    shard_schema,
    write_errors,
)
from indexer.collection.versions import (
    clear_salvage,
    mark_request,
    new_shard_prefixes,
    prune,
    publish,
    start_version,
)
from indexer.config import BuildConfig
from indexer.decode.images import BACKGROUND
from indexer.decode.preprocess import DRAFT_FACTOR, REDUCING_GAP
from indexer.errors import (
    InputError,
)
from indexer.index.faiss_index import read_index_meta, reuse_index
from indexer.index.update import IndexedVersion, index_version, settings_changed
from indexer.model.known_export import KnownExport, remember
from indexer.model.portable import Exported
from indexer.model.runtime import (
    carry_portable,
    with_portable,
)
from indexer.sources import Item, Source
from indexer.version import __version__

if TYPE_CHECKING:  # torch-heavy: imported only when a build has something to embed
    from indexer.model.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildReport:
    root: Path
    counts: dict[str, int]  # listed, new, changed, unchanged, deleted, failed
    rows: int  # rows in the collection after the run
    shards: int
    seconds: float
    index: dict[str, Any] | None  # None when nothing changed and nothing was published
    status: str = "success"  # or "partial": some items failed, within the failure budget
    version: int | None = None
    reindexed: bool = False  # nothing changed, but the index settings did: only re-indexed
    failures: dict[str, int] = field(default_factory=dict)  # failed items per reason
    failed_stages: dict[str, dict[str, int]] = field(default_factory=dict)  # per stage, reason
    runtime: str | None = None  # what embedded: torch, onnxruntime, openvino (None: nothing)
    unfetched: int = 0  # of the failed: items their downloader never fetched (stage "fetch")
    choice: dict[str, Any] | None = None  # the collection's runtime record (decide.Decision)


REPAIR_KEEPS = ("parts", "part_versions")  # a merged collection stays one of its parts
PART_INDEX = {"type": "none", "part": True}  # a part is indexed when the parts are merged


def unfetched(errors: list[dict[str, Any]], sources: list[Source]) -> int:
    """Error rows of items never fetched upstream (img2dataset's failed downloads), not
    counted against the failure budget; a URL list's failed fetches are this build's own."""
    ours = {s.label for s in sources if getattr(s, "row_metadata", None) is not None}
    return sum(1 for e in errors if e.get("stage") == "fetch" and e.get("source") not in ours)


def errors_extra(sources: list[Source]) -> pa.Schema:
    """The columns error rows carry besides the contract's: what the sources know of an
    item without reading it (a URL list's columns)."""
    schemas = [s.row_metadata_schema() for s in sources if hasattr(s, "row_metadata_schema")]
    if any(getattr(s, "etags", False) for s in sources):  # a stored object's ETag: a failed
        schemas.append(pa.schema([pa.field("etag", pa.string())]))  # one is retried when it
    return merge_metadata_schemas(schemas) if schemas else pa.schema([])  # changes


def zero_counts(listed: int) -> dict[str, int]:
    """Per listed item: new, changed, unchanged, failed; plus deleted rows; plus vectors reused
    by content hash (touched, renamed, duplicated files, and work a killed run finished); of
    the new and changed, those embedded by this run."""
    return {
        "listed": listed, "new": 0, "changed": 0, "unchanged": 0, "deleted": 0, "failed": 0,
        "reused": 0, "embedded": 0,
    }  # fmt: skip


@dataclass(frozen=True)
class NewVersion:
    """A version being built: its number, its folder, and what it carries from the last one."""

    number: int
    folder: Path
    carried: list[ShardInfo]  # the previous version's shards, kept as they are
    carried_model: dict[str, Any] | None  # its portable model, when this one is the same


def row_schema(embedder: Runtime, sources: list[Source]) -> pa.Schema:
    """The shards' schema: the vector, the sources' metadata columns, then the labels'."""
    metadata = merge_metadata_schemas([s.metadata_schema() for s in sources])
    if embedder.labels:  # label columns follow the sources' columns
        metadata = pa.unify_schemas([metadata, LABEL_SCHEMA])
    return shard_schema(embedder.dim, metadata)


def start_new_version(
    cfg: BuildConfig, job: EmbedJob, prev: PublishedVersion, asked: dict[str, Any]
) -> tuple[EmbedJob, NewVersion]:
    """The version's folder started (the request recorded, unconfirmed while a known export
    is not), the previous version's kept shards and model carried in; the job's shard names."""
    known = isinstance(job.embedder, KnownExport)  # its shards are salvaged only once confirmed
    number, building = start_version(cfg.out, {**asked, "unconfirmed_model": True} if known
                                     else asked)  # fmt: skip
    paths = CollectionPaths(building)
    paths.shards.mkdir()
    carried = carry_kept_shards(prev, job.plan.kept_ids(), paths, job.schema, cfg.out)
    prefix, reused_prefix = new_shard_prefixes(number)
    carried_model = carry_portable(prev.folder, prev.manifest, job.embedder.recipe, building)
    confirmed = (lambda: mark_request(building, asked)) if known else None
    job = replace(job, prefix=prefix, reused_prefix=reused_prefix, confirmed=confirmed)
    return job, NewVersion(number, building, carried, carried_model)


def publish_version(
    cfg: BuildConfig,
    job: EmbedJob,
    version: NewVersion,
    embedded: Embedded,
    portable: Exported,
    prev: PublishedVersion,
    asked: dict[str, Any],
    start: float,
) -> BuildReport:
    """The embedded version completed (reused rows, errors, manifest, index) and published."""
    embedder, plan, sources, items = job.embedder, job.plan, job.sources, job.items
    building, paths = version.folder, CollectionPaths(version.folder)
    if isinstance(embedder, KnownExport):  # confirmed (if not already during the run): a
        mark_request(building, asked)  # killed run's shards may now be salvaged
    elif embedder.name == "torch" and version.carried_model is None and portable.record:
        remember(cfg.model, embedder.recipe, portable.record, building)
    new_shards, new_errors, reused = embedded.shards, embedded.errors, embedded.reused
    errors = plan.kept_errors + new_errors
    new_shards += write_reused(job, reused, prev, paths, cfg.shard_size)
    check_recovered(prev.lost, sum(s.rows for s in new_shards), cfg.out)
    shards = version.carried + new_shards
    write_errors(paths.errors, errors, errors_extra(sources))
    counts = count_outcomes(plan, reused, new_errors, prev, items, len(items))
    counts["failed"] += len(plan.kept_errors)
    manifest = make_manifest(cfg, embedder, sources, shards, len(items), len(errors))
    manifest.update(version=version.number, next_id=plan.next_id, request=asked)
    manifest.update(runtime_fields(embedded, prev.manifest, manifest["model"]))
    manifest = with_portable(manifest, portable)
    if cfg.drop_shards and prev.manifest is not None:  # a repair restores: provenance stays
        manifest.update({k: prev.manifest[k] for k in REPAIR_KEEPS if k in prev.manifest})
    write_json_atomic(paths.manifest, manifest)
    index_meta = (
        PART_INDEX if cfg.partition is not None
        else same_vectors_index(cfg, plan, reused, prev, items, building, manifest)
        or index_version(building, manifest, cfg.index, indexed_version(prev), rebuild_why(cfg))
    )  # fmt: skip
    publish(cfg.out, version.number, building)
    clear_salvage(cfg.out)
    prune(cfg.out, cfg.keep)
    rows = sum(s.rows for s in shards)
    seconds = time.perf_counter() - start
    log.info("published %s v%d: %d rows, %s, %.1fs", cfg.out, version.number, rows, counts,
             seconds)  # fmt: skip
    return BuildReport(cfg.out, counts, rows, len(shards), seconds, index_meta,
                       version=version.number, failures=count_reasons(errors),
                       failed_stages=count_stages(errors),
                       runtime=embedded.runtime, unfetched=unfetched(errors, sources),
                       choice=embedded.decision.record() if embedded.decision
                       else manifest.get("runtime"))  # fmt: skip


def runtime_fields(
    embedded: Embedded, previous: dict[str, Any] | None, model: dict[str, Any]
) -> dict[str, Any]:
    """The manifest's model (its precision the decided one), precision and runtime record:
    this run's decision, else (nothing embedded) the published version's."""
    if embedded.decision is not None and embedded.decision.how == "recorded" and previous:
        kept = previous.get("runtime")  # how the first build decided stays (info shows it)
        if isinstance(kept, dict) and kept.get("name") == embedded.decision.choice.runtime:
            return {"precision": model.get("precision"), "runtime": kept}
    if embedded.decision is not None:
        recipe = {**model, **(embedded.recipe or {})}
        recipe["precision"] = embedded.decision.choice.precision
        return {"model": recipe, "precision": recipe["precision"],
                "runtime": embedded.decision.record()}  # fmt: skip
    out: dict[str, Any] = {"precision": model.get("precision")}
    # nothing embedded: the published version's record, or none yet (decided by the first
    # run that embeds something; `null`, not absent: absent means built before records)
    out["runtime"] = previous.get("runtime") if previous is not None else None
    return out


def rebuild_why(cfg: BuildConfig) -> str | None:
    """Why a build's index is rebuilt whatever changed: --rebuild, or a repair (vectors
    embedded again may differ in their last bits from those the old index holds)."""
    if cfg.rebuild:
        return "asked for (--rebuild)"
    return "a repair: vectors were embedded again" if cfg.drop_shards else None


def indexed_version(prev: PublishedVersion) -> IndexedVersion | None:
    if prev.folder is None or prev.manifest is None:
        return None
    return IndexedVersion(prev.folder, prev.manifest)


def same_vectors_index(
    cfg: BuildConfig,
    plan: Plan,
    reused: list[tuple[int, str, dict[str, Any]]],
    prev: PublishedVersion,
    items: list[Item],
    building: Path,
    manifest: dict[str, Any],
) -> dict[str, Any] | None:
    """The previous version's index, linked, when this version holds exactly its vectors under
    the same ids: nothing deleted or embedded, every item read only touched (same bytes, same
    key), the same index settings. None otherwise (the index is built)."""
    if prev.folder is None or prev.manifest is None or plan.deleted or cfg.drop_shards:
        return None
    if len(reused) != len(plan.check) or settings_changed(cfg.index, read_index_meta(prev.folder)):
        return None
    for position, digest, _ in reused:
        row = prev.rows.get(items[position].key)
        if row is None or row.content_hash != digest or row.id != plan.ids[position]:
            return None
    return reuse_index(prev.folder, read_manifest(prev.folder), building, manifest)


def check_recovered(lost: int, embedded: int, root: Path) -> None:
    """A repair publishes only if it embedded at least as many items as the damaged shards
    held: fewer means some can no longer be read from the sources, and they would be lost."""
    if embedded < lost:
        raise InputError(
            f"the damaged shards of {root} held {lost} rows but only {embedded} of their items "
            "could be embedded again from the sources (moved, deleted or now unreadable): "
            "restore them and run the repair again, or rebuild with `indexer build ... "
            "--rebuild`"
        )


def carry_kept_shards(
    prev: PublishedVersion,
    keep_ids: set[int],
    paths: CollectionPaths,
    schema: pa.Schema,
    root: Path,
) -> list[ShardInfo]:
    if prev.folder is None or prev.manifest is None or not keep_ids:
        return []
    try:
        return carry_over(prev.folder / SHARDS, prev.manifest["shards"], keep_ids, paths.shards,
                          schema)  # fmt: skip
    except ValueError as exc:
        raise InputError(
            f"the sources' columns differ from those of {root} ({exc}): pass --rebuild"
        ) from exc


def count_outcomes(
    plan: Plan,
    reused: list[tuple[int, str, dict[str, Any]]],
    errors: list[dict[str, Any]],
    prev: PublishedVersion,
    items: list[Item],
    listed: int,
) -> dict[str, int]:
    """What the run did, per listed item: new, changed, unchanged (incl. touched), failed;
    of the new and changed, how many were embedded (the rest reused a stored vector)."""
    counts = {**zero_counts(listed), "unchanged": len(plan.keep), "deleted": plan.deleted,
              "reused": len(reused)}  # fmt: skip
    failed_keys = {e["key"] for e in errors}
    touched = {
        p for p, digest, _ in reused
        if p in plan.known and prev.rows[items[p].key].content_hash == digest
    }  # fmt: skip

    carried = {p for p, _, _ in reused}  # vectors copied by content hash, not embedded
    for position in plan.check:
        if items[position].key in failed_keys:
            counts["failed"] += 1
            continue
        if position in touched:
            counts["unchanged"] += 1
            continue
        counts["changed" if position in plan.known else "new"] += 1
        counts["embedded"] += position not in carried
    return counts


def make_manifest(
    cfg: BuildConfig,
    embedder: Runtime,
    sources: list[Source],
    shards: list[ShardInfo],
    items: int,
    failed: int,
) -> dict[str, Any]:
    """How every vector was made, from what, and where it is."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "indexer_version": __version__,
        "model": embedder.recipe,
        "decode": {
            "mode": cfg.loader.preprocessing,
            "jpeg_draft_factor": DRAFT_FACTOR if cfg.loader.preprocessing == "fast" else None,
            "reducing_gap": REDUCING_GAP if cfg.loader.preprocessing == "fast" else None,
            "max_pixels": cfg.loader.max_pixels,
            "allow_truncated": cfg.loader.allow_truncated,
            "alpha_background": list(BACKGROUND),
            "exif_orientation": True,
        },
        "embedding_dim": embedder.dim,
        "normalized": embedder.normalize,
        "metric": cfg.index.metric,
        "sources": [s.describe() for s in sources],
        "counts": {"items": items, "embedded": sum(s.rows for s in shards), "failed": failed},
        "shards": [s.to_manifest() for s in shards],
        "errors": "errors.parquet",
    }
