"""build = list -> plan -> load -> embed -> write -> index; nothing else."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from indexer import __version__, configcache
from indexer.catalog import (
    ERRORS,
    MANIFEST,
    SCHEMA_VERSION,
    SHARDS,
    CollectionPaths,
    check_build_dir,
    open_version,
    read_manifest,
    write_json_atomic,
)
from indexer.config import BuildConfig, IndexConfig
from indexer.errors import CollectionLockedError, InputError, TooManyFailuresError
from indexer.history import RunRecord, append_run, write_metrics
from indexer.images import BACKGROUND, DEFAULT_MAX_PIXELS
from indexer.index import build_index
from indexer.loader import Batch, iter_batches
from indexer.lock import CollectionLock
from indexer.model import Embedder, load_embedder
from indexer.preprocess import DRAFT_FACTOR, REDUCING_GAP, Preprocessor
from indexer.publish import prune, publish, start_version
from indexer.shards import (
    ShardInfo,
    ShardWriter,
    embedding_array,
    merge_metadata_schemas,
    shard_schema,
    write_errors,
)
from indexer.sources import Item, Source, list_items, open_sources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildReport:
    root: Path
    items: int
    embedded: int
    failed: int
    shards: int
    seconds: float
    index: dict[str, Any]
    status: str = "success"  # or "partial": some items failed, within the failure budget


def build(cfg: BuildConfig) -> BuildReport:
    """Build under the collection's lock, and record the run in its history (and metrics)."""
    if cfg.out.exists() and not cfg.out.is_dir():
        raise InputError(f"--out {cfg.out} is a file: choose a directory")
    started, status, error = time.time(), "failed", None
    report: BuildReport | None = None
    try:
        with CollectionLock(cfg.out, "build"):
            report = build_unlocked(cfg)
        status = judge(report.failed, report.items, cfg.max_failures)
        if status == "failed":
            raise TooManyFailuresError(
                f"{report.failed} of {report.items} items failed, over the failure budget "
                f"(--max-failures {cfg.max_failures:g}); the collection was written: see "
                f"{cfg.out / 'errors.parquet'}"
            )
        report = replace(report, status=status)
        return report
    except CollectionLockedError as exc:
        status, error = "locked", str(exc)
        raise
    except BaseException as exc:
        error = error or f"{type(exc).__name__}: {exc}"
        raise
    finally:
        record = RunRecord("build", started, time.time(), status, run_counts(report), error)
        append_run(cfg.out, record)
        if cfg.metrics_file is not None:
            write_metrics(cfg.metrics_file, cfg.out, record)


def judge(failed: int, items: int, max_failures: float) -> str:
    """success, partial (failures within the budget) or failed (over it)."""
    if failed == 0:
        return "success"
    budget = int(max_failures) if max_failures >= 1 else math.floor(max_failures * items)
    return "partial" if failed <= budget else "failed"


def run_counts(report: BuildReport | None) -> dict[str, int]:
    if report is None:
        return {}
    return {
        "listed": report.items,
        "new": report.embedded,
        "changed": 0,
        "unchanged": 0,
        "deleted": 0,
        "failed": report.failed,
    }


def reindex(root: Path, keep: int = 2) -> dict[str, Any]:
    """Publish a new version of the collection with the same shards and a rebuilt index."""
    with CollectionLock(root, "index"):
        source = open_version(root)
        manifest = read_manifest(source)
        number, building = start_version(root)
        (building / SHARDS).mkdir()
        for shard in manifest["shards"]:  # shards are immutable: the versions share the files
            os.link(source / SHARDS / shard["name"], building / SHARDS / shard["name"])
        if (source / ERRORS).is_file():
            os.link(source / ERRORS, building / ERRORS)
        manifest = {**manifest, "version": number}
        write_json_atomic(building / MANIFEST, manifest)
        meta = build_index(building, manifest, IndexConfig(metric=manifest["metric"]))
        publish(root, number, building)
        prune(root, keep)
        return meta


def build_unlocked(cfg: BuildConfig) -> BuildReport:
    """Embed every item of the sources into a new collection at cfg.out and index it."""
    start = time.perf_counter()
    sources = open_sources(cfg.sources)
    items = list_items(sources)
    if not items:
        raise InputError("the sources hold no images: check the paths (hidden files are skipped)")
    log.info("listed %d items from %d source(s)", len(items), len(sources))
    check_build_dir(cfg.out, cfg.overwrite)
    embedder, batches = load_model_while_decoding(items, sources, cfg)
    log.info("model %s ready (%s)", cfg.model.name, embedder.recipe["precision"])
    number, building = start_version(cfg.out)  # the published version stays untouched
    paths = CollectionPaths(building)
    metadata = merge_metadata_schemas([s.metadata_schema() for s in sources])
    schema = shard_schema(embedder.dim, metadata)
    shards, errors = embed_items(items, sources, batches, embedder, schema, paths, cfg)
    log.info("embedded %d items into %d shard(s)", sum(s.rows for s in shards), len(shards))
    write_errors(paths.errors, errors)
    manifest = make_manifest(cfg, embedder, sources, shards, len(items), len(errors))
    manifest["version"] = number
    write_json_atomic(paths.manifest, manifest)
    index_meta = build_index(building, manifest, cfg.index)
    publish(cfg.out, number, building)
    prune(cfg.out, cfg.keep)
    embedded = sum(s.rows for s in shards)
    seconds = time.perf_counter() - start
    log.info("built %s: %d embedded, %d failed, %.1fs", cfg.out, embedded, len(errors), seconds)
    return BuildReport(cfg.out, len(items), embedded, len(errors), len(shards), seconds, index_meta)


def load_model_while_decoding(
    items: list[Item], sources: list[Source], cfg: BuildConfig
) -> tuple[Embedder, Iterator[Batch]]:
    """Start the loader with the model's remembered data config, then load the model.

    Importing timm and creating the model take seconds; the workers decode meanwhile. If the
    remembered config differs from the model's own, that work is discarded and decoding
    restarts with the right one: the hint only saves time, it never decides the pixels.
    """
    hint = configcache.lookup(cfg.model.name)
    early = None
    if hint is not None:
        early = iter_batches(
            items, sources, Preprocessor(hint, cfg.loader.preprocessing), cfg.loader
        )
    try:
        embedder = load_embedder(cfg.model)  # fails here, before anything is written
    except BaseException:
        del early  # shuts its workers down now rather than at garbage collection
        raise
    configcache.store(cfg.model.name, embedder.data_config)
    if early is not None and hint == embedder.data_config:
        return embedder, early
    if early is not None:
        log.warning("remembered data config of %s was out of date; decoding again", cfg.model.name)
        del early  # shuts its workers down
    preprocess = Preprocessor(embedder.data_config, cfg.loader.preprocessing)
    return embedder, iter_batches(items, sources, preprocess, cfg.loader)


def embed_items(
    items: list[Item],
    sources: list[Source],
    batches: Iterator[Batch],
    embedder: Embedder,
    schema: pa.Schema,
    paths: CollectionPaths,
    cfg: BuildConfig,
) -> tuple[list[ShardInfo], list[dict[str, str]]]:
    """Stream batches through the model into shards; failed items become error rows."""
    errors: list[dict[str, str]] = []
    bar = tqdm(total=len(items), unit="img", disable=_no_bar(cfg.loader.progress))
    with ShardWriter(paths.shards, schema, cfg.shard_size) as writer, bar:
        for batch in batches:
            if batch.pixels is not None:
                vectors = embedder.embed(batch.pixels)
                writer.write(batch_table(batch, vectors, items, sources, schema))
            for position, stage, reason in batch.errors:
                item = items[position]
                errors.append(
                    {
                        "key": item.key,
                        "source": sources[item.source].label,
                        "stage": stage,
                        "error": reason,
                    }
                )
            bar.update(len(batch.positions) + len(batch.errors))
        return writer.close(), errors


def _no_bar(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # tqdm: None = only on a terminal


def batch_table(
    batch: Batch, vectors: np.ndarray, items: list[Item], sources: list[Source], schema: pa.Schema
) -> pa.Table:
    """One row per good item of the batch; the id is the item's position in the listing."""
    rows = [items[p] for p in batch.positions]
    columns: dict[str, Any] = {
        "id": pa.array(batch.positions, pa.int64()),
        "key": [item.key for item in rows],
        "source": [sources[item.source].label for item in rows],
        "embedding": embedding_array(vectors),
        "width": pa.array(batch.widths, pa.int32()),
        "height": pa.array(batch.heights, pa.int32()),
        "content_hash": batch.hashes,
        "file_size": [item.fingerprint[0] if item.fingerprint else None for item in rows],
        "mtime_ns": [item.fingerprint[1] if item.fingerprint else None for item in rows],
    }
    for name in schema.names[len(columns) :]:
        columns[name] = pa.array([m.get(name) for m in batch.metadata], schema.field(name).type)
    return pa.table(columns)


def make_manifest(
    cfg: BuildConfig,
    embedder: Embedder,
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
            "max_pixels": DEFAULT_MAX_PIXELS,
            "alpha_background": list(BACKGROUND),
            "exif_orientation": True,
        },
        "embedding_dim": embedder.dim,
        "normalized": embedder.normalize,
        "metric": cfg.index.metric,
        "sources": [s.describe() for s in sources],
        "counts": {"items": items, "embedded": sum(s.rows for s in shards), "failed": failed},
        "shards": [{"name": s.name, "rows": s.rows} for s in shards],
        "errors": "errors.parquet",
    }
