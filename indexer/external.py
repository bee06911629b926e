"""Index embeddings made elsewhere: Parquet files with a list-of-floats column, as a collection."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexer import __version__
from indexer.catalog import (
    CURRENT,
    SCHEMA_VERSION,
    CollectionPaths,
    check_build_dir,
    open_version,
    parse_manifest,
    write_json_atomic,
)
from indexer.config import IndexConfig
from indexer.errors import CollectionError, InputError
from indexer.index import build_index
from indexer.lock import CollectionLock
from indexer.publish import prune, publish, salvage, start_version
from indexer.safeio import os_errors_as
from indexer.shards import ShardWriter, embedding_array, metadata_field, shard_schema, write_errors

log = logging.getLogger(__name__)
READ_ROWS = 65_536
UNIT_TOLERANCE = 1e-3  # vectors this close to norm 1 count as already normalised


@dataclass(frozen=True)
class ExternalConfig:
    """What ``indexer index --from-parquet`` needs."""

    paths: tuple[Path, ...]
    out: Path
    embedding_column: str = "embedding"
    key_column: str = "key"
    normalize: bool = False  # L2-normalise the vectors on the way in
    shard_size: int = 50_000
    index: IndexConfig = field(default_factory=IndexConfig)
    keep: int = 2


@dataclass(frozen=True)
class InputFile:
    path: Path
    rows: int
    dim: int
    metadata: dict[str, pa.Field]  # source column name -> its shard column


def parquet_files(paths: tuple[Path, ...]) -> list[Path]:
    """The files named, and the *.parquet files under the folders named, in a stable order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.parquet") if p.is_file())
            if not found:
                raise InputError(f"{path} holds no .parquet files: name the files to index")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path} does not exist: name Parquet files or folders of them")
    if len(set(files)) != len(files):
        raise InputError("a Parquet file is named twice: name each file (or folder) once")
    return files


def inspect(path: Path, cfg: ExternalConfig) -> InputFile:
    """Check one file's columns; its rows, vector length and the metadata columns it carries."""
    try:
        meta = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path} is not a readable Parquet file ({exc})") from exc
    schema = meta.schema_arrow
    for role, name in (("embedding", cfg.embedding_column), ("key", cfg.key_column)):
        if name not in schema.names:
            raise InputError(
                f"{path} has no column {name!r} (it has {', '.join(schema.names)}): "
                f"name its {role} column with --{role}-column"
            )
    _check_types(path, schema, cfg)
    dim = _dim(meta, schema.field(cfg.embedding_column).type, cfg.embedding_column, path)
    taken = {cfg.embedding_column, cfg.key_column}
    carried = {
        f.name: metadata_field(f) for f in schema
        if f.name not in taken and not pa.types.is_nested(f.type)
    }  # fmt: skip
    return InputFile(path, meta.metadata.num_rows, dim, carried)


def _check_types(path: Path, schema: pa.Schema, cfg: ExternalConfig) -> None:
    emb = schema.field(cfg.embedding_column).type
    kinds = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    if not any(is_kind(emb) for is_kind in kinds) or not pa.types.is_floating(emb.value_type):
        raise InputError(
            f"column {cfg.embedding_column!r} of {path} is {emb}, not a list of floats: "
            "name the embedding column with --embedding-column"
        )
    key = schema.field(cfg.key_column).type
    if not (pa.types.is_string(key) or pa.types.is_large_string(key) or pa.types.is_integer(key)):
        raise InputError(
            f"column {cfg.key_column!r} of {path} is {key}: keys must be strings or integers; "
            "name another with --key-column"
        )


def _dim(meta: pq.ParquetFile, emb: pa.DataType, column: str, path: Path) -> int:
    if pa.types.is_fixed_size_list(emb):
        return int(emb.list_size)
    for batch in meta.iter_batches(batch_size=1, columns=[column]):
        if batch.num_rows and batch.column(0)[0].is_valid:
            return len(batch.column(0)[0])
    return 0


def index_parquet(cfg: ExternalConfig) -> dict[str, Any]:
    """Copy the vectors into a new version of the collection at cfg.out, index it, publish it."""
    check_build_dir(cfg.out)
    _refuse_image_collection(cfg.out)
    with os_errors_as(f"indexing into {cfg.out}"), CollectionLock(cfg.out, "index"):
        return index_parquet_unlocked(cfg)


def index_parquet_unlocked(cfg: ExternalConfig) -> dict[str, Any]:
    """index_parquet() for a caller that holds the collection's lock (repair)."""
    files = [inspect(p, cfg) for p in parquet_files(cfg.paths)]
    dims = {f.dim for f in files if f.rows}
    if len(dims) > 1:
        raise InputError(
            f"the files hold vectors of different lengths ({sorted(dims)}): index them separately"
        )
    dim = dims.pop() if dims else 0
    if dim == 0:
        raise InputError("the Parquet files hold no vectors: check the paths")
    try:
        metadata = pa.unify_schemas(
            [pa.schema(list(f.metadata.values())) for f in files], promote_options="permissive"
        )
    except pa.ArrowException as exc:
        raise InputError(f"the files' other columns disagree on types ({exc})") from exc
    request = {"from_parquet": True, "embedding_column": cfg.embedding_column,
               "key_column": cfg.key_column, "normalize": cfg.normalize}  # fmt: skip
    salvage(cfg.out, request)  # clears what a killed run left
    number, building = start_version(cfg.out, request)
    paths = CollectionPaths(building)
    start = time.perf_counter()
    copied = copy_vectors(files, cfg, paths, shard_schema(dim, metadata))
    write_errors(paths.errors, [])
    manifest = external_manifest(cfg, files, copied, dim, number, request)
    write_json_atomic(paths.manifest, manifest)
    copy_seconds = time.perf_counter() - start
    meta = build_index(building, manifest, cfg.index)
    publish(cfg.out, number, building)
    prune(cfg.out, cfg.keep)
    log.info("copied %d vectors in %.1fs", copied.rows, copy_seconds)
    return {**meta, "copy_seconds": round(copy_seconds, 3)}


def _refuse_image_collection(out: Path) -> None:
    if not (out / CURRENT).exists():
        return
    try:  # the manifest alone: a damaged collection may be re-made from its Parquet files
        model = parse_manifest(open_version(out))["model"]
    except CollectionError as exc:
        raise InputError(
            f"--out {out} holds a collection whose manifest is unreadable ({exc}): choose "
            "another --out"
        ) from exc
    if model is not None:
        raise InputError(
            f"--out {out} holds images embedded by `indexer build`; vectors from Parquet "
            "would replace them: choose another --out"
        )


@dataclass
class Copied:
    shards: list[dict[str, Any]]
    rows: int = 0
    all_unit: bool = True


def copy_vectors(
    files: list[InputFile], cfg: ExternalConfig, paths: CollectionPaths, schema: pa.Schema
) -> Copied:
    """Stream every file into shards: ids 0..n-1 in file order, keys checked unique."""
    copied = Copied([])
    keys = KeyCheck()
    with ShardWriter(paths.shards, schema, cfg.shard_size) as writer:
        for file in files:
            for batch, first_row in _batches(file.path):
                column = batch.column(cfg.embedding_column)
                vectors = to_matrix(column, file.dim, file.path, first_row)
                norms = np.linalg.norm(vectors, axis=1)
                if cfg.normalize:
                    vectors /= np.maximum(norms, 1e-12)[:, None]
                else:
                    copied.all_unit &= bool(np.all(np.abs(norms - 1) < UNIT_TOLERANCE))
                key_col = batch.column(cfg.key_column).cast(pa.string())
                keys.add(key_col)
                writer.write(_table(batch, vectors, key_col, copied.rows, file, schema))
                copied.rows += batch.num_rows
        shards = writer.close()
    keys.check(paths.shard_paths({"shards": [{"name": s.name} for s in shards]}))
    copied.shards = [s.to_manifest() for s in shards]
    return copied


def _batches(path: Path) -> Iterator[tuple[pa.RecordBatch, int]]:
    first = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS):
        yield batch, first
        first += batch.num_rows


def to_matrix(column: pa.Array, dim: int, path: Path, first_row: int) -> np.ndarray:
    """A list column as an (n, dim) float32 matrix; nulls, other lengths and NaN are errors."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.null_count:
        row = first_row + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(f"{path} row {row} has no embedding (null): drop or fill that row")
    if not pa.types.is_fixed_size_list(column.type):
        lengths = np.diff(column.offsets.to_numpy())
        wrong = np.flatnonzero(lengths != dim)
        if wrong.size:
            raise InputError(
                f"{path} row {first_row + int(wrong[0])} has a vector of length "
                f"{int(lengths[wrong[0]])}, the others {dim}: fix or drop that row"
            )
    values = column.flatten().to_numpy(zero_copy_only=False)
    vectors = np.array(values, dtype=np.float32).reshape(-1, dim)
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        raise InputError(f"{path} row {first_row + int(bad[0])} has NaN or infinite values")
    return vectors


def _table(
    batch: pa.RecordBatch,
    vectors: np.ndarray,
    keys: pa.Array,
    first_id: int,
    file: InputFile,
    schema: pa.Schema,
) -> pa.Table:
    """The shard rows of one batch; metadata columns this file lacks are nulls."""
    n = batch.num_rows
    columns: dict[str, Any] = {
        "id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
        "key": keys,
        "source": pa.array([file.path.name] * n, pa.string()),
        "embedding": embedding_array(vectors),
        "width": pa.nulls(n, pa.int32()),
        "height": pa.nulls(n, pa.int32()),
        "content_hash": pa.nulls(n, pa.string()),
        "file_size": pa.nulls(n, pa.int64()),
        "mtime_ns": pa.nulls(n, pa.int64()),
    }
    present = {f.name: original for original, f in file.metadata.items()}
    for f in schema:
        if f.name not in columns:
            original = present.get(f.name)
            columns[f.name] = batch.column(original) if original else pa.nulls(n, f.type)
    return pa.table(columns)


class KeyCheck:
    """Keys must be unique across all files.

    Memory stays at 8 bytes a row: 64-bit hashes are kept, and only keys whose hash repeats
    are compared exactly, in a second pass over the written shards.
    """

    def __init__(self) -> None:
        self.hashes: list[np.ndarray] = []

    def add(self, keys: pa.Array) -> None:
        self.hashes.append(np.fromiter((hash(k) for k in keys.to_pylist()), np.int64, len(keys)))

    def check(self, shard_paths: list[Path]) -> None:
        if not self.hashes:
            return
        ordered = np.sort(np.concatenate(self.hashes))
        repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
        if not repeated:
            return
        seen: set[str] = set()
        for path in shard_paths:
            for key in pq.read_table(path, columns=["key"]).column("key").to_pylist():
                if hash(key) in repeated:
                    if key in seen:
                        raise InputError(
                            f"key {key!r} appears more than once: keys must be unique; "
                            "name a unique column with --key-column"
                        )
                    seen.add(key)


def external_manifest(
    cfg: ExternalConfig,
    files: list[InputFile],
    copied: Copied,
    dim: int,
    number: int,
    request: dict[str, Any],
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "indexer_version": __version__,
        "model": None,  # made elsewhere: queries are vectors (the Python API), not images
        "decode": None,
        "embedding_dim": dim,
        "normalized": cfg.normalize or copied.all_unit,
        "metric": cfg.index.metric,
        "sources": [_describe(f, cfg) for f in files],
        "counts": {"items": copied.rows, "embedded": copied.rows, "failed": 0},
        "shards": copied.shards,
        "errors": "errors.parquet",
        "version": number,
        "next_id": copied.rows,
        "request": request,
    }


def _describe(file: InputFile, cfg: ExternalConfig) -> dict[str, Any]:
    return {
        "kind": "parquet",
        "path": str(file.path.resolve()),
        "rows": file.rows,
        "embedding_column": cfg.embedding_column,
        "key_column": cfg.key_column,
    }
