"""Index embeddings made elsewhere: Parquet files with a list-of-floats column, as a collection."""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from indexer.collection.layout import (
    CURRENT,
    SCHEMA_VERSION,
    CollectionPaths,
    check_build_dir,
    open_version,
    parse_manifest,
    write_json_atomic,
)
from indexer.collection.lock import locked_run
from indexer.collection.shards import (
    ShardWriter,
    embedding_array,
    merge_metadata_schemas,
    metadata_fields,
    read_shard,
    shard_schema,
    write_errors,
)
from indexer.collection.versions import clear_salvage, prune, publish, salvage, start_version
from indexer.config import IndexConfig, file_sha256
from indexer.errors import CollectionError, InputError
from indexer.index.faiss_index import read_index_meta
from indexer.index.update import IndexedVersion, index_version, previous_version
from indexer.safeio import os_errors_as
from indexer.version import __version__

log = logging.getLogger(__name__)
READ_ROWS = 65_536
UNIT_TOLERANCE = 1e-3  # vectors this close to norm 1 count as already normalised
ADDED = "added"  # shard name prefix of rows new or changed since the previous version
REBUILD = "rebuild it with `indexer index --from-parquet PARQUET... --out {out}`"


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
    expect: tuple[str, ...] = ()  # repair: the sha256 each of paths (files) must still have


@dataclass(frozen=True)
class InputFile:
    path: Path
    rows: int
    dim: int
    metadata: dict[str, pa.Field]  # source column name -> its shard column
    size: int = 0  # size, mtime and sha256 when inspected: what the copy is proven to be of
    mtime_ns: int = 0
    sha256: str = ""


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
    carried = metadata_fields(
        [f for f in schema if f.name not in taken and not pa.types.is_nested(f.type)]
    )
    st = path.stat()  # before hashing: a change from here on fails check_unchanged
    return InputFile(path, meta.metadata.num_rows, dim, carried, st.st_size, st.st_mtime_ns,
                     file_sha256(path))  # fmt: skip


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


def recorded_index(out: Path) -> dict[str, Any] | None:
    """The index metadata of the collection at out when it was made from Parquet (a re-run
    keeps its index settings and metric unless flags say otherwise); None otherwise."""
    previous = previous_version(out)
    if previous is None or previous.manifest.get("model") is not None:
        return None
    return read_index_meta(previous.folder)


def index_parquet(cfg: ExternalConfig) -> dict[str, Any]:
    """Copy the vectors into a new version of the collection at cfg.out, index it, publish it."""
    check_build_dir(cfg.out)
    _refuse_image_collection(cfg.out)
    with os_errors_as(f"indexing into {cfg.out}"), locked_run(cfg.out, "index"):
        return index_parquet_unlocked(cfg)


def index_parquet_unlocked(cfg: ExternalConfig) -> dict[str, Any]:
    """index_parquet() for a caller that holds the collection's lock (repair)."""
    files = _recorded_files(cfg) if cfg.expect else _input_files(cfg)
    dims = {f.dim for f in files if f.rows}
    if len(dims) > 1:
        raise InputError(
            f"the files hold vectors of different lengths ({sorted(dims)}): index them separately"
        )
    dim = dims.pop() if dims else 0
    if dim == 0:
        raise InputError("the Parquet files hold no vectors: check the paths")
    metadata = merge_metadata_schemas([pa.schema(list(f.metadata.values())) for f in files])
    request = {"from_parquet": True, "embedding_column": cfg.embedding_column,
               "key_column": cfg.key_column, "normalize": cfg.normalize}  # fmt: skip
    salvage(cfg.out, request)  # clears what a killed run left
    previous = previous_version(cfg.out)
    known = known_keys(cfg, previous)
    number, building = start_version(cfg.out, request)
    paths = CollectionPaths(building)
    start = time.perf_counter()
    try:
        copied = copy_vectors(files, cfg, paths, shard_schema(dim, metadata), known)
        check_unchanged(files)
    except InputError:  # a bad row or a file changed: copied vectors are never reused
        shutil.rmtree(building, ignore_errors=True)
        raise
    write_errors(paths.errors, [])
    manifest = external_manifest(cfg, files, copied, dim, number, request)
    write_json_atomic(paths.manifest, manifest)
    copy_seconds = time.perf_counter() - start
    force = (
        "a repair: the vectors were copied again" if cfg.expect
        else "the keys are another column's: ids start again" if previous and not known
        else None
    )  # fmt: skip
    meta = index_version(building, manifest, cfg.index, previous, force)
    publish(cfg.out, number, building)
    clear_salvage(cfg.out)  # what killed runs left: these vectors are copied, never reused
    prune(cfg.out, cfg.keep)
    log.info("copied %d vectors in %.1fs", copied.rows, copy_seconds)
    return {**meta, "copy_seconds": round(copy_seconds, 3)}


def _input_files(cfg: ExternalConfig) -> list[InputFile]:
    return [inspect(path, cfg) for path in parquet_files(cfg.paths)]


def _recorded_files(cfg: ExternalConfig) -> list[InputFile]:
    """Repair: the files the collection was copied from, each proven the same by its sha256."""
    rebuild = REBUILD.format(out=cfg.out)
    files = []
    for path, digest in zip(cfg.paths, cfg.expect, strict=True):
        if not path.is_file():
            raise InputError(f"{path}, which {cfg.out} was copied from, is gone: {rebuild}")
        file = inspect(path, cfg)
        if file.sha256 != digest:
            raise InputError(
                f"{path} changed since {cfg.out} was copied from it (its sha256 differs), so "
                f"its vectors cannot be copied again: {rebuild}"
            )
        files.append(file)
    return files


def recorded_checksums(out: Path, sources: list[dict[str, Any]]) -> tuple[str, ...]:
    """The sha256 of each file a collection's manifest says it was copied from."""
    for source in sources:
        if not source.get("sha256"):
            raise InputError(
                f"the manifest of {out} records no checksum of {source.get('path')} (it "
                "predates them), so its vectors cannot be proven the same: "
                + REBUILD.format(out=out)
            )
    return tuple(str(source["sha256"]) for source in sources)


def check_unchanged(files: list[InputFile]) -> None:
    """Each file still has the size and mtime it had when hashed, before its rows were read."""
    for file in files:
        st = file.path.stat()
        if (st.st_size, st.st_mtime_ns) != (file.size, file.mtime_ns):
            raise InputError(
                f"{file.path} changed while its vectors were copied: index again once it is written"
            )


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


@dataclass(frozen=True)
class KnownKeys:
    """The previous version's keys and their ids: a key keeps its id from run to run."""

    keys: pa.Array
    ids: np.ndarray
    next_id: int
    hashes: pa.Array  # each key's content hash (of its vector) then


def known_keys(cfg: ExternalConfig, previous: IndexedVersion | None) -> KnownKeys | None:
    """The ids the published version gave its keys, when it was copied from Parquet under the
    same key column (None: ids start at 0). A repair (cfg.expect) skips damaged shards: their
    keys get new ids."""
    if previous is None or previous.manifest.get("model") is not None:
        return None
    if (previous.manifest.get("request") or {}).get("key_column") != cfg.key_column:
        return None
    keys, ids = [pa.array([], pa.string())], [np.zeros(0, np.int64)]
    hashes = [pa.array([], pa.string())]
    for shard in previous.manifest["shards"]:
        path = CollectionPaths(previous.folder).shards / shard["name"]
        if cfg.expect and (not path.is_file() or file_sha256(path) != shard.get("sha256")):
            log.warning("%s is damaged: the keys it held get new ids", path)
            continue
        table = read_shard(path, ["id", "key", "content_hash"])
        keys.append(table.column("key").combine_chunks().cast(pa.string()))
        ids.append(table.column("id").to_numpy())
        hashes.append(table.column("content_hash").combine_chunks().cast(pa.string()))
    every = np.concatenate(ids).astype(np.int64)
    recorded = int(previous.manifest.get("next_id") or 0)
    next_id = max(recorded, int(every.max()) + 1 if len(every) else 0)
    return KnownKeys(pa.concat_arrays(keys), every, next_id, pa.concat_arrays(hashes))


@dataclass
class Copied:
    shards: list[dict[str, Any]]
    rows: int = 0
    all_unit: bool = True
    next_id: int = 0


def assign_ids(
    keys: pa.Array, hashes: pa.Array, known: KnownKeys | None, copied: Copied
) -> tuple[np.ndarray, np.ndarray]:
    """Each key's id (the one the previous version gave it, else the next unused one), and
    whether its row is unchanged (the same key with the same vector)."""
    ids = np.full(len(keys), -1, np.int64)
    same = np.zeros(len(keys), bool)
    if known is not None and len(known.keys):
        at = pc.fill_null(pc.index_in(keys, value_set=known.keys), -1).to_numpy()
        found = at >= 0
        ids[found] = known.ids[at[found]]
        equal = pc.equal(known.hashes.take(pa.array(at[found])), hashes.filter(pa.array(found)))
        same[found] = pc.fill_null(equal, False).to_numpy(zero_copy_only=False)
    new = ids < 0
    ids[new] = copied.next_id + np.arange(int(new.sum()), dtype=np.int64)
    copied.next_id += int(new.sum())
    return ids, same


def vector_hashes(vectors: np.ndarray) -> pa.Array:
    """Each row's content hash: blake2b-128 of its float32 bytes (an update compares them)."""
    data = memoryview(np.ascontiguousarray(vectors, np.float32).tobytes())
    step = 4 * vectors.shape[1]
    return pa.array([hashlib.blake2b(data[i * step : (i + 1) * step], digest_size=16).hexdigest()
                     for i in range(len(vectors))], pa.string())  # fmt: skip


def copy_vectors(
    files: list[InputFile],
    cfg: ExternalConfig,
    paths: CollectionPaths,
    schema: pa.Schema,
    known: KnownKeys | None = None,
) -> Copied:
    """Stream every file into shards, keys checked unique: a key the previous version had keeps
    its id, new keys take the next ids (from 0 in file order for a new collection). Rows that
    changed since the previous version (new keys, new vectors) go to shards of their own
    (added-NNNNN), so an index update reads only those."""
    copied = Copied([], next_id=known.next_id if known is not None else 0)
    keys = KeyCheck()
    with (
        ShardWriter(paths.shards, schema, cfg.shard_size) as writer,
        ShardWriter(paths.shards, schema, cfg.shard_size, prefix=ADDED) as added,
    ):
        for file in files:
            for batch, first_row in _batches(file.path):
                column = batch.column(cfg.embedding_column)
                given = to_matrix(column, file.dim, file.path, first_row)
                if cfg.normalize:
                    vectors = unit_rows(given, file.path, first_row)
                else:
                    vectors = as_float32(given, file.path, first_row)
                    norms = np.linalg.norm(vectors, axis=1)
                    copied.all_unit &= bool(np.all(np.abs(norms - 1) < UNIT_TOLERANCE))
                key_col = key_strings(batch.column(cfg.key_column), file.path, first_row)
                keys.add(key_col)
                hashes = vector_hashes(vectors)
                ids, same = assign_ids(key_col, hashes, known, copied)
                table = _table(batch, vectors, key_col, ids, hashes, file, schema)
                if known is None:
                    writer.write(table)
                else:
                    writer.write(table.filter(pa.array(same)))
                    added.write(table.filter(pa.array(~same)))
                copied.rows += batch.num_rows
        shards = writer.close() + added.close()
    keys.check(paths.shard_paths({"shards": [{"name": s.name} for s in shards]}))
    copied.shards = [s.to_manifest() for s in shards]
    return copied


def _batches(path: Path) -> Iterator[tuple[pa.RecordBatch, int]]:
    first = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS):
        yield batch, first
        first += batch.num_rows


def _first_null(column: pa.Array) -> int:
    return int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])


def key_strings(column: pa.Array, path: Path, first_row: int) -> pa.Array:
    """The key column as strings; a null key is an error."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.null_count:
        raise InputError(
            f"{path} row {first_row + _first_null(column)} has no key (null): drop that row, "
            "fill its key, or name another column with --key-column"
        )
    return column.cast(pa.string())


def to_matrix(column: pa.Array, dim: int, path: Path, first_row: int) -> np.ndarray:
    """A list column as an (n, dim) matrix of its own float type; nulls, other lengths and
    NaN are errors."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.null_count:
        row = first_row + _first_null(column)
        raise InputError(f"{path} row {row} has no embedding (null): drop or fill that row")
    if not pa.types.is_fixed_size_list(column.type):
        lengths = np.diff(column.offsets.to_numpy())
        wrong = np.flatnonzero(lengths != dim)
        if wrong.size:
            raise InputError(
                f"{path} row {first_row + int(wrong[0])} has a vector of length "
                f"{int(lengths[wrong[0]])}, the others {dim}: fix or drop that row"
            )
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        raise InputError(f"{path} row {first_row + int(bad[0])} has NaN or infinite values")
    return vectors


def unit_rows(vectors: np.ndarray, path: Path, first_row: int) -> np.ndarray:
    """The rows L2-normalised, as float32. Each row is first divided by its largest absolute
    value, so no finite nonzero row overflows or underflows to zero; a zero row is an error."""
    wide = vectors.astype(np.result_type(vectors.dtype, np.float32), copy=False)
    peak = np.abs(wide).max(axis=1)
    zero = np.flatnonzero(peak == 0)
    if zero.size:
        raise InputError(
            f"{path} row {first_row + int(zero[0])} is all zeros: a zero vector has no "
            "direction to normalise; drop that row or index without --normalize"
        )
    scaled = wide / peak[:, None]
    scaled /= np.linalg.norm(scaled, axis=1)[:, None]
    return scaled.astype(np.float32, copy=False)


def as_float32(vectors: np.ndarray, path: Path, first_row: int) -> np.ndarray:
    """The rows as float32, as given; a row that float32 cannot hold (float64 values over
    its range, or so small that the whole row rounds to 0) is an error."""
    if vectors.dtype == np.float32:
        return vectors
    with np.errstate(over="ignore", under="ignore"):
        narrow = vectors.astype(np.float32)
    over = np.flatnonzero(~np.isfinite(narrow).all(axis=1))
    if over.size:
        raise InputError(
            f"{path} row {first_row + int(over[0])} has values beyond float32's range "
            "(3.4e38): scale the vectors, or pass --normalize"
        )
    lost = np.flatnonzero(vectors.any(axis=1) & ~narrow.any(axis=1))
    if lost.size:
        raise InputError(
            f"{path} row {first_row + int(lost[0])}'s values all round to 0 in float32: "
            "scale the vectors, or pass --normalize"
        )
    return narrow


def _table(
    batch: pa.RecordBatch,
    vectors: np.ndarray,
    keys: pa.Array,
    ids: np.ndarray,
    hashes: pa.Array,
    file: InputFile,
    schema: pa.Schema,
) -> pa.Table:
    """The shard rows of one batch; metadata columns this file lacks are nulls."""
    n = batch.num_rows
    columns: dict[str, Any] = {
        "id": pa.array(ids, pa.int64()),
        "key": keys,
        "source": pa.array([file.path.name] * n, pa.string()),
        "embedding": embedding_array(vectors),
        "width": pa.nulls(n, pa.int32()),
        "height": pa.nulls(n, pa.int32()),
        "content_hash": hashes,
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
        "next_id": copied.next_id,
        "request": request,
    }


def _describe(file: InputFile, cfg: ExternalConfig) -> dict[str, Any]:
    return {
        "kind": "parquet",
        "path": str(file.path.resolve()),
        "rows": file.rows,
        "size": file.size,
        "mtime_ns": file.mtime_ns,
        "sha256": file.sha256,  # repair copies the file again only while this still holds
        "embedding_column": cfg.embedding_column,
        "key_column": cfg.key_column,
    }
