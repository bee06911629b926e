"""Test helpers: the CLI runner, the seeded model and timm's reference embedding path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
from click.testing import CliRunner, Result

from indexer.cli import main
from indexer.config import DEFAULT_MODEL

BUILD_FLAGS = ("--no-pretrained", "--workers", "0", "--no-progress")


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
