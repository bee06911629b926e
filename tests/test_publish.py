"""Versioned publish: each build is a new version, switched in atomically; readers never mix."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import indexer.build.new_version as new_version
import indexer.build.pipeline as pipeline
from indexer.config import BuildConfig, LoaderConfig, ModelConfig, SourceSpec
from indexer.query.collection import Collection
from tests.helpers import BUILD_FLAGS, run_cli


def versions(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "versions").iterdir())


def test_each_build_publishes_a_version_and_old_ones_are_pruned(
    corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "c"
    for i in range(3):
        flags = ("--rebuild",) if i else ()
        assert (
            run_cli("build", corpus / "group0", "--out", out, *flags, *BUILD_FLAGS).exit_code == 0
        )
    assert versions(out) == ["v000002", "v000003"]  # --keep 2 by default
    assert os.readlink(out / "current") == "versions/v000003"
    for name in ("manifest.json", "shards", "index", "errors.parquet"):
        assert os.readlink(out / name) == f"current/{name}"
    assert pq.read_table(out / "shards").num_rows == len(list((corpus / "group0").iterdir()))
    keep1 = ("--rebuild", "--keep", "1", *BUILD_FLAGS)
    assert run_cli("build", corpus / "group0", "--out", out, *keep1).exit_code == 0
    assert versions(out) == ["v000004"]
    assert "version 4" in run_cli("info", out).output


def test_a_failed_build_leaves_the_published_version(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "c"
    assert run_cli("build", corpus / "group0", "--out", out, *BUILD_FLAGS).exit_code == 0

    def broken_index(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(new_version, "index_version", broken_index)
    result = run_cli("build", corpus / "group1", "--out", out, "--rebuild", *BUILD_FLAGS)
    assert result.exit_code != 0
    assert os.readlink(out / "current") == "versions/v000001"
    keys = pq.read_table(out / "shards").column("key").to_pylist()
    assert all(k.startswith("scene") for k in keys) and len(keys) == 6
    assert any(p.name.startswith(".building-") for p in (out / "versions").iterdir())
    monkeypatch.undo()
    assert (
        run_cli("build", corpus / "group1", "--out", out, "--rebuild", *BUILD_FLAGS).exit_code == 0
    )
    assert versions(out) == ["v000001", "v000002"]  # the leftover was cleared, numbers go on


@pytest.mark.slow
def test_queries_during_builds_never_fail_or_mix(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    groups = [corpus / "group0", corpus / "group1"]
    keys = [{p.name for p in g.iterdir()} for g in groups]

    def config(group: Path) -> BuildConfig:
        return BuildConfig(
            sources=(SourceSpec(str(group)),),
            out=out,
            model=ModelConfig(pretrained=False),
            loader=LoaderConfig(workers=0, progress=False),
        )

    pipeline.build(config(groups[0]))
    vector = np.random.default_rng(0).normal(size=(1, 64)).astype(np.float32)
    vector /= np.linalg.norm(vector)
    stop, problems, seen = threading.Event(), [], []

    def query_loop() -> None:
        while not stop.is_set():
            try:
                searcher = Collection(out)
                found = {hit.key for hit in searcher.hits(vector, k=10)[0]}
                assert searcher.index.ntotal == searcher.manifest["counts"]["embedded"]
                assert found in keys, f"mixed or partial result: {sorted(found)}"
                seen.append(searcher.manifest["version"])
            except Exception as exc:
                problems.append(repr(exc))

    thread = threading.Thread(target=query_loop)
    thread.start()
    try:
        for i in range(6):
            pipeline.build(config(groups[(i + 1) % 2]))
    finally:
        stop.set()
        thread.join()
    assert problems == []
    assert len(set(seen)) >= 2  # the loop saw several versions come and go
