"""Parquet shard schema, an atomic rotating shard writer, and readers for shards and errors."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexer.config import file_sha256
from indexer.errors import CollectionError, InputError

TMP_SUFFIX = ".tmp"
ROW_GROUP_ROWS = 8192
ERROR_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("stage", pa.string()),
        ("error", pa.string()),
        ("file_size", pa.int64()),  # as listed: a failed file left unchanged is not retried
        ("mtime_ns", pa.int64()),
        ("url", pa.string()),  # where the item was fetched from, when its source says
    ]
)


def shard_schema(dim: int, metadata: pa.Schema) -> pa.Schema:
    """The shard columns: the contract's fixed ones, then the sources' metadata columns."""
    fixed = [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("content_hash", pa.string()),
        pa.field("file_size", pa.int64()),  # size and mtime at listing: what the next run
        pa.field("mtime_ns", pa.int64()),  # compares to skip unchanged files (null: datasets)
    ]
    return pa.schema(fixed + list(metadata))


LABEL_SCHEMA = pa.schema(
    [
        pa.field("label_index", pa.list_(pa.int32())),  # the classifier's top-K, best first
        pa.field("label_name", pa.list_(pa.string())),  # null when the classes have no names
        pa.field("label_prob", pa.list_(pa.float32())),
    ]
)
FIXED_COLUMNS = frozenset(shard_schema(1, pa.schema([])).names) | frozenset(LABEL_SCHEMA.names)


def metadata_name(name: str) -> str:
    """A source column's name in the shards: source_NAME where NAME is a fixed column's."""
    return f"source_{name}" if name in FIXED_COLUMNS else name


def metadata_names(names: list[str]) -> dict[str, str]:
    """Each of one source's column names -> its shard column, all distinct: a fixed column's
    name becomes source_NAME, or source_NAME_2, _3, ... when the source has that name too."""
    taken = {name for name in names if name not in FIXED_COLUMNS}
    renamed: dict[str, str] = {}
    for name in names:
        if name in FIXED_COLUMNS:
            new, n = metadata_name(name), 1
            while new in taken:
                n += 1
                new = f"{metadata_name(name)}_{n}"
            taken.add(new)
            renamed[name] = new
        else:
            renamed[name] = name
    return renamed


def metadata_fields(fields: list[pa.Field]) -> dict[str, pa.Field]:
    """One source's columns (name -> field) as shard columns: nullable, named by metadata_names."""
    names = metadata_names([f.name for f in fields])
    return {f.name: pa.field(names[f.name], f.type, nullable=True) for f in fields}


def metadata_field(source_field: pa.Field) -> pa.Field:
    """A source's column as a shard column: nullable, renamed by metadata_name."""
    return pa.field(metadata_name(source_field.name), source_field.type, nullable=True)


def merge_metadata_schemas(schemas: list[pa.Schema]) -> pa.Schema:
    """One schema for all sources' metadata. A column's types are widened where no value can
    change (int32 and int64, float32 and float64, string and large_string, null and any);
    other pairs (string and int64, int64 and float64, uint64 and int64) are an InputError."""
    merged: dict[str, pa.DataType] = {}
    for schema in schemas:
        for f in schema:
            merged[f.name] = _widen(f.name, merged[f.name], f.type) if f.name in merged else f.type
    return pa.schema([pa.field(name, t, nullable=True) for name, t in merged.items()])


def _widen(name: str, a: pa.DataType, b: pa.DataType) -> pa.DataType:
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    if not _lossless(a, b):
        raise InputError(
            f"column {name!r} is {a} in one source and {b} in another: give it one type in "
            "every source (cast or rename it in one), or build them into separate collections"
        )
    one = pa.unify_schemas([pa.schema([(name, a)]), pa.schema([(name, b)])],
                           promote_options="permissive")  # fmt: skip
    return one.field(name).type


def _lossless(a: pa.DataType, b: pa.DataType) -> bool:
    """Whether one type holds every value of both (a is not b, neither is null)."""
    strings = (pa.types.is_string, pa.types.is_large_string)
    kinds = (pa.types.is_signed_integer, pa.types.is_unsigned_integer, pa.types.is_floating)
    if any(kind(a) and kind(b) for kind in kinds):
        return True
    if any(s(a) for s in strings) and any(s(b) for s in strings):
        return True
    unsigned = a if pa.types.is_unsigned_integer(a) else b
    signed = b if unsigned is a else a
    return (
        pa.types.is_unsigned_integer(unsigned)
        and pa.types.is_signed_integer(signed)
        and unsigned.bit_width < 64
    )


def embedding_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    # A copy: an Arrow array made zero-copy over torch-owned memory was seen to pin ~250 KB
    # per batch until freed, so buffered row groups grew memory with the corpus.
    flat = plain_array(np.array(vectors, dtype=np.float32, copy=True).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


def plain_array(values: np.ndarray) -> pa.Array:
    """A null-free numeric numpy array as Arrow, without pa.array (see as_numpy: pandas)."""
    data = np.ascontiguousarray(values)
    kind = {np.dtype(v): k for k, v in NUMPY_TYPES.items()}[data.dtype]
    return pa.Array.from_buffers(kind, len(data), [None, pa.py_buffer(data)])


def text_array(values: list[str]) -> pa.Array:
    """Python strings as an Arrow string array, without pa.array (see as_numpy: pandas)."""
    encoded = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, np.int32)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
    return pa.Array.from_buffers(pa.string(), len(encoded), buffers)


def int_array(values: list[int | None], kind: pa.DataType) -> pa.Array:
    """Integers (None: null) as Arrow, without pa.array (pandas)."""
    if any(v is None for v in values):
        return column_array(values, kind)
    return plain_array(np.array(values, dtype=NUMPY_TYPES[kind]))


def column_array(values: list[Any], kind: pa.DataType) -> pa.Array:
    """Python values (None: null) as an Arrow column of a scalar type (strings, booleans,
    integers, floats) without pa.array: its first call imports pandas (~0.45 s of a build
    whose source has metadata columns). Other types, or values of another Python type, go
    through pa.array, which converts them or says why not."""
    present = [v is not None for v in values]
    given = [v for v in values if v is not None]
    dtype = _numpy_scalar(kind)
    wanted = str if pa.types.is_string(kind) else bool if dtype == np.bool_ else None
    numbers = int if dtype is not None and np.issubdtype(dtype, np.integer) else int | float
    fits = (
        all(type(v) is wanted for v in given)
        if wanted
        else dtype is not None
        and all(isinstance(v, numbers) and not isinstance(v, bool) for v in given)
    )
    if fits and dtype is not None and np.issubdtype(dtype, np.floating):  # an int a float
        exact = 2 ** (np.finfo(dtype).nmant + 1)  # cannot hold exactly: pa.array refuses it
        fits = all(abs(v) <= exact for v in given if isinstance(v, int))
    if not fits:
        return pa.array(values, kind)
    valid = pa.py_buffer(np.packbits(np.array(present, np.bool_), bitorder="little"))
    if wanted is str:
        encoded = [v.encode("utf-8") if v is not None else b"" for v in values]
        offsets = np.zeros(len(encoded) + 1, np.int32)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        buffers = [valid, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
        return pa.Array.from_buffers(kind, len(values), buffers)
    filled = [v if v is not None else 0 for v in values]
    try:
        data = np.array(filled, dtype=dtype)
    except (OverflowError, ValueError):  # out of the column's range: pa.array says so
        return pa.array(values, kind)
    if dtype == np.bool_:
        body = pa.py_buffer(np.packbits(data, bitorder="little"))
    else:
        body = pa.py_buffer(np.ascontiguousarray(data))
    return pa.Array.from_buffers(kind, len(values), [valid, body])


def _numpy_scalar(kind: pa.DataType) -> Any:
    """numpy's dtype for an Arrow boolean, integer or float type; None for any other."""
    if pa.types.is_boolean(kind):
        return np.bool_
    if pa.types.is_integer(kind):
        return np.dtype(f"{'' if pa.types.is_signed_integer(kind) else 'u'}int{kind.bit_width}")
    if pa.types.is_floating(kind):
        return np.dtype(f"float{kind.bit_width}")
    return None


@dataclass(frozen=True)
class ShardInfo:
    name: str
    rows: int
    sha256: str | None = None  # of the finished file: `indexer verify` checks it

    def to_manifest(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.rows, "sha256": self.sha256}


class ShardWriter:
    """Appends tables to part-NNNNN.parquet files of at most ``shard_size`` rows.

    Each file is written under a .tmp name and renamed only once complete, so a reader (or a
    crash) never sees a half-written shard.
    """

    def __init__(
        self, directory: Path, schema: pa.Schema, shard_size: int, prefix: str = "part"
    ) -> None:
        self.directory = directory
        self.prefix = prefix
        self.schema = schema
        self.shard_size = shard_size
        self.done: list[ShardInfo] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        while table.num_rows:
            room = self.shard_size - self._rows - self._pending_rows
            head, table = table.slice(0, room), table.slice(room)
            self._pending.append(head)
            self._pending_rows += head.num_rows
            if self._pending_rows >= ROW_GROUP_ROWS:
                self._flush()
            if self._rows + self._pending_rows >= self.shard_size:
                self._finish_shard()

    def close(self) -> list[ShardInfo]:
        self._finish_shard()
        return self.done

    def abort(self) -> None:
        """Drop the shard in progress (its .tmp file); finished shards stay."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._tmp_path().unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()

    def _path(self) -> Path:
        return self.directory / f"{self.prefix}-{len(self.done):05d}.parquet"

    def _tmp_path(self) -> Path:
        return self._path().with_name(self._path().name + TMP_SUFFIX)

    def _flush(self) -> None:
        if not self._pending_rows:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(
                self._tmp_path(), self.schema, compression="zstd", write_page_checksum=True
            )
        self._writer.write_table(pa.concat_tables(self._pending), row_group_size=ROW_GROUP_ROWS)
        self._rows += self._pending_rows
        self._pending, self._pending_rows = [], 0

    def _finish_shard(self) -> None:
        self._flush()
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        digest = file_sha256(self._tmp_path())
        os.replace(self._tmp_path(), self._path())
        self.done.append(ShardInfo(self._path().name, self._rows, digest))
        self._rows = 0


def read_parquet(path: Path | str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file, page checksums verified. Unlike pq.read_table it does not import
    pyarrow.dataset, which imports pandas (half a second of every query's start-up)."""
    with pq.ParquetFile(path, page_checksum_verification=True) as f:
        return f.read(columns=columns)


NUMPY_TYPES = {pa.int64(): np.int64, pa.int32(): np.int32, pa.float32(): np.float32,
               pa.float64(): np.float64}  # fmt: skip


def as_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric column as numpy. pyarrow's to_numpy() imports pandas when it is installed
    (0.4 s of a query's start-up); this reads the buffers of null-free columns directly."""
    dtype = NUMPY_TYPES.get(column.type)
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if dtype is None or column.null_count:
        return column.to_numpy(zero_copy_only=False)
    size = np.dtype(dtype).itemsize
    parts = [
        np.frombuffer(c.buffers()[1], dtype, len(c), c.offset * size) for c in chunks if len(c)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def positions(values: np.ndarray) -> pa.Array:
    """Row numbers for take(), wrapped without pa.array (which imports pandas, see as_numpy)."""
    data = np.ascontiguousarray(values, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(data), [None, pa.py_buffer(data)])


def read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A shard (or some of its columns), its page checksums verified: a damaged shard is a
    CollectionError naming the fix, never rows read as if whole."""
    try:
        return read_parquet(path, columns)
    except (OSError, pa.ArrowException) as exc:
        raise CollectionError(
            f"shard {path} is damaged or unreadable ({exc}): run `indexer verify --repair` "
            "on its collection"
        ) from exc


def read_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [n], embeddings float32 [n, dim]) of one shard."""
    table = read_shard(path, ["id", "embedding"])
    ids = as_numpy(table.column("id"))
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    vectors = as_numpy(emb.flatten()).reshape(-1, dim)
    return ids, np.ascontiguousarray(vectors, dtype=np.float32)


def iter_embeddings(paths: list[Path]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for path in paths:
        yield read_embeddings(path)


def read_rows(paths: list[Path], ids: set[int]) -> dict[int, dict[str, Any]]:
    """The non-embedding columns of the rows with these ids, read shard by shard."""
    found: dict[int, dict[str, Any]] = {}
    for path in paths:
        id_col = as_numpy(read_shard(path, ["id"]).column("id"))
        hits = np.flatnonzero(np.isin(id_col, np.fromiter(ids, dtype=np.int64)))
        if not hits.size:
            continue
        names = [n for n in pq.read_schema(path).names if n != "embedding"]
        table = read_shard(path, names).take(positions(hits))
        for row in table.to_pylist():
            found[int(row["id"])] = row
    return found


def errors_schema(extra: pa.Schema | None = None) -> pa.Schema:
    """The errors table's columns: the contract's, then the columns a source knows of an item
    without reading it (a URL list's other columns), those whose names are not taken."""
    fields = [f for f in (extra or []) if f.name not in ERROR_SCHEMA.names]
    return pa.schema([*ERROR_SCHEMA, *fields])


def write_errors(path: Path, rows: list[dict[str, Any]], extra: pa.Schema | None = None) -> None:
    """The errors table, written whole under a temporary name and renamed."""
    schema = errors_schema(extra)
    # (an empty table from_batches: empty_table() and pa.table() import pandas, see as_numpy)
    table = (
        pa.Table.from_pylist(rows, schema=schema)
        if rows
        else pa.Table.from_batches([], schema=schema)
    )
    tmp = path.with_name(path.name + TMP_SUFFIX)
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def carry_over(
    source: Path, shards: list[dict[str, Any]], keep_ids: set[int], target: Path,
    schema: pa.Schema,
) -> list[ShardInfo]:  # fmt: skip
    """The kept rows of a version's shards in a new version: whole shards as hard links,
    shards that lost rows rewritten with the rest (shards are immutable once published)."""
    kept: list[ShardInfo] = []
    wanted = np.fromiter(keep_ids, dtype=np.int64)
    for shard in shards:
        path = source / shard["name"]
        if not pq.read_schema(path).equals(schema):
            raise ValueError(f"shard {path} has another schema")
        ids = as_numpy(read_shard(path, ["id"]).column("id"))
        mask = np.isin(ids, wanted)
        if mask.all():
            os.link(path, target / shard["name"])
            kept.append(ShardInfo(shard["name"], int(shard["rows"]), shard.get("sha256")))
        elif mask.any():
            table = read_shard(path).take(positions(np.flatnonzero(mask)))
            tmp = target / (shard["name"] + TMP_SUFFIX)
            pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS,
                           write_page_checksum=True)  # fmt: skip
            digest = file_sha256(tmp)
            os.replace(tmp, target / shard["name"])
            kept.append(ShardInfo(shard["name"], table.num_rows, digest))
    return kept


def rows_by_hash(paths: list[Path], hashes: set[str]) -> dict[str, dict[str, Any]]:
    """One stored row (embedding included) for each content hash asked for."""
    found: dict[str, dict[str, Any]] = {}
    for path in paths:
        if len(found) == len(hashes):
            break
        column = read_shard(path, ["content_hash"]).column("content_hash")
        mask = np.isin(np.array(column.to_pylist(), dtype=object), list(hashes - found.keys()))
        if mask.any():
            for row in read_shard(path).take(positions(np.flatnonzero(mask))).to_pylist():
                found.setdefault(row["content_hash"], row)
    return found


def read_hashes(path: Path) -> list[str]:
    return list(read_shard(path, ["content_hash"]).column("content_hash").to_pylist())


def top_labels(paths: list[Path], n: int = 5) -> list[tuple[str, int]]:
    """The most frequent top-1 predicted labels (names, else indices) and their counts."""
    from collections import Counter

    counts: Counter[str] = Counter()
    for path in paths:
        names = pq.read_schema(path).names
        if "label_index" not in names:
            return []
        table = read_shard(path, ["label_index", "label_name"])
        for index, name in zip(table.column("label_index").to_pylist(),
                               table.column("label_name").to_pylist(), strict=True):  # fmt: skip
            if index:
                counts[name[0] if name else str(index[0])] += 1
    return counts.most_common(n)


def shard_columns(path: Path) -> list[str]:
    """The column names a shard holds (its footer only)."""
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as f:
            return list(f.schema_arrow.names)
    except (OSError, pa.ArrowException) as exc:
        raise CollectionError(
            f"shard {path} is damaged or unreadable ({exc}): run `indexer verify --repair` "
            "on its collection"
        ) from exc
