"""The rows a build writes: embedded items, reused vectors and error rows, with planned ids."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from indexer.build.plan import Plan, PublishedVersion
from indexer.collection.layout import CollectionPaths
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

if TYPE_CHECKING:  # torch-heavy: imported only when a build has something to embed
    from indexer.model.runtime import Runtime
    from indexer.model.runtime_choice import RuntimePlan
from indexer.decode.batch import Batch

log = logging.getLogger(__name__)


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
    prev: PublishedVersion,
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
