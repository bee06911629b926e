"""Fast and exact preprocessing through the CLI, the data-config hint that overlaps startup, and
the seconds-by-stage line every build ends with."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.config import DataConfig
from indexer.model import data_config_cache as configcache
from indexer.synthetic import scene
from tests.helpers import (
    BUILD_FLAGS,
    read_embeddings_by_key,
    reference_embedding,
    run_cli,
    seeded_model,
)


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Camera-like JPEGs large enough for a 1/4-scale JPEG draft."""
    root = tmp_path_factory.mktemp("large")
    for i in range(6):
        img = scene(50 + i, (320, 240)).resize((1600, 1200), Image.Resampling.BICUBIC)
        img.save(root / f"IMG_{i:03d}.jpg", quality=90)
    return root


def _cosines(root: Path, images: Path) -> dict[str, float]:
    model = seeded_model(0)
    stored = read_embeddings_by_key(root)
    return {k: float(v @ reference_embedding(model, images / k)) for k, v in stored.items()}


def test_fast_mode_is_faithful_on_large_jpegs(large_jpegs: Path, tmp_path: Path) -> None:
    out = tmp_path / "fast"
    assert run_cli("build", large_jpegs, "--out", out, *BUILD_FLAGS).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decode"]["mode"] == "fast" and manifest["decode"]["jpeg_draft_factor"] == 2
    cosines = _cosines(out, large_jpegs)
    assert np.mean(list(cosines.values())) >= 0.99
    model = seeded_model(0)
    refs = {k: reference_embedding(model, large_jpegs / k) for k in cosines}
    for key, vector in read_embeddings_by_key(out).items():  # each finds its own reference
        assert max(refs, key=lambda k: float(vector @ refs[k])) == key
    query = run_cli("query", large_jpegs / "IMG_003.jpg", "--index", out, "--json")
    top = json.loads(query.stdout)[0]["results"][0]
    assert top["key"] == "IMG_003.jpg" and top["score"] > 0.9999
    assert (top["width"], top["height"]) == (1600, 1200)


def test_exact_mode_reproduces_timm(large_jpegs: Path, tmp_path: Path) -> None:
    out = tmp_path / "exact"
    flags = ("--exact-preprocessing", *BUILD_FLAGS)
    assert run_cli("build", large_jpegs, "--out", out, *flags).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decode"]["mode"] == "exact" and manifest["model"]["precision"] == "fp32"
    assert min(_cosines(out, large_jpegs).values()) >= 0.99999


@pytest.mark.usefixtures("fresh_cache")  # the torch path: no export known yet
def test_stale_config_hint_is_detected_and_replaced(
    corpus: Path, tmp_path: Path, collection: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = "test_convnext.r160_in1k"
    wrong = DataConfig((3, 96, 96), "bilinear", 0.5, "center", (0.1,) * 3, (0.9,) * 3)
    configcache.store(name, wrong)
    assert configcache.lookup(name) == wrong
    out = tmp_path / "c"
    own = json.loads((collection / "manifest.json").read_text())["runtime"]
    runtime = {"onnxruntime": "onnx"}.get(own["name"], own["name"])  # compared with its vectors
    flags = ("--workers", "2", "--no-pretrained", "--precision", "fp32", "--runtime", runtime)
    with caplog.at_level(logging.WARNING):
        result = run_cli("build", corpus, "--out", out, *flags)
    assert result.exit_code == 0, result.output
    assert "out of date" in caplog.text
    assert configcache.lookup(name) != wrong
    assert configcache.lookup(name).input_size == (3, 160, 160)
    warm = read_embeddings_by_key(out)
    cold = read_embeddings_by_key(collection)
    assert warm.keys() == cold.keys()
    for key in warm:
        np.testing.assert_allclose(warm[key], cold[key], atol=1e-6)


def test_corrupt_or_unwritable_cache_only_costs_speed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INDEXER_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / configcache.FILENAME).write_text("{broken")
    assert configcache.lookup("any") is None
    cfg = DataConfig((3, 8, 8), "bicubic", 1.0, "center", (0.5,) * 3, (0.5,) * 3)
    configcache.store("any", cfg)
    assert configcache.lookup("any") == cfg
    monkeypatch.setenv("INDEXER_CACHE_DIR", str(tmp_path / "file" / "below-a-file"))
    (tmp_path / "file").write_text("x")
    configcache.store("any", cfg)  # logged, not raised
    assert configcache.lookup("any") is None


def test_every_build_says_where_its_time_went(
    corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import re

    from tests.helpers import BUILD_FLAGS, run_cli

    with caplog.at_level(logging.INFO, logger="indexer.build.embed"):
        result = run_cli("build", corpus, "--out", tmp_path / "c", *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    line = next(r.getMessage() for r in caplog.records if "seconds by stage" in r.getMessage())
    stages = dict(re.fullmatch(r"([a-z ]+) ([\d.]+) s", part).groups()  # type: ignore[union-attr]
                  for part in line.split(": ", 1)[1].split(", "))  # fmt: skip
    assert {"waiting for batches", "first batch", "writing"} <= set(stages)
    assert all(float(s) >= 0 for s in stages.values()) and float(stages["first batch"]) > 0
