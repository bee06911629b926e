"""Pooling and feature stages: each equals the same computation on timm's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tests.helpers import read_embeddings_by_key, run_cli, seeded_model


def timm_input(model: torch.nn.Module, path: Path) -> torch.Tensor:
    cfg = timm.data.resolve_model_data_config(model)
    return timm.data.create_transform(**cfg)(Image.open(path).convert("RGB")).unsqueeze(0)


def reference(
    model: torch.nn.Module, x: torch.Tensor, pooling: str, stage: int | None
) -> np.ndarray:
    """The pooled vector computed directly on timm's outputs (not indexer's code)."""
    with torch.inference_mode():
        if stage is None:
            fmap = model.forward_features(x)
        else:  # timm's feature extraction: a features_only model with the same weights
            torch.manual_seed(0)
            features = timm.create_model(model.default_cfg["architecture"], features_only=True,
                                         out_indices=(stage,)).eval()  # fmt: skip
            fmap = features(x)[0]
            assert torch.allclose(
                fmap,
                model.forward_intermediates(x, indices=[stage], intermediates_only=True)[0],
                atol=1e-5,
            )
        if pooling == "avg":
            v = fmap.mean((2, 3))
        elif pooling == "max":
            v = fmap.amax((2, 3))
        else:
            v = fmap.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)
    return torch.nn.functional.normalize(v.flatten(1), dim=1)[0].numpy()


@pytest.mark.parametrize(
    ("pooling", "stage"), [("avg", None), ("max", None), ("gem", None), ("gem", 1), ("avg", 2)]
)
def test_pooling_equals_timm(corpus: Path, tmp_path: Path, pooling: str, stage: int | None) -> None:
    source = corpus / "group0"
    out = tmp_path / "c"
    flags = ["--pooling", pooling] + ([] if stage is None else ["--feature-stage", str(stage)])
    result = run_cli("build", source, "--out", out, "--no-pretrained", "--workers", "0",
                     "--no-progress", "--exact-preprocessing", *flags)  # fmt: skip
    assert result.exit_code == 0, result.output
    model = seeded_model(0)
    stored = read_embeddings_by_key(out)
    for key, vector in stored.items():
        expected = reference(model, timm_input(model, source / key), pooling, stage)
        assert vector.shape == expected.shape
        assert float(vector @ expected) >= 0.9999, (key, pooling, stage)
    recipe = json.loads((out / "manifest.json").read_text())["model"]
    assert (recipe["pooling"], recipe["feature_stage"]) == (pooling, stage)
    image = sorted(source.glob("*.jpg"))[0]  # query follows the recipe: finds itself
    hit = run_cli("query", image, "--index", out, "--json", "-k", "1")
    assert json.loads(hit.output)[0]["results"][0]["key"] == image.name
    assert json.loads(hit.output)[0]["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_pooling_errors_and_recipe_changes(corpus: Path, tmp_path: Path) -> None:
    source, out = corpus / "group1", tmp_path / "c"
    base = ("build", source, "--out", out, "--no-pretrained", "--workers", "0", "--no-progress")
    bad_stage = run_cli(*base, "--pooling", "avg", "--feature-stage", "9")
    assert bad_stage.exit_code == 2 and "feature stages 0 to 3" in bad_stage.output
    head_stage = run_cli(*base, "--feature-stage", "1")
    assert head_stage.exit_code == 2 and "--pooling avg" in head_stage.output
    assert run_cli(*base).exit_code == 0
    changed = run_cli(*base, "--pooling", "gem")
    assert changed.exit_code == 2 and "pooling" in changed.output, changed.output
    assert run_cli(*base, "--pooling", "gem", "--rebuild").exit_code == 0
