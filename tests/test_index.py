"""The index half: --from-parquet, chosen and tuned indexes, on-disk lists, the Python API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from indexer import Collection
from indexer.errors import InputError
from tests.helpers import (
    BUILD_FLAGS,
    clustered_vectors,
    copy_of,
    exact_top_k,
    run_cli,
    write_vectors,
)


def keys_for(n: int, start: int = 0) -> list[str]:
    return [f"item-{i:05d}" for i in range(start, start + n)]


def index_parquet(*args: object) -> None:
    result = run_cli("index", "--from-parquet", *args)
    assert result.exit_code == 0, result.output


def test_from_parquet_reads_both_list_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((700, 16)).astype(np.float32)
    a = write_vectors(tmp_path / "a.parquet", vectors[:400], keys_for(400),
                      caption=[f"caption {i}" for i in range(400)])  # fmt: skip
    b = write_vectors(tmp_path / "b.parquet", vectors[400:], keys_for(300, 400), fixed=False)
    out = tmp_path / "vectors.idx"
    index_parquet(a, b, "--out", out, "--shard-size", 150)

    table = pq.read_table(out / "shards").sort_by("id")
    assert table.column("id").to_pylist() == list(range(700))
    assert table.column("key").to_pylist() == keys_for(700)
    stored = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(stored, vectors)  # as given: float64 lists cast to float32
    captions = table.column("caption").to_pylist()
    assert captions[:2] == ["caption 0", "caption 1"] and captions[400:] == [None] * 300
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] is None and manifest["normalized"] is False
    assert len(manifest["shards"]) == 5

    collection = Collection.open(out)
    scores, keys = collection.search(vectors[::50], k=5)
    assert scores.shape == keys.shape == (14, 5) and scores.dtype == np.float32
    expected = np.array(keys_for(700), dtype=object)[exact_top_k(vectors, vectors[::50], 5)]
    assert (keys == expected).all()
    info = run_cli("info", out)
    assert "none: vectors indexed from Parquet" in info.output, info.output


def test_from_parquet_normalize_and_integer_keys(tmp_path: Path) -> None:
    import pyarrow as pa

    vectors = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32) * 3
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 8)
    pq.write_table(pa.table({"row": pa.array(range(50), pa.int64()), "vec": emb}),
                   tmp_path / "x.parquet")  # fmt: skip
    out = tmp_path / "n.idx"
    index_parquet(tmp_path, "--out", out, "--embedding-column", "vec", "--key-column", "row",
                  "--normalize")  # fmt: skip
    stored = np.stack(pq.read_table(out / "shards").column("embedding").to_numpy(False))
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1, atol=1e-6)
    _, keys = Collection.open(out).search(vectors[7] * 0.1, k=1)  # queries are normalised too
    assert keys[0, 0] == "7"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        ({"drop": "key"}, "--key-column"),
        ({"embedding": ["not", "floats", "x"]}, "--embedding-column"),
        (
            {"embedding": [[1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0]]},
            "row 1 has a vector of length 3",
        ),
        ({"embedding": [[1.0, 0.0], [float("nan"), 1.0], [1.0, 1.0]]}, "row 1 has NaN"),
        ({"embedding": [[1.0, 0.0], None, [1.0, 1.0]]}, "row 1 has no embedding"),
        ({"key": ["a", "b", "a"]}, "key 'a' appears more than once"),
    ],
)
def test_from_parquet_bad_input_is_a_one_line_error_and_keeps_the_collection(
    tmp_path: Path, mutate: dict, message: str
) -> None:
    import pyarrow as pa

    out = tmp_path / "kept.idx"
    good = write_vectors(tmp_path / "good.parquet", np.eye(3, 2, dtype=np.float32), ["a", "b", "c"])
    index_parquet(good, "--out", out)
    columns = {"key": ["a", "b", "c"], "embedding": [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]}
    columns.update({k: v for k, v in mutate.items() if k != "drop"})
    columns.pop(mutate.get("drop", ""), None)
    pq.write_table(pa.table(columns), tmp_path / "bad.parquet")
    result = run_cli("index", "--from-parquet", tmp_path / "bad.parquet", "--out", out)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert Collection.open(out).search(np.array([[1.0, 0.0]]), 1)[1][0, 0] == "a"


def test_ivf_reaches_the_target_recall_on_unseen_queries(tmp_path: Path) -> None:
    vectors = clustered_vectors(30_000, 32, clusters=300, spread=0.2, seed=0)
    write_vectors(tmp_path / "v.parquet", vectors, keys_for(len(vectors)))
    out = tmp_path / "ivf.idx"
    index_parquet(tmp_path / "v.parquet", "--out", out, "--index-type", "ivf")
    collection = Collection.open(out)
    meta = collection.index_meta
    assert meta["type"] == "ivf" and meta["target_met"] and meta["recall_lower_bound"] >= 0.95
    assert 1 < meta["params"]["nprobe"] < meta["nlist"]  # tuned, not exhaustive

    queries = clustered_vectors(300, 32, clusters=300, spread=0.2, seed=99)  # not stored
    _, keys = collection.search(queries, k=10)
    truth = np.array(keys_for(len(vectors)), dtype=object)[exact_top_k(vectors, queries, 10)]
    recall = np.mean([len(set(k) & set(t)) / 10 for k, t in zip(keys, truth, strict=True)])
    assert recall >= 0.95, recall
    collection.set_search_params({"nprobe": 1})
    _, fewer = collection.search(queries, k=10)
    assert np.mean([len(set(k) & set(t)) / 10 for k, t in zip(fewer, truth, strict=True)]) < recall


def test_ids_map_back_to_keys_across_shards_for_every_index_type(tmp_path: Path) -> None:
    vectors = np.random.default_rng(3).standard_normal((3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # well separated
    keys = np.array(keys_for(3000), dtype=object)
    order = np.random.default_rng(0).permutation(3000)  # keys not in vector order
    write_vectors(tmp_path / "v.parquet", vectors[order], list(keys[order]))
    out = tmp_path / "types.idx"
    index_parquet(tmp_path / "v.parquet", "--out", out, "--shard-size", 250)
    near = vectors[::30] + 0.002 * np.random.default_rng(5).standard_normal((100, 16))
    expected = keys[::30]
    for kind in ("flat", "ivf", "ivfsq", "hnsw", "IVF16,SQ8", "IVF32_HNSW32,Flat"):
        result = run_cli("index", out, "--index-type", kind)
        assert result.exit_code == 0, result.output
        collection = Collection.open(out)
        meta = collection.index_meta
        assert meta["type"] == kind or (meta["type"], meta["factory"]) == ("factory", kind)
        assert int(collection.index.ntotal) == 3000
        _, found = collection.search(near.astype(np.float32), k=1)
        assert (found[:, 0] == expected).all(), kind


def test_on_disk_lists_survive_publishing_and_a_new_process(tmp_path: Path) -> None:
    vectors = clustered_vectors(3000, 16, clusters=30, spread=0.1, seed=4)
    write_vectors(tmp_path / "v.parquet", vectors, keys_for(3000))
    out = tmp_path / "disk.idx"
    index_parquet(tmp_path / "v.parquet", "--out", out, "--max-index-memory", "64K")
    meta = json.loads((out / "index" / "meta.json").read_text())
    assert meta["on_disk"] and meta["type"] == "ivf" and meta["target_met"]
    assert (out / "index" / "lists.ivfdata").stat().st_size >= 3000 * (16 * 4 + 8)
    assert not list((out / "index").glob(".block-*"))
    script = (
        "import sys, numpy as np; from indexer import Collection; "
        f"c = Collection.open({str(out)!r}); "
        f"v = np.load({str(tmp_path / 'q.npy')!r}); "
        "print(','.join(c.search(v, 1)[1][:, 0]))"
    )
    np.save(tmp_path / "q.npy", vectors[:5])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ",".join(keys_for(5))  # and nothing else on stdout
    info = run_cli("info", out, "--json")
    assert json.loads(info.output)["index"]["on_disk"] is True


def test_index_dir_keeps_recorded_settings_and_build_reindexes_when_they_change(
    collection: Path, tmp_path: Path
) -> None:

    copy = copy_of(collection, tmp_path)
    assert run_cli("index", copy, "--index-type", "hnsw", "--target-recall", "0.99").exit_code == 0
    assert run_cli("index", copy).exit_code == 0
    meta = Collection.open(copy).index_meta
    assert (meta["type"], meta["target_recall"]) == ("hnsw", 0.99)
    assert meta["params"]["efSearch"] >= 10

    corpus = Path(json.loads((copy / "manifest.json").read_text())["sources"][0]["path"])
    same = run_cli("build", corpus, "--out", copy, *BUILD_FLAGS, "--index-type", "hnsw",
                   "--target-recall", "0.99")  # fmt: skip
    assert same.exit_code == 0 and "Nothing changed" in same.output, same.output
    other = run_cli("build", corpus, "--out", copy, *BUILD_FLAGS, "--index-type", "flat")
    assert other.exit_code == 0 and "re-indexed" in other.output, other.output
    assert Collection.open(copy).index_meta["type"] == "flat"
    info = run_cli("info", copy)
    assert "chosen because: asked for" in info.output and "queries/s" in info.output


def test_python_api_matches_the_cli(collection: Path, corpus: Path) -> None:
    image = sorted(corpus.rglob("*.jpg"))[0]
    cli = run_cli("query", image, "--index", collection, "-k", "3", "--json")
    assert cli.exit_code == 0, cli.output
    cli_keys = [hit["key"] for hit in json.loads(cli.output)[0]["results"]]
    c = Collection.open(collection)
    scores, keys = c.search_images([image], k=3)
    assert list(keys[0]) == cli_keys and keys[0, 0] == image.relative_to(corpus).as_posix()
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-3)
    everything = c.manifest["counts"]["embedded"]
    scores, keys = c.search(c.embed_files([image]), k=everything + 2)
    assert keys.shape == (1, everything) and None not in keys[0]  # k capped at the size
    assert not np.isnan(scores).any()
    with pytest.raises(InputError, match=f"pass an \\(n, {c.dim}\\) array"):
        c.search(np.ones((2, c.dim + 1)), k=1)


def test_query_search_parameter_overrides(collection: Path, corpus: Path, tmp_path: Path) -> None:
    image = sorted(corpus.rglob("*.jpg"))[0]
    flat = run_cli("query", image, "--index", collection, "--nprobe", "2")
    assert flat.exit_code == 2 and "has no nprobe" in flat.output, flat.output

    copy = copy_of(collection, tmp_path)
    assert run_cli("index", copy, "--index-type", "hnsw").exit_code == 0
    tuned = Collection.open(copy).index_meta["params"]["efSearch"]
    wide = run_cli("query", image, "--index", copy, "--ef", "64", "--json")
    assert wide.exit_code == 0, wide.output
    assert Collection.open(copy, params={"efSearch": 64}).search_params == {"efSearch": 64}
    assert Collection.open(copy).search_params == {"efSearch": tuned}


def test_from_parquet_never_replaces_an_image_collection(collection: Path, tmp_path: Path) -> None:
    write_vectors(tmp_path / "v.parquet", np.eye(4, dtype=np.float32), keys_for(4))
    before = (collection / "current").resolve()
    result = run_cli("index", "--from-parquet", tmp_path / "v.parquet", "--out", collection)
    assert result.exit_code == 2 and "choose another --out" in result.output, result.output
    assert (collection / "current").resolve() == before


def test_an_external_collection_refuses_images(corpus: Path, tmp_path: Path) -> None:
    write_vectors(tmp_path / "v.parquet", np.eye(4, dtype=np.float32), keys_for(4))
    out = tmp_path / "ext.idx"
    index_parquet(tmp_path / "v.parquet", "--out", out)
    image = sorted(corpus.rglob("*.jpg"))[0]
    query = run_cli("query", image, "--index", out)
    assert query.exit_code == 2 and "query it with vectors" in query.output, query.output
    build = run_cli("build", corpus, "--out", out, *BUILD_FLAGS)
    assert build.exit_code == 2 and "build into another --out" in build.output, build.output


def test_index_from_parquet_does_not_import_torch(tmp_path: Path) -> None:
    write_vectors(tmp_path / "v.parquet", np.eye(4, dtype=np.float32), keys_for(4))
    script = (
        "import sys; from indexer.cli.main import main\n"
        "try:\n"
        f"    main(['index', '--from-parquet', {str(tmp_path / 'v.parquet')!r}, '--out', "
        f"{str(tmp_path / 'o')!r}])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + done.stdout
