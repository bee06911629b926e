"""Embeddings equal timm's own reference path; checkpoints load and are recorded; query follows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import (
    BUILD_FLAGS,
    read_embeddings_by_key,
    reference_embedding,
    run_cli,
    seeded_model,
)


def test_embeddings_equal_timm_reference(collection: Path, corpus: Path) -> None:
    model = seeded_model(0)
    stored = read_embeddings_by_key(collection)
    assert len(stored) == len([p for p in corpus.rglob("*") if p.is_file()])
    for key, vector in stored.items():
        cosine = float(vector @ reference_embedding(model, corpus / key))
        assert cosine >= 0.9999, key


def test_seed_changes_weights(corpus: Path, tmp_path: Path, collection: Path) -> None:
    out = tmp_path / "seed1"
    assert run_cli("build", corpus, "--out", out, *BUILD_FLAGS, "--seed", "1").exit_code == 0
    a, b = read_embeddings_by_key(collection), read_embeddings_by_key(out)
    assert max(float(a[k] @ b[k]) for k in a) < 0.999
    model = seeded_model(1)
    key = next(iter(b))
    assert float(b[key] @ reference_embedding(model, corpus / key)) >= 0.9999


def _state(seed: int, head: bool) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in seeded_model(seed).state_dict().items()}
    return state if head else {k: v for k, v in state.items() if not k.startswith("head.fc.")}


@pytest.mark.parametrize(
    ("filename", "head"),
    [("w.safetensors", True), ("w.safetensors", False), ("w.pth", True), ("w.bin", False)],
)
def test_checkpoint_with_or_without_head(
    corpus: Path, tmp_path: Path, filename: str, head: bool
) -> None:
    path = tmp_path / filename
    state = _state(5, head)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:  # a wrapped DataParallel-style checkpoint, as training scripts write it
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    out = tmp_path / "c"
    result = run_cli("build", corpus, "--out", out, "--checkpoint", path, *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    weights = json.loads((out / "manifest.json").read_text())["model"]["weights"]
    assert weights["kind"] == "checkpoint" and weights["path"] == str(path.resolve())
    assert len(weights["sha256"]) == 64
    model = seeded_model(5)
    for key, vector in read_embeddings_by_key(out).items():
        assert float(vector @ reference_embedding(model, corpus / key)) >= 0.9999


def test_different_checkpoint_gives_different_embeddings(corpus: Path, tmp_path: Path) -> None:
    vectors, hashes = [], []
    for seed in (11, 12):
        path = tmp_path / f"w{seed}.safetensors"
        save_file(_state(seed, head=True), str(path))
        out = tmp_path / f"c{seed}"
        assert (
            run_cli("build", corpus, "--out", out, "--checkpoint", path, *BUILD_FLAGS).exit_code
            == 0
        )
        vectors.append(read_embeddings_by_key(out))
        hashes.append(json.loads((out / "manifest.json").read_text())["model"]["weights"]["sha256"])
    assert hashes[0] != hashes[1]
    assert max(float(vectors[0][k] @ vectors[1][k]) for k in vectors[0]) < 0.999


def test_checkpoint_for_another_model_is_refused(corpus: Path, tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, str(path))
    result = run_cli("build", corpus, "--out", tmp_path / "c", "--checkpoint", path, *BUILD_FLAGS)
    assert result.exit_code == 4
    assert "does not fit model" in result.output and "--model" in result.output


def test_query_refuses_a_changed_or_missing_checkpoint(corpus: Path, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(_state(3, head=True), str(path))
    out = tmp_path / "c"
    assert run_cli("build", corpus, "--out", out, "--checkpoint", path, *BUILD_FLAGS).exit_code == 0
    image = next(p for p in sorted(corpus.rglob("*.jpg")))
    ok = run_cli("query", image, "--index", out, "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)[0]["results"][0]["score"] > 0.9999
    save_file(_state(4, head=True), str(path))
    changed = run_cli("query", image, "--index", out, "--runtime", "torch")
    assert changed.exit_code == 3 and "has changed" in changed.output
    path.unlink()
    gone = run_cli("query", image, "--index", out, "--runtime", "torch")
    assert gone.exit_code == 3 and "is gone" in gone.output
    portable = run_cli("query", image, "--index", out, "--json")  # the model travels along
    assert json.loads(portable.stdout) == json.loads(ok.stdout)


def test_query_refuses_when_weights_cannot_be_reproduced(collection: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(collection, copy, symlinks=True)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model"]["state_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    image = next(iter(sorted(Path(manifest["sources"][0]["path"]).rglob("*.png"))))
    result = run_cli("query", image, "--index", copy, "--runtime", "torch")
    assert result.exit_code == 3 and "differ" in result.output


def test_no_normalize_keeps_raw_vectors(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    flags = ("--no-normalize", "--metric", "l2")
    assert run_cli("build", corpus, "--out", out, *flags, *BUILD_FLAGS).exit_code == 0
    stored = read_embeddings_by_key(out)
    norms = np.array([np.linalg.norm(v) for v in stored.values()])
    assert not np.allclose(norms, 1.0, atol=1e-3)
    image = corpus / next(iter(stored))
    doc = json.loads(run_cli("query", image, "--index", out, "--json").stdout)
    assert doc[0]["results"][0]["key"] == next(iter(stored))
    assert doc[0]["results"][0]["score"] == pytest.approx(0.0, abs=1e-3)  # L2 distance to itself
