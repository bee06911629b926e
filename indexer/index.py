"""Build, measure, save and load the FAISS index, from the shards alone."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from indexer.catalog import CollectionPaths, write_json_atomic
from indexer.config import IndexConfig
from indexer.errors import CollectionError
from indexer.shards import iter_embeddings

INDEX_FILE = "index.faiss"
META_FILE = "meta.json"


def build_index(root: Path, manifest: dict[str, Any], cfg: IndexConfig) -> dict[str, Any]:
    """Exact search over every shard vector, ids = the shards' ``id`` column; then publish."""
    import faiss

    paths = CollectionPaths(root)
    shard_paths = paths.shard_paths(manifest)
    dim, metric = int(manifest["embedding_dim"]), manifest["metric"]
    start = time.perf_counter()
    flat = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
    index = faiss.IndexIDMap2(flat)
    for ids, vectors in iter_embeddings(shard_paths):
        index.add_with_ids(vectors, ids)
    build_seconds = time.perf_counter() - start
    meta: dict[str, Any] = {
        "type": "flat",
        "factory": "IDMap2,Flat",
        "metric": metric,
        "dim": dim,
        "ntotal": int(index.ntotal),
        "build_seconds": round(build_seconds, 4),
        "shards": manifest["shards"],
    }
    counts = [int(s["rows"]) for s in manifest["shards"]]
    meta.update(measure(index, shard_paths, counts, metric, cfg))
    save(paths, index, meta)
    return meta


def measure(
    index: Any, shard_paths: list[Path], counts: list[int], metric: str, cfg: IndexConfig
) -> dict[str, Any]:
    """recall@k of the index against exact search, on stored vectors used as queries."""
    total = int(index.ntotal)
    if total == 0:
        return {"recall_at_k": None, "recall_k": cfg.recall_k, "recall_queries": 0}
    k = min(cfg.recall_k, total)
    queries = sample_vectors(shard_paths, counts, min(cfg.recall_queries, total), cfg.seed)
    truth = exact_search(shard_paths, queries, k, metric)
    start = time.perf_counter()
    _, found = index.search(queries, k)
    seconds = time.perf_counter() - start
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist(), strict=True))
    return {
        "recall_at_k": round(hits / (len(queries) * k), 6),
        "recall_k": k,
        "recall_queries": len(queries),
        "queries_per_second": round(len(queries) / max(seconds, 1e-9), 1),
    }


def sample_vectors(shard_paths: list[Path], counts: list[int], n: int, seed: int) -> np.ndarray:
    """n stored vectors drawn without replacement, reading one shard at a time."""
    chosen = np.sort(np.random.default_rng(seed).choice(sum(counts), size=n, replace=False))
    picked, offset = [], 0
    for (_, vectors), count in zip(iter_embeddings(shard_paths), counts, strict=True):
        local = chosen[(chosen >= offset) & (chosen < offset + count)] - offset
        picked.append(vectors[local])
        offset += count
    return np.ascontiguousarray(np.concatenate(picked), dtype=np.float32)


def exact_search(shard_paths: list[Path], queries: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Brute-force top-k ids, streamed over shards (the ground truth for recall)."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for ids, vectors in iter_embeddings(shard_paths):
        scores = queries @ vectors.T
        if metric == "l2":
            scores = 2 * scores - (vectors * vectors).sum(1)[None, :]  # -||q-v||^2 + ||q||^2
        all_scores = np.concatenate([best_scores, scores], axis=1)
        all_ids = np.concatenate([best_ids, np.broadcast_to(ids, scores.shape)], axis=1)
        top = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(all_scores, top, 1)
        best_ids = np.take_along_axis(all_ids, top, 1)
    return best_ids


def save(paths: CollectionPaths, index: Any, meta: dict[str, Any]) -> None:
    """Write the index into a version being built; the version's publish makes it visible."""
    import faiss

    paths.index.mkdir()
    faiss.write_index(index, str(paths.index / INDEX_FILE))
    write_json_atomic(paths.index / META_FILE, meta)


def load_index(root: Path, collection: Path | None = None) -> tuple[Any, dict[str, Any]]:
    """The FAISS index and metadata in root (a version of ``collection``); errors say the fix."""
    import faiss

    paths = CollectionPaths(root)
    name = collection or root
    fix = f"rebuild it with `indexer index {name}`"
    if not (paths.index / INDEX_FILE).is_file():
        raise CollectionError(f"{name} has no index: {fix}")
    try:
        meta = json.loads((paths.index / META_FILE).read_text(encoding="utf-8"))
        index = faiss.read_index(str(paths.index / INDEX_FILE))
    except Exception as exc:
        raise CollectionError(f"the index in {name} is unreadable ({exc}): {fix}") from exc
    return index, meta


def read_index_meta(root: Path) -> dict[str, Any] | None:
    path = CollectionPaths(root).index / META_FILE
    if not path.is_file():
        return None
    try:
        meta: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return meta
    except ValueError:
        return None
