"""Integrity: checksums recorded at build, `indexer verify` finds damage, `--repair` mends it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    BUILD_FLAGS,
    copy_of,
    edit_manifest,
    read_embeddings_by_key,
    run_cli,
    write_vectors,
)


@pytest.fixture
def sharded(corpus: Path, tmp_path: Path) -> Path:
    out = tmp_path / "c"
    result = run_cli("build", corpus, "--out", out, *BUILD_FLAGS, "--shard-size", "8")
    assert result.exit_code == 0, result.output
    return out


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.unlink()  # the file may be hard-linked into an older version: break the link
    path.write_bytes(bytes(data))


def test_a_whole_collection_verifies(sharded: Path) -> None:
    manifest = json.loads((sharded / "manifest.json").read_text())
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    meta = json.loads((sharded / "index" / "meta.json").read_text())
    assert set(meta["files"]) == {"index.faiss", "probe.npz"}
    result = run_cli("verify", sharded)
    assert result.exit_code == 0 and "is whole" in result.output, result.output


def test_a_damaged_index_is_refused_then_repaired(sharded: Path, corpus: Path) -> None:
    index_file = sharded / "index" / "index.faiss"
    data = index_file.read_bytes()
    index_file.unlink()
    index_file.write_bytes(data[: len(data) // 2])  # truncated
    image = sorted(corpus.rglob("*.jpg"))[0]
    query = run_cli("query", image, "--index", sharded)
    assert query.exit_code == 3 and "verify --repair" in query.output, query.output
    found = run_cli("verify", sharded)
    assert found.exit_code == 3 and "index: index.faiss has" in found.output, found.output
    mended = run_cli("verify", "--repair", sharded)
    assert mended.exit_code == 0 and "whole again" in mended.output, mended.output
    assert run_cli("query", image, "--index", sharded).exit_code == 0


def test_a_damaged_shard_is_found_and_its_items_embedded_again(sharded: Path) -> None:
    before = read_embeddings_by_key(sharded)
    manifest = json.loads((sharded / "manifest.json").read_text())
    victim = manifest["shards"][1]["name"]
    _flip_middle_byte(sharded / "shards" / victim)
    found = run_cli("verify", sharded)
    assert found.exit_code == 3, found.output
    assert f"shard {victim}: its bytes differ from the recorded checksum" in found.output
    reindex = run_cli("index", sharded)  # page checksums: never indexed as if whole
    assert reindex.exit_code == 3 and "damaged or unreadable" in reindex.output, reindex.output
    mended = run_cli("verify", "--repair", sharded)
    assert mended.exit_code == 0 and "Embedded the items of 1 damaged shard(s)" in mended.output, (
        mended.output
    )
    after = read_embeddings_by_key(sharded)
    assert after.keys() == before.keys()
    assert all(np.allclose(after[k], before[k], atol=1e-6) for k in before)


def test_a_damaged_external_collection_is_copied_again(tmp_path: Path) -> None:
    vectors = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    write_vectors(tmp_path / "v.parquet", vectors, [f"k{i}" for i in range(300)])
    out = tmp_path / "ext"
    made = run_cli("index", "--from-parquet", tmp_path / "v.parquet", "--out", out,
                   "--shard-size", "100")  # fmt: skip
    assert made.exit_code == 0, made.output
    shard = sorted((out / "shards").glob("*.parquet"))[2]
    shard.unlink()
    found = run_cli("verify", out)
    assert found.exit_code == 3 and f"shard {shard.name}: missing" in found.output
    mended = run_cli("verify", "--repair", out)
    assert mended.exit_code == 0, mended.output
    assert len(read_embeddings_by_key(out)) == 300


def test_a_manifest_cannot_point_outside_the_collection(collection: Path, tmp_path: Path) -> None:
    copy = copy_of(collection, tmp_path)
    edit_manifest(copy, lambda m: m["shards"][0].update(name="../../../../outside.parquet"))
    for args in (("info", copy), ("index", copy)):
        result = run_cli(*args)
        assert result.exit_code == 3 and "not a plain file" in result.output, result.output
    assert not (tmp_path / "outside.parquet").exists()
