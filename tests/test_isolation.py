"""A decoder that crashes or hangs its worker costs only its own item; the run goes on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from indexer.sources.folder import walk_images
from tests.helpers import read_embeddings_by_key, reference_embedding, run_cli, seeded_model
from tests.hooks import use_decode_hook


@pytest.mark.slow
def test_crashing_and_hanging_decoders_fail_only_their_items(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "hostile"
    shutil.copytree(corpus, root)
    good = root / "group1" / "scene0005.png"
    shutil.copy(good, root / "group0" / "crash-me.png")  # valid images the hook sabotages
    shutil.copy(good, root / "group2" / "hang-me.png")
    (root / "group3" / "zz-empty.jpg").write_bytes(b"")  # and an ordinary failure
    use_decode_hook(monkeypatch, "tests.hooks:hostile")
    out = tmp_path / "c"
    result = run_cli(
        "build", root, "--out", out, "--no-pretrained", "--no-progress", "--workers", "2",
        "--batch-size", "3", "--decode-timeout", "2", "--max-failures", "3",
    )  # fmt: skip
    assert result.exit_code == 5, result.output  # partial: three failures, within budget
    errors = {e["key"]: e for e in pq.read_table(out / "errors.parquet").to_pylist()}
    assert sorted(errors) == ["group0/crash-me.png", "group2/hang-me.png", "group3/zz-empty.jpg"]
    assert "crashed (SIGSEGV)" in errors["group0/crash-me.png"]["error"]
    assert "longer than 2s" in errors["group2/hang-me.png"]["error"]
    stored = read_embeddings_by_key(out)
    assert sorted(stored) == sorted(set(walk_images(root)) - set(errors))
    model = seeded_model(0)
    for key, vector in stored.items():  # every neighbour of a crash still has its own vector
        assert float(vector @ reference_embedding(model, root / key)) >= 0.9999, key
    ids = pq.read_table(out / "shards").column("id").to_pylist()
    assert len(ids) == len(set(ids))
