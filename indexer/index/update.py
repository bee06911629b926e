"""Update the previous version's index for a new version: ids out, vectors in, drift measured."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.collection.layout import CollectionPaths
from indexer.collection.shards import read_embeddings, read_shard
from indexer.config import IndexConfig
from indexer.errors import CollectionError
from indexer.index.faiss_index import (
    INDEX_FILE,
    Vectors,
    build_index,
    check_index_files,
    index_mismatch,
    load_probe,
    make_probe,
    measure_and_tune,
    read_index_meta,
    save_index,
    version_vectors,
)
from indexer.index.index_type import IndexChoice, choose_index
from indexer.index.tune import (
    TIE_TOLERANCE,
    Probe,
    exact_probe,
    exact_top,
    pool_size,
    ranked,
    truth_from_pool,
)

log = logging.getLogger(__name__)
UPDATABLE = ("flat", "ivf", "ivfsq")  # HNSW cannot remove vectors; factory strings: unknown
NONE = np.zeros(0, np.int64)
EXACT_CODES = ("flat", "ivf")  # index types whose stored codes are the float vectors themselves
ADD_BATCH = 65_536  # added vectors gathered before one add (per-call costs dominate small ones)
NEW_QUERY_SHARE = 0.05  # of the probe's queries, at least this share is drawn from added ones


@dataclass(frozen=True)
class IndexedVersion:
    """The published version a new one may update the index of."""

    folder: Path
    manifest: dict[str, Any]


@dataclass(frozen=True)
class Delta:
    """What changed between two versions' vectors, by id (a changed vector is in both)."""

    removed: np.ndarray  # ids in the previous index whose row is gone or changed
    added: np.ndarray  # ids whose vectors the new version adds (new or changed rows)
    previous: int  # vectors in the previous version
    holding: frozenset[str] | set[str] = frozenset()  # the new version's shards with added rows

    @property
    def changed(self) -> int:
        return len(np.union1d(self.removed, self.added))

    @property
    def share(self) -> float:
        return self.changed / max(self.previous, 1)

    def describe(self) -> str:
        return (f"{self.share:.1%} of the vectors changed ({len(self.removed):,} removed, "
                f"{len(self.added):,} added)")  # fmt: skip


def settings_changed(cfg: IndexConfig, recorded: dict[str, Any] | None) -> bool:
    """Whether the published index was built with other settings than those asked now."""
    if recorded is None:
        return True
    asked = (cfg.index_type, cfg.max_memory, cfg.target_recall)
    return asked != (recorded.get("requested"), recorded.get("max_memory"),
                     recorded.get("target_recall"))  # fmt: skip


def rebuild_reason(
    meta: dict[str, Any] | None, choice: IndexChoice, changed_settings: bool, max_share: float,
    share: float | None = None,
) -> str | None:  # fmt: skip
    """Why the index must be built from scratch instead of updated; None: update it."""
    if meta is None:
        return "the previous version has no readable index"
    if changed_settings:
        return "the index settings changed"
    kind = meta.get("type")
    if kind == "hnsw":
        return "an HNSW index cannot remove vectors"
    if kind not in UPDATABLE:
        return f"a {kind} index ({meta.get('factory')}) is not updated in place"
    if meta.get("on_disk"):  # measured: after add_with_ids, 58% of the stored vectors of an
        # OnDiskInvertedLists index no longer found themselves (faiss grows its lists in place)
        return "on-disk inverted lists cannot take vectors in place"
    was = (kind, meta.get("factory"), bool(meta.get("on_disk")))
    if was != (choice.kind, choice.factory, choice.on_disk):
        where = " on disk" if choice.on_disk else ""
        return f"the collection's size now calls for {choice.factory}{where}, not {was[1]}"
    if share is not None and share > max_share:
        return f"{share:.1%} of the vectors changed (more than {max_share:.0%})"
    return None


def index_version(
    root: Path,
    manifest: dict[str, Any],
    cfg: IndexConfig,
    previous: IndexedVersion | None,
    force: str | None = None,
) -> dict[str, Any]:
    """The index of the version at root: the previous version's updated when the rules allow
    (rebuild_reason, then the recall after the update), else built from the shards (always
    when `force` says why, or cfg.rebuild)."""
    reason = force or ("asked for (--rebuild-index)" if cfg.rebuild else None)
    if previous is None and reason is None:
        reason = "no previous version"
    if reason is None and previous is not None:
        outcome = update_index(previous, root, manifest, cfg)
        if isinstance(outcome, dict):
            return outcome
        reason = outcome
        shutil.rmtree(CollectionPaths(root).index, ignore_errors=True)
        log.info("index rebuilt: %s", reason)
    return build_index(root, manifest, cfg, {"how": "rebuilt", "from_version": None,
                                             "why": reason})  # fmt: skip


def update_index(
    previous: IndexedVersion, root: Path, manifest: dict[str, Any], cfg: IndexConfig
) -> dict[str, Any] | str:
    """The previous index with the removed ids taken out and the added vectors put in, saved
    into root's index folder and tuned; or why it must be rebuilt instead."""
    start = time.perf_counter()
    meta = _whole_meta(previous)
    vectors = version_vectors(root, manifest)
    choice = choose_index(vectors.total, vectors.dim, cfg.max_memory, cfg.index_type)
    recorded = meta or {}
    changed = settings_changed(cfg, meta) or (recorded.get("metric"), recorded.get("dim")) != (
        manifest["metric"],
        int(manifest["embedding_dim"]),
    )  # a new model or metric: rebuilt
    reason = rebuild_reason(meta, choice, changed, cfg.max_update_share)
    if reason is not None or meta is None:
        return reason or "the previous version has no readable index"
    delta = diff(previous, root, manifest)  # the pass below checks every shard's ids
    reason = rebuild_reason(meta, choice, False, cfg.max_update_share, delta.share)
    if reason is not None:
        return reason
    paths = CollectionPaths(root)
    paths.index.mkdir()
    try:
        index = _open_copy(CollectionPaths(previous.folder).index)
    except RuntimeError as exc:  # checksums that were made to match a damaged file
        return f"the previous index cannot be read ({str(exc).strip().splitlines()[-1]})"
    mismatch = _not_as_recorded(index, meta)  # meta.json has no checksum: the index decides
    if mismatch:
        return mismatch
    if len(delta.removed):
        import faiss

        gone = index.remove_ids(faiss.IDSelectorBatch(delta.removed))
        if gone != len(delta.removed):
            return f"the previous index lacked {len(delta.removed) - gone} of the ids to remove"
    probe = _ProbeUpdate(previous, delta, vectors, cfg, manifest)
    fresh = delta.holding
    probe.draw_new(vectors, fresh, delta.added)
    # Flat codes hold the vectors exactly: an exhaustive search of the updated index scores the
    # new queries, and only the shards with added rows are read (SQ8: every shard is)
    exact_codes = meta.get("type") in EXACT_CODES
    adding = _Adding(index, probe)
    for path, ids, batch in _stream(vectors, fresh, exact_codes):
        if path.name in fresh:  # the other shards add nothing
            wanted = np.isin(ids, delta.added)
            adding.put(ids[wanted], batch[wanted])
        if not exact_codes:
            probe.see_all(ids, batch)
    adding.flush()
    if index.ntotal != vectors.total:
        return f"the updated index holds {index.ntotal} vectors, the version {vectors.total}"
    if exact_codes:
        probe.search_new(index)
    build_seconds = time.perf_counter() - start
    new_probe = probe.finish()
    before = next(iter((meta.get("params") or {}).values()), None)
    tuning = measure_and_tune(index, new_probe, cfg.target_recall, before)
    if not tuning.target_met:
        low = tuning.recall_low
        return (
            f"after the update recall@k's lower bound {low} is below the target {cfg.target_recall}"
        )
    kind = {k: meta.get(k) for k in ("type", "factory", "reason", "on_disk", "train_vectors")}
    took = {
        "build_seconds": build_seconds,
        "tune_seconds": time.perf_counter() - start - build_seconds,
    }
    provenance = {"how": "updated", "from_version": previous.folder.name, "why": delta.describe(),
                  "removed": len(delta.removed), "added": len(delta.added)}  # fmt: skip
    return save_index(index, paths.index, {**kind, **provenance}, vectors, cfg, took, tuning,
                      new_probe, manifest)  # fmt: skip


def _whole_meta(previous: IndexedVersion) -> dict[str, Any] | None:
    """The previous index's metadata when the index is whole and its own (every file's size and
    sha256 as recorded, built from its version's shards); None otherwise."""
    meta = read_index_meta(previous.folder)
    recorded = (meta or {}).get("files") or {}
    if meta is None or not recorded or index_mismatch(meta, previous.manifest):
        return None
    folder = CollectionPaths(previous.folder).index
    if check_index_files(folder, recorded, set(recorded)):
        return None
    return meta


def _not_as_recorded(index: Any, meta: dict[str, Any]) -> str | None:
    """Why a loaded index is not what its metadata says; None if it is."""
    import faiss

    kind = kind_of(index)
    if kind != meta.get("type"):
        return f"the previous index is a {kind} index, its metadata says {meta.get('type')}"
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and int(ivf.nlist) != meta.get("nlist"):
        return f"the previous index has {ivf.nlist} lists, its metadata says {meta.get('nlist')}"
    if int(index.ntotal) != meta.get("ntotal"):
        return f"the previous index holds {index.ntotal} vectors, its metadata {meta.get('ntotal')}"
    return None


def kind_of(index: Any) -> str:
    """What a loaded index is, in choose.py's names (the kinds an update can change), else
    its class name."""
    import faiss

    inner = index.index if isinstance(index, faiss.IndexIDMap) else index
    inner = faiss.downcast_index(inner)
    if isinstance(index, faiss.IndexIDMap) and isinstance(inner, faiss.IndexFlat):
        return "flat"
    if isinstance(inner, faiss.IndexIVFFlat):
        return "ivf"
    if isinstance(inner, faiss.IndexIVFScalarQuantizer):
        return "ivfsq"
    return type(inner).__name__


def _open_copy(source: Path) -> Any:
    """The previous index, read into memory for changing (its file is never written)."""
    import faiss

    return faiss.read_index(str(source / INDEX_FILE))


def diff(previous: IndexedVersion, root: Path, manifest: dict[str, Any]) -> Delta:
    """Rows by (id, content hash): those of shards both versions share (same name and sha256)
    are unchanged; of the others, a pair in one version only is removed or added (a row
    without a hash never counts as unchanged)."""
    import pyarrow.compute as pc

    shared = _shard_ids(previous.manifest) & _shard_ids(manifest)
    old_ids, old_hashes, _ = _rows(previous.folder, previous.manifest, shared)
    new_ids, new_hashes, new_shard = _rows(root, manifest, shared)
    _, at_old, at_new = np.intersect1d(old_ids, new_ids, assume_unique=True, return_indices=True)
    same = pc.equal(old_hashes.take(at_old), new_hashes.take(at_new))
    same = pc.fill_null(same, False).to_numpy(zero_copy_only=False).astype(bool)
    kept_old, kept_new = np.zeros(len(old_ids), bool), np.zeros(len(new_ids), bool)
    kept_old[at_old[same]] = True
    kept_new[at_new[same]] = True
    names = [str(s["name"]) for s in manifest["shards"]]
    holding = {names[n] for n in np.unique(new_shard[~kept_new]).tolist()}
    return Delta(np.sort(old_ids[~kept_old]), np.sort(new_ids[~kept_new]),
                 int(previous.manifest["counts"]["embedded"]), holding)  # fmt: skip


def _shard_ids(manifest: dict[str, Any]) -> set[tuple[str, str]]:
    return {(str(s["name"]), str(s.get("sha256"))) for s in manifest["shards"] if s.get("sha256")}


def _rows(
    root: Path, manifest: dict[str, Any], shared: set[tuple[str, str]]
) -> tuple[np.ndarray, Any, np.ndarray]:
    """ids, content hashes (a pyarrow string array) and shard numbers (in the manifest's
    order) of the rows of the unshared shards."""
    import pyarrow as pa

    paths = CollectionPaths(root)
    ids, hashes = [np.zeros(0, np.int64)], [pa.array([], pa.string())]
    numbers = [np.zeros(0, np.int64)]
    for number, shard in enumerate(manifest["shards"]):
        if (str(shard["name"]), str(shard.get("sha256"))) in shared:
            continue
        table = read_shard(paths.shards / shard["name"], ["id", "content_hash"])
        ids.append(table.column("id").to_numpy())
        hashes.append(table.column("content_hash").combine_chunks().cast(pa.string()))
        numbers.append(np.full(table.num_rows, number, np.int64))
    return (np.concatenate(ids).astype(np.int64), pa.concat_arrays(hashes),
            np.concatenate(numbers))  # fmt: skip


def _stream(
    vectors: Vectors, fresh: frozenset[str] | set[str], only_fresh: bool
) -> Iterator[tuple[Path, np.ndarray, np.ndarray]]:
    """(path, ids, vectors) of every shard, or (only_fresh) of the fresh ones; every shard's
    ids are checked either way."""
    if not only_fresh:
        for path, (ids, batch) in zip(vectors.paths, vectors.batches(), strict=True):
            yield path, ids, batch
        return
    vectors.check_ids()
    for path in vectors.paths:
        if path.name in fresh:
            ids, batch = read_embeddings(path)
            yield path, ids, batch


class _Adding:
    """Added vectors gathered into large batches: one add_with_ids (and one exact scoring of
    the carried queries) per ADD_BATCH rows, not one per shard."""

    def __init__(self, index: Any, probe: _ProbeUpdate) -> None:
        self.index, self.probe = index, probe
        self.ids: list[np.ndarray] = []
        self.vectors: list[np.ndarray] = []
        self.rows = 0

    def put(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.ids.append(ids)
            self.vectors.append(np.ascontiguousarray(vectors, np.float32))
            self.rows += len(ids)
        if self.rows >= ADD_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        ids, vectors = np.concatenate(self.ids), np.concatenate(self.vectors)
        self.index.add_with_ids(vectors, ids)
        self.probe.see_added(ids, vectors)
        self.ids, self.vectors, self.rows = [], [], 0


class _ProbeUpdate:
    """The previous probe carried over: queries whose vectors stayed keep their exact
    candidates less the removed ids, plus the added vectors' best. Some queries are drawn from
    the added vectors and scored against every vector as the update streams the shards; a
    carried query whose remaining candidates no longer settle its top k (or its ties) is
    searched again over every vector."""

    def __init__(self, previous: IndexedVersion, delta: Delta, vectors: Vectors, cfg: IndexConfig,
                 manifest: dict[str, Any]) -> None:  # fmt: skip
        self.vectors, self.cfg = vectors, cfg
        self.rng = np.random.default_rng([cfg.seed, int(manifest.get("version") or 0)])
        old = load_probe(CollectionPaths(previous.folder).index, vectors.dim)
        self.k = min(cfg.recall_k, max(vectors.total - 1, 1))
        self.pool = pool_size(self.k)
        usable = old is not None and old.k == self.k and old.pool_ids is not None
        self.old = old if usable else None
        self._carry(self.old, delta)
        self.new_ids = NONE
        self.new_queries = np.zeros((0, vectors.dim), np.float32)
        self.new_top = (np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64))

    def _carry(self, old: Probe | None, delta: Delta) -> None:
        if old is None or old.pool_scores is None or old.pool_ids is None:
            self.ids, self.depth = NONE, NONE
            self.queries = np.zeros((0, self.vectors.dim), np.float32)
            self.scores = np.zeros((0, self.pool), np.float32)
            self.cands = np.zeros((0, self.pool), np.int64)
            return
        keep = ~np.isin(old.ids, delta.removed)
        self.ids, self.queries = old.ids[keep], old.queries[keep]
        scores, cands = _widen(old.pool_scores[keep], old.pool_ids[keep], self.pool)
        gone = np.isin(cands, delta.removed) | (cands < 0)
        scores[gone], cands[gone] = -np.inf, -1
        self.scores, self.cands = ranked(scores, cands)
        self.depth = np.isfinite(self.scores).sum(axis=1)  # exact ranks left per query

    def draw_new(
        self, vectors: Vectors, fresh: frozenset[str] | set[str], added: np.ndarray
    ) -> None:
        """Queries drawn from the added vectors of randomly picked fresh shards (read here, so
        the update's one pass over the shards can score them against every vector); carried
        queries make room so the probe keeps its size."""
        if self.old is None:
            return  # make_probe draws a whole new probe instead
        total = self.cfg.recall_queries
        want = min(len(added), max(int(np.ceil(NEW_QUERY_SHARE * total)), total - len(self.ids)))
        ids, vecs = [NONE], [np.zeros((0, vectors.dim), np.float32)]
        candidates = [p for p in vectors.paths if p.name in fresh]
        for at in self.rng.permutation(len(candidates)):
            if sum(len(i) for i in ids) >= want:
                break
            shard_ids, batch = read_embeddings(candidates[at])
            wanted = np.isin(shard_ids, added)
            ids.append(shard_ids[wanted])
            vecs.append(batch[wanted])
        pool_ids, pool_vecs = np.concatenate(ids), np.concatenate(vecs)
        pick = np.sort(self.rng.choice(len(pool_ids), min(want, len(pool_ids)), replace=False))
        self.new_ids = pool_ids[pick]
        self.new_queries = np.ascontiguousarray(pool_vecs[pick], np.float32)
        self.new_top = (np.zeros((len(pick), 0), np.float32), np.zeros((len(pick), 0), np.int64))
        surplus = len(self.ids) + len(pick) - total
        if surplus > 0:
            keep = np.sort(self.rng.choice(len(self.ids), len(self.ids) - surplus, replace=False))
            self.ids, self.queries, self.depth = (
                self.ids[keep],
                self.queries[keep],
                self.depth[keep],
            )
            self.scores, self.cands = self.scores[keep], self.cands[keep]

    def see_added(self, ids: np.ndarray, batch: np.ndarray) -> None:
        """Added vectors: candidates for the carried queries."""
        if len(self.ids):
            top = exact_top([(ids, batch)], self.ids, self.queries, self.pool, self.vectors.metric)
            self.scores, self.cands = _merge((self.scores, self.cands), top, self.pool)

    def see_all(self, ids: np.ndarray, batch: np.ndarray) -> None:
        """Every vector of the new version, shard by shard: the new queries' exact top."""
        if len(self.new_ids):
            top = exact_top([(ids, batch)], self.new_ids, self.new_queries, self.pool,
                            self.vectors.metric)  # fmt: skip
            self.new_top = _merge(self.new_top, top, self.pool)

    def search_new(self, index: Any) -> None:
        """The new queries' exact top from an exhaustive search of the updated index (for
        indexes that store the vectors themselves)."""
        if not len(self.new_ids):
            return
        import faiss

        ivf = faiss.try_extract_index_ivf(index)
        saved = int(ivf.nprobe) if ivf is not None else 0
        if ivf is not None:
            ivf.nprobe = ivf.nlist
        try:
            found, cands = index.search(self.new_queries, self.pool + 1)
        finally:
            if ivf is not None:
                ivf.nprobe = saved
        scores = found.astype(np.float32)
        if self.vectors.metric == "l2":  # exact_top's score: |q|^2 - |q - v|^2
            scores = np.einsum("ij,ij->i", self.new_queries, self.new_queries)[:, None] - scores
        drop = (cands == self.new_ids[:, None]) | (cands < 0)
        scores[drop], cands[drop] = -np.inf, -1
        self.new_top = ranked(scores, cands, self.pool)

    def finish(self) -> Probe | None:
        """The new version's probe: carried queries settled from their candidates (or searched
        again), new ones from their exact top."""
        if self.old is None:
            return make_probe(self.vectors, self.cfg, NONE)
        k, metric, again = self.k, self.vectors.metric, self.vectors.batches
        if len(self.ids):  # past a query's depth its candidates are not proven the best
            beyond = np.arange(self.pool)[None, :] >= self.depth[:, None]
            self.scores[beyond], self.cands[beyond] = -np.inf, -1
        redo = self._unsettled()
        kept = np.flatnonzero(~redo)
        parts = [self._settled(self.ids[kept], self.queries[kept], self.scores[kept],
                               self.cands[kept]),
                 self._settled(self.new_ids, self.new_queries, *self.new_top)]  # fmt: skip
        if redo.any():
            ids, queries = self.ids[redo], self.queries[redo]
            truth, ties, scores, cands = exact_probe(again, ids, queries, k, metric)
            parts.append((ids, queries, truth, ties, scores, cands))
        return _join(parts, k)

    def _settled(self, ids: np.ndarray, queries: np.ndarray, scores: np.ndarray,
                 cands: np.ndarray) -> tuple[Any, ...]:  # fmt: skip
        scores, cands = _widen(scores, cands, self.pool)
        truth, ties = truth_from_pool(scores, cands, queries, self.k, self.vectors.batches, ids,
                                      self.vectors.metric)  # fmt: skip
        return ids, queries, truth, ties, scores, cands

    def _unsettled(self) -> np.ndarray:
        """Carried queries whose proven candidates cannot settle the top k and its ties: no
        more than k left, or the last proven one ties with the k-th (more may lie beyond)."""
        if not len(self.ids):
            return np.zeros(0, bool)
        rows = np.arange(len(self.ids))
        kth = self.scores[:, self.k - 1]
        last = self.scores[rows, np.maximum(self.depth - 1, 0)]
        scale = np.maximum.reduce([np.abs(self.scores[:, 0]), np.abs(kth),
                                   np.einsum("ij,ij->i", self.queries, self.queries)])  # fmt: skip
        with np.errstate(invalid="ignore"):
            tied_last = last >= kth - TIE_TOLERANCE * np.maximum(scale, 1e-30)
        short = self.depth < self.pool
        return short & ((self.depth <= self.k) | tied_last)


def _merge(
    best: tuple[np.ndarray, np.ndarray], more: tuple[np.ndarray, np.ndarray], width: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best `width` (scores, ids) per row of two candidate sets, best first."""
    return ranked(np.concatenate([best[0], more[0]], axis=1),
                  np.concatenate([best[1], more[1]], axis=1), width)  # fmt: skip


def _widen(scores: np.ndarray, cands: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pools padded to `width` columns (-inf, -1), as float32 and int64 copies."""
    pad = width - scores.shape[1]
    scores, cands = scores.astype(np.float32), cands.astype(np.int64)
    if pad > 0:
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        cands = np.pad(cands, ((0, 0), (0, pad)), constant_values=-1)
    return scores[:, :width].copy(), cands[:, :width].copy()


def _join(parts: list[tuple[Any, ...]], k: int) -> Probe:
    ids = np.concatenate([p[0] for p in parts])
    queries = np.concatenate([p[1] for p in parts])
    truth = np.concatenate([p[2] for p in parts])
    width = max(p[3].shape[1] for p in parts)
    ties = np.concatenate([np.pad(p[3], ((0, 0), (0, width - p[3].shape[1])), constant_values=-1)
                           for p in parts])  # fmt: skip
    pool = max(p[4].shape[1] for p in parts)
    widened = [_widen(p[4], p[5], pool) for p in parts]
    scores = np.concatenate([w[0] for w in widened])
    cands = np.concatenate([w[1] for w in widened])
    order = np.argsort(ids, kind="stable")
    return Probe(ids[order], queries[order], truth[order], k, ties[order], scores[order],
                 cands[order])  # fmt: skip


def previous_version(root: Path) -> IndexedVersion | None:
    """The collection's published version, when it has one with a readable manifest."""
    from indexer.collection.layout import open_version, parse_manifest

    try:
        folder = open_version(root)
        return IndexedVersion(folder, parse_manifest(folder))
    except CollectionError:
        return None
