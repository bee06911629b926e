"""Test helpers: the CLI runner, the seeded model and timm's reference embedding path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from click.testing import CliRunner, Result

from indexer.cli.main import main
from indexer.config import DEFAULT_MODEL

# fp32: tests that compare paths (torch, the portable model, the service) pin the precision they
# compare; tests/test_precision.py compares them under each precision the CPU offers
BUILD_FLAGS = ("--no-pretrained", "--workers", "0", "--no-progress", "--precision", "fp32")


def run_cli(*args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def seeded_model(seed: int = 0, name: str = DEFAULT_MODEL) -> torch.nn.Module:
    """The model exactly as `--no-pretrained --seed SEED` creates it."""
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).eval()


def reference_embedding(model: torch.nn.Module, path: Path) -> np.ndarray:
    """timm's path: create_transform(resolve_model_data_config) on the PIL image, then the model."""
    from PIL import Image

    cfg = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**cfg)
    x = transform(Image.open(path).convert("RGB")).unsqueeze(0)
    with torch.inference_mode():
        out = model.forward_head(model.forward_features(x), pre_logits=True)
    out = torch.nn.functional.normalize(out.flatten(1), dim=1)
    return out[0].numpy()


def read_embeddings_by_key(root: Path) -> dict[str, np.ndarray]:
    import pyarrow.dataset as ds

    table = ds.dataset(root / "shards", format="parquet").to_table(columns=["key", "embedding"])
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    return dict(zip(table.column("key").to_pylist(), vectors, strict=True))


def clustered_vectors(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """Unit vectors around `clusters` random centres (fixed by dim and clusters, not seed)."""
    centres = np.random.default_rng(1000 + clusters).standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    points = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def write_vectors(
    path: Path, vectors: np.ndarray, keys: list[str], fixed: bool = True, **extra: list
) -> Path:
    """A Parquet file of (key, embedding[, extra columns]) as another tool would write it:
    a fixed-size list of float32, or a variable list of float64."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fixed:
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    else:
        emb = pa.array([[float(v) for v in row] for row in vectors], pa.list_(pa.float64()))
    pq.write_table(pa.table({"key": keys, "embedding": emb, **extra}), path)
    return path


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the k largest inner products per query (numpy brute force)."""
    return np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :k]


def copy_of(collection: Path, tmp_path: Path) -> Path:
    """A private copy of a built collection (its version symlinks kept) to change freely."""
    import shutil

    copy = tmp_path / "copy"
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(collection, copy, symlinks=True)
    return copy


def edit_manifest(collection: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change the published version's manifest in place (to play a collection from elsewhere)."""
    import json

    path = (collection / "current").resolve() / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def pretend_cuda(monkeypatch: Any) -> list[str]:
    """Builds whose torch model says it is on CUDA (it runs on the CPU), so embed_items takes
    the GPU-decode path; the names of the threads `gpu_decoding.ahead` starts are listed in the
    returned list as they start."""
    import indexer.build.gpu_decoding
    import indexer.model.timm_model

    real = indexer.model.timm_model.load_embedder

    def as_on_cuda(cfg: object) -> object:
        embedder = real(cfg)  # type: ignore[arg-type]
        embedder.on_cuda = True
        return embedder

    monkeypatch.setattr(indexer.model.timm_model, "load_embedder", as_on_cuda)
    started: list[str] = []
    produce_ahead = indexer.build.gpu_decoding.produce_ahead

    def watched(*args: Any, **kwargs: Any) -> Any:
        started.append(str(kwargs.get("name", args[1] if len(args) > 1 else "")))
        return produce_ahead(*args, **kwargs)

    monkeypatch.setattr(indexer.build.gpu_decoding, "produce_ahead", watched)
    return started
