"""Measure an index's recall@k against exact search and tune nprobe/efSearch to a target recall."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TIMING_ROUNDS = 3
TIMING_BUDGET = 1.0  # seconds: stop timing rounds once this much was spent
CONFIDENCE_Z = 3.0  # tuning asks the recall's lower bound (mean - 3 SE) to reach the target
EXACT_BLOCK = 8192  # stored vectors scored at once: ~100 MB of scratch for 1000 queries
PLATEAU = 0.001  # recall gained by doubling below this, twice running: the index can do no better
TIE_TOLERANCE = 1e-5  # a neighbour this near the k-th (relative to the scores' scale) ties with it
TIES_KEPT = 4  # ties with the k-th neighbour are looked for among the exact top (1 + 4) * k


@dataclass(frozen=True)
class Probe:
    """Stored vectors used as queries, with their exact neighbours (themselves left out)."""

    ids: np.ndarray  # (n,) the queries' own ids
    queries: np.ndarray  # (n, dim) float32
    truth: np.ndarray  # (n, k) exact neighbour ids, best first, the query's own id excluded
    k: int
    ties: np.ndarray | None = None  # (n, t) other ids as near as each k-th; -1 padded
    # each query's exact top POOL (scores, ids; -inf/-1 past the collection's end): what an
    # index update starts from instead of scanning every vector again (indexupdate.py)
    pool_scores: np.ndarray | None = None
    pool_ids: np.ndarray | None = None


@dataclass(frozen=True)
class Tuning:
    """The tuned search parameter and what it measured."""

    param: str | None  # nprobe, efSearch, or None (nothing to tune)
    value: int | None
    recall: float | None
    recall_low: float | None  # lower confidence bound of recall (what must reach the target)
    queries_per_second: float | None
    target_met: bool
    curve: list[dict[str, float]] = field(default_factory=list)

    def to_meta(self, target: float, probe: Probe | None) -> dict[str, Any]:
        return {
            "params": {} if self.param is None else {self.param: self.value},
            "recall_at_k": None if self.recall is None else round(self.recall, 4),
            "recall_lower_bound": None if self.recall_low is None else round(self.recall_low, 4),
            "recall_k": None if probe is None else probe.k,
            "recall_queries": 0 if probe is None else len(probe.ids),
            "target_recall": target,
            "target_met": self.target_met,
            "queries_per_second": self.queries_per_second,
            "tuning": self.curve,
        }


def exact_neighbours(
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    query_ids: np.ndarray,
    queries: np.ndarray,
    k: int,
    metric: str,
) -> np.ndarray:
    """Brute-force top-k ids per query over streamed (ids, vectors) batches, self excluded."""
    return exact_neighbours_and_ties(batches, query_ids, queries, k, metric)[0]


def exact_neighbours_and_ties(
    batches: Iterable[tuple[np.ndarray, np.ndarray]] | Callable[[], Iterable[Any]],
    query_ids: np.ndarray,
    queries: np.ndarray,
    k: int,
    metric: str,
) -> tuple[np.ndarray, np.ndarray]:
    """exact_neighbours, and the ids tied with each k-th neighbour (tied_ids): returning one of
    those instead is no miss. Given a callable for the batches, the queries whose candidates
    are tied to the last are searched again with four times as many, until the ties end."""
    truth, ties, _, _ = exact_probe(batches, query_ids, queries, k, metric)
    return truth, ties


def pool_size(k: int) -> int:
    """Exact candidates kept per query: the k neighbours and room for their ties."""
    return k * (1 + TIES_KEPT)


def exact_probe(
    batches: Iterable[tuple[np.ndarray, np.ndarray]] | Callable[[], Iterable[Any]],
    query_ids: np.ndarray,
    queries: np.ndarray,
    k: int,
    metric: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """exact_neighbours_and_ties, and each query's exact top pool_size(k) (scores, ids)."""
    again = batches if callable(batches) else None
    first: Any = again() if again is not None else batches
    best_s, best_i = exact_top(first, query_ids, queries, pool_size(k), metric)
    truth, ties = truth_from_pool(best_s, best_i, queries, k, again, query_ids, metric)
    return truth, ties, best_s, best_i


def truth_from_pool(
    best_s: np.ndarray,
    best_i: np.ndarray,
    queries: np.ndarray,
    k: int,
    again: Callable[[], Iterable[Any]] | None,
    query_ids: np.ndarray,
    metric: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top k and the ties with each k-th, from each query's exact top candidates;
    rows whose every candidate after the k-th ties are searched again wider (with `again`)."""
    pool = pool_size(k)
    scale = np.maximum(np.einsum("ij,ij->i", queries, queries), 1e-30)
    ties = tied_ids(best_s, best_i, k, scale)
    rows = _saturated(ties, pool, k)
    while again is not None and len(rows):
        pool *= 4
        wide_s, wide_i = exact_top(again(), query_ids[rows], queries[rows], pool, metric)
        if wide_i.shape[1] < pool:  # the whole collection is in: nothing further to look at
            again = None
        wider = tied_ids(wide_s, wide_i, k, scale[rows], start=0)  # another k-th may be first
        ties = _pad(ties, wider.shape[1])
        ties[rows] = _pad(wider, ties.shape[1])
        rows = rows[_saturated(wider, pool, k)]
    return np.ascontiguousarray(best_i[:, :k]), ties


def _saturated(ties: np.ndarray, pool: int, k: int) -> np.ndarray:
    """Rows whose every candidate after the k-th is tied: more ties may lie beyond the pool."""
    if ties.shape[1] < pool - k or not ties.shape[1]:
        return np.zeros(0, np.int64)
    return np.flatnonzero(ties[:, -1] >= 0)


def _pad(array: np.ndarray, width: int) -> np.ndarray:
    """array widened to `width` columns with -1 (never narrowed)."""
    if array.shape[1] >= width:
        return array
    return np.pad(array, ((0, 0), (0, width - array.shape[1])), constant_values=-1)


def tied_ids(
    scores: np.ndarray, ids: np.ndarray, k: int, scale: np.ndarray, start: int | None = None
) -> np.ndarray:
    """Of candidates ranked best first, the ids from position `start` (default: after the
    k-th) whose score equals the k-th's within TIE_TOLERANCE of the scale (the scores', or the
    query's squared norm); -1 padded."""
    start = k if start is None else start
    if scores.shape[1] <= start:
        return np.full((len(scores), 0), -1, dtype=np.int64)
    rest = scores[:, start:]
    kth = scores[:, k - 1 : k]
    scale = np.maximum(np.maximum(np.abs(scores[:, :1]), np.abs(kth)), scale[:, None])
    tied = np.isfinite(rest) & (rest >= kth - TIE_TOLERANCE * scale)
    return np.where(tied, ids[:, start:], -1)


def ranked(
    scores: np.ndarray, ids: np.ndarray, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's (scores, ids) best first (ties in their order), the first `width` kept."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :width]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def exact_top(
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    query_ids: np.ndarray,
    queries: np.ndarray,
    k: int,
    metric: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the top k per query, best first (-1 ids past the collection's end)."""
    n = len(queries)
    best_s = np.full((n, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((n, 0), dtype=np.int64)
    for ids, vectors in _blocks(batches):
        scores = queries @ vectors.T
        if metric == "l2":  # rank by -||q - v||^2 + ||q||^2
            scores = 2 * scores - np.einsum("ij,ij->i", vectors, vectors)[None, :]
        scores[ids[None, :] == query_ids[:, None]] = -np.inf
        take = min(k, scores.shape[1])
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], axis=1)
        best_s, best_i = ranked(cand_s, np.concatenate([best_i, ids[top]], axis=1), k)
    best_i[~np.isfinite(best_s)] = -1
    return best_s, best_i


def query_recalls(found: np.ndarray, probe: Probe) -> np.ndarray:
    """Per query: the share of its exact neighbours found among the first k results that are
    not the query itself; one tied with the k-th (probe.ties) counts as found: ties are ties."""
    out = np.ones(len(probe.ids))
    ties = probe.ties if probe.ties is not None else np.full((len(probe.ids), 0), -1)
    rows = zip(probe.ids.tolist(), found.tolist(), probe.truth.tolist(), ties.tolist(), strict=True)
    for n, (own, row, truth, tied) in enumerate(rows):
        wanted = {t for t in truth if t >= 0}
        accepted = wanted.union(t for t in tied if t >= 0)
        got = [i for i in row if i != own and i >= 0][: probe.k]
        out[n] = min(1.0, len(accepted.intersection(got)) / len(wanted)) if wanted else 1.0
    return out


def _blocks(
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for ids, vectors in batches:
        for start in range(0, len(ids), EXACT_BLOCK):
            yield ids[start : start + EXACT_BLOCK], vectors[start : start + EXACT_BLOCK]


def recall_at_k(found: np.ndarray, probe: Probe) -> float:
    return float(query_recalls(found, probe).mean())


def recall_bounds(recalls: np.ndarray) -> tuple[float, float]:
    """Mean recall and its lower confidence bound (queries are the independent samples)."""
    mean = float(recalls.mean())
    if len(recalls) < 2:
        return mean, mean
    return mean, mean - CONFIDENCE_Z * float(recalls.std(ddof=1)) / len(recalls) ** 0.5


def queries_per_second(
    search: Callable[[np.ndarray, int], Any], queries: np.ndarray, k: int
) -> float:
    """Batch queries/s, best of up to TIMING_ROUNDS within TIMING_BUDGET (machines are noisy)."""
    best, spent = float("inf"), 0.0
    for _ in range(TIMING_ROUNDS):
        start = time.perf_counter()
        search(queries, k)
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > TIMING_BUDGET:
            break
    return round(len(queries) / max(best, 1e-9), 1)


def candidates(param: str, limit: int, start: int | None = None) -> Iterator[int]:
    """Doubling values of the search parameter, from the cheapest useful one (or start) up to
    limit."""
    value = min(start, limit) if start else 1 if param == "nprobe" else 16
    while value < limit:
        yield value
        value *= 2
    yield limit


def tune(
    index: Any, param: str | None, limit: int, probe: Probe, target: float, start: int | None = None
) -> Tuning:
    """The smallest parameter value whose recall@k lower bound reaches target (doubling, then
    bisection), never below `start` when given (an updated index keeps its tuned value unless
    the recall fell); with nothing to tune, the index's recall measured once."""
    if param is None:
        began = time.perf_counter()
        found = index.search(probe.queries, probe.k + 1)[1]
        qps = round(len(probe.queries) / max(time.perf_counter() - began, 1e-9), 1)
        rec, low = recall_bounds(query_recalls(found, probe))
        return Tuning(None, None, rec, low, qps, low >= target)
    measured: dict[int, tuple[float, float]] = {}

    def measure(value: int) -> tuple[float, float]:
        if value not in measured:
            set_param(index, param, value)
            found = index.search(probe.queries, probe.k + 1)[1]
            measured[value] = recall_bounds(query_recalls(found, probe))
        return measured[value]

    passing = _first_passing(measure, candidates(param, limit, start), target)
    if passing is None:
        best = max(measured, key=lambda v: (measured[v][1], -v))
        return _finish(index, param, best, measured, probe, met=False)
    floor = 0 if param == "nprobe" else probe.k  # efSearch below k is never used
    floor = max(floor, (start or 1) - 1)
    lower = max((v for v in measured if v < passing), default=floor)
    while passing - lower > 1:  # recall grows with the parameter: bisect to the smallest
        middle = (lower + passing) // 2
        lower, passing = (middle, passing) if measure(middle)[1] < target else (lower, middle)
    return _finish(index, param, passing, measured, probe, met=True)


def _first_passing(
    measure: Callable[[int], tuple[float, float]], values: Iterator[int], target: float
) -> int | None:
    previous, flat_steps = -1.0, 0
    for value in values:
        rec, low = measure(value)
        if low >= target:
            return value
        flat_steps = flat_steps + 1 if rec - previous < PLATEAU else 0
        if flat_steps >= 2:
            return None
        previous = rec
    return None


def _finish(
    index: Any,
    param: str,
    value: int,
    measured: dict[int, tuple[float, float]],
    probe: Probe,
    *,
    met: bool,
) -> Tuning:
    set_param(index, param, value)
    qps = queries_per_second(index.search, probe.queries, probe.k)
    curve = [
        {param: v, "recall": round(r, 4), "recall_low": round(low, 4)}
        for v, (r, low) in sorted(measured.items())
    ]
    rec, low = measured[value]
    return Tuning(param, value, rec, low, qps, met, curve)


def set_param(index: Any, param: str, value: int) -> None:
    """Set nprobe or efSearch through any wrapper (id map, pre-transform, refine)."""
    import faiss

    faiss.ParameterSpace().set_index_parameter(index, param, value)
