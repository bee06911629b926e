"""The index choice, size parsing and recall tuning as small pure functions, from tables."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.errors import InputError
from indexer.index.index_type import (
    check_index_type,
    choose_index,
    nlist_for,
    parse_size,
    train_size,
)
from indexer.index.tune import Probe, candidates, exact_neighbours, recall_bounds, tune
from tests.helpers import clustered_vectors

G, M = 1024**3, 1024**2


@pytest.mark.parametrize(
    ("n", "dim", "budget", "asked", "kind", "factory", "on_disk"),
    [
        (0, 64, 16 * G, "auto", "flat", "IDMap,Flat", False),
        (99_999, 64, 16 * G, "auto", "flat", "IDMap,Flat", False),
        (100_000, 64, 16 * G, "auto", "ivf", "IVF1024,Flat", False),
        (1_000_000, 64, 16 * G, "auto", "ivf", "IVF4096,Flat", False),
        (1_000_000, 512, 16 * G, "auto", "ivf", "IVF4096,Flat", False),
        (1_000_000, 64, 200 * M, "auto", "ivfsq", "IVF4096,SQ8", False),  # floats: 264 MB
        (1_000_000, 64, 50 * M, "auto", "ivf", "IVF4096,Flat", True),  # SQ8 too: 72 MB
        (50_000, 64, 1 * M, "auto", "ivf", "IVF512,Flat", True),  # even exact would not fit
        (10**9, 64, 16 * G, "auto", "ivf", "IVF131072_HNSW32,Flat", True),
        (10**9, 64, 100 * G, "auto", "ivfsq", "IVF131072_HNSW32,SQ8", False),
        (100_000_000, 64, 16 * G, "auto", "ivfsq", "IVF32768_HNSW32,SQ8", False),
        (10_000_000, 64, 16 * G, "auto", "ivf", "IVF16384_HNSW32,Flat", False),
        (1000, 64, 16 * G, "flat", "flat", "IDMap,Flat", False),
        (1000, 64, 16 * G, "ivf", "ivf", "IVF16,Flat", False),
        (1000, 64, 10_000, "ivf", "ivf", "IVF16,Flat", True),  # asked for, over budget: disk
        (5, 8, 16 * G, "ivf", "ivf", "IVF1,Flat", False),
        (1000, 64, 16 * G, "ivfsq", "ivfsq", "IVF16,SQ8", False),
        (1000, 64, 16 * G, "hnsw", "hnsw", "IDMap,HNSW32,Flat", False),
        (1000, 64, 16 * G, "IVF64,PQ8", "factory", "IVF64,PQ8", False),
    ],
)
def test_choose_index(
    n: int, dim: int, budget: int, asked: str, kind: str, factory: str, on_disk: bool
) -> None:
    choice = choose_index(n, dim, budget, asked)
    assert (choice.kind, choice.factory, choice.on_disk) == (kind, factory, on_disk)
    if asked == "auto":
        assert choice.memory_bytes <= budget or choice.on_disk, choice


@pytest.mark.parametrize("bad", ["nonsense", "ivf; rm -rf /", "", "hnsw32"])
def test_unknown_index_types_are_refused(bad: str) -> None:
    with pytest.raises(InputError, match="--index-type"):
        check_index_type(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512M", 512 * M), ("16G", 16 * G), ("1.5GiB", int(1.5 * G)), ("2t", 2 * 1024 * G),
     ("1000", 1000), ("64KB", 64 * 1024)],
)  # fmt: skip
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1G", "1.2.3M", "G"])
def test_parse_size_refuses_non_sizes(bad: str) -> None:
    with pytest.raises(InputError, match="512M"):
        parse_size(bad)


@pytest.mark.parametrize(
    ("n", "nlist", "train"),
    [(1, 1, 1), (49, 1, 49), (1000, 16, 800), (100_000, 1024, 51_200), (1_000_000, 4096, 204_800),
     (10**9, 131072, 6_553_600)],
)  # fmt: skip
def test_lists_and_training_sample(n: int, nlist: int, train: int) -> None:
    assert nlist_for(n) == nlist
    assert train_size(n, nlist) == train


def test_candidates_double_up_to_the_limit() -> None:
    assert list(candidates("nprobe", 20)) == [1, 2, 4, 8, 16, 20]
    assert list(candidates("efSearch", 100)) == [16, 32, 64, 100]
    assert list(candidates("nprobe", 20, start=3)) == [3, 6, 12, 20]  # an update: never lower


def test_recall_bounds() -> None:
    assert recall_bounds(np.ones(50)) == (1.0, 1.0)
    mean, low = recall_bounds(np.array([1.0, 0.0] * 50))
    assert mean == 0.5 and low == pytest.approx(0.5 - 3 * 0.5025 / 10, abs=1e-3)


def _batches(vectors: np.ndarray, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    ids = np.arange(len(vectors), dtype=np.int64) * 3 + 7  # ids that are not row numbers
    return [(ids[s : s + size], vectors[s : s + size]) for s in range(0, len(vectors), size)]


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_neighbours_streamed_equal_brute_force_without_self(metric: str) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((230, 8)).astype(np.float32)
    batches = _batches(vectors, 50)
    rows = np.array([0, 5, 77, 229])
    query_ids = rows * 3 + 7
    found = exact_neighbours(batches, query_ids, vectors[rows], 6, metric)
    if metric == "ip":
        scores = vectors[rows] @ vectors.T
    else:
        scores = -((vectors[rows][:, None, :] - vectors[None]) ** 2).sum(-1)
    scores[np.arange(len(rows)), rows] = -np.inf  # the query itself is left out
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :6] * 3 + 7
    np.testing.assert_array_equal(found, expected)


def test_tune_finds_the_smallest_nprobe_reaching_the_target() -> None:
    import faiss

    vectors = clustered_vectors(20_000, 32, clusters=200, spread=0.2, seed=0)
    ids = np.arange(len(vectors), dtype=np.int64)
    index = faiss.index_factory(32, "IVF128,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[:6400])
    index.add_with_ids(vectors, ids)
    rows = np.random.default_rng(1).choice(len(vectors), 400, replace=False)
    truth = exact_neighbours([(ids, vectors)], ids[rows], vectors[rows], 10, "ip")
    probe = Probe(ids[rows], vectors[rows], truth, 10)
    tuning = tune(index, "nprobe", 128, probe, target=0.95)
    assert tuning.target_met and tuning.recall_low is not None and tuning.recall_low >= 0.95
    assert tuning.value is not None and 4 < tuning.value < 128
    curve = {point["nprobe"]: point["recall_low"] for point in tuning.curve}
    assert curve[tuning.value] >= 0.95
    assert all(low < 0.95 for v, low in curve.items() if v < tuning.value)
    assert tuning.value - 1 in curve or tuning.value == 1  # bisected down to the smallest
    assert index.nprobe == tuning.value


def test_tune_reports_a_target_it_cannot_reach() -> None:
    import faiss

    vectors = clustered_vectors(3000, 16, clusters=30, spread=0.3, seed=2)
    ids = np.arange(len(vectors), dtype=np.int64)
    index = faiss.IndexIDMap(faiss.IndexHNSWFlat(16, 4, faiss.METRIC_INNER_PRODUCT))
    index.add_with_ids(vectors, ids)
    rows = np.arange(0, 3000, 15)
    truth = exact_neighbours([(ids, vectors)], ids[rows], vectors[rows], 10, "ip")
    tuning = tune(index, "efSearch", 16, Probe(ids[rows], vectors[rows], truth, 10), 1.01)
    assert not tuning.target_met and tuning.value == 16


@pytest.mark.parametrize(
    ("total", "n", "avoid", "disjoint"),
    [(1000, 50, np.arange(0, 1000, 5), True), (100, 30, np.arange(50), True),
     (100, 60, np.arange(50), False), (10, 20, None, False), (1_000_000, 1000, None, False)],
)  # fmt: skip
def test_draw_positions(total: int, n: int, avoid: np.ndarray | None, disjoint: bool) -> None:
    from indexer.index.faiss_index import draw_positions

    drawn = draw_positions(total, n, seed=3, avoid=avoid)
    assert len(drawn) == min(n, total) == len(set(drawn.tolist()))
    assert (np.diff(drawn) > 0).all() and drawn.min() >= 0 and drawn.max() < total
    if disjoint:
        assert not np.isin(drawn, avoid).any()
    np.testing.assert_array_equal(drawn, draw_positions(total, n, seed=3, avoid=avoid))


def test_parse_index_flags() -> None:
    from indexer.index.index_type import parse_index_flags

    assert parse_index_flags(None, None) == (None, None)  # not given: keep what was recorded
    assert parse_index_flags("IVF64,SQ8", "1G") == ("IVF64,SQ8", G)
    with pytest.raises(InputError, match="--index-type"):
        parse_index_flags("bogus", None)
    with pytest.raises(InputError, match="--max-index-memory"):
        parse_index_flags(None, "lots")
