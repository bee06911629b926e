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
    from indexer.build.ray_engine import RayPlan, ray_batches
    from indexer.config import BuildConfig, EngineConfig, LoaderConfig, ModelConfig, SourceSpec
    from indexer.decode.preprocess import Preprocessor
    from indexer.model.timm_model import load_embedder
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


def _cosines(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> np.ndarray:
    from indexer.model.export import cosines

    keys = sorted(a)
    return cosines(np.stack([a[k] for k in keys]), np.stack([b[k] for k in keys]))


def _runtime(out: Path) -> tuple[str, str, str | None]:
    import json

    manifest = json.loads(((out / "current").resolve() / "manifest.json").read_text())
    last = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    return manifest["runtime"]["name"], manifest["runtime"]["precision"], last["runtime"]


@pytest.mark.parametrize(("runtime", "precision"), [("onnx", "fp32"), ("auto", "auto")])
def test_both_engines_embed_with_one_runtime_and_precision(
    corpus: Path, tmp_path: Path, local_ray: None, runtime: str, precision: str
) -> None:
    """The Ray engine's actors run what the local engine runs on this machine (auto: what it
    chose, at bf16 where the CPU has it), and the run records it; the two collections'
    vectors agree within cosine 0.99999. A later Ray run keeps the collection's."""
    flags = ("--no-pretrained", "--no-progress", "--precision", precision, "--batch-size", "8",
             "--runtime", runtime)  # fmt: skip
    local = run_cli("build", corpus, "--out", tmp_path / "local", *flags)
    assert local.exit_code == 0, local.output
    remote = run_cli("build", corpus, "--out", tmp_path / "ray", *flags, "--engine", "ray")
    assert remote.exit_code == 0, remote.output
    assert _runtime(tmp_path / "ray") == _runtime(tmp_path / "local")
    name, chosen, recorded = _runtime(tmp_path / "ray")
    assert recorded == name and (runtime == "auto" or name == "onnxruntime")  # the portable
    # model, on the actors too
    a, b = read_embeddings_by_key(tmp_path / "local"), read_embeddings_by_key(tmp_path / "ray")
    assert a.keys() == b.keys() and len(a) == 28
    assert _cosines(a, b).min() >= 0.99999, (chosen, _cosines(a, b).min())
    copy = tmp_path / "more"
    shutil.copytree(corpus, copy)
    (copy / "group0" / "extra.png").write_bytes((corpus / "group1" / "scene0005.png").read_bytes())
    again = run_cli("build", copy, "--out", tmp_path / "ray", *flags, "--engine", "ray")
    assert again.exit_code == 0, again.output
    assert _runtime(tmp_path / "ray")[:2] == (name, chosen)


def test_ray_workers_read_a_bucket_themselves(
    corpus: Path, tmp_path: Path, local_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s3:// through the Ray engine: the driver lists, the tasks fetch their own objects (the
    endpoint given as a storage option travels with the source, never the bytes through the
    driver), and the collection equals the local engine's from the same bucket."""
    pytest.importorskip("moto")
    from tests.s3server import S3
    from tests.test_buckets import upload

    server = S3()
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        upload(server, corpus)
        env = server.env()  # the workers started before it: options travel, not the env
        options = {"endpoint_url": server.endpoint, "key": env["AWS_ACCESS_KEY_ID"],
                   "secret": env["AWS_SECRET_ACCESS_KEY"]}  # fmt: skip
        flags = (
            "--no-pretrained",
            "--no-progress",
            "--precision",
            "fp32",
            "--batch-size",
            "8",
            *(x for k, v in options.items() for x in ("--storage-option", f"{k}={v}")),
        )
        local = run_cli("build", "s3://photos/pics/", "--out", tmp_path / "local", *flags)
        assert local.exit_code == 0, local.output
        before = server.faults.object_gets()
        remote = run_cli("build", "s3://photos/pics/", "--out", tmp_path / "ray", *flags,
                         "--engine", "ray")  # fmt: skip
        assert remote.exit_code == 0, remote.output
        assert server.faults.object_gets() - before == 28  # each object read once, by a task
        a, b = read_embeddings_by_key(tmp_path / "local"), read_embeddings_by_key(tmp_path / "ray")
        assert a.keys() == b.keys() and len(a) == 28
        assert _cosines(a, b).min() >= 0.99999
    finally:
        server.stop()
