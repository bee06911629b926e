"""Failed items become error rows; every other row holds its own item's embedding."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from indexer.sources.folder import walk_images
from tests.helpers import read_embeddings_by_key, reference_embedding, run_cli, seeded_model


@pytest.fixture
def mixed(corpus: Path, tmp_path: Path) -> Path:
    """Good images interleaved with broken ones, in the same folders."""
    root = tmp_path / "mixed"
    shutil.copytree(corpus, root)
    (root / "group0" / "scene0001x.jpg").write_bytes(b"")
    (root / "group1" / "scene0005x.png").write_text("<html>404</html>")
    good = (root / "group2" / "scene0002.jpg").read_bytes()
    (root / "group2" / "scene0003x.jpg").write_bytes(good[: len(good) // 3])
    (root / "group3" / "scene0003x.JPEG").write_bytes(good)  # upper-case extension, valid
    return root


@pytest.mark.slow
def test_errors_do_not_misalign_with_workers(mixed: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    flags = ("--no-pretrained", "--workers", "2", "--batch-size", "3", "--no-progress")
    result = run_cli(
        "build", mixed, "--out", out, "--shard-size", "10", "--max-failures", "3", *flags
    )
    assert result.exit_code == 5, result.output  # partial: failures within the budget
    assert "3 failed" in result.output
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert sorted(e["key"] for e in errors) == [
        "group0/scene0001x.jpg",
        "group1/scene0005x.png",
        "group2/scene0003x.jpg",
    ]
    assert {e["stage"] for e in errors} == {"decode"}
    assert all(e["error"] for e in errors)
    stored = read_embeddings_by_key(out)
    listed = walk_images(mixed)
    assert sorted(stored) == sorted(set(listed) - {e["key"] for e in errors})
    model = seeded_model(0)
    for key, vector in stored.items():
        assert float(vector @ reference_embedding(model, mixed / key)) >= 0.9999, key
    ids = pq.read_table(out / "shards").column("id").to_pylist()
    assert len(ids) == len(set(ids))


def test_unreadable_file_is_a_read_error(corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "src"
    shutil.copytree(corpus / "group0", root)
    victim = root / "gone.jpg"
    victim.symlink_to(tmp_path / "nowhere.jpg")  # listed, then cannot be read
    out = tmp_path / "c"
    flags = ("--no-pretrained", "--workers", "0", "--max-failures", "0.2")
    result = run_cli("build", root, "--out", out, *flags)
    assert result.exit_code == 5, result.output
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert [(e["key"], e["stage"]) for e in errors] == [("gone.jpg", "read")]
    assert "FileNotFoundError" in errors[0]["error"]
