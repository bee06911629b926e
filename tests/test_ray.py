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


def test_ray_gpu_actors_decode_routed_jpegs(corpus: Path, tmp_path: Path, local_ray: None) -> None:
    """--engine ray on a cluster with GPUs: the tasks only read and route the JPEGs, the
    actors decode them. Forced here without a GPU (torchvision decodes on the actors' CPU)."""
    from indexer.config import BuildConfig, EngineConfig, LoaderConfig, ModelConfig, SourceSpec
    from indexer.model import load_embedder
    from indexer.preprocess import Preprocessor
    from indexer.rayengine import RayPlan, ray_batches
    from indexer.sources import list_items, open_sources

    root = tmp_path / "src"
    shutil.copytree(corpus, root)
    (root / "group0" / "cut.jpg").write_bytes(
        (root / "group0" / "scene0004.jpg").read_bytes()[:3000]
    )
    model = ModelConfig(pretrained=False, device="cpu", precision="fp32")
    engine, loader = EngineConfig("ray", None, 2), LoaderConfig(batch_size=5)
    cfg = BuildConfig((SourceSpec(str(root)),), tmp_path / "out", model, loader, engine=engine)
    sources = open_sources(cfg.sources)
    items = list_items(sources)
    driver = load_embedder(cfg.model)
    batches = list(ray_batches(items, sources, cfg, frozenset(), list(range(len(items))), driver,
                               RayPlan(0, True)))  # fmt: skip
    positions = [p for b in batches for p in b.positions]
    failed = [p for b in batches for p, _, _ in b.errors]
    assert [items[p].key for p in failed] == ["group0/cut.jpg"]
    assert sorted(positions + failed) == list(range(len(items)))  # each item once
    vectors = np.concatenate([b.vectors for b in batches if b.vectors is not None])
    prep = Preprocessor(driver.data_config, "fast")
    want = driver.embed(np.stack([prep((root / items[p].key).read_bytes()).pixels
                                  for p in positions]))  # fmt: skip
    cosine = np.sum(want * vectors, axis=1)
    assert cosine.min() > 0.99 and cosine.mean() > 0.999
    assert (cosine < 0.999999).sum() >= 10  # the JPEGs were the actors' decodes, not the tasks'


def test_ray_decode_gpu_without_gpus_is_refused(corpus: Path, tmp_path: Path,
                                                local_ray: None) -> None:  # fmt: skip
    flags = ("--no-pretrained", "--no-progress", "--engine", "ray", "--decode", "gpu")
    result = run_cli("build", corpus, "--out", tmp_path / "c", *flags)
    assert result.exit_code == 2, result.output
    assert "--decode gpu needs GPUs in the Ray cluster" in result.output
    assert not (tmp_path / "c").exists()  # refused before anything is written
