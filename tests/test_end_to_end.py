"""The demo behind `make run`, and real photos when ../shared/data/imagenet-sample is present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_cli

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


@pytest.mark.slow
def test_demo_builds_and_finds_the_near_duplicates(tmp_path: Path) -> None:
    result = run_cli("demo", "--out", tmp_path, "--images", "40")
    assert result.exit_code == 0, result.output
    assert "Pretrained weights unavailable" in result.output  # tests run offline
    assert "0 failed" in result.output
    blocks = result.stdout.split("query: ")[1:]
    assert len(blocks) == 2
    for block, scene in zip(blocks, ("scene0002", "scene0003"), strict=True):
        top3 = [line.split()[-1] for line in block.splitlines()[2:5]]
        assert any(scene in key for key in top3), block


@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE.is_dir(), reason="needs ../shared/data/imagenet-sample")
def test_real_photos_find_themselves(tmp_path: Path) -> None:
    out = tmp_path / "imagenet"
    result = run_cli("build", SAMPLE, "--out", out, "--no-pretrained", "--no-progress")
    assert result.exit_code == 0, result.output
    photos = sorted(SAMPLE.glob("*.JPEG"))
    assert f"{len(photos)} embedded, 0 reused" in result.output
    assert f"0 failed of {len(photos)} listed" in result.output
    query = run_cli("query", *photos, "--index", out, "-k", "1", "--json")
    assert query.exit_code == 0, query.output
    tops = [entry["results"][0]["key"] for entry in json.loads(query.stdout)]
    assert tops == [p.name for p in photos]
