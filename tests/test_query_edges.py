"""Queries at the edges: huge k, NaN thresholds, odd file names, a version pruned under a reader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from indexer.errors import InputError
from indexer.query.collection import Collection, capped_k
from tests.helpers import BUILD_FLAGS, copy_of, run_cli


@pytest.mark.parametrize(
    ("k", "size", "expected"),
    [(10, 28, 10), (10**9, 28, 28), (np.int64(3), 28, 3), (5, 0, 1), (2**63 - 1, 5, 5)],
)
def test_k_is_capped_at_the_collection_size(k: int, size: int, expected: int) -> None:
    assert capped_k(k, size) == expected


@pytest.mark.parametrize("k", [0, -1, 2.5, "3", None])
def test_a_bad_k_is_refused(k: object) -> None:
    with pytest.raises(InputError):
        capped_k(k, 10)


def test_a_huge_k_returns_the_whole_collection(collection: Path) -> None:
    rows = json.loads((collection / "manifest.json").read_text())["counts"]["embedded"]
    result = run_cli("query", "--id", "group0/scene0004.jpg", "--index", collection,
                     "-k", "1000000000", "--jsonl")  # fmt: skip
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)["results"]
    assert len(hits) == rows and len({h["id"] for h in hits}) == rows
    c = Collection.open(collection)
    scores, keys = c.search(np.ones((2, c.dim), np.float32), 10**12)
    assert scores.shape == keys.shape == (2, rows) and None not in keys.ravel()
    dedup = run_cli("dedup", collection, "--out", Path(collection).parent / "d.parquet",
                    "-k", "100000000")  # fmt: skip
    assert dedup.exit_code == 0, dedup.output


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_threshold_that_is_no_number_is_refused(
    collection: Path, tmp_path: Path, value: str
) -> None:
    query = run_cli("query", "--id", "group0/scene0004.jpg", "--index", collection,
                    "--threshold", value)  # fmt: skip
    assert query.exit_code == 2 and "not a finite number" in query.output, query.output
    dedup = run_cli("dedup", collection, "--out", tmp_path / "d.parquet", "--threshold", value)
    assert dedup.exit_code == 2 and "not a finite number" in dedup.output, dedup.output
    assert not (tmp_path / "d.parquet").exists()


def test_json_output_is_strict_utf8_for_undecodable_names(collection: Path, tmp_path: Path) -> None:
    src = sorted(Path(json.loads((collection / "manifest.json").read_text())["sources"][0]["path"])
                 .rglob("*.jpg"))[0]  # fmt: skip
    odd = Path(bytes(tmp_path).decode() + "/" + b"\xff.jpg".decode("utf-8", "surrogateescape"))
    shutil.copy(src, odd)
    for flag in ("--json", "--jsonl"):
        result = run_cli("query", str(odd), "--index", collection, "-k", "2", flag)
        assert result.exit_code == 0, result.output
        text = result.stdout_bytes.decode("utf-8")  # strict: no lone surrogates
        assert "\\\\xff.jpg" in text and "\\udcff" not in text


def test_a_reader_whose_version_was_pruned_reads_the_next_one(
    collection: Path, corpus: Path, tmp_path: Path
) -> None:
    copy = copy_of(collection, tmp_path)
    reader = Collection.open(copy)
    first = reader.version
    src = tmp_path / "src"
    shutil.copytree(corpus, src)
    (src / "group0" / "scene0004.jpg").unlink()
    built = run_cli("build", src, "--out", copy, *BUILD_FLAGS, "--keep", "1", "--rebuild")
    assert built.exit_code == 0, built.output
    assert not first.exists()  # pruned under the reader
    results = reader.query(ids=["group0/scene0000.png"], k=3)
    assert reader.version != first and results[0].hits[0].key == "group0/scene0000.png"
    assert all(h.key != "group0/scene0004.jpg" for h in results[0].hits)


def test_a_stray_file_in_a_collection_does_not_block_builds(
    collection: Path, corpus: Path, tmp_path: Path
) -> None:
    copy = copy_of(collection, tmp_path)
    dedup = run_cli("dedup", copy, "--out", copy / "dups.parquet")
    assert dedup.exit_code == 0, dedup.output
    again = run_cli("build", corpus, "--out", copy, *BUILD_FLAGS)
    assert again.exit_code == 0 and "Nothing changed" in again.output, again.output
    assert (copy / "dups.parquet").is_file()


def test_a_refused_build_leaves_nothing_in_out(corpus: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    shutil.copytree(corpus / "group1", photos)
    before = sorted(p.name for p in photos.iterdir())
    result = run_cli("build", corpus / "group0", "--out", photos, *BUILD_FLAGS)
    assert result.exit_code == 2 and "is not empty and is not a collection" in result.output
    assert sorted(p.name for p in photos.iterdir()) == before


def test_a_folder_with_files_named_like_the_layout_is_not_ours(
    corpus: Path, tmp_path: Path
) -> None:
    mine = tmp_path / "mine"
    (mine / "index").mkdir(parents=True)
    (mine / "manifest.json").write_text("{}")
    (mine / "runs.jsonl").write_text("my line\n")
    (mine / "index" / "index.html").write_text("page")
    for number in (1, 2):  # notes of the user's in folders named like our versions
        (mine / "versions" / f"v00000{number}").mkdir(parents=True)
        (mine / "versions" / f"v00000{number}" / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*"))
    result = run_cli("build", corpus / "group0", "--out", mine, *BUILD_FLAGS)
    assert result.exit_code == 2 and "is not a collection" in result.output, result.output
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == before
    assert (mine / "runs.jsonl").read_text() == "my line\n"


@pytest.mark.parametrize("flag", ["--max-failures", "--decode-timeout"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_flags_that_are_no_finite_number_are_refused(
    corpus: Path, tmp_path: Path, flag: str, value: str
) -> None:
    result = run_cli("build", corpus, "--out", tmp_path / "c", *BUILD_FLAGS, flag, value)
    assert result.exit_code == 2 and "not a finite number" in result.output, result.output
    assert not (tmp_path / "c").exists()
    index = run_cli("index", tmp_path / "c", "--target-recall", value)
    assert index.exit_code == 2


def test_info_json_is_strict_even_with_odd_history(collection: Path, tmp_path: Path) -> None:
    copy = copy_of(collection, tmp_path)
    line = json.loads((copy / "runs.jsonl").read_text().splitlines()[-1])
    with open(copy / "runs.jsonl", "a") as f:
        f.write(json.dumps({**line, "seconds": float("nan")}) + "\n")
    result = run_cli("info", copy, "--json")
    assert result.exit_code == 0, result.output
    json.loads(result.output, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))


def test_search_parameters_must_be_a_dict(collection: Path) -> None:
    c = Collection.open(collection)
    for bad in (None, "nprobe=3", [("nprobe", 3)]):
        with pytest.raises(InputError, match="must be a dict"):
            c.set_search_params(bad)  # type: ignore[arg-type]


def test_where_on_an_approximate_index_searches_the_whole_collection(
    corpus: Path, tmp_path: Path
) -> None:
    flat = tmp_path / "flat"
    built = run_cli("build", corpus, "--out", flat, *BUILD_FLAGS, "--labels", "1")
    assert built.exit_code == 0, built.output
    ivf = copy_of(flat, tmp_path / "ivf")
    assert run_cli("index", ivf, "--index-type", "IVF4,Flat").exit_code == 0
    table = pq.read_table(flat / "shards", columns=["key", "label_name"]).to_pylist()
    labels = sorted({row["label_name"][0] for row in table})
    query = ("query", "--id", "group0/scene0004.jpg", "-k", "3", "--json")
    for label in labels:
        want = run_cli(*query, "--index", flat, "--where", f"label={label}")
        got = run_cli(*query, "--index", ivf, "--where", f"label={label}", "--nprobe", "1")
        assert got.exit_code == want.exit_code == 0, got.output
        keys = [[h["key"] for h in json.loads(r.output)[0]["results"]] for r in (want, got)]
        assert keys[0] == keys[1] and keys[0], (label, keys)
