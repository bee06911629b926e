"""Shared fixtures: small generated images and a collection built once from them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from indexer.synthetic import write_corpus
from tests.helpers import BUILD_FLAGS, run_cli


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test touches the network; the datasets and indexer caches stay in temp space."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-cache"))
    monkeypatch.setenv("INDEXER_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "indexer-cache"))


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty indexer cache: a first build runs torch first (no export known yet)."""
    folder = tmp_path / "fresh-cache"
    monkeypatch.setenv("INDEXER_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 scenes in four subfolders (JPEG and PNG) and 4 near-duplicates."""
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root, 24, duplicates=4, seed=3)
    return root


@pytest.fixture(scope="session")
def collection(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus built once with seeded random weights."""
    out = tmp_path_factory.mktemp("coll") / "c"
    result = run_cli("build", corpus, "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto's S3 server on 127.0.0.1 behind the counting, fault-injecting proxy
    (tests/s3server.py), its address and credentials in the environment."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from tests.s3server import S3

    server = S3()
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    yield server
    server.stop()
