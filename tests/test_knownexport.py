"""A first build that reuses an earlier export of the same request: embedding from its first
batch, confirmed against timm before anything is published, never decided by a stale entry."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer.collection.versions import mark_request, salvage, start_version
from indexer.config import ModelConfig
from indexer.model.known_export import (
    chained_bound,
    content_complete,
    recipe_mismatch,
    request_identity,
    source_digest,
)
from indexer.synthetic import write_corpus
from tests.helpers import BUILD_FLAGS, read_embeddings_by_key, run_cli


@pytest.fixture
def cache(fresh_cache: Path) -> Path:
    """An export cache of this test's own (conftest's fresh_cache)."""
    return fresh_cache


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("known") / "src"
    write_corpus(root, 20, duplicates=2, seed=5)
    return root


def entries(cache: Path) -> dict[str, Path]:
    return {p.stem: p for p in (cache / "exports" / "known").glob("*.json")}


def last_run(out: Path) -> dict:
    return json.loads((out / "runs.jsonl").read_text().splitlines()[-1])


def build(src: Path, out: Path, *flags: str) -> str:
    """A build whose runtime is known before its first batch (a known export may embed it)."""
    flags = ("--runtime", "onnx", *flags)
    result = run_cli("build", src, "--out", out, *BUILD_FLAGS, "--batch-size", "8", *flags)
    assert result.exit_code == 0, result.output
    return result.output


def test_request_identity_follows_what_decides_the_export(tmp_path: Path) -> None:
    base = ModelConfig(pretrained=False)
    same = [ModelConfig(pretrained=False, runtime="onnx")]  # how it runs, not what it computes
    other = [
        ModelConfig(pretrained=False, seed=1),
        ModelConfig(pretrained=True),
        ModelConfig(pretrained=False, pooling="avg"),
        ModelConfig(pretrained=False, labels=3),
        ModelConfig(pretrained=False, normalize=False),
        ModelConfig(pretrained=False, precision="bf16"),
    ]
    assert all(request_identity(c) == request_identity(base) for c in same)
    assert all(request_identity(c) != request_identity(base) for c in other)
    ck = tmp_path / "w.safetensors"
    ck.write_bytes(b"one")
    first = request_identity(ModelConfig(checkpoint=ck))
    ck.write_bytes(b"two")  # same path, other bytes: another export
    assert first is not None and first != request_identity(ModelConfig(checkpoint=ck))
    assert request_identity(ModelConfig(checkpoint=tmp_path / "gone")) is None


def test_first_build_embeds_with_the_known_export(
    src: Path,
    tmp_path: Path,
    cache: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import indexer.model.known_export as known

    caplog.set_level(logging.INFO, logger="indexer.model.known_export")
    build(src, tmp_path / "a")

    def no_timm(cfg: ModelConfig) -> None:
        raise AssertionError("a trusted export is never confirmed against timm")

    monkeypatch.setattr(known, "Confirmation", no_timm)
    assert last_run(tmp_path / "a")["runtime"] == "onnxruntime"
    assert len(entries(cache)) == 1
    build(src, tmp_path / "b")
    assert last_run(tmp_path / "b")["runtime"] == "onnxruntime", caplog.text
    a, b = (json.loads((tmp_path / n / "manifest.json").read_text()) for n in "ab")
    assert b["model"] == a["model"] and b["runtime"]["name"] == a["runtime"]["name"]
    record = b["portable_model"]
    assert "cached" not in a["portable_model"]  # a: torch checked the export on its first batch
    assert record["cached"] is True and record["sha256"] == a["portable_model"]["sha256"]
    assert record["fidelity"]["images_from"] == "the build"
    assert record["fidelity"]["min_cosine"] >= 0.9999
    # a seed and this code's sources name the computation: checked against the export in
    # fp32 on the build's images, not against timm (no model created, no thread)
    assert "cached export is trusted" in caplog.text
    assert record["fidelity"]["export_min_cosine"] >= 0.9999
    assert record["fidelity"]["to_export"] >= record["fidelity"]["min_cosine"]
    model = (tmp_path / "b" / "current" / "model.onnx").read_bytes()
    assert hashlib.sha256(model).hexdigest() == record["sha256"]
    va, vb = read_embeddings_by_key(tmp_path / "a"), read_embeddings_by_key(tmp_path / "b")
    assert va.keys() == vb.keys()
    assert max(np.abs(va[k] - vb[k]).max() for k in va) < 1e-5


def _plant(cache: Path, target: Path, donor: Path, fix_record: bool) -> None:
    """Put the donor entry's model under the target entry's name: with the donor's recipe and
    record (another model), or with the target's recipe and a record fixed up to the donor's
    bytes (the right recipe, the wrong computation)."""
    donor_entry = json.loads(donor.read_text())
    entry = json.loads(target.read_text())
    model = donor.with_suffix(".onnx").read_bytes()
    if fix_record:
        entry["record"].update(sha256=hashlib.sha256(model).hexdigest(), bytes=len(model))
    else:
        entry = {**donor_entry, "identity": entry["identity"]}
    target.write_text(json.dumps(entry))
    target.with_suffix(".onnx").write_bytes(model)


TAMPERING = {  # what was done to the cache -> what the build says before it embeds again
    "another model": "not usable",  # the recipe is not the request's: refused at lookup
    "corrupt": "not usable",  # the bytes are not the record's
    "the wrong computation": "embedding again with torch",  # timm's check (untrusted identity)
    "a runtime off the export": "embedding again with torch",  # the trusted check on the build
}


@pytest.mark.parametrize("tampering", list(TAMPERING))
def test_a_stale_known_export_never_decides_a_vector(
    src: Path,
    tmp_path: Path,
    cache: Path,
    tampering: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A forged entry whose record matches other bytes (the wrong computation) is caught only
    by timm: where the identity is content-complete the cache is trusted for it (a user's own
    cache, forged consistently, is as trusted as their installed timm), so this case runs as
    a pretrained identity would, confirmed against timm."""
    import indexer.model.known_export as known

    build(src, tmp_path / "seed1", "--seed", "1")
    donor = next(iter(entries(cache).values()))
    build(src, tmp_path / "clean")  # seed 0, torch then its own export
    target = next(p for p in entries(cache).values() if p != donor)
    if tampering == "corrupt":
        model = bytearray(target.with_suffix(".onnx").read_bytes())
        model[len(model) // 2] ^= 0xFF
        target.with_suffix(".onnx").write_bytes(bytes(model))
    elif tampering == "a runtime off the export":  # no runtime can reach this bound
        monkeypatch.setattr(known, "chained_bound", lambda bound, export_min: 1.5)
    else:
        _plant(cache, target, donor, fix_record=tampering == "the wrong computation")
    if tampering == "the wrong computation":
        monkeypatch.setattr(known, "content_complete", lambda identity: False)
    build(src, tmp_path / "out")
    assert TAMPERING[tampering] in caplog.text
    assert last_run(tmp_path / "out")["runtime"] == "onnxruntime"
    assert (
        "cached"
        not in json.loads((tmp_path / "out" / "manifest.json").read_text())["portable_model"]
    )  # embedded again after torch checked a fresh export
    got, want = read_embeddings_by_key(tmp_path / "out"), read_embeddings_by_key(tmp_path / "clean")
    assert got.keys() == want.keys()
    assert max(np.abs(got[k] - want[k]).max() for k in want) < 1e-5
    versions = sorted(p.name for p in (tmp_path / "out" / "versions").iterdir())
    assert versions == ["v000001"] or versions == ["v000002"]  # the discarded one is gone
    assert not (tmp_path / "out" / "versions" / ".salvage").exists()


def test_the_model_that_cannot_be_created_fails_the_build_as_without_the_cache(
    src: Path, tmp_path: Path, cache: Path
) -> None:
    """Pretrained weights offline: the child says so and the build fails the same way."""
    build(src, tmp_path / "seed0")
    entry = next(iter(entries(cache).values()))
    identity = request_identity(ModelConfig(pretrained=True))
    assert identity is not None
    from indexer.model.known_export import _paths

    planted, model = _paths(identity)
    data = json.loads(entry.read_text())
    planted.write_text(json.dumps({**data, "identity": identity}))
    model.write_bytes(entry.with_suffix(".onnx").read_bytes())
    flags = ("--workers", "0", "--no-progress")
    result = run_cli("build", src, "--out", tmp_path / "out", *flags)
    assert result.exit_code != 0 and "pretrained weights" in result.output
    planted.unlink()
    plain = run_cli("build", src, "--out", tmp_path / "plain", *flags)
    assert (result.exit_code, result.output) == (plain.exit_code, plain.output.replace(
        str(tmp_path / "plain"), str(tmp_path / "out")))  # fmt: skip
    assert not (tmp_path / "out" / "current").exists()


def test_unconfirmed_shards_are_never_salvaged(tmp_path: Path) -> None:
    """A run killed before its cached export was confirmed leaves nothing a re-run reuses;
    once confirmed, its finished shards are salvaged as any run's are."""
    asked = {"model": "m", "seed": 0}
    root = tmp_path / "c"
    for confirmed in (False, True):
        number, building = start_version(root, {**asked, "unconfirmed_model": True})
        (building / "shards").mkdir()
        (building / "shards" / f"part-v{number:06d}-00000.parquet").write_bytes(b"x")
        if confirmed:
            mark_request(building, asked)
        assert len(salvage(root, asked)) == int(confirmed)


@pytest.mark.parametrize(
    ("weights", "sources", "trusted"),
    [
        ({"checkpoint_sha256": "ab"}, {"timm": "1", "indexer": "2"}, True),
        ({"seed": 0}, {"timm": "1", "indexer": "2"}, True),
        ({"pretrained": "resnet50.a1_in1k"}, {"timm": "1", "indexer": "2"}, False),
        ({"seed": 0}, {"timm": None, "indexer": "2"}, False),
    ],
)
def test_content_complete(weights: dict, sources: dict, trusted: bool) -> None:
    assert content_complete({"weights": weights, "sources": sources}) is trusted


@pytest.mark.parametrize(
    ("bound", "export_min", "want"),
    [
        (0.999, 1.0, 0.999),  # a perfect export leaves the whole bound to the runtime
        (0.999, 0.99999, None),  # the runtime gets what the export did not use
        (0.9999, 0.9999, 1.0),  # nothing left: the runtime must equal the export
        (0.9999, 0.999, math.inf),  # an export below the bound can never be confirmed so
    ],
)
def test_chained_bound(bound: float, export_min: float, want: float | None) -> None:
    got = chained_bound(bound, export_min)
    if want is not None:
        assert got == pytest.approx(want)
    else:
        assert bound < got < 1.0
        # the worst runtime it admits is still within the bound of torch fp32
        assert math.cos(math.acos(got) + math.acos(export_min)) >= bound - 1e-12


def test_source_digest_follows_the_code_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "tinypkg"
    package.mkdir()
    (package / "__init__.py").write_text("X = 1\n")
    (package / "models.py").write_text("def f():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = source_digest("tinypkg")
    assert first is not None and first == source_digest("tinypkg")
    (package / "models.py").write_text("def f():\n    return 2\n")  # an edit in place
    assert source_digest("tinypkg") != first
    assert source_digest("no_such_package_here") is None
    sys.modules.pop("tinypkg", None)


def test_a_cached_recipe_must_be_the_requests(tmp_path: Path) -> None:
    ck = tmp_path / "w.safetensors"
    ck.write_bytes(b"weights")
    cfg = ModelConfig(checkpoint=ck)
    recipe = {"name": cfg.name, "pooling": cfg.pooling, "feature_stage": cfg.feature_stage,
              "labels": cfg.labels, "normalize": cfg.normalize,
              "weights": {"kind": "checkpoint", "sha256": hashlib.sha256(b"weights").hexdigest(),
                          "path": "/elsewhere/w.safetensors"}}  # fmt: skip

    def mismatch(recipe: dict, cfg: ModelConfig) -> str:
        identity = request_identity(cfg)
        assert identity is not None
        return recipe_mismatch(recipe, cfg, identity)

    assert mismatch(recipe, cfg) == ""  # the path may differ: the bytes decide
    assert mismatch({**recipe, "name": "resnet50"}, cfg) == "name"
    (tmp_path / "x").write_bytes(b"other")
    assert mismatch(recipe, ModelConfig(checkpoint=tmp_path / "x")) == "weights sha256"
    seeded = {**recipe, "weights": {"kind": "random", "seed": 1}}
    assert mismatch(seeded, ModelConfig(pretrained=False, seed=1)) == ""
    assert mismatch(seeded, ModelConfig(pretrained=False, seed=2)) == "weights seed"
