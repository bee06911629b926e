"""The stored model is checked against the stored vectors: a model file swapped for another valid
export (its sha256 recorded too) is found by verify, mended by --repair, refused by incremental
builds and by a service loading the version."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from indexer.collection.layout import open_version, read_manifest
from indexer.errors import ModelMismatchError
from indexer.model.runtime_choice import BOUND, Choice, this_machine
from indexer.query.collection import Collection
from indexer.query.model_check import (
    CHEAP_SAMPLE,
    VERIFY_SAMPLE,
    ModelCheck,
    bound,
    check_collection,
    check_model,
    spread,
    stored_sample,
)
from indexer.query.stored_items import ItemReader
from tests.helpers import BUILD_FLAGS, copy_of, edit_manifest, read_embeddings_by_key, run_cli


@pytest.fixture(scope="module")
def foreign(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.onnx of another collection: the same architecture, other weights (--seed 1)."""
    src = tmp_path_factory.mktemp("foreign") / "src"
    shutil.copytree(corpus / "group0", src / "group0")
    out = src.parent / "c"
    result = run_cli("build", src, "--out", out, *BUILD_FLAGS, "--seed", "1")
    assert result.exit_code == 0, result.output
    return (out / "current").resolve() / "model.onnx"


@pytest.fixture(scope="module")
def own(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A collection that embeds with its portable model (onnxruntime), in shards of 4 rows."""
    src = tmp_path_factory.mktemp("own") / "src"
    for group in ("group0", "group1"):
        shutil.copytree(corpus / group, src / group)
    out = src.parent / "c"
    result = run_cli("build", src, "--out", out, *BUILD_FLAGS, "--runtime", "onnx",
                     "--shard-size", "4")  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def _swap_model(root: Path, model: Path) -> None:
    """Replace the published model with another valid export and record its sha256 and size,
    as someone who can write the collection would."""
    target = (root / "current").resolve() / "model.onnx"
    target.unlink()  # it may be hard-linked into another version
    shutil.copyfile(model, target)
    data = target.read_bytes()
    edit_manifest(root, lambda m: m["portable_model"].update(
        sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)))  # fmt: skip


def _private(root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the collection and of its source folder (same name), the copy reading it."""
    copy = copy_of(root, tmp_path)
    source = Path(read_manifest(open_version(root))["sources"][0]["path"])
    moved = tmp_path / "sources" / source.name
    shutil.copytree(source, moved)
    edit_manifest(copy, lambda m: m["sources"][0].update(path=str(moved)))
    return copy, moved


def _check(root: Path, sample: int = VERIFY_SAMPLE) -> ModelCheck:
    version = open_version(root)
    return check_model(version, read_manifest(version), sample=sample)


def test_the_stored_model_reproduces_a_whole_collection(collection: Path) -> None:
    found = _check(collection)
    assert found.ok and found.checked == 28 and found.skipped == 0, found
    assert found.worst is not None and found.worst >= BOUND["fp32"]
    assert _check(collection, sample=CHEAP_SAMPLE).checked == CHEAP_SAMPLE
    served = check_collection(Collection(collection, runtime="onnx"))
    assert served.ok and served.checked == CHEAP_SAMPLE


NATIVE_BF16 = this_machine(cuda=False).native_bf16


@pytest.mark.slow
@pytest.mark.skipif(not NATIVE_BF16, reason="bf16 needs AVX512-BF16 or AMX on this CPU")
@pytest.mark.parametrize("runtime", ["openvino", "torch"])
def test_a_bf16_collection_passes(corpus: Path, tmp_path: Path, runtime: str) -> None:
    src, out = tmp_path / "src", tmp_path / "c"
    shutil.copytree(corpus / "group0", src / "group0")
    built = run_cli("build", src, "--out", out, *BUILD_FLAGS, "--precision", "bf16",
                    "--runtime", runtime)  # fmt: skip
    assert built.exit_code == 0, built.output
    found = _check(out)  # the portable model: on openvino in bf16, or (torch's) in fp32
    checked_on = {"openvino": "openvino bf16", "torch": "onnxruntime fp32"}[runtime]
    assert found.ok and found.checked > 0 and found.runtime == checked_on, found
    served = check_collection(Collection(out))  # the runtime queries embed with
    assert served.ok and served.runtime == f"{runtime} bf16", served


def test_a_swapped_model_fails_the_check(collection: Path, foreign: Path, tmp_path: Path) -> None:
    copy = copy_of(collection, tmp_path)
    _swap_model(copy, foreign)
    found = _check(copy)
    assert not found.ok and len(found.below) == found.checked == 28, found
    assert found.worst is not None and found.worst < 0.9
    with pytest.raises(ModelMismatchError, match=r"does not reproduce .*`indexer verify --repair"):
        check_collection(Collection(copy, runtime="onnx"))


def test_verify_finds_a_swapped_model_and_repair_exports_it_again(
    collection: Path, foreign: Path, corpus: Path, tmp_path: Path
) -> None:
    copy = copy_of(collection, tmp_path)
    _swap_model(copy, foreign)
    assert run_cli("verify", collection).exit_code == 0  # the original is untouched
    found = run_cli("verify", copy)
    assert found.exit_code == 3, found.output
    assert "model model.onnx: does not reproduce the stored vectors" in found.output
    mended = run_cli("verify", "--repair", copy)
    assert mended.exit_code == 0 and "exported its model again" in mended.output, mended.output
    again = run_cli("verify", copy)
    assert again.exit_code == 0 and "reproduces the stored vectors" in again.output, again.output
    key = "group0/scene0004.jpg"
    [result] = Collection(copy, runtime="onnx").query([corpus / key], k=1)
    assert result.hits[0].key == key and result.hits[0].score > BOUND["fp32"]


def test_an_incremental_build_refuses_a_swapped_model(
    own: Path, foreign: Path, corpus: Path, tmp_path: Path
) -> None:
    copy, src = _private(own, tmp_path)
    _swap_model(copy, foreign)
    shutil.copytree(corpus / "group2", src / "group2")  # new items to embed
    versions = sorted(os.listdir(copy / "versions"))
    current = os.readlink(copy / "current")
    refused = run_cli("build", src, "--out", copy, *BUILD_FLAGS)
    assert refused.exit_code == 3, refused.output
    assert "does not reproduce its stored vectors" in refused.output
    assert f"indexer verify --repair {copy}" in refused.output
    assert sorted(os.listdir(copy / "versions")) == versions  # nothing written
    assert os.readlink(copy / "current") == current
    assert run_cli("verify", "--repair", copy).exit_code == 0
    built = run_cli("build", src, "--out", copy, *BUILD_FLAGS)
    assert built.exit_code == 0 and "new" in built.output, built.output


@pytest.mark.slow
def test_a_repair_of_a_damaged_shard_does_not_embed_with_a_swapped_model(
    own: Path, foreign: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy, _ = _private(own, tmp_path)
    before = read_embeddings_by_key(copy)
    _swap_model(copy, foreign)
    shard = sorted(((copy / "current").resolve() / "shards").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.unlink()
    shard.write_bytes(bytes(data))
    mended = run_cli("verify", "--repair", copy)
    assert mended.exit_code == 0 and "whole again" in mended.output, mended.output
    assert "reproduces the stored vectors" in mended.output
    assert "the repair embeds with torch and exports the model again" in caplog.text
    after = read_embeddings_by_key(copy)
    assert after.keys() == before.keys()
    assert all(float(after[k] @ before[k]) >= BOUND["fp32"] for k in before)


def test_items_gone_or_changed_are_skipped(collection: Path, corpus: Path) -> None:
    version = open_version(collection)
    manifest = read_manifest(version)
    rows = stored_sample(version, manifest, 2 * CHEAP_SAMPLE)
    reader = ItemReader(manifest)
    other = (corpus / rows[-1].key).read_bytes()
    gone, changed = rows[0].key, rows[1].key

    def read(key: str) -> bytes | None:
        return None if key == gone else other if key == changed else reader.read(key)

    found = check_model(version, manifest, read=read, sample=CHEAP_SAMPLE)
    assert found.ok and found.checked == CHEAP_SAMPLE and found.skipped == 2, found


def test_no_readable_item_is_said_not_failed(
    collection: Path, foreign: Path, tmp_path: Path
) -> None:
    copy = copy_of(collection, tmp_path)
    _swap_model(copy, foreign)
    edit_manifest(copy, lambda m: m["sources"][0].update(path=str(tmp_path / "gone")))
    result = run_cli("verify", copy)
    assert result.exit_code == 0, result.output
    assert "the model was not checked: none of the" in result.output


def test_the_sample_is_spread_and_the_bound_composed() -> None:
    assert spread(5, 8) == [0, 1, 2, 3, 4]
    assert spread(100, 4) == [0, 50, 25, 75]  # the first half alone is spread
    assert spread(100, 0) == []
    fp32, bf16 = Choice("openvino", "fp32"), Choice("torch", "bf16")
    assert bound(fp32, fp32) == BOUND["fp32"] and bound(None, bf16) == BOUND["bf16"]
    angle = math.acos(BOUND["fp32"]) + math.acos(BOUND["bf16"])
    assert bound(bf16, fp32) == pytest.approx(math.cos(angle))
    assert BOUND["bf16"] > bound(bf16, fp32) > 0.99
    assert np.isclose(bound(Choice("onnxruntime", "fp32"), fp32), math.cos(2 * math.acos(0.9999)))


def test_the_service_refuses_a_version_whose_model_is_not_its_vectors(
    own: Path, foreign: Path, tmp_path: Path
) -> None:
    from indexer.serve.registry import Registry

    copy, _ = _private(own, tmp_path)
    registry = Registry({"c": copy})
    registry.refresh()
    assert registry.ready() and registry.failures == 0  # the untouched version serves
    _swap_model(copy, foreign)
    fresh = Registry({"c": copy})
    fresh.refresh()
    assert not fresh.ready() and fresh.failures == 1  # refused: never served
