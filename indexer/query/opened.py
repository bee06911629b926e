"""A collection's published version opened and checked: manifest, index, search parameters."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pyarrow as pa

from indexer.collection.layout import CollectionPaths, open_version, read_manifest
from indexer.config import StorageOptions
from indexer.errors import CollectionError, InputError
from indexer.index.faiss_index import apply_params, load_index, search_param

if TYPE_CHECKING:
    from indexer.model.runtime import Runtime
    from indexer.query.stored_items import ItemReader

T = TypeVar("T")


class OpenedCollection:
    """The version current at open(), its index and parameters; reopened if a build prunes it."""

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

    def _stale_index(self) -> CollectionError:
        return CollectionError(
            f"the index in {self.root} names ids missing from the shards: "
            f"rebuild it with `indexer index {self.root}`"
        )


SEARCH_PARAMS = ("nprobe", "efSearch")
