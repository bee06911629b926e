"""A collection's stored rows, vectors and item images, read by key, lazily and bounded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from indexer.collection.shards import as_numpy, positions, read_rows, read_shard
from indexer.errors import InputError
from indexer.query.opened import OpenedCollection


class RowAccess(OpenedCollection):
    """Stored rows, vectors and item pictures of an opened collection, by key or id."""

    def schema(self) -> pa.Schema | None:
        """The shards' columns and their types (the first shard's footer: they share one);
        None for a collection without shards."""
        import pyarrow.parquet as pq

        paths = self.paths.shard_paths(self.manifest)
        return pq.read_schema(paths[0]) if paths else None

    def keys_of(self, ids: np.ndarray) -> np.ndarray:
        """Keys for an array of ids (object array of the same shape; None for -1)."""
        sorted_ids, keys = self._key_map()
        flat = ids.ravel()
        out = np.full(flat.shape, None, dtype=object)
        valid = flat >= 0
        pos = np.searchsorted(sorted_ids, flat[valid])
        pos = np.minimum(pos, max(len(sorted_ids) - 1, 0))
        if valid.any() and not np.array_equal(sorted_ids[pos], flat[valid]):
            raise self._stale_index()
        out[valid] = keys.take(positions(pos)).to_pylist()
        return out.reshape(ids.shape)

    def _key_map(self) -> tuple[np.ndarray, pa.Array]:
        """Every id (sorted) and its key: read once, ids and keys only (no vectors)."""
        if self._keys is None:
            tables = [read_shard(p, ["id", "key"]) for p in self.paths.shard_paths(self.manifest)]
            table = pa.concat_tables(tables) if tables else pa.table({"id": [], "key": []})
            order = np.argsort(as_numpy(table.column("id")), kind="stable")
            ids = as_numpy(table.column("id"))[order]
            self._keys = (ids, table.column("key").combine_chunks().take(positions(order)))
        return self._keys

    def vectors_of(self, keys: list[str]) -> np.ndarray:
        """The stored vectors of items, by key (no re-embedding); InputError for an unknown key."""
        if self._cache_rows:
            return self._cached_vectors(keys)
        wanted, found = set(keys), {}
        for path in self.paths.shard_paths(self.manifest):
            table = read_shard(path, ["key", "embedding"])
            mask = np.isin(np.array(table.column("key").to_pylist(), dtype=object), list(wanted))
            for row in table.take(positions(np.flatnonzero(mask))).to_pylist():
                found[row["key"]] = np.asarray(row["embedding"], np.float32)
        missing = [k for k in keys if k not in found]
        if missing:
            raise InputError(
                f"{self.root} holds no item {missing[0]!r}: give a key as `indexer query` shows it"
            )
        return np.stack([found[k] for k in keys])

    def warm(self) -> None:
        """With cache_rows: read every shard now (rows and vectors, checksums verified), so
        a damaged shard fails here, not in a query."""
        if self._cache_rows:
            self._read_rows(set())
            self._cached_vectors([])

    def _cached_vectors(self, keys: list[str]) -> np.ndarray:
        """vectors_of from memory (cache_rows): every vector read once, by key."""
        if self._vectors is None:
            paths = self.paths.shard_paths(self.manifest)
            tables = [read_shard(p, ["key", "embedding"]) for p in paths]
            if tables:
                table = pa.concat_tables(tables)
                matrix = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
                where = {k: n for n, k in enumerate(table.column("key").to_pylist())}
            else:
                matrix, where = np.zeros((0, self.dim), np.float32), {}
            self._vectors = (where, matrix.astype(np.float32, copy=False))
        where, matrix = self._vectors
        missing = [k for k in keys if k not in where]
        if missing:
            raise InputError(
                f"{self.root} holds no item {missing[0]!r}: give a key as `indexer query` shows it"
            )
        return matrix[[where[k] for k in keys]] if keys else matrix[:0]

    def image_of(self, key: str) -> bytes | Path | None:
        """An item's picture: its file (folder sources), else its bytes read from its
        dataset row or tar member; None when its source no longer has it."""
        path = self.path_of(key)
        if path is not None:
            return path
        if self._items is None:
            from indexer.query.stored_items import ItemReader

            self._items = ItemReader(self.manifest, self.storage_options)
        return self._items.read(key)

    def row_of(self, item_id: int) -> dict[str, Any] | None:
        """The stored row (without its vector) of the item with this id, or None."""
        return self._read_rows({int(item_id)}).get(int(item_id))

    def _read_rows(self, ids: set[int]) -> dict[int, dict[str, Any]]:
        """Rows by id (no vectors): from the shards, or from memory with cache_rows."""
        if not self._cache_rows:
            return read_rows(self.paths.shard_paths(self.manifest), ids)
        if self._rows is None:
            self._rows = self._all_rows()
        sorted_ids, table = self._rows
        if not len(sorted_ids) or not ids:
            return {}
        wanted = np.fromiter(ids, dtype=np.int64)
        pos = np.searchsorted(sorted_ids, wanted)
        found = pos[sorted_ids[np.minimum(pos, len(sorted_ids) - 1)] == wanted]
        return {int(r["id"]): r for r in table.take(positions(found)).to_pylist()}

    def _all_rows(self) -> tuple[np.ndarray, pa.Table]:
        """Every row without its vector, ordered by id, and the sorted ids."""
        import pyarrow.parquet as pq

        paths = self.paths.shard_paths(self.manifest)
        if not paths:
            return np.zeros(0, np.int64), pa.Table.from_batches([], pa.schema([]))
        names = [n for n in pq.read_schema(paths[0]).names if n != "embedding"]
        table = pa.concat_tables([read_shard(p, names) for p in paths])
        order = np.argsort(as_numpy(table.column("id")), kind="stable")
        return as_numpy(table.column("id"))[order], table.take(positions(order))

    def path_of(self, key: str) -> Path | None:
        """The absolute path of an item's file, for items of folder sources (else None)."""
        from indexer.sources.folder import key_to_relpath

        sources = self.manifest["sources"]
        label, rel = key.split("/", 1) if len(sources) > 1 and "/" in key else (None, key)
        for source in sources:
            if source["kind"] == "folder" and (label is None or source.get("label") == label):
                return Path(source["path"]) / key_to_relpath(rel)
        return None
