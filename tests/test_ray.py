"""The Ray Data engine makes the same collection as the local engine (a local Ray cluster)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.helpers import read_embeddings_by_key, run_cli

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_engine_equals_local_engine(corpus: Path, tmp_path: Path, local_ray: None) -> None:
    root = tmp_path / "src"
    shutil.copytree(corpus, root)
    (root / "group0" / "broken.jpg").write_bytes(b"<html>no</html>")
    (root / "group2" / "cut.png").write_bytes(
        (root / "group1" / "scene0005.png").read_bytes()[:300]
    )
    flags = ("--no-pretrained", "--no-progress", "--precision", "fp32", "--max-failures", "2",
             "--batch-size", "5")  # fmt: skip
    local = run_cli("build", root, "--out", tmp_path / "local", *flags)
    remote = run_cli("build", root, "--out", tmp_path / "ray", *flags, "--engine", "ray",
                     "--concurrency", "2")  # fmt: skip
    assert local.exit_code == remote.exit_code == 5, (local.output, remote.output)
    a, b = read_embeddings_by_key(tmp_path / "local"), read_embeddings_by_key(tmp_path / "ray")
    assert a.keys() == b.keys() and len(a) == 28
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5
    errors = [
        sorted((e["key"], e["stage"], e["error"]) for e in pq.read_table(p).to_pylist())
        for p in (tmp_path / "local" / "errors.parquet", tmp_path / "ray" / "errors.parquet")
    ]
    assert errors[0] == errors[1] and [e[0] for e in errors[0]] == ["group0/broken.jpg",
                                                                    "group2/cut.png"]  # fmt: skip
    ids = pq.read_table(tmp_path / "ray" / "shards").column("id").to_pylist()
    assert len(ids) == len(set(ids))
    again = run_cli("build", root, "--out", tmp_path / "ray", *flags, "--engine", "ray")
    assert again.exit_code == 5 and "Nothing changed" in again.output, again.output
