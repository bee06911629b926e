"""Open a collection and answer nearest-neighbour queries, rows joined with shard columns."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.errors import InputError
from indexer.index.faiss_index import search_param, whole_number
from indexer.query.rows import RowAccess

if TYPE_CHECKING:
    from indexer.config import DataConfig
    from indexer.decode.preprocess import Preprocessor

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


class Collection(RowAccess):
    """A collection's published version, opened for queries from Python or the CLI.

    >>> c = Collection.open("photos.idx")
    >>> scores, keys = c.search(vectors, k=10)        # (n, k) float32 and (n, k) keys
    >>> scores, keys = c.search_images(["a.jpg"], k=5)

    Everything is read from the version current at open(), so a build publishing meanwhile
    never mixes in. The model is recreated from the manifest on the first image query.
    """

    @classmethod
    def open(
        cls,
        root: Path | str,
        device: str = "auto",
        params: dict[str, int] | None = None,
        runtime: str = "auto",
    ) -> Collection:
        return cls(root, device, params, runtime)

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
        for width in search_widths(k, total):
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
    return [h for h in hits if passes_threshold(h.score, threshold, metric)]


def passes_threshold(score: float, threshold: float, metric: str) -> bool:
    """score >= threshold (ip) or <= threshold (l2), give or take float32 rounding: identical
    vectors score 0.99999994, not 1 (SCORE_TOLERANCE, relative to the threshold above 1)."""
    slack = SCORE_TOLERANCE * max(1.0, abs(threshold))
    return score >= threshold - slack if metric == "ip" else score <= threshold + slack


def search_widths(k: int, total: int) -> Iterator[int]:
    """How many neighbours a filtered query asks for, try after try: WHERE_FIRST (or 20k)
    first, then doubling, ending at the whole collection."""
    width = max(1, min(total, max(WHERE_FIRST, 20 * k)))
    yield width
    while width < total:
        width = min(total, 2 * width)
        yield width
