"""build = list -> plan -> load -> embed -> write -> index; nothing else."""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from indexer.build.early_start import EarlyStart
from indexer.build.embed import embed_items
from indexer.build.failures import count_reasons
from indexer.build.model_start import load_model_while_decoding
from indexer.build.new_version import (
    BuildReport,
    publish_version,
    row_schema,
    start_new_version,
    unfetched,
    zero_counts,
)
from indexer.build.partitions import part_dir
from indexer.build.plan import (
    Plan,
    PublishedVersion,
    plan_build,
)
from indexer.build.runtime_setup import check_before_adding, check_runtime
from indexer.build.shard_rows import EmbedJob
from indexer.build.threads import close
from indexer.collection.history import RunRecord, append_run, write_metrics
from indexer.collection.layout import (
    ERRORS,
    LOCK,
    MANIFEST,
    PARTS,
    SHARDS,
    CollectionPaths,
    check_build_dir,
    open_version,
    read_manifest,
    write_json_atomic,
)
from indexer.collection.lock import Run, locked_run
from indexer.collection.versions import (
    clear_salvage,
    prune,
    publish,
    salvage,
    start_version,
)
from indexer.config import BuildConfig, IndexConfig, IndexOverrides
from indexer.errors import (
    CollectionLockedError,
    IndexerError,
    InputError,
    ModelMismatchError,
    RecipeMismatchError,
    TooManyFailuresError,
)
from indexer.index.faiss_index import read_index_meta
from indexer.index.update import IndexedVersion, index_version, settings_changed
from indexer.model.known_export import KnownExport, UnconfirmedExport
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

log = logging.getLogger(__name__)


def build(cfg: BuildConfig) -> BuildReport:
    """Build under the collection's lock, and record the run in its history (and metrics)."""
    check_build_dir(cfg.out)  # refused before anything is written into someone's folder
    if cfg.model.pretrained and cfg.model.checkpoint is None and not cfg.out.exists():
        from indexer.hub import check_pretrained_early

        check_pretrained_early(cfg.model.name)  # a first build offline without the weights:
        # fail at once, before torch loads (a refused run leaves no folder in any case)
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
    run = Run()
    try:
        with os_errors_as(f"building {cfg.out}"), locked_run(cfg.out, "build") as run:
            report = build_unlocked(cfg)
        unfetched = report.unfetched  # failed upstream: not this build's failures
        failed, listed = report.counts["failed"] - unfetched, report.counts["listed"] - unfetched
        status = run_status(failed, listed, cfg.max_failures)
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
        if not run.refused:  # a refused run leaves no trace: no folder, no lock, no history
            record_run(cfg, started, status, error, report)


def record_run(
    cfg: BuildConfig, started: float, status: str, error: str | None, report: BuildReport | None
) -> None:
    """The run in the collection's history, and in the metrics file when asked for."""
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


def run_status(failed: int, items: int, max_failures: float) -> str:
    """success, partial (failures within the budget) or failed (over it)."""
    if failed == 0:
        return "success"
    budget = int(max_failures) if max_failures >= 1 else math.floor(max_failures * items)
    return "partial" if failed <= budget else "failed"


def reindex(root: Path, keep: int = 2, overrides: IndexOverrides | None = None) -> dict[str, Any]:
    """Publish a new version of the collection with the same shards and a rebuilt index."""
    if not (root / LOCK).exists():  # not one of ours: refused before a lock file is made in
        open_version(root)  # it (with one, a first build may be running: locked says so)
    with os_errors_as(f"indexing {root}"), locked_run(root, "index"):
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
    return embed_and_publish(cfg, sources, items, plan, replace(prev, salvaged=salvaged), asked,
                             start, early=early)  # fmt: skip


@contextmanager
def closed_on_error(batches: Iterator[Any]) -> Iterator[None]:
    """The batches closed (their head start and workers stopped) if the block fails."""
    try:
        yield
    except BaseException:
        close(batches)
        raise


def embed_and_publish(
    cfg: BuildConfig,
    sources: list[Source],
    items: list[Item],
    plan: Plan,
    prev: PublishedVersion,
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
            return embed_and_publish(cfg, sources, items, plan, prev, asked, start, trust_cache)
        job = EmbedJob(items, sources, plan, embedder, row_schema(embedder, sources), "", "",
                       runtime_plan)  # fmt: skip
        job, version = start_new_version(cfg, job, prev, asked)
    try:
        embedded = embed_items(job, batches, CollectionPaths(version.folder), cfg)
        portable = (
            Exported(version.carried_model) if version.carried_model is not None
            else embedded.exported or embedder.portable_model(embedded.sample, version.folder)
        )  # fmt: skip
    except UnconfirmedExport as exc:
        log.warning("%s: embedding again with torch", exc)
        close(batches)  # its workers stop now
        shutil.rmtree(version.folder, ignore_errors=True)
        return embed_and_publish(cfg, sources, items, plan, prev, asked, start, trust_cache=False)
    finally:
        if isinstance(embedder, KnownExport):
            embedder.close()
    return publish_version(cfg, job, version, embedded, portable, prev, asked, start)


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
