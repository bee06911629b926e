"""Find groups of near-duplicate items with the index: a self k-NN join in bounded memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexer.collection.shards import iter_embeddings
from indexer.errors import InputError
from indexer.query.collection import Collection, capped_k, check_threshold, passes_threshold
from indexer.safeio import os_errors_as, write_bytes_atomic

DEDUP_SCHEMA = pa.schema([("group", pa.int64()), ("key", pa.string()), ("score", pa.float32())])


@dataclass(frozen=True)
class Groups:
    """Groups of two or more near-duplicates; each member with its best score in the group."""

    members: list[list[tuple[str, float]]]  # largest group first

    @property
    def items(self) -> int:
        return sum(len(g) for g in self.members)


def find_duplicates(collection: Collection, threshold: float, k: int = 10) -> Groups:
    """Pairs closer than threshold among each item's k nearest, joined into groups."""
    if capped_k(k, 2**62) < 2:
        raise InputError("-k must be at least 2 to find duplicates")
    check_threshold(threshold)
    k = capped_k(k, max(int(collection.index.ntotal), 1))  # more neighbours than items: none
    metric = collection.manifest["metric"]  # ip: scores are similarities, l2: distances
    pick = max if metric == "ip" else min
    parent: dict[int, int] = {}
    best: dict[int, float] = {}
    paths = collection.paths.shard_paths(collection.manifest)
    for ids, vectors in iter_embeddings(paths):  # one shard in memory at a time
        scores, found = collection.index.search(vectors, k)
        for own, row_scores, row_ids in zip(ids.tolist(), scores, found, strict=True):
            for score, other in zip(row_scores.tolist(), row_ids.tolist(), strict=True):
                if other >= 0 and other != own and passes_threshold(score, threshold, metric):
                    _union(parent, own, int(other))
                    for item in (own, int(other)):
                        best[item] = pick(best.get(item, score), score)
    return Groups(_collect(collection, parent, best))


def _find(parent: dict[int, int], item: int) -> int:
    root = item
    while parent.get(root, root) != root:
        root = parent[root]
    while parent.get(item, item) != root:  # path compression
        parent[item], item = root, parent[item]
    return root


def _union(parent: dict[int, int], a: int, b: int) -> None:
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)
    parent.setdefault(a, a)
    parent.setdefault(b, b)


def _collect(
    collection: Collection, parent: dict[int, int], best: dict[int, float]
) -> list[list[tuple[str, float]]]:
    by_root: dict[int, list[int]] = {}
    for item in parent:
        by_root.setdefault(_find(parent, item), []).append(item)
    ids = np.array(sorted(parent), dtype=np.int64)
    keys = dict(zip(ids.tolist(), collection.keys_of(ids).tolist(), strict=True))
    groups = [
        sorted(((keys[i], float(best[i])) for i in members), key=lambda m: m[0])
        for members in by_root.values()
        if len(members) > 1
    ]
    return sorted(groups, key=lambda g: (-len(g), g[0][0]))


def write_groups(groups: Groups, out: Path) -> None:
    """Parquet: group, key, score; one row per member of a group of two or more."""
    rows = [{"group": n, "key": key, "score": score}
            for n, members in enumerate(groups.members) for key, score in members]  # fmt: skip
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=DEDUP_SCHEMA), sink)
    with os_errors_as(f"writing the groups to {out}"):
        out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out, sink.getvalue().to_pybytes())
