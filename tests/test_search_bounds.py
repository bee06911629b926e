"""No silently wrong answers: bounded search parameters, ties, thresholds, widened filters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import Result

from indexer import Collection
from indexer.errors import InputError
from indexer.index.faiss_index import EF_LIMIT, checked_param
from indexer.index.tune import Probe, exact_neighbours_and_ties, query_recalls, tied_ids
from indexer.query.collection import passes_threshold, search_widths
from indexer.synthetic import write_corpus
from tests.helpers import BUILD_FLAGS, clustered_vectors, exact_top_k, run_cli, write_vectors


def keys_for(n: int) -> list[str]:
    return [f"item-{i:05d}" for i in range(n)]


def indexed(tmp_path: Path, vectors: np.ndarray, name: str, *flags: object) -> Path:
    write_vectors(tmp_path / f"{name}.parquet", vectors, keys_for(len(vectors)))
    out = tmp_path / f"{name}.idx"
    result = run_cli("index", "--from-parquet", tmp_path / f"{name}.parquet", "--out", out, *flags)
    assert result.exit_code == 0, result.output
    return out


def hit_keys(output: str) -> list[str]:
    return [hit["key"] for hit in json.loads(output)[0]["results"]]


def one_line_error(result: Result, *words: str) -> None:
    output = result.output
    assert result.exit_code == 2, output
    assert len(output.strip().splitlines()) == 1 and "Traceback" not in output, output
    assert all(word in output for word in words), output


# 1. search parameters: whole numbers >= 1; nprobe capped at nlist, efSearch at most EF_LIMIT


@pytest.mark.parametrize(
    ("name", "value", "limit", "expected"),
    [("nprobe", 5, 64, 5), ("nprobe", 64, 64, 64), ("nprobe", 65, 64, 64),
     ("nprobe", 2**31, 64, 64), ("nprobe", 10**12, 64, 64), ("nprobe", np.int64(3), 64, 3),
     ("efSearch", 1, EF_LIMIT, 1), ("efSearch", EF_LIMIT, EF_LIMIT, EF_LIMIT),
     ("efSearch", np.int32(64), EF_LIMIT, 64)],
)  # fmt: skip
def test_a_search_parameter_is_bounded(name: str, value: object, limit: int, expected: int) -> None:
    assert checked_param(name, value, limit) == expected
    assert type(checked_param(name, value, limit)) is int


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [("efSearch", EF_LIMIT + 1, "at most 4096"), ("efSearch", 2**31, "at most 4096"),
     ("efSearch", 10**9, "at most 4096"), ("nprobe", 0, "at least 1"),
     ("efSearch", -5, "at least 1"), ("nprobe", True, "whole number"),
     ("nprobe", 2.0, "whole number"), ("efSearch", "64", "whole number"),
     ("nprobe", None, "whole number")],
)  # fmt: skip
def test_a_bad_search_parameter_is_refused(name: str, value: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        checked_param(name, value, EF_LIMIT if name == "efSearch" else 64)


def test_ef_is_bounded_on_an_hnsw_collection(tmp_path: Path) -> None:
    vectors = clustered_vectors(600, 16, clusters=20, spread=0.3, seed=0)
    out = indexed(tmp_path, vectors, "hnsw", "--index-type", "hnsw")
    base = ("query", "--id", "item-00007", "--index", out, "-k", "5", "--json")
    for ef in ("2147483648", "1000000000", str(EF_LIMIT + 1)):
        one_line_error(run_cli(*base, "--ef", ef), "efSearch", "at most 4096")
    widest = run_cli(*base, "--ef", str(EF_LIMIT))
    assert widest.exit_code == 0, widest.output
    expected = [keys_for(600)[i] for i in exact_top_k(vectors, vectors[7:8], 5)[0]]
    assert hit_keys(widest.output) == expected
    for bad in ({"efSearch": 10**9}, {"efSearch": 0}, {"efSearch": 2.5}, {"efSearch": True}):
        with pytest.raises(InputError):
            Collection.open(out, params=bad)
    c = Collection.open(out, params={"efSearch": np.int64(EF_LIMIT)})
    assert c.search_params == {"efSearch": EF_LIMIT}
    with pytest.raises(InputError, match="at most 4096"):
        c.set_search_params({"efSearch": 2**31})
    assert c.search_params == {"efSearch": EF_LIMIT}  # a refused value changes nothing


def test_nprobe_is_capped_at_nlist_on_an_ivf_collection(tmp_path: Path) -> None:
    vectors = clustered_vectors(3000, 16, clusters=30, spread=0.3, seed=1)
    out = indexed(tmp_path, vectors, "ivf", "--index-type", "ivf")
    nlist = Collection.open(out).index_meta["nlist"]
    expected = [keys_for(3000)[i] for i in exact_top_k(vectors, vectors[11:12], 10)[0]]
    base = ("query", "--id", "item-00011", "--index", out)
    for nprobe in ("2147483648", str(10**12), str(nlist + 1)):
        result = run_cli(*base, "--nprobe", nprobe, "--json")
        assert result.exit_code == 0, result.output
        assert hit_keys(result.output) == expected  # every list scanned: the exact answer
    c = Collection.open(out)
    c.set_search_params({"nprobe": 10**12})
    assert c.search_params == {"nprobe": nlist} and c.index_meta["params"] == {"nprobe": nlist}
    assert Collection.open(out, params={"nprobe": 2**31}).search_params == {"nprobe": nlist}
    for bad in ({"nprobe": 0}, {"nprobe": "8"}, {"nprobe": 1.5}, {"probes": 8}):
        with pytest.raises(InputError):
            c.set_search_params(bad)
    with pytest.warns(UserWarning, match="no efSearch"):
        c.set_search_params({"efSearch": 16})  # not this index's: left alone
    with pytest.raises(InputError, match="no efSearch"):
        c.set_search_params({"efSearch": 16}, strict=True)
    one_line_error(run_cli(*base, "--ef", "16"), "no efSearch")


# 2. recall counts a neighbour tied with the k-th true one as found


def tied_groups(groups: int, size: int, dim: int = 16) -> np.ndarray:
    centres = np.random.default_rng(7).standard_normal((groups, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return np.repeat(centres, size, axis=0)  # `size` identical vectors per group


INF = float("inf")


@pytest.mark.parametrize(
    ("scores", "k", "scale", "expected"),
    [([0.9, 0.5, 0.5, 0.5, 0.2], 2, 1.0, [3, 4, -1]),  # equal to the k-th: tied
     ([0.9, 0.5, 0.499999, 0.4999, 0.2], 2, 1.0, [3, -1, -1]),  # within 1e-5 of the scale
     ([90.0, 50.0, 49.9999, 49.99, 0.2], 2, 1.0, [3, -1, -1]),  # the scale is the scores'
     ([0.9, 0.5, 0.5 - 2e-5, 0.4, 0.2], 2, 1.0, [-1, -1, -1]),
     ([0.9, 0.5, 0.49, -INF, -INF], 2, 1.0, [-1, -1, -1]),  # past the collection's end
     ([0.9, -INF, -INF, -INF, -INF], 2, 1.0, [-1, -1, -1]),  # no k-th at all
     ([0.9, 0.5], 2, 1.0, [])],
)  # fmt: skip
def test_tied_ids(scores: list[float], k: int, scale: float, expected: list[int]) -> None:
    ids = np.arange(len(scores), dtype=np.int64) + 1
    tied = tied_ids(np.array([scores], np.float32), ids[None, :], k, np.array([scale]))
    assert tied.tolist() == [expected]


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ties_with_the_kth_neighbour_are_found_neighbours(metric: str) -> None:
    vectors = tied_groups(3, 5)  # groups of 5: each query has 4 equal neighbours
    ids = np.arange(len(vectors), dtype=np.int64) + 100
    truth, ties = exact_neighbours_and_ties([(ids, vectors)], ids[[0, 5]], vectors[[0, 5]], 2,
                                            metric)  # fmt: skip
    probe = Probe(ids[[0, 5]], vectors[[0, 5]], truth, 2, ties)
    assert probe.ties is not None
    assert set(truth[0]) | set(probe.ties[0]) - {-1} == {101, 102, 103, 104}
    table = [  # what a search returned (the query first), and its recall
        ([[100, 103, 104], [105, 108, 109]], [1.0, 1.0]),  # other members of the tie: found
        ([[103, 104, 100], [109, 105, 106]], [1.0, 1.0]),
        ([[100, 103, 110], [105, 110, 111]], [0.5, 0.0]),  # another group's items: missed
        ([[100, 103, -1], [-1, -1, -1]], [0.5, 0.0]),
    ]
    for found, recalls in table:
        np.testing.assert_array_equal(query_recalls(np.array(found), probe), recalls)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_recall_of_an_exact_search_over_tied_vectors_is_one(tmp_path: Path, kind: str) -> None:
    out = indexed(tmp_path, tied_groups(100, 12), kind, "--index-type", kind)  # k=10 of 11 ties
    meta = json.loads((out / "index" / "meta.json").read_text())
    assert meta["recall_at_k"] == 1.0 and meta["target_met"], meta
    if kind == "ivf":  # recall 1 from the first list: no need to scan more
        assert meta["params"] == {"nprobe": 1}, meta


def test_recall_counts_ties_far_past_the_first_candidates(tmp_path: Path) -> None:
    """200 identical vectors among 500: ties reach far beyond the first (1 + 4) * k."""
    vectors = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[:200] = vectors[0]
    out = indexed(tmp_path, vectors, "flat", "--index-type", "flat")
    meta = json.loads((out / "index" / "meta.json").read_text())
    assert meta["recall_at_k"] == 1.0 and meta["target_met"], meta


# 3. thresholds compare with a float32 tolerance: exact duplicates meet --threshold 1 (or 0)


@pytest.mark.parametrize(
    ("score", "threshold", "metric", "expected"),
    [(0.99999994, 1.0, "ip", True), (1.0000001, 1.0, "ip", True), (0.9999, 1.0, "ip", False),
     (0.95, 0.95, "ip", True), (0.94, 0.95, "ip", False), (-2.0, -2.0000001, "ip", True),
     (2.4e-7, 0.0, "l2", True), (0.0, 0.0, "l2", True), (1e-4, 0.0, "l2", False),
     (100.00005, 100.0, "l2", True), (100.01, 100.0, "l2", False)],
)  # fmt: skip
def test_within_the_threshold(score: float, threshold: float, metric: str, expected: bool) -> None:
    assert passes_threshold(score, threshold, metric) is expected


@pytest.mark.parametrize(("metric", "threshold"), [("ip", "1"), ("l2", "0")])
def test_every_exact_duplicate_meets_the_strictest_threshold(
    tmp_path: Path, metric: str, threshold: str
) -> None:
    base = np.random.default_rng(3).standard_normal((100, 32)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    out = indexed(tmp_path, np.concatenate([base, base]), "dups", "--metric", metric)
    result = run_cli("dedup", out, "--threshold", threshold, "--out", tmp_path / "d.parquet")
    assert result.exit_code == 0, result.output
    groups = pq.read_table(tmp_path / "d.parquet").to_pylist()
    pairs = {}
    for row in groups:
        pairs.setdefault(row["group"], set()).add(row["key"])
    assert sorted(map(sorted, pairs.values())) == [
        [f"item-{i:05d}", f"item-{i + 100:05d}"] for i in range(100)
    ]
    for key in ("item-00000", "item-00042", "item-00199"):
        query = run_cli("query", "--id", key, "--index", out, "--threshold", threshold, "--json")
        assert query.exit_code == 0, query.output
        assert len(hit_keys(query.output)) == 2, query.output  # itself and its duplicate


# 4. --where widens the search until it has k matches (or searched everything)


@pytest.mark.parametrize(
    ("k", "total", "expected"),
    [(10, 28, [28]), (1, 1000, [200, 400, 800, 1000]), (10, 250, [200, 250]),
     (50, 5000, [1000, 2000, 4000, 5000]), (10, 200, [200]), (3, 0, [1])],
)  # fmt: skip
def test_widths_double_up_to_the_collection(k: int, total: int, expected: list[int]) -> None:
    assert list(search_widths(k, total)) == expected


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """220 scenes built with --labels 1: more than the first 200 neighbours a filter asks for."""
    root = tmp_path_factory.mktemp("labelled")
    write_corpus(root / "src", 220, duplicates=0, seed=5)
    result = run_cli("build", root / "src", "--out", root / "c", *BUILD_FLAGS, "--labels", "1")
    assert result.exit_code == 0, result.output
    return root / "c"


def test_where_finds_a_match_beyond_the_first_200_neighbours(labelled: Path) -> None:
    rows = pq.read_table(labelled / "shards").to_pylist()
    vectors = np.stack([np.asarray(r["embedding"], np.float32) for r in rows])
    labels = [r["label_name"][0] for r in rows]
    order = np.argsort(-(vectors @ vectors.T), axis=1, kind="stable")  # nearest first
    singles = [n for n, label in enumerate(labels) if labels.count(label) == 1]
    rank, query, target = max(
        (int(np.flatnonzero(order[q] == t)[0]), q, t) for t in singles for q in range(len(rows))
    )
    assert rank >= 205, rank  # the only item of its label is far beyond the first 200
    result = run_cli("query", "--id", rows[query]["key"], "--index", labelled,
                     "--where", f"label={labels[target]}", "-k", "3", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)[0]["results"]
    assert [(h["key"], h["rank"]) for h in hits] == [(rows[target]["key"], 1)]
    both = Collection.open(labelled).query(ids=[rows[query]["key"], rows[target]["key"]], k=1,
                                           where=f"label={labels[target]}")  # fmt: skip
    assert [[h.key for h in r.hits] for r in both] == [[rows[target]["key"]]] * 2
    common = max(set(labels), key=labels.count)
    kept = Collection.open(labelled).query(ids=[rows[query]["key"]], k=200,
                                           where=f"label={common}")  # fmt: skip
    assert len(kept[0].hits) == min(200, labels.count(common))
    assert [h.rank for h in kept[0].hits] == list(range(1, len(kept[0].hits) + 1))
