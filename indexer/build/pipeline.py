"""build = list -> plan -> load -> embed -> write -> index; nothing else."""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from indexer.build.early_start import EarlyStart
from indexer.build.embed import Embedded, embed_items
from indexer.build.failures import count_reasons
from indexer.build.model_start import load_model_while_decoding
from indexer.build.partitions import part_dir
from indexer.build.plan import (
    Plan,
    Previous,
    plan_build,
)
from indexer.build.runtime_setup import check_before_adding, check_runtime
from indexer.build.shard_rows import EmbedJob, write_reused
from indexer.build.threads import close
from indexer.collection.history import RunRecord, append_run, write_metrics
from indexer.collection.layout import (
    ERRORS,
    MANIFEST,
    PARTS,
    SCHEMA_VERSION,
    SHARDS,
    CollectionPaths,
    check_build_dir,
    open_version,
    read_manifest,
    write_json_atomic,
)
from indexer.collection.lock import CollectionLock
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
    salvage,
    start_version,
)
from indexer.config import BuildConfig, IndexConfig, IndexOverrides
from indexer.decode.images import BACKGROUND
from indexer.decode.preprocess import DRAFT_FACTOR, REDUCING_GAP
from indexer.errors import (
    CollectionLockedError,
    IndexerError,
    InputError,
    ModelMismatchError,
    RecipeMismatchError,
    TooManyFailuresError,
)
from indexer.index.faiss_index import read_index_meta, reuse_index
from indexer.index.update import Previous as IndexedVersion
from indexer.index.update import index_version, settings_changed
from indexer.model.known_export import KnownExport, UnconfirmedExport, remember
from indexer.model.portable import Exported
from indexer.model.runtime import (
    absent_reason,
    carry_portable,
    export_from_recipe,
    with_portable,
)
from indexer.model.runtime_choice import recorded
from indexer.query.model_check import distrusted
from indexer.safeio import check_writable, os_errors_as
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
    runtime: str | None = None  # what embedded: torch, onnxruntime, openvino (None: nothing)
    unfetched: int = 0  # of the failed: items their downloader never fetched (stage "fetch")
    choice: dict[str, Any] | None = None  # the collection's runtime record (decide.Decision)


REPAIR_KEEPS = ("parts", "part_versions")  # a merged collection stays one of its parts
PART_INDEX = {"type": "none", "part": True}  # a part is indexed when the parts are merged


def build(cfg: BuildConfig) -> BuildReport:
    """Build under the collection's lock, and record the run in its history (and metrics)."""
    check_build_dir(cfg.out)  # refused before anything is written into someone's folder
    if cfg.model.pretrained and cfg.model.checkpoint is None and not cfg.out.exists():
        from indexer.hub import check_pretrained_early

        check_pretrained_early(cfg.model.name)  # a first build offline without the weights:
        # fail at once, leaving no folder (an existing collection records the failed run)
    if cfg.metrics_file is not None:
        check_writable(cfg.metrics_file, "--metrics-file")  # before the work, not after it
    if cfg.loader.decode == "gpu":
        from indexer.build.gpu_decoding import check_decode

        check_decode(cfg)  # a cron job asking for the GPU where there is none fails every run
    check_runtime(cfg)  # a runtime or precision this machine cannot run: refused, nothing written
    if cfg.partition is not None:  # the part is a collection of its own inside --out
        cfg = replace(cfg, out=part_dir(cfg.out, cfg.partition))
    elif (cfg.out / PARTS).is_dir() and any((cfg.out / PARTS).iterdir()):
        raise InputError(
            f"{cfg.out} is built in parts ({cfg.out / PARTS}): build it with --partition I/N "
            f"and merge with `indexer index {cfg.out}`, or remove {cfg.out / PARTS} to build "
            "it whole"
        )
    started, status, error = time.time(), "failed", None
    report: BuildReport | None = None
    try:
        with os_errors_as(f"building {cfg.out}"), CollectionLock(cfg.out, "build"):
            report = build_unlocked(cfg)
        unfetched = report.unfetched  # failed upstream: not this build's failures
        failed, listed = report.counts["failed"] - unfetched, report.counts["listed"] - unfetched
        status = judge(failed, listed, cfg.max_failures)
        if status == "failed":
            raise TooManyFailuresError(
                f"{failed} of {listed} items failed, over the failure budget "
                f"(--max-failures {cfg.max_failures:g}); the collection was written: see "
                f"{cfg.out / 'errors.parquet'}"
            )
        report = replace(report, status=status)
        return report
    except CollectionLockedError as exc:
        status, error = "locked", str(exc)
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Interrupted)
        status, error = "interrupted", str(exc) or type(exc).__name__
        raise
    except BaseException as exc:
        error = error or f"{type(exc).__name__}: {exc}"
        raise
    finally:
        counts = report.counts if report is not None else {}
        failures = report.failures if report is not None else {}
        runtime = report.runtime if report is not None else None
        choice = report.choice if report is not None else None
        record = RunRecord("build", started, time.time(), status, counts, error, failures,
                           runtime, choice)  # fmt: skip
        append_run(cfg.out, record)  # never raises: a failure here must not hide the first
        if cfg.metrics_file is not None:
            try:
                write_metrics(cfg.metrics_file, cfg.out, record)
            except IndexerError as exc:
                if error is None:
                    raise
                log.warning("%s", exc)  # the run's own error is the one to report


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


def judge(failed: int, items: int, max_failures: float) -> str:
    """success, partial (failures within the budget) or failed (over it)."""
    if failed == 0:
        return "success"
    budget = int(max_failures) if max_failures >= 1 else math.floor(max_failures * items)
    return "partial" if failed <= budget else "failed"


def reindex(root: Path, keep: int = 2, overrides: IndexOverrides | None = None) -> dict[str, Any]:
    """Publish a new version of the collection with the same shards and a rebuilt index."""
    with os_errors_as(f"indexing {root}"), CollectionLock(root, "index"):
        source = open_version(root)
        manifest = read_manifest(source)
        cfg = (overrides or IndexOverrides()).resolve(manifest["metric"], read_index_meta(source))
        return reindex_unlocked(root, source, manifest, cfg, keep)


def reindex_unlocked(
    root: Path,
    source: Path,
    manifest: dict[str, Any],
    cfg: IndexConfig,
    keep: int,
    drop: frozenset[str] | set[str] = frozenset(),
    reexport: Callable[[Path], Exported] | None = None,
) -> dict[str, Any]:
    """A new version sharing the published one's shards (hard links; those named in `drop`
    left out, with their rows) and portable model (or `reexport`'s), with a new index."""
    salvage(root, manifest.get("request", {}))
    number, building = start_version(root, manifest.get("request", {}))
    (building / SHARDS).mkdir()
    shards = [s for s in manifest["shards"] if s["name"] not in drop]
    for shard in shards:  # shards are immutable: the versions share the files
        os.link(source / SHARDS / shard["name"], building / SHARDS / shard["name"])
    if (source / ERRORS).is_file():
        os.link(source / ERRORS, building / ERRORS)
    counts = {**manifest["counts"], "embedded": sum(int(s["rows"]) for s in shards)}
    before = manifest
    portable = (
        carried_portable(source, manifest, building) if reexport is None else reexport(building)
    )
    manifest = with_portable({**manifest, "version": number, "shards": shards, "counts": counts},
                             portable)  # fmt: skip
    write_json_atomic(building / MANIFEST, manifest)
    meta = index_version(building, manifest, cfg, IndexedVersion(source, before))
    publish(root, number, building)
    prune(root, keep)
    return meta


def carried_portable(source: Path, manifest: dict[str, Any], building: Path) -> Exported:
    """The published version's portable model linked into the new version (or its absence)."""
    if manifest.get("model") is None:
        return Exported(None)
    record = carry_portable(source, manifest, manifest["model"], building)
    if record is not None:
        return Exported(record)
    if "portable_model" in manifest:  # damaged: made again, so no version forgets it
        return export_from_recipe(manifest["model"], building)
    return Exported(None, absent_reason(manifest))


def build_unlocked(cfg: BuildConfig) -> BuildReport:
    """list -> plan; then, only if something changed: load -> embed -> write -> index -> publish."""
    start = time.perf_counter()
    early = EarlyStart.start(cfg)
    try:
        return plan_and_update(cfg, start, early)
    finally:
        if early is not None:
            early.close()  # unless adopted: its head start is stopped with the batches


def plan_and_update(cfg: BuildConfig, start: float, early: EarlyStart | None) -> BuildReport:
    """build_unlocked's work, with the early start's listings where it made them."""
    listings = None
    if early is not None:  # torch loads while it lists (a first build embeds: it is needed)
        import indexer.decode.loader  # noqa: F401

        listings = early.listings()
    planned = plan_build(cfg, listings)
    sources, items, asked, prev, plan = (
        planned.sources, planned.items, planned.asked, planned.prev, planned.plan
    )  # fmt: skip
    salvaged = salvage(cfg.out, asked)  # finished shards of a killed run with the same recipe
    log.info("listed %d items: %d to check, %d unchanged, %d deleted",
             len(items), len(plan.check), len(plan.keep), plan.deleted)  # fmt: skip
    unchanged = plan.nothing_to_do and not cfg.drop_shards  # a repair always publishes
    if prev.manifest is not None and prev.folder is not None and unchanged:
        clear_salvage(cfg.out)
        counts = {
            **zero_counts(len(items)),
            "unchanged": len(plan.keep),
            "failed": len(plan.kept_errors),
        }
        index, version = None, prev.manifest.get("version")
        recorded = read_index_meta(prev.folder)
        if cfg.partition is None and settings_changed(cfg.index, recorded):
            index = reindex_unlocked(cfg.out, prev.folder, prev.manifest, cfg.index, cfg.keep)
            version = int(open_version(cfg.out).name[1:])
        return BuildReport(cfg.out, counts, len(plan.keep), len(prev.manifest["shards"]),
                           time.perf_counter() - start, index, version=version,
                           reindexed=index is not None,
                           failures=count_reasons(plan.kept_errors),
                           unfetched=unfetched(plan.kept_errors, sources))  # fmt: skip
    return update(cfg, sources, items, plan, replace(prev, salvaged=salvaged), asked, start,
                  early=early)  # fmt: skip


@contextmanager
def closed_on_error(batches: Iterator[Any]) -> Iterator[None]:
    """The batches closed (their head start and workers stopped) if the block fails."""
    try:
        yield
    except BaseException:
        close(batches)
        raise


def zero_counts(listed: int) -> dict[str, int]:
    """Per listed item: new, changed, unchanged, failed; plus deleted rows; plus vectors reused
    by content hash (touched, renamed, duplicated files, and work a killed run finished)."""
    return {
        "listed": listed, "new": 0, "changed": 0, "unchanged": 0, "deleted": 0, "failed": 0,
        "reused": 0,
    }  # fmt: skip


def update(
    cfg: BuildConfig,
    sources: list[Source],
    items: list[Item],
    plan: Plan,
    prev: Previous,
    asked: dict[str, Any],
    start: float,
    trust_cache: bool = True,
    early: EarlyStart | None = None,
) -> BuildReport:
    """Embed what the plan says, then write, index and publish a new version."""
    embedder, batches, runtime_plan = load_model_while_decoding(
        items, sources, cfg, prev.known_hashes(), plan.check, prev, trust_cache, early
    )
    with closed_on_error(batches):  # (a failure before embedding leaves nothing decoding)
        if prev.manifest is not None:
            check_recipe(embedder.recipe, cfg.loader.preprocessing, prev.manifest, cfg.out,
                         decided=recorded(prev.manifest) is not None)  # fmt: skip
        try:
            unchanged = {items[position].key for position in plan.keep}
            check_before_adding(embedder, prev, sources, items, cfg.out, unchanged)
        except ModelMismatchError as exc:
            close(batches)  # its workers stop now
            if not cfg.drop_shards or prev.manifest is None:
                raise  # refused: nothing was written
            log.warning("%s; the repair embeds with torch and exports the model again", exc)
            prev = replace(prev, manifest=distrusted(prev.manifest))
            return update(cfg, sources, items, plan, prev, asked, start, trust_cache)
        metadata = merge_metadata_schemas([s.metadata_schema() for s in sources])
        if embedder.labels:  # label columns follow the sources' columns
            metadata = pa.unify_schemas([metadata, LABEL_SCHEMA])
        schema = shard_schema(embedder.dim, metadata)
        known = isinstance(embedder, KnownExport)  # its shards are salvaged only once confirmed
        number, building = start_version(cfg.out, {**asked, "unconfirmed_model": True} if known
                                         else asked)  # fmt: skip
        paths = CollectionPaths(building)
        paths.shards.mkdir()
        carried = carry(prev, plan.kept_ids(), paths, schema, cfg.out)
        prefix, reused_prefix = new_shard_prefixes(number)
        carried_model = carry_portable(prev.folder, prev.manifest, embedder.recipe, building)
        confirmed = (lambda: mark_request(building, asked)) if known else None
        job = EmbedJob(items, sources, plan, embedder, schema, prefix, reused_prefix, runtime_plan,
                       confirmed)  # fmt: skip
    try:
        embedded = embed_items(job, batches, paths, cfg)
        portable = (
            Exported(carried_model) if carried_model is not None
            else embedded.exported or embedder.portable_model(embedded.sample, building)
        )  # fmt: skip
    except UnconfirmedExport as exc:
        log.warning("%s: embedding again with torch", exc)
        close(batches)  # its workers stop now
        shutil.rmtree(building, ignore_errors=True)
        return update(cfg, sources, items, plan, prev, asked, start, trust_cache=False)
    finally:
        if isinstance(embedder, KnownExport):
            embedder.close()
    if known:  # confirmed (if not already during the run): a killed run's shards may now
        mark_request(building, asked)  # be salvaged
    elif embedder.name == "torch" and carried_model is None and portable.record is not None:
        remember(cfg.model, embedder.recipe, portable.record, building)
    new_shards, new_errors, reused = embedded.shards, embedded.errors, embedded.reused
    errors = plan.kept_errors + new_errors
    new_shards += write_reused(job, reused, prev, paths, cfg.shard_size)
    check_recovered(prev.lost, sum(s.rows for s in new_shards), cfg.out)
    shards = carried + new_shards
    write_errors(paths.errors, errors, errors_extra(sources))
    counts = tally(plan, reused, new_errors, prev, items, len(items))
    counts["failed"] += len(plan.kept_errors)
    manifest = make_manifest(cfg, embedder, sources, shards, len(items), len(errors))
    manifest.update(version=number, next_id=plan.next_id, request=asked)
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
    publish(cfg.out, number, building)
    clear_salvage(cfg.out)
    prune(cfg.out, cfg.keep)
    rows = sum(s.rows for s in shards)
    seconds = time.perf_counter() - start
    log.info("published %s v%d: %d rows, %s, %.1fs", cfg.out, number, rows, counts, seconds)
    return BuildReport(cfg.out, counts, rows, len(shards), seconds, index_meta, version=number,
                       failures=count_reasons(errors), runtime=embedded.runtime,
                       unfetched=unfetched(errors, sources),
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


def indexed_version(prev: Previous) -> IndexedVersion | None:
    if prev.folder is None or prev.manifest is None:
        return None
    return IndexedVersion(prev.folder, prev.manifest)


def same_vectors_index(
    cfg: BuildConfig,
    plan: Plan,
    reused: list[tuple[int, str, dict[str, Any]]],
    prev: Previous,
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


def carry(
    prev: Previous, keep_ids: set[int], paths: CollectionPaths, schema: pa.Schema, root: Path
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


def check_recipe(
    recipe: dict[str, Any], mode: str, manifest: dict[str, Any], root: Path, decided: bool = True
) -> None:
    """The loaded model must make vectors exactly as the published ones were made (their
    precision too, once a run decided it)."""
    built = manifest["model"]
    fields: tuple[str, ...] = ("name", "state_sha256", "data_config", "normalize", "forward")
    fields += ("precision",) if decided else ()
    diff = [f for f in fields if built.get(f) != recipe.get(f)]
    if manifest["decode"]["mode"] != mode:
        diff.append("preprocessing")
    if diff:
        raise RecipeMismatchError(
            f"the model loaded here differs from the one {root} was built with "
            f"({', '.join(diff)}; built with timm {built.get('timm_version')}, torch "
            f"{built.get('torch_version')}; here timm {recipe.get('timm_version')}, torch "
            f"{recipe.get('torch_version')}): "
            "pass --rebuild to re-embed everything"
        )


def tally(
    plan: Plan,
    reused: list[tuple[int, str, dict[str, Any]]],
    errors: list[dict[str, Any]],
    prev: Previous,
    items: list[Item],
    listed: int,
) -> dict[str, int]:
    """What the run did, per listed item: new, changed, unchanged (incl. touched), failed."""
    counts = {**zero_counts(listed), "unchanged": len(plan.keep), "deleted": plan.deleted,
              "reused": len(reused)}  # fmt: skip
    failed_keys = {e["key"] for e in errors}
    touched = {
        p for p, digest, _ in reused
        if p in plan.known and prev.rows[items[p].key].content_hash == digest
    }  # fmt: skip

    for position in plan.check:
        if items[position].key in failed_keys:
            counts["failed"] += 1
        elif position in touched:
            counts["unchanged"] += 1
        elif position in plan.known:
            counts["changed"] += 1
        else:
            counts["new"] += 1
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
