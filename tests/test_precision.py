"""One runtime and precision per collection, under each one this CPU offers: a first build takes
any of them, stays within its precision's bound of torch fp32, and every later run, query and
the service embed as it did."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer.model.runtime_choice import BOUND, candidates, this_machine
from indexer.query.collection import Collection
from tests.helpers import (
    BUILD_FLAGS,
    read_embeddings_by_key,
    reference_embedding,
    run_cli,
    seeded_model,
)

OFFERED = [c.label for c in candidates("auto", "auto", this_machine(cuda=False))]
FLAG = {"onnxruntime": "onnx", "openvino": "openvino", "torch": "torch"}


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _runs(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "runs.jsonl").read_text().splitlines()]


def _build(src: Path, out: Path, *flags: str) -> None:
    result = run_cli("build", src, "--out", out, *BUILD_FLAGS, "--batch-size", "8", *flags)
    assert result.exit_code == 0, result.output


@pytest.mark.slow
@pytest.mark.parametrize("label", OFFERED)
def test_every_offered_runtime_and_precision_embeds_one_collection(
    label: str, corpus: Path, tmp_path: Path
) -> None:
    runtime, precision = label.split()
    flags = ("--runtime", FLAG[runtime], "--precision", precision)
    src, out = tmp_path / "src", tmp_path / "c"
    shutil.copytree(corpus / "group0", src / "group0")
    shutil.copytree(corpus / "group1", src / "group1")
    _build(src, out, *flags)
    manifest = _manifest(out)
    assert manifest["runtime"]["name"] == runtime and manifest["precision"] == precision
    assert manifest["model"]["precision"] == precision and manifest["runtime"]["how"] == "forced"
    assert _runs(out)[-1]["runtime"] == runtime  # the first batch too: one runtime embeds all
    first = read_embeddings_by_key(out)
    model = seeded_model(0)
    cosines = [float(v @ reference_embedding(model, src / k)) for k, v in first.items()]
    assert min(cosines) >= BOUND[precision], (label, min(cosines))

    # a later run keeps the runtime and precision without being told (auto), old rows stay
    shutil.copytree(corpus / "group2", src / "group2")
    result = run_cli("build", src, "--out", out, *BUILD_FLAGS[:-2], "--batch-size", "8")
    assert result.exit_code == 0, result.output
    later = _runs(out)[-1]
    assert later["runtime"] == runtime and later["choice"]["how"] == "recorded"
    assert (later["choice"]["name"], later["choice"]["precision"]) == (runtime, precision)
    again = read_embeddings_by_key(out)
    assert all(np.array_equal(again[k], first[k]) for k in first)
    model_cosines = [float(again[k] @ reference_embedding(model, src / k)) for k in again]
    assert min(model_cosines) >= BOUND[precision]

    # a new image through the query path (the service's too) lands where the build put it
    collection = Collection.open(out, device="cpu")
    embedder = collection.embedder
    assert embedder.name == runtime and embedder.recipe["precision"] == precision
    key = sorted(again)[0]
    doc = run_cli("query", src / key, "--index", out, "--json", "-k", "1")
    assert doc.exit_code == 0, doc.output
    top = json.loads(doc.stdout)[0]["results"][0]
    assert top["key"] == key and top["score"] > 0.99999  # the stored vector, made again


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_cache")
def test_auto_times_once_then_the_cache_decides_the_same_vectors(
    corpus: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    shutil.copytree(corpus / "group0", src / "group0")
    auto = ("--runtime", "auto", "--precision", "auto")
    _build(src, tmp_path / "a", *auto)
    _build(src, tmp_path / "b", *auto)
    a, b = (_manifest(tmp_path / n)["runtime"] for n in "ab")
    assert a["how"] == "timed" and b["how"] == "cached"
    assert (a["name"], a["precision"]) == (b["name"], b["precision"])
    assert f"{a['name']} {a['precision']}" in OFFERED
    assert set(a["images_per_second"]) == set(OFFERED)  # every candidate was timed
    va, vb = read_embeddings_by_key(tmp_path / "a"), read_embeddings_by_key(tmp_path / "b")
    assert va.keys() == vb.keys()
    assert max(float(np.abs(va[k] - vb[k]).max()) for k in va) < 1e-5
    info = run_cli("info", tmp_path / "b")
    assert info.exit_code == 0 and f"runtime:     {a['name']} {a['precision']}" in info.output


def test_a_cpu_without_native_bf16_refuses_it_and_auto_stays_fp32(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INDEXER_NATIVE_BF16", "0")  # this CPU, as one without AVX512-BF16/AMX
    out = tmp_path / "c"
    refused = run_cli("build", corpus, "--out", out, *BUILD_FLAGS, "--precision", "bf16")
    assert refused.exit_code == 2 and "no native bf16" in refused.output
    assert not out.exists()
    assert all(label.endswith("fp32") for label in
               (c.label for c in candidates("auto", "auto", this_machine(cuda=False))))  # fmt: skip


def test_another_runtime_or_precision_is_a_rebuild(
    collection: Path, corpus: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(collection, copy, symlinks=True)
    own = _manifest(copy)["runtime"]
    other = "torch" if own["name"] != "torch" else "onnx"
    for flags in (("--runtime", other), ("--precision", "bf16")):
        if flags[1] == "bf16" and "torch bf16" not in OFFERED:
            continue
        refused = run_cli("build", corpus, "--out", copy, *BUILD_FLAGS, *flags)
        assert refused.exit_code == 3 and "--rebuild" in refused.output, refused.output
        assert _manifest(copy)["version"] == _manifest(collection)["version"]


def test_a_refused_later_run_writes_nothing(collection: Path, corpus: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(collection, copy, symlinks=True)
    before = (copy / "runs.jsonl").read_text()
    other = "torch" if _manifest(copy)["runtime"]["name"] != "torch" else "onnx"
    refused = run_cli("build", corpus, "--out", copy, *BUILD_FLAGS, "--runtime", other)
    assert refused.exit_code == 3 and "--rebuild" in refused.output
    assert (copy / "runs.jsonl").read_text() == before  # refused before the lock: no run line


def test_a_later_run_keeps_how_the_first_build_decided(corpus: Path, tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "c"
    shutil.copytree(corpus / "group0", src / "group0")
    _build(src, out, "--runtime", "onnx")
    first = _manifest(out)["runtime"]
    shutil.copytree(corpus / "group1", src / "group1")
    _build(src, out)
    assert _manifest(out)["runtime"] == first and first["how"] == "forced"
    assert _runs(out)[-1]["choice"]["how"] == "recorded"  # the run says what it did
    info = run_cli("info", out)
    assert "runtime:     onnxruntime fp32 (forced: asked for (--runtime onnx" in info.output


def test_a_first_build_that_embedded_nothing_leaves_the_choice_open(
    corpus: Path, tmp_path: Path
) -> None:
    src, out = tmp_path / "src", tmp_path / "c"
    src.mkdir()
    for n in range(3):
        (src / f"bad{n}.jpg").write_bytes(b"\xff\xd8 not a jpeg %d" % n)
    result = run_cli("build", src, "--out", out, *BUILD_FLAGS, "--max-failures", "10")
    assert result.exit_code == 5, result.output  # partial: every item failed, within budget
    assert _manifest(out)["runtime"] is None
    shutil.copytree(corpus / "group0", src / "group0")
    flags = (*BUILD_FLAGS, "--precision", "auto", "--max-failures", "10")  # none decided yet
    assert run_cli("build", src, "--out", out, *flags).exit_code == 5  # the 3 still fail
    decided = _manifest(out)["runtime"]
    assert decided["how"] in ("timed", "cached") and f"{decided['name']} " in " ".join(OFFERED)


def test_a_runtime_that_cannot_be_imported_is_refused_or_passed_over(
    corpus: Path, tmp_path: Path
) -> None:
    """openvino installed but broken (here: a package of that name that fails to import)."""
    import sys

    from indexer.config import ModelConfig
    from indexer.model.known_export import request_identity
    from indexer.model.runtime_choice import Choice, Decision, cache_key, remember

    fake = tmp_path / "fake" / "openvino"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('a broken install')\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    cli = [str(Path(sys.executable).parent / "indexer")]
    src = corpus / "group0"
    asked = run([*cli, "build", str(src), "--out", str(tmp_path / "a"), *BUILD_FLAGS,
                 "--runtime", "openvino"], env)  # fmt: skip
    assert asked.returncode == 2 and "openvino cannot be imported" in asked.stderr, asked.stderr
    assert not (tmp_path / "a").exists()
    # auto with this machine's cached choice naming openvino: the others are timed instead
    key = cache_key(request_identity(ModelConfig(pretrained=False, precision="fp32")), "auto",
                    "fp32")  # fmt: skip
    remember(key, Decision(Choice("openvino", "fp32"), "timed", ""))
    done = run([*cli, "build", str(src), "--out", str(tmp_path / "b"), *BUILD_FLAGS], env)
    assert done.returncode == 0, done.stderr
    chosen = _manifest(tmp_path / "b")["runtime"]
    assert chosen["name"] != "openvino" and chosen["how"] in ("timed", "forced")


def run(argv: list[str], env: dict[str, str]) -> Any:
    import subprocess

    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.usefixtures("fresh_cache")
def test_a_known_export_times_its_runtimes_without_torch(
    corpus: Path, tmp_path: Path, fresh_cache: Path
) -> None:
    """An export known from an earlier build, no decision cached (another machine's cache, a
    new runtime version): auto times the export's runtimes on the first batch, torch stays
    off the path, and the choice is confirmed against torch fp32 before anything publishes."""
    src = corpus / "group0"
    _build(src, tmp_path / "a", "--runtime", "onnx", "--precision", "auto")
    shutil.rmtree(fresh_cache / "runtimes", ignore_errors=True)
    _build(src, tmp_path / "b", "--runtime", "auto", "--precision", "auto")
    chosen = _manifest(tmp_path / "b")["runtime"]
    portable = {label for label in OFFERED if not label.startswith("torch")}
    assert chosen["how"] == "timed" and set(chosen["images_per_second"]) == portable
    record = _manifest(tmp_path / "b")["portable_model"]
    assert (
        record["cached"] is True and record["fidelity"]["min_cosine"] >= BOUND[chosen["precision"]]
    )
    model = seeded_model(0)
    got = read_embeddings_by_key(tmp_path / "b")
    assert (
        min(float(v @ reference_embedding(model, src / k)) for k, v in got.items())
        >= BOUND[chosen["precision"]]
    )
    _build(src, tmp_path / "c", "--runtime", "auto", "--precision", "auto")
    assert _manifest(tmp_path / "c")["runtime"]["how"] == "cached"  # remembered


def test_on_cuda_the_trial_checks_bf16_against_the_model_itself_in_fp32(tmp_path: Path) -> None:
    """A CUDA build's only candidate is torch (bf16 by default): checked against torch fp32 on
    the build's images, run by the model on its own device (here a CPU model that says it
    is on CUDA), not by a CPU copy of it."""
    import numpy as np

    from indexer.config import ModelConfig
    from indexer.model.export import fallback_images
    from indexer.model.runtime_choice import Choice, RuntimePlan
    from indexer.model.runtime_trial import settle
    from indexer.model.timm_model import load_embedder

    embedder = load_embedder(ModelConfig(pretrained=False, precision="fp32", device="cpu"))
    embedder.on_cuda = True
    plan = RuntimePlan((Choice("torch", "bf16"),), "forced", "torch embeds on CUDA")
    sample = np.asarray(fallback_images(embedder, 8))
    runtime, decision, exported = settle(plan, embedder, sample, tmp_path)
    assert exported is None and runtime.recipe["precision"] == "bf16"
    assert decision.how == "forced" and decision.fidelity["min_cosine"] >= BOUND["bf16"]
    assert decision.fidelity["min_cosine"] < 1.0  # bf16 really ran against an fp32 reference


@pytest.mark.usefixtures("fresh_cache")
def test_a_first_build_runs_torch_fp32_on_its_check_images_once(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trial's reference is the export's too: not a second copy of the model run on the
    same images (a large model's seconds)."""
    from indexer.model import export

    calls: list[int] = []
    real = export.reference

    def counted(wrapper: Any, images: Any) -> Any:
        calls.append(len(images))
        return real(wrapper, images)

    monkeypatch.setattr(export, "reference", counted)
    _build(corpus / "group0", tmp_path / "c", "--runtime", "onnx")
    assert len(calls) == 1, calls
    assert _manifest(tmp_path / "c")["portable_model"]["fidelity"]["min_cosine"] >= BOUND["fp32"]
