"""A tampered collection is refused in one line, never answered from: index, current, next_id."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from indexer.collection.manifest_check import first_bad_field
from tests.helpers import BUILD_FLAGS, copy_of, edit_manifest, run_cli


def _one_clean_line(output: str) -> None:
    assert "Traceback" not in output
    assert len([line for line in output.splitlines() if line.startswith("Error:")]) == 1


@pytest.fixture(scope="module")
def other(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second collection of as many items, made from other images."""
    from indexer.synthetic import write_corpus

    src = tmp_path_factory.mktemp("other-src")
    write_corpus(src, 24, duplicates=4, seed=11)
    out = tmp_path_factory.mktemp("other") / "c"
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS).exit_code == 0
    return out


def test_another_collections_index_is_refused_and_repaired(
    collection: Path, other: Path, tmp_path: Path
) -> None:
    copy = copy_of(collection, tmp_path)
    theirs, ours = (other / "current").resolve() / "index", (copy / "current").resolve() / "index"
    assert (
        json.loads((theirs / "meta.json").read_text())["ntotal"]
        == json.loads((ours / "meta.json").read_text())["ntotal"]
    )  # same size and dim: only the shard record tells them apart
    shutil.rmtree(ours)
    shutil.copytree(theirs, ours)
    query = run_cli("query", "--id", "group0/scene0004.jpg", "--index", copy)
    assert query.exit_code == 3 and "not its own" in query.output, query.output
    _one_clean_line(query.output)
    found = run_cli("verify", copy)
    assert found.exit_code == 3 and "not built from this version's shards" in found.output
    mended = run_cli("verify", "--repair", copy)
    assert mended.exit_code == 0 and "whole again" in mended.output, mended.output
    again = run_cli("query", "--id", "group0/scene0004.jpg", "--index", copy, "-k", "1")
    assert again.exit_code == 0 and "group0/scene0004.jpg" in again.stdout.splitlines()[2]


def test_current_pointing_outside_its_versions_is_refused(
    collection: Path, other: Path, tmp_path: Path, corpus: Path
) -> None:
    copy = copy_of(collection, tmp_path)
    for target in ((other / "current").resolve(), Path("/etc")):
        (copy / "current").unlink()
        (copy / "current").symlink_to(target)
        for args in (("query", "--id", "group0/scene0004.jpg", "--index", copy),
                     ("verify", copy), ("info", copy)):  # fmt: skip
            result = run_cli(*args)
            assert result.exit_code == 3 and "tampered" in result.output, (args, result.output)
            _one_clean_line(result.output)
    rebuild = run_cli("build", corpus, "--out", copy, *BUILD_FLAGS, "--rebuild")
    assert rebuild.exit_code == 3 and "tampered" in rebuild.output, rebuild.output
    _one_clean_line(rebuild.output)
    assert sorted(os.listdir("/etc"))  # untouched, still readable


@pytest.mark.parametrize("next_id", [-1, "abc", None, 2**63 - 1, 1.5, True])
def test_a_bad_next_id_is_a_one_line_error_everywhere(
    collection: Path, corpus: Path, tmp_path: Path, next_id: object
) -> None:
    copy = copy_of(collection, tmp_path)
    edit_manifest(copy, lambda m: m.update(next_id=next_id))
    for args in (("info", copy), ("verify", copy), ("index", copy),
                 ("query", "--id", "group0/scene0004.jpg", "--index", copy),
                 ("build", corpus, "--out", copy, *BUILD_FLAGS)):  # fmt: skip
        result = run_cli(*args)
        assert result.exit_code == 3 and "next_id" in result.output, (args, result.output)
        _one_clean_line(result.output)


def test_ids_at_or_beyond_next_id_are_found_by_verify(collection: Path, tmp_path: Path) -> None:
    copy = copy_of(collection, tmp_path)
    edit_manifest(copy, lambda m: m.update(next_id=3))
    found = run_cli("verify", copy)
    assert found.exit_code == 3 and "ids are not below next_id (3)" in found.output


MODEL = {
    "name": "m", "weights": {"kind": "random", "seed": 0}, "normalize": True,
    "precision": "fp32", "label_set": None,
    "data_config": {"input_size": [3, 160, 160], "mean": [0.5] * 3, "std": [0.5] * 3,
                    "crop_pct": 0.95, "interpolation": "bicubic", "crop_mode": "center"},
}  # fmt: skip
GOOD = {
    "schema_version": 1, "embedding_dim": 64, "metric": "ip", "next_id": 3,
    "counts": {"embedded": 1}, "shards": [{"name": "a.parquet", "rows": 1}],
    "sources": [{"kind": "folder", "path": "/x", "label": "x"}], "model": MODEL,
    "decode": {"mode": "fast", "max_pixels": 100}, "request": {"model": "m"},
}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({}, None),
        ({"model": None, "decode": None}, None),
        ({"schema_version": "1"}, "schema_version"),
        ({"embedding_dim": "64"}, "embedding_dim"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"metric": "cosine"}, "metric"),
        ({"next_id": -5}, "next_id"),
        ({"next_id": None}, "next_id"),
        ({"counts": {"embedded": -1}}, "counts.embedded"),
        ({"shards": {"a": 1}}, "shards"),
        ({"shards": [{"name": "a.parquet", "rows": "7"}]}, "shards"),
        ({"sources": "x"}, "sources"),
        ({"sources": ["a"]}, "sources"),
        ({"sources": [{"path": "/x", "label": "x"}]}, "sources"),
        ({"sources": [{"kind": "folder", "path": 5}]}, "sources"),
        ({"request": "x"}, "request"),
        ({"model": "timm"}, "model"),
        ({"model": {**MODEL, "name": 5}}, "model.name"),
        ({"model": {k: v for k, v in MODEL.items() if k != "weights"}}, "model.weights"),
        ({"model": {**MODEL, "data_config": {"input_size": "x"}}}, "input_size"),
        ({"model": {**MODEL, "label_set": 7}}, "label_set"),
        ({"decode": None}, "decode.mode"),
        ({"runtime": {"name": "torch", "precision": MODEL["precision"]}}, None),
        ({"runtime": {"name": "torch", "precision": "bf16"}}, "runtime.precision is not"),
        ({"runtime": {"name": "openvino", "precision": MODEL["precision"]}}, "no portable_model"),
        ({"runtime": "openvino"}, "runtime"),
        ({"runtime": {"name": "tensorrt", "precision": "fp32"}}, "runtime.name"),
        ({"runtime": {"name": "torch", "precision": "fp16"}}, "runtime.precision"),
        ({"precision": 16}, "precision"),
    ],
)
def test_manifest_fields_are_checked(change: dict[str, object], problem: str | None) -> None:
    found = first_bad_field({**GOOD, **change})
    assert (found is None) if problem is None else (problem in str(found)), found


def test_a_versions_link_to_another_collection_is_refused(
    collection: Path, other: Path, tmp_path: Path, corpus: Path
) -> None:
    theirs = copy_of(other, tmp_path / "theirs")
    copy = copy_of(collection, tmp_path / "ours")
    shutil.rmtree(copy / "versions")
    (copy / "versions").symlink_to(theirs / "versions")
    for args in (("verify", copy), ("build", corpus, "--out", copy, *BUILD_FLAGS, "--rebuild",
                                    "--keep", "1")):  # fmt: skip
        result = run_cli(*args)
        assert result.exit_code == 3 and "symbolic link" in result.output, result.output
        _one_clean_line(result.output)
    assert run_cli("verify", theirs).exit_code == 0  # untouched


def test_a_next_id_below_the_ids_is_refused_by_builds(
    collection: Path, corpus: Path, tmp_path: Path
) -> None:
    copy = copy_of(collection, tmp_path)
    edit_manifest(copy, lambda m: m.update(next_id=10))
    result = run_cli("build", corpus, "--out", copy, *BUILD_FLAGS)
    assert result.exit_code == 3 and "not below its next_id" in result.output, result.output
    assert os.readlink(copy / "current") == "versions/v000001"


def test_a_stray_file_among_the_versions_is_ignored(
    collection: Path, corpus: Path, tmp_path: Path
) -> None:
    copy = copy_of(collection, tmp_path)
    (copy / "versions" / "v999999").touch()
    result = run_cli("build", corpus, "--out", copy, *BUILD_FLAGS, "--rebuild")
    assert result.exit_code == 0, result.output
    assert os.readlink(copy / "current") == "versions/v000002"
    assert run_cli("info", copy).exit_code == 0


def test_a_file_in_place_of_a_layout_link_is_refused_before_the_switch(
    collection: Path, tmp_path: Path
) -> None:
    copy = copy_of(collection, tmp_path)
    (copy / "errors.parquet").unlink()
    (copy / "errors.parquet").write_bytes(b"mine")
    result = run_cli("index", copy)
    assert result.exit_code == 3 and "in the way" in result.output, result.output
    assert os.readlink(copy / "current") == "versions/v000001"
    assert (copy / "errors.parquet").read_bytes() == b"mine"


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["model"].pop("weights"),
        lambda m: m.pop("decode"),
        lambda m: m.update(sources=["a"]),
        lambda m: m.update(request="x"),
        lambda m: m["model"].update(name=5),
        lambda m: m["model"]["data_config"].update(input_size="x"),
        lambda m: m["model"].update(label_set=7),
        lambda m: m.update(schema_version="1"),
        lambda m: m.update(runtime={"name": "tensorrt", "precision": "fp32"}),
        lambda m: m.update(runtime=["openvino"]),
        lambda m: m["runtime"].update(precision="bf16"),  # the vectors are the model's fp32
        lambda m: m.pop("portable_model") and m["runtime"].update(name="openvino"),
    ],
)
def test_a_tampered_model_is_one_line_everywhere(
    collection: Path, corpus: Path, tmp_path: Path, edit: object
) -> None:
    copy = copy_of(collection, tmp_path)
    edit_manifest(copy, edit)  # type: ignore[arg-type]
    for args in (("info", copy), ("verify", "--repair", copy),
                 ("query", sorted(corpus.rglob("*.jpg"))[0], "--index", copy),
                 ("build", corpus, "--out", copy, *BUILD_FLAGS)):  # fmt: skip
        result = run_cli(*args)
        assert result.exit_code == 3 and "is corrupt" in result.output, (args, result.output)
        _one_clean_line(result.output)


def _drop_checksums(meta: Path) -> None:
    doc = json.loads(meta.read_text())
    doc.pop("files")
    meta.write_text(json.dumps(doc))


def _fifo(meta: Path) -> None:
    meta.unlink()
    os.mkfifo(meta)  # a reader that opened it plainly would hang


@pytest.mark.parametrize(
    ("tamper", "said"),
    [(_drop_checksums, "no checksum is recorded"), (_fifo, "not a regular file")],
)
def test_tampered_index_metadata_is_refused(
    collection: Path, tmp_path: Path, tamper: object, said: str
) -> None:
    copy = copy_of(collection, tmp_path)
    tamper((copy / "current").resolve() / "index" / "meta.json")  # type: ignore[operator]
    query = run_cli("query", "--id", "group0/scene0004.jpg", "--index", copy)
    assert query.exit_code == 3 and said in query.output, query.output
    assert run_cli("verify", copy).exit_code == 3


def test_a_manifest_metric_that_is_not_the_indexs_is_refused(
    collection: Path, tmp_path: Path
) -> None:
    copy = copy_of(collection, tmp_path)
    edit_manifest(copy, lambda m: m.update(metric="l2"))
    for args in (("verify", copy), ("dedup", copy, "--out", tmp_path / "d.parquet"),
                 ("query", "--id", "group0/scene0004.jpg", "--index", copy)):  # fmt: skip
        result = run_cli(*args)
        assert result.exit_code == 3 and "metric" in result.output, (args, result.output)
    assert not (tmp_path / "d.parquet").exists()


def test_reindexing_refuses_ids_past_next_id(collection: Path, tmp_path: Path) -> None:
    copy = copy_of(collection, tmp_path)
    edit_manifest(copy, lambda m: m.update(next_id=3))
    result = run_cli("index", copy)
    assert result.exit_code == 3 and "outside [0, next_id=3)" in result.output, result.output
    assert os.readlink(copy / "current") == "versions/v000001"


def test_a_fifo_manifest_is_called_tampering(collection: Path, tmp_path: Path) -> None:
    copy = copy_of(collection, tmp_path)
    manifest = (copy / "current").resolve() / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest)
    result = run_cli("info", copy)
    assert result.exit_code == 3 and "not a regular file" in result.output, result.output
