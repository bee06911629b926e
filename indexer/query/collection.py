"""Open a collection and answer nearest-neighbour queries, rows joined with shard columns."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pyarrow as pa

from indexer.collection.layout import CollectionPaths, open_version, read_manifest
from indexer.collection.shards import as_numpy, positions, read_rows, read_shard
from indexer.config import StorageOptions
from indexer.errors import CollectionError, InputError
from indexer.index.faiss_index import apply_params, load_index, search_param, whole_number

if TYPE_CHECKING:
    from indexer.decode.preprocess import DataConfig, Preprocessor
    from indexer.model.runtime import Runtime
    from indexer.query.stored_items import ItemReader

T = TypeVar("T")
SCORE_TOLERANCE = 1e-6  # thresholds compare with this slack: float32 rounds identical items
WHERE_FIRST = 200  # a filtered query first asks for this many neighbours (or 20k), then doubles


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    id: int
    key: str
    columns: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        extra = {k: v for k, v in self.columns.items() if k not in ("id", "key")}
        return {"rank": self.rank, "key": self.key, "score": self.score, "id": self.id, **extra}


class Collection:
    """A collection's published version, opened for queries from Python or the CLI.

    >>> c = Collection.open("photos.idx")
    >>> scores, keys = c.search(vectors, k=10)        # (n, k) float32 and (n, k) keys
    >>> scores, keys = c.search_images(["a.jpg"], k=5)

    Everything is read from the version current at open(), so a build publishing meanwhile
    never mixes in. The model is recreated from the manifest on the first image query.
    """

    def __init__(
        self,
        root: Path | str,
        device: str = "auto",
        params: dict[str, int] | None = None,
        runtime: str = "auto",
        strict_params: bool = False,
        cache_rows: bool = False,
        storage_options: StorageOptions = (),
    ) -> None:
        self.root = Path(root)
        self.storage_options = storage_options  # buckets: to read items back (never stored)
        self.device = device
        self._strict = strict_params  # a parameter the index lacks: an error (the CLI's flags)
        self._cache_rows = cache_rows  # keep every row in memory (a service): no shard reads
        from indexer.config import RUNTIMES

        if runtime not in RUNTIMES:
            raise InputError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
        self.runtime = runtime  # auto: the portable model on CPU when there is one, else torch
        self._embedder: Runtime | None = None
        self._params = dict(params or {})
        self._open()

    def _open(self) -> None:
        """Read the published version: manifest, index (refused unless it is this version's)."""
        self.version = open_version(self.root)
        self.paths = CollectionPaths(self.version)
        self.manifest = read_manifest(self.version)
        self.index, self.index_meta = load_index(self.version, self.manifest, self.root)
        self._keys: tuple[np.ndarray, pa.Array] | None = None
        self._items: ItemReader | None = None  # pictures of items: the sources, listed once
        self._rows: tuple[np.ndarray, pa.Table] | None = None  # sorted ids, rows in that order
        self._vectors: tuple[dict[str, int], np.ndarray] | None = None  # key -> row of matrix
        if self._params:
            self.set_search_params(self._params, strict=self._strict)

    def _again_if_pruned(self, work: Callable[[], T]) -> T:
        """Run work; if the version it reads was deleted under it (a build published with
        --keep 1 meanwhile), open the new published version and run it once more."""
        try:
            return work()
        except (CollectionError, OSError) as exc:
            if self.version.is_dir() or self._cache_rows:  # a service's registry reloads:
                # a Collection shared by request threads is never reopened under them
                if isinstance(exc, OSError):
                    raise CollectionError(f"cannot read {self.root}: {exc}") from exc
                raise
        old = self.version.name
        self._open()
        try:
            return work()
        except (CollectionError, OSError) as exc:
            raise CollectionError(
                f"{self.root}'s version {old} was deleted while it was read, and then its "
                f"next one too ({exc}): keep at least 2 versions (--keep 2) when queries run "
                "during builds"
            ) from exc

    @classmethod
    def open(
        cls,
        root: Path | str,
        device: str = "auto",
        params: dict[str, int] | None = None,
        runtime: str = "auto",
    ) -> Collection:
        return cls(root, device, params, runtime)

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def search_params(self) -> dict[str, int]:
        """The tuned search parameters in use (e.g. {'nprobe': 12}); {} for exact search."""
        return dict(self.index_meta.get("params") or {})

    def set_search_params(self, params: dict[str, int], strict: bool = False) -> None:
        """Override the tuned nprobe or efSearch. A parameter this index does not take (nprobe
        of an exact or HNSW index) is left alone with a warning, so code written for a large
        collection runs on a small one (strict: refused, as the CLI's flags are); an unknown
        name is refused. nprobe above the index's nlist is nlist; efSearch above EF_LIMIT
        (4096) is refused."""
        own = search_param(self.index)[0]
        if not isinstance(params, dict):
            raise InputError(f"search parameters must be a dict such as {{'nprobe': 8}}, not "
                             f"{params!r}")  # fmt: skip
        usable = {}
        for name, value in params.items():
            if name not in SEARCH_PARAMS:
                raise InputError(f"unknown search parameter {name!r}: use nprobe or efSearch")
            if name != own and strict:
                raise InputError(
                    f"the index of {self.root} is {self.index_meta['type']} "
                    f"({self.index_meta['factory']}): it has no {name} to set"
                    + (f"; it takes {own}" if own else "")
                )
            if name != own:
                warnings.warn(
                    f"the index of {self.root} is {self.index_meta['type']} "
                    f"({self.index_meta['factory']}): it has no {name}; left as it is"
                    + (f" (it takes {own})" if own else ""),
                    stacklevel=2,
                )
                continue
            usable[name] = value
        applied = apply_params(self.index, usable)
        self.index_meta = {**self.index_meta, "params": {**self.search_params, **applied}}

    def __len__(self) -> int:
        """The number of items in the published version."""
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        model = (self.manifest.get("model") or {}).get("name", "vectors from Parquet")
        return (
            f"<Collection {str(self.root)!r} {self.version.name}: {len(self):,} items, "
            f"{self.dim}-d, {self.index_meta.get('type')} index, {model}>"
        )

    @property
    def embedder(self) -> Runtime:
        if self.manifest["model"] is None:
            raise InputError(
                f"{self.root} holds vectors indexed from Parquet, with no model to embed "
                "images: query it with vectors (Collection.search)"
            )
        if self._embedder is None or self._embedder.recipe != self.manifest["model"]:
            from indexer.model.runtime import query_runtime

            self._embedder = query_runtime(self.runtime, self.device, self.version, self.manifest)
        return self._embedder

    def embed_files(self, files: list[Path]) -> np.ndarray:
        """Embed query image files with the collection's recipe (see embed_images)."""
        return self.embed_images(list(files))

    def embed_images(self, images: ImageInput | list[ImageInput]) -> np.ndarray:
        """Embed query images with the collection's recipe: (n, dim) float32. Each image is
        a path (str or Path), encoded bytes, a PIL image or an (H, W, 3) uint8 array; one
        image alone, or a list. One that cannot be read is an InputError naming it."""
        return self.embedder.embed(self.pixels_of(images))

    def pixels_of(self, images: ImageInput | list[ImageInput]) -> np.ndarray:
        """Query images decoded and prepared as the build prepared its items: uint8
        (n, H, W, 3), the model's input (see embed_images)."""
        from indexer.decode.images import DecodeError

        preprocess = preprocessor(self.manifest, self.embedder.data_config)
        batch = [images] if _one_image(images) else list(images)
        if not batch:
            raise InputError("no query images given")
        pixels = []
        for n, image in enumerate(batch):
            try:
                pixels.append(preprocess(encoded(image)).pixels)
            except (OSError, DecodeError, ValueError, TypeError) as exc:
                raise InputError(f"cannot read query image {_name(image, n)}: {exc}") from exc
        return np.stack(pixels)

    def prepare(self, vectors: np.ndarray) -> np.ndarray:
        """Query vectors as the index wants them: float32 (n, dim), normalised if the
        collection's vectors are."""
        array = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise InputError(
                f"query vectors have shape {np.shape(vectors)}; {self.root} holds "
                f"{self.dim}-d vectors: pass an (n, {self.dim}) array"
            )
        if not np.isfinite(array).all():
            raise InputError("query vectors hold NaN or infinite values")
        if self.manifest["normalized"]:
            array = array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(array)

    def search_ids(self, vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n, min(k, size)); an id of -1 means fewer results were found."""
        k = capped_k(k, int(self.index.ntotal))
        scores, ids = self.index.search(self.prepare(vectors), k)
        return scores, ids

    def search(self, vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores, keys) of the k nearest items per vector, best first; each (n, k).

        Scores are inner products (higher is closer) or, for metric l2, squared distances
        (lower is closer). k is capped at the collection's size; results an approximate index
        did not find are NaN and None.
        """
        return self._again_if_pruned(lambda: self._search(vectors, k))

    def _search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.search_ids(vectors, k)
        keys = self.keys_of(ids)
        scores = scores.astype(np.float32)
        scores[ids < 0] = np.nan
        return scores, keys

    def search_images(
        self, images: ImageInput | list[ImageInput], k: int = 10
    ) -> tuple[np.ndarray, np.ndarray]:
        """search() for images (paths, bytes, PIL images or arrays; one or a list), embedded
        with the collection's own recipe."""
        return self.search(self.embed_images(images), k)

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

    def query(
        self,
        images: list[ImageInput] | None = None,
        ids: list[str] | None = None,
        k: int = 10,
        threshold: float | None = None,
        where: str | list[str] | None = None,
    ) -> list[QueryResult]:
        """Nearest items to each image (embedded with the collection's recipe) and to each
        stored item given by key, as result rows with their shard columns. `where` (one
        condition or a list, ANDed: "caption=dog", "original_width>400", "label=tench" for
        the top predicted label) keeps the rows that satisfy it, searching wider until k are
        found."""
        return self._again_if_pruned(lambda: self._query(images, ids, k, threshold, where))

    def _query(
        self,
        images: list[ImageInput] | None,
        ids: list[str] | None,
        k: int,
        threshold: float | None,
        where: str | list[str] | None,
    ) -> list[QueryResult]:
        k = capped_k(k, max(int(self.index.ntotal), 1))
        check_threshold(threshold)
        allowed = None if not where else self.allowed_ids(where)
        images = [images] if _one_image(images) else list(images or [])
        ids = [ids] if isinstance(ids, str) else list(ids or [])  # one key, not its letters
        if not images and not ids:
            raise InputError("nothing to query: give images, a folder, a glob, or --id KEY")
        parts = []
        if images:
            parts.append(self.embed_images(images))
        if ids:
            parts.append(self.vectors_of(ids))
        vectors = np.concatenate(parts)
        names = [(_name(p, n), Path(p) if isinstance(p, str | Path) else None)
                 for n, p in enumerate(images)] + [(key, None) for key in ids]  # fmt: skip
        return self._results(vectors, names, k, threshold, allowed)

    def query_vectors(
        self,
        vectors: np.ndarray,
        names: list[str],
        k: int = 10,
        threshold: float | None = None,
        where: str | list[str] | None = None,
    ) -> list[QueryResult]:
        """query() for query vectors already embedded (named for the results), e.g. a
        service's micro-batch of uploads embedded together."""

        def run() -> list[QueryResult]:
            capped = capped_k(k, max(int(self.index.ntotal), 1))
            check_threshold(threshold)
            allowed = None if not where else self.allowed_ids(where)
            named: list[tuple[str, Path | None]] = [(name, None) for name in names]
            return self._results(np.asarray(vectors), named, capped, threshold, allowed)

        return self._again_if_pruned(run)

    def _results(
        self,
        vectors: np.ndarray,
        names: list[tuple[str, Path | None]],
        k: int,
        threshold: float | None,
        allowed: np.ndarray | None,
    ) -> list[QueryResult]:
        found = self.hits(vectors, k) if allowed is None else self._filtered(vectors, k, allowed)
        metric = self.manifest["metric"]
        results = []
        for (name, path), hits in zip(names, found, strict=True):
            if path is None:  # a stored item: show its own file when it has one
                path = self.path_of(name)
            results.append(QueryResult(name, path, keep_above(hits, threshold, metric)))
        return results

    def _filtered(self, vectors: np.ndarray, k: int, allowed: np.ndarray) -> list[list[Hit]]:
        """The k nearest hits among the allowed ids (sorted): the search widens (doubling)
        until each query has k of them or searched the whole collection."""
        total = int(self.index.ntotal)
        scores = np.full((len(vectors), k), np.nan, np.float32)
        ids = np.full((len(vectors), k), -1, np.int64)
        todo = np.arange(len(vectors))
        for width in widths(k, total):
            found_s, found_i = self._search_wide(vectors[todo], width)
            match = (found_i >= 0) & np.isin(found_i, allowed)
            enough = (match.sum(axis=1) >= k) | (width >= total)
            for row, s_row, i_row, m in zip(todo[enough], found_s[enough], found_i[enough],
                                            match[enough], strict=True):  # fmt: skip
                picked = np.flatnonzero(m)[:k]
                scores[row, : len(picked)], ids[row, : len(picked)] = s_row[picked], i_row[picked]
            todo = todo[~enough]
            if not len(todo):
                break
        return self._as_hits(scores, ids)

    def _search_wide(self, vectors: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """search_ids; at the whole collection's width on an approximate index (which would
        still scan only nprobe lists or efSearch candidates), an exact scan of the shards."""
        if width < int(self.index.ntotal) or search_param(self.index)[0] is None:
            return self.search_ids(vectors, width)
        from indexer.collection.shards import iter_embeddings
        from indexer.index.tune import exact_top

        queries = self.prepare(vectors)
        batches = iter_embeddings(self.paths.shard_paths(self.manifest))
        scores, ids = exact_top(batches, np.full(len(queries), -1), queries, width,
                                self.manifest["metric"])  # fmt: skip
        if self.manifest["metric"] == "l2":  # exact_top ranks by |q|^2 - distance^2
            scores = np.einsum("ij,ij->i", queries, queries)[:, None] - scores
        return scores.astype(np.float32), ids

    def allowed_ids(self, where: str | list[str]) -> np.ndarray:
        """The sorted ids of the items every --where condition keeps."""
        from indexer.query.filters import allowed_ids, parse_where

        conditions = parse_where(where)
        if self._cache_rows:  # a service: from the rows in memory, never the shards again
            return self._allowed_in_memory(conditions)
        paths = self.paths.shard_paths(self.manifest)
        if not paths:
            return np.zeros(0, np.int64)
        import pyarrow.parquet as pq

        return allowed_ids(paths, pq.read_schema(paths[0]), conditions)

    def _allowed_in_memory(self, conditions: list[Any]) -> np.ndarray:
        from indexer.query.filters import columns_needed, keep_mask

        if self._rows is None:
            self._rows = self._all_rows()
        sorted_ids, table = self._rows
        if table.num_rows == 0:
            return np.zeros(0, np.int64)
        needed = sorted(set(columns_needed(conditions, table.schema)))
        return sorted_ids[keep_mask(table.select(needed), conditions)]

    def query_frame(self, *args: Any, **kwargs: Any) -> Any:
        """query() as a pandas DataFrame: one row per hit, with a `query` column."""
        import pandas as pd

        rows = [{"query": r.name, **h.to_dict()} for r in self.query(*args, **kwargs)
                for h in r.hits]  # fmt: skip
        return pd.DataFrame(rows)

    def _stale_index(self) -> CollectionError:
        return CollectionError(
            f"the index in {self.root} names ids missing from the shards: "
            f"rebuild it with `indexer index {self.root}`"
        )

    def hits(self, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Top-k hits for each vector, best first, with their shard rows (the CLI's view)."""
        return self._again_if_pruned(lambda: self._hits(vectors, k))

    def _hits(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        return self._as_hits(*self.search_ids(vectors, k))

    def _as_hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        """Search results (ids of -1 left out) as hits, ranked, with their shard rows."""
        wanted = {int(i) for i in ids.ravel() if i >= 0}
        rows = self._read_rows(wanted)
        if wanted - rows.keys():
            raise self._stale_index()
        results = []
        for score_row, id_row in zip(scores.tolist(), ids.tolist(), strict=True):
            found = [(s, i) for s, i in zip(score_row, id_row, strict=True) if i >= 0]
            hits = [
                Hit(rank, float(score), int(i), rows[i]["key"], rows[i])
                for rank, (score, i) in enumerate(found, start=1)
            ]
            results.append(hits)
        return results


@dataclass(frozen=True)
class QueryResult:
    """One query (an image file or a stored item's key) and its hits, best first."""

    name: str
    path: Path | None  # the query image, when there is a file to show
    hits: list[Hit]

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.name, "results": [h.to_dict() for h in self.hits]}


ImageInput = Any  # str | Path | bytes | PIL.Image.Image | np.ndarray (PIL imported lazily)
SEARCH_PARAMS = ("nprobe", "efSearch")


def _one_image(images: Any) -> bool:
    return isinstance(images, str | Path | bytes | bytearray | np.ndarray) or hasattr(
        images, "getpixel"
    )


def preprocessor(manifest: dict[str, Any], data_config: DataConfig) -> Preprocessor:
    """Images decoded and prepared by the rules the build recorded (mode, size limit, truncated
    files): query images, and the stored items a model check embeds again."""
    from indexer.decode.preprocess import Preprocessor

    rules = manifest["decode"]
    return Preprocessor(data_config, rules["mode"], rules["max_pixels"],
                        bool(rules.get("allow_truncated")))  # fmt: skip


def encoded(image: ImageInput) -> bytes:
    """A query image's encoded bytes: a file's, the bytes given, or a PIL image or uint8
    array written as PNG (lossless: the same pixels the caller holds)."""
    if isinstance(image, str | Path):
        return Path(image).read_bytes()
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    import io

    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"an array image must be uint8 (H, W) or (H, W, 3), not "
                             f"{image.dtype} {image.shape}")  # fmt: skip
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"a query image is a path, bytes, a PIL image or an array, not "
                        f"{type(image).__name__}")  # fmt: skip
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _name(image: ImageInput, n: int) -> str:
    return str(image) if isinstance(image, str | Path) else f"#{n} ({type(image).__name__})"


def expand_images(args: list[str]) -> list[Path]:
    """Query arguments as image files: files as given, folders walked, glob patterns expanded."""
    import glob

    from indexer.sources.folder import walk_images

    files: list[Path] = []
    for arg in args:
        path = Path(arg).expanduser()
        if path.is_dir():
            files += [path / rel for rel in walk_images(path.resolve())]
        elif path.exists() or not glob.has_magic(arg):
            files.append(path)
        else:
            matched = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            if not matched:
                raise InputError(f"no file matches {arg!r}: check the pattern")
            files += [p for p in matched if p.is_file()]
    return files


def capped_k(k: Any, size: int) -> int:
    """k as an int, at least 1, at most the collection's size (the rest would be empty)."""
    return max(min(whole_number("k", k), size), 1)


def check_threshold(threshold: float | None) -> None:
    """A threshold must be a finite number: NaN would match nothing and say nothing."""
    if threshold is not None and not math.isfinite(threshold):
        raise InputError(f"--threshold {threshold} is not a finite number: give one like 0.9")


def keep_above(hits: list[Hit], threshold: float | None, metric: str) -> list[Hit]:
    """Hits at least as close as threshold: score >= t for ip, distance <= t for l2."""
    if threshold is None:
        return hits
    return [h for h in hits if within(h.score, threshold, metric)]


def within(score: float, threshold: float, metric: str) -> bool:
    """score >= threshold (ip) or <= threshold (l2), give or take float32 rounding: identical
    vectors score 0.99999994, not 1 (SCORE_TOLERANCE, relative to the threshold above 1)."""
    slack = SCORE_TOLERANCE * max(1.0, abs(threshold))
    return score >= threshold - slack if metric == "ip" else score <= threshold + slack


def widths(k: int, total: int) -> Iterator[int]:
    """How many neighbours a filtered query asks for, try after try: WHERE_FIRST (or 20k)
    first, then doubling, ending at the whole collection."""
    width = max(1, min(total, max(WHERE_FIRST, 20 * k)))
    yield width
    while width < total:
        width = min(total, 2 * width)
        yield width
