"""Open a collection and answer nearest-neighbour queries, rows joined with shard columns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexer.catalog import CollectionPaths, open_version, read_manifest
from indexer.errors import CollectionError, InputError
from indexer.images import DecodeError
from indexer.index import load_index
from indexer.model import Embedder, embedder_from_recipe
from indexer.preprocess import Preprocessor
from indexer.shards import read_rows


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


class Searcher:
    """A collection opened for queries; the model is recreated from the manifest on first use."""

    def __init__(self, root: Path, device: str = "auto") -> None:
        self.root = root
        self.version = open_version(root)  # everything below is read from this one version
        self.paths = CollectionPaths(self.version)
        self.manifest = read_manifest(self.version)
        self.index, self.index_meta = load_index(self.version, root)
        self.device = device
        self._embedder: Embedder | None = None
        if int(self.index.ntotal) != int(self.manifest["counts"]["embedded"]):
            raise CollectionError(
                f"the index in {root} holds {self.index.ntotal} vectors but the shards hold "
                f"{self.manifest['counts']['embedded']}: rebuild it with `indexer index {root}`"
            )

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = embedder_from_recipe(self.manifest["model"], self.device)
        return self._embedder

    def embed_files(self, files: list[Path]) -> np.ndarray:
        """Embed query images with the collection's recipe; an unreadable one is an InputError."""
        preprocess = Preprocessor(self.embedder.data_config, self.manifest["decode"]["mode"])
        pixels = []
        for path in files:
            try:
                pixels.append(preprocess(path.read_bytes()).pixels)
            except (OSError, DecodeError) as exc:
                raise InputError(f"cannot read query image {path}: {exc}") from exc
        return self.embedder.embed(torch.from_numpy(np.stack(pixels)))

    def search(self, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Top-k hits for each vector, best first, with their shard rows."""
        if k < 1:
            raise InputError("-k must be at least 1")
        scores, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        wanted = {int(i) for i in ids.ravel() if i >= 0}
        rows = read_rows(self.paths.shard_paths(self.manifest), wanted)
        if wanted - rows.keys():
            raise CollectionError(
                f"the index in {self.root} names ids missing from the shards: "
                f"rebuild it with `indexer index {self.root}`"
            )
        results = []
        for score_row, id_row in zip(scores.tolist(), ids.tolist(), strict=True):
            hits = [
                Hit(rank, float(score), int(i), rows[i]["key"], rows[i])
                for rank, (score, i) in enumerate(
                    ((s, i) for s, i in zip(score_row, id_row, strict=True) if i >= 0), start=1
                )
            ]
            results.append(hits)
        return results
