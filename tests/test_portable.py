"""The portable model: exported with the build, checked, stored, carried, verified, and run
without torch or timm (queries) or without timm (incremental builds)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from indexer.config import ModelConfig
from indexer.errors import InputError
from indexer.model import export
from indexer.model.portable import MODEL_FILE, PortableEmbedder
from indexer.model.runtime import choose_runtime
from indexer.model.timm_model import load_embedder
from indexer.query.collection import Collection
from indexer.synthetic import scene
from tests.helpers import BUILD_FLAGS, copy_of, edit_manifest, read_embeddings_by_key, run_cli

INDEXER = str(Path(sys.executable).parent / "indexer")
NO_PORTABLE = "the collection has no portable model (x)"


@pytest.mark.parametrize(
    ("asked", "cuda", "unusable", "chosen"),
    [
        ("auto", False, None, "onnxruntime"),
        ("auto", True, None, "torch"),
        ("auto", False, NO_PORTABLE, "torch"),
        ("torch", False, None, "torch"),
        ("onnx", False, None, "onnxruntime"),
        ("openvino", False, None, "openvino"),
        ("onnx", True, None, "runs on the CPU"),
        ("onnx", False, NO_PORTABLE, "no portable model"),
        ("tensorrt", False, None, "unknown runtime"),
    ],
)
def test_choose_runtime(asked: str, cuda: bool, unusable: str | None, chosen: str) -> None:
    if chosen in ("onnxruntime", "openvino", "torch"):
        assert choose_runtime(asked, cuda, unusable) == chosen
    else:
        with pytest.raises(InputError, match=chosen):
            choose_runtime(asked, cuda, unusable)


def _images(count: int, size: int = 160) -> np.ndarray:
    return np.stack([np.asarray(scene(s, (size, size))) for s in range(count)])


@pytest.mark.parametrize(
    "recipe",
    [
        {},
        {"labels": 3},
        {"pooling": "gem", "feature_stage": 1},
        {"normalize": False, "pooling": "max"},
    ],
)
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_exported_model_computes_what_torch_does(
    recipe: dict, backend: str, tmp_path: Path
) -> None:
    embedder = load_embedder(ModelConfig(pretrained=False, precision="fp32", **recipe))
    images = _images(12)
    exported = embedder.portable_model(images[:8], tmp_path)
    assert exported.record is not None, exported.reason
    assert exported.record["fidelity"]["min_cosine"] >= export.FIDELITY_MIN
    portable = PortableEmbedder((tmp_path / MODEL_FILE).read_bytes(), embedder.recipe,
                                exported.record, backend)  # fmt: skip
    want, want_labels = embedder.embed_with_labels(torch.from_numpy(images[8:]))
    got, got_labels = portable.embed_with_labels(images[8:])  # images it was not checked on
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-4
    assert [r["label_index"] for r in got_labels] == [r["label_index"] for r in want_labels]
    assert [r["label_name"] for r in got_labels] == [r["label_name"] for r in want_labels]


def test_a_model_below_the_fidelity_bound_is_not_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    embedder = load_embedder(ModelConfig(pretrained=False))
    monkeypatch.setattr(export, "FIDELITY_MIN", 1.5)  # no cosine reaches it
    exported = embedder.portable_model(_images(4), tmp_path)
    assert exported.record is None
    assert "reproduces torch fp32 only to cosine" in str(exported.reason)
    assert not (tmp_path / MODEL_FILE).exists()


def test_a_corrupt_cached_export_never_decides(tmp_path: Path) -> None:
    embedder = load_embedder(ModelConfig(pretrained=False))
    images = _images(4)
    for name in "abc":
        (tmp_path / name).mkdir()
    first = embedder.portable_model(images, tmp_path / "a")
    assert first.record is not None
    cached = next((Path(os.environ["INDEXER_CACHE_DIR"]) / export.CACHE).glob("*.onnx"))
    other = load_embedder(ModelConfig(pretrained=False, seed=5))
    other.portable_model(images, tmp_path / "b")  # another seed: another cache entry
    for planted in (b"not a model", (tmp_path / "b" / MODEL_FILE).read_bytes()):
        cached.write_bytes(planted)  # garbage, then another model's export under this key
        again = embedder.portable_model(images, tmp_path / "c")
        assert again.record is not None and again.record["sha256"] == first.record["sha256"]
        (tmp_path / "c" / MODEL_FILE).unlink()


def _small(corpus: Path, tmp_path: Path, *flags: str, groups: int = 1) -> tuple[Path, Path]:
    """A source of the corpus's first groups and its collection, built: (src, out)."""
    src, out = tmp_path / "src", tmp_path / "c"
    for group in range(groups):
        shutil.copytree(corpus / f"group{group}", src / f"group{group}")
    result = run_cli("build", src, "--out", out, *BUILD_FLAGS, *flags)
    assert result.exit_code == 0, result.output
    return src, out


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def test_build_stores_the_model_in_the_version(collection: Path) -> None:
    import hashlib

    manifest = _manifest(collection)
    record = manifest["portable_model"]
    model = (collection / "current" / record["path"]).read_bytes()
    assert record["path"] == MODEL_FILE and hashlib.sha256(model).hexdigest() == record["sha256"]
    assert record["opset"] == export.OPSET and record["input"]["shape"] == ["batch", 160, 160, 3]
    assert record["torch_version"] == torch.__version__ and record["timm_version"]
    assert record["fidelity"]["min_cosine"] >= 0.9999
    assert record["fidelity"]["images_from"] == "the build"
    info = run_cli("info", collection)
    assert "portable:    model.onnx (ONNX opset 18" in info.output


def _blocker(tmp_path: Path, modules: tuple[str, ...]) -> dict[str, str]:
    """An environment in which importing these modules fails, as if they were not installed."""
    folder = tmp_path / "blocker"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        f"for name in {modules!r}:\n"
        "    sys.modules[name] = None  # import fails; find_spec says: not installed\n"
    )
    return {**os.environ, "PYTHONPATH": str(folder)}


def _by_key(doc: list[dict]) -> list[list[tuple[str, float]]]:
    return [[(r["key"], r["score"]) for r in q["results"]] for q in doc]


def _same_answers(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(_by_key(got), _by_key(want), strict=True):
        assert [k for k, _ in g] == [k for k, _ in w]
        assert np.allclose([s for _, s in g], [s for _, s in w], atol=1e-4)


def test_query_needs_neither_torch_nor_timm(collection: Path, corpus: Path, tmp_path: Path) -> None:
    images = [str(p) for p in sorted(corpus.rglob("*.jpg"))[:3]]
    torch_path = run_cli("query", *images, "--index", collection, "--json", "--runtime", "torch")
    assert torch_path.exit_code == 0, torch_path.output
    env = _blocker(tmp_path, ("torch", "timm", "torchvision"))
    argv = [INDEXER, "query", *images, "--index", str(collection), "--json", "-k", "10"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    _same_answers(json.loads(done.stdout), json.loads(torch_path.stdout))
    refused = subprocess.run([*argv, "--runtime", "torch"], env=env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert refused.returncode != 0  # the blocker is real: the torch path cannot run there
    api = (
        "import json, sys\nfrom indexer.query.collection import Collection\n"
        "c = Collection(sys.argv[1])\nscores, keys = c.search_images(sys.argv[2:], k=5)\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
        "rows = [[[k, float(s)] for k, s in zip(ks, ss)] for ks, ss in zip(keys, scores)]\n"
        "print(json.dumps(rows))"
    )
    done = subprocess.run([sys.executable, "-c", api, str(collection), *images], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    want = [[(k, s) for k, s in row] for row in _by_key(json.loads(torch_path.stdout))]
    for got_row, want_row in zip(json.loads(done.stdout), want, strict=True):
        assert [k for k, _ in got_row] == [k for k, _ in want_row[:5]]
        assert np.allclose([s for _, s in got_row], [s for _, s in want_row[:5]], atol=1e-4)


def test_openvino_answers_as_onnxruntime_does(collection: Path, corpus: Path) -> None:
    names = {r: Collection.open(collection, runtime=r, device="cpu").embedder.name
             for r in ("auto", "onnx", "openvino", "torch")}  # fmt: skip
    own = _manifest(collection)["runtime"]["name"]  # auto: the collection's own runtime
    assert names == {"auto": own, "onnx": "onnxruntime", "openvino": "openvino",
                     "torch": "torch"}  # fmt: skip
    image = sorted(corpus.rglob("*.png"))[0]
    runs = [run_cli("query", image, "--index", collection, "--json", "--runtime", r)
            for r in ("onnx", "openvino", "torch")]  # fmt: skip
    assert all(r.exit_code == 0 for r in runs), [r.output for r in runs]
    docs = [json.loads(r.stdout) for r in runs]
    _same_answers(docs[0], docs[2])
    _same_answers(docs[1], docs[2])


@pytest.mark.usefixtures("fresh_cache")
def test_incremental_build_runs_the_stored_model_without_timm(corpus: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(corpus / "group0", src / "group0")
    out = tmp_path / "c"
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS, "--runtime", "onnx").exit_code == 0
    shutil.copytree(corpus / "group1", src / "group1")
    env = _blocker(tmp_path, ("timm", "torchvision"))
    argv = [INDEXER, "build", str(src), "--out", str(out), *BUILD_FLAGS]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["runtime"] for r in runs] == ["onnxruntime", "onnxruntime"]
    assert [r["choice"]["how"] for r in runs] == ["forced", "recorded"]
    v1, v2 = (
        (out / "versions" / "v000001" / MODEL_FILE),
        (out / "versions" / "v000002" / MODEL_FILE),
    )
    assert v1.stat().st_ino == v2.stat().st_ino  # carried over as a hard link, not exported
    reference = tmp_path / "ref"
    assert (
        run_cli("build", src, "--out", reference, *BUILD_FLAGS, "--runtime", "torch").exit_code == 0
    )
    got, want = read_embeddings_by_key(out), read_embeddings_by_key(reference)
    assert got.keys() == want.keys()
    assert max(float(np.abs(got[k] - want[k]).max()) for k in got) < 1e-5
    assert not subprocess.run(
        [INDEXER, "verify", str(out)], env=env, capture_output=True, timeout=120
    ).returncode


@pytest.mark.usefixtures("fresh_cache")  # no known export: the export is made and checked
def test_runtime_onnx_without_a_portable_model_is_one_line(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "FIDELITY_MIN", 1.5)  # the export never passes its check
    out = tmp_path / "c"
    first = run_cli("build", corpus, "--out", out, *BUILD_FLAGS, "--runtime", "onnx")
    assert first.exit_code == 4 and "there is none" in first.output, first.output
    assert "--runtime torch" in first.output
    assert not (out / "current").exists()  # nothing published


def test_a_collection_without_a_portable_model_says_why(
    collection: Path, corpus: Path, tmp_path: Path
) -> None:
    copy = copy_of(collection, tmp_path)

    def drop(manifest: dict) -> None:
        del manifest["portable_model"]
        manifest["portable_model_reason"] = "export failed: RuntimeError: unsupported op"
        manifest["runtime"]["name"] = "torch"  # what embeds where there is no portable model

    edit_manifest(copy, drop)
    info = run_cli("info", copy)
    assert "portable:    none (export failed: RuntimeError: unsupported op)" in info.output
    image = sorted(corpus.rglob("*.jpg"))[0]
    auto = run_cli("query", image, "--index", copy, "--json")
    assert auto.exit_code == 0  # torch answers
    onnx = run_cli("query", image, "--index", copy, "--runtime", "onnx")
    assert onnx.exit_code == 2 and "unsupported op" in onnx.output


@pytest.mark.parametrize("path", ["../../model.onnx", "/etc/passwd", "model.pt", ""])
def test_a_tampered_model_path_is_refused(collection: Path, tmp_path: Path, path: str) -> None:
    copy = copy_of(collection, tmp_path)
    edit_manifest(copy, lambda m: m["portable_model"].update(path=path))
    result = run_cli("query", "--id", "group0/scene0000.png", "--index", copy)
    assert result.exit_code == 3 and "portable_model.path" in result.output
    assert "Traceback" not in result.output


def test_a_damaged_model_is_found_and_exported_again(
    collection: Path, corpus: Path, tmp_path: Path
) -> None:
    copy = copy_of(collection, tmp_path)
    model = copy / "current" / MODEL_FILE
    original = model.read_bytes()
    model.unlink()  # versions share it by hard link: write a new file, never through
    model.write_bytes(original[:-100] + b"\0" * 100)
    image = sorted(corpus.rglob("*.jpg"))[0]
    refused = run_cli("query", image, "--index", copy, "--runtime", "onnx")
    assert refused.exit_code == 3 and "verify --repair" in refused.output
    auto = run_cli("query", image, "--index", copy, "--json")  # auto: torch, with a warning
    assert auto.exit_code == 0, auto.output
    checked = run_cli("verify", copy)
    assert checked.exit_code != 0 and "model model.onnx: its bytes differ" in checked.output
    repaired = run_cli("verify", "--repair", copy)
    assert repaired.exit_code == 0 and "exported its model again" in repaired.output
    assert run_cli("verify", copy).exit_code == 0
    record = _manifest(copy)["portable_model"]
    assert record["fidelity"]["images_from"] == "generated scenes"
    assert (copy / "current" / MODEL_FILE).read_bytes() == original  # the same export
    again = run_cli("query", image, "--index", copy, "--json", "--runtime", "onnx")
    _same_answers(json.loads(again.stdout), json.loads(auto.stdout))


def test_a_missing_model_is_exported_again_by_the_next_version(
    collection: Path, tmp_path: Path
) -> None:
    copy = copy_of(collection, tmp_path)
    (copy / "current" / MODEL_FILE).unlink()
    assert "model model.onnx: missing" in run_cli("verify", copy).output
    reindexed = run_cli("index", copy)  # a re-index exports a lost model again
    assert reindexed.exit_code == 0, reindexed.output
    assert run_cli("verify", copy).exit_code == 0
    assert _manifest(copy)["portable_model"]["fidelity"]["images_from"] == "generated scenes"


def test_reindex_and_merge_carry_the_model(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "parts"
    for i in range(2):
        part = run_cli("build", corpus, "--out", out, *BUILD_FLAGS, "--partition", f"{i}/2")
        assert part.exit_code == 0, part.output
    merged = run_cli("index", out)
    assert merged.exit_code == 0, merged.output
    record = _manifest(out)["portable_model"]
    assert (out / "current" / MODEL_FILE).is_file() and run_cli("verify", out).exit_code == 0
    reindexed = run_cli("index", out, "--index-type", "flat")
    assert reindexed.exit_code == 0 and _manifest(out)["portable_model"] == record
    inodes = {p.stat().st_ino for p in (out / "versions").glob("v*/" + MODEL_FILE)}
    assert len(inodes) == 1


def test_touched_and_copied_files_load_no_model(corpus: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(corpus / "group0", src / "group0")
    out = tmp_path / "c"
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS).exit_code == 0
    before = read_embeddings_by_key(out)
    files = sorted((src / "group0").iterdir())
    for path in files[:3]:
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    shutil.copy(files[3], src / "group0" / "copy.jpg")
    env = _blocker(tmp_path, ("torch", "timm", "torchvision", "onnxruntime", "openvino"))
    argv = [INDEXER, "build", str(src), "--out", str(out), *BUILD_FLAGS]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    last = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert last["runtime"] is None and last["counts"]["reused"] == 4
    after = read_embeddings_by_key(out)
    assert set(after) == set(before) | {"group0/copy.jpg"}
    assert all(np.array_equal(after[k], before[k]) for k in before)
    assert np.array_equal(after["group0/copy.jpg"], before[files[3].relative_to(src).as_posix()])
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Nothing changed" in again.stdout  # new mtimes recorded
    assert run_cli("verify", out).exit_code == 0
    assert "portable_model" in _manifest(out)


def test_incremental_labels_from_the_stored_model_equal_torch(corpus: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    shutil.copytree(corpus / "group0", src / "group0")
    out, ref = tmp_path / "c", tmp_path / "ref"
    flags = (*BUILD_FLAGS, "--labels", "3", "--pooling", "gem")
    assert run_cli("build", src, "--out", out, *flags, "--runtime", "onnx").exit_code == 0
    shutil.copytree(corpus / "group1", src / "group1")
    assert run_cli("build", src, "--out", out, *flags).exit_code == 0
    assert json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["runtime"] == "onnxruntime"
    assert run_cli("build", src, "--out", ref, *flags, "--runtime", "torch").exit_code == 0

    def labels(root: Path) -> dict[str, tuple]:
        table = pq.read_table(root / "shards", columns=["key", "label_index", "label_name"])
        return {r["key"]: (r["label_index"], r["label_name"]) for r in table.to_pylist()}

    got, want = labels(out), labels(ref)
    assert got.keys() == want.keys() and all(got[k][1] for k in got)
    assert sum(got[k] == want[k] for k in got) == len(got)


@pytest.mark.usefixtures("fresh_cache")
def test_a_first_build_embeds_every_batch_with_the_runtime_it_chose(
    corpus: Path, tmp_path: Path
) -> None:
    """The first batch included: torch embeds it only to check the export against."""
    flags = (*BUILD_FLAGS, "--batch-size", "8")
    auto, torch_only = tmp_path / "auto", tmp_path / "torch"
    assert run_cli("build", corpus, "--out", auto, *flags, "--runtime", "onnx").exit_code == 0
    assert (
        run_cli("build", corpus, "--out", torch_only, *flags, "--runtime", "torch").exit_code == 0
    )
    runtimes = [json.loads((d / "runs.jsonl").read_text())["runtime"] for d in (auto, torch_only)]
    assert runtimes == ["onnxruntime", "torch"]
    got, want = read_embeddings_by_key(auto), read_embeddings_by_key(torch_only)
    assert got.keys() == want.keys() and len(got) > 8
    assert max(float(np.abs(got[k] - want[k]).max()) for k in got) < 1e-5
    records = [_manifest(d)["portable_model"] for d in (auto, torch_only)]
    assert records[0]["sha256"] == records[1]["sha256"]
    assert records[0]["fidelity"]["images"] == 8  # checked on the first batch


def test_batchnorm_models_export_and_match(tmp_path: Path) -> None:
    """The check runs the wrapper in eval mode: BatchNorm uses its running statistics."""
    embedder = load_embedder(
        ModelConfig(name="test_resnet.r160_in1k", pretrained=False, precision="fp32")
    )
    images = _images(8)
    exported = embedder.portable_model(images, tmp_path)
    assert exported.record is not None, exported.reason
    portable = PortableEmbedder((tmp_path / MODEL_FILE).read_bytes(), embedder.recipe,
                                exported.record)  # fmt: skip
    want = embedder.embed(torch.from_numpy(images))
    assert np.abs(portable.embed(images) - want).max() < 1e-4
    again = embedder.embed(torch.from_numpy(images))  # the export left the model untouched
    assert np.array_equal(again, want)


@pytest.mark.parametrize("run", ["touch", "merge"])
def test_a_lost_model_is_exported_again_by_runs_that_embed_nothing(
    corpus: Path, tmp_path: Path, run: str
) -> None:
    if run == "merge":
        src, out = _small(corpus, tmp_path, "--partition", "0/2", groups=2)
        assert (
            run_cli("build", src, "--out", out, *BUILD_FLAGS, "--partition", "1/2").exit_code == 0
        )
    else:
        src, out = _small(corpus, tmp_path, groups=2)
    models = {p.resolve() for p in out.glob("**/current/" + MODEL_FILE)}
    for model in models:
        model.unlink()
    if run == "touch":
        path = next((src / "group0").iterdir())
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
        result = run_cli("build", src, "--out", out, *BUILD_FLAGS)
    else:
        result = run_cli("index", out)
    assert result.exit_code == 0, result.output
    assert _manifest(out)["portable_model"]["sha256"]
    assert run_cli("verify", out).exit_code == 0


def test_without_torch_a_collection_without_a_usable_model_is_one_line(
    collection: Path, corpus: Path, tmp_path: Path
) -> None:
    copy = copy_of(collection, tmp_path)
    model = copy / "current" / MODEL_FILE
    model.unlink()
    model.write_bytes(b"garbage")
    env = _blocker(tmp_path, ("torch", "timm", "torchvision"))
    image = str(sorted(corpus.rglob("*.jpg"))[0])
    done = subprocess.run([INDEXER, "query", image, "--index", str(copy)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "torch is not installed here" in done.stderr and "verify --repair" in done.stderr


def test_label_names_that_do_not_fit_the_model_are_refused(corpus: Path, tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "c"
    shutil.copytree(corpus / "group0", src / "group0")
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS, "--labels", "3").exit_code == 0
    edit_manifest(out, lambda m: m["portable_model"].update(label_names=["a", "b"]))
    shutil.copytree(corpus / "group1", src / "group1")
    result = run_cli("build", src, "--out", out, *BUILD_FLAGS, "--labels", "3")
    assert result.exit_code == 3 and "names 2 classes but the model has 1000" in result.output


def test_unknown_runtime_is_refused_at_open(collection: Path) -> None:
    with pytest.raises(InputError, match="unknown runtime"):
        Collection.open(collection, runtime="bogus")


def test_a_touch_only_run_links_the_index_a_rename_rebuilds_it(
    corpus: Path, tmp_path: Path
) -> None:
    src, out = _small(corpus, tmp_path)
    files = sorted((src / "group0").iterdir())
    os.utime(files[0], ns=(files[0].stat().st_atime_ns, files[0].stat().st_mtime_ns + 10**9))
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS).exit_code == 0
    v1, v2 = (out / "versions" / f"v00000{n}" / "index" for n in (1, 2))
    assert (v1 / "index.faiss").stat().st_ino == (v2 / "index.faiss").stat().st_ino
    meta = json.loads((v2 / "meta.json").read_text())
    assert meta["reused_from"] == "v000001" and meta["shards"] == _manifest(out)["shards"]
    assert run_cli("verify", out).exit_code == 0
    image = files[0]
    hit = json.loads(run_cli("query", image, "--index", out, "--json").stdout)[0]["results"][0]
    assert hit["key"] == "group0/" + image.name and hit["mtime_ns"] == image.stat().st_mtime_ns
    files[1].rename(files[1].with_name("renamed.jpg"))  # a new key, a new id: a new index
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS).exit_code == 0
    v3 = out / "versions" / "v000003" / "index"
    assert "reused_from" not in json.loads((v3 / "meta.json").read_text())
    assert run_cli("verify", out).exit_code == 0


@pytest.mark.parametrize("damage", ["flip", "foreign"])
def test_a_touch_only_run_never_carries_an_index_that_is_not_whole(
    corpus: Path, tmp_path: Path, damage: str
) -> None:
    src, out = _small(corpus, tmp_path)
    files = sorted((src / "group0").iterdir())
    current = (out / "current").resolve() / "index"
    if damage == "flip":  # same size, other bytes
        data = bytearray((current / "index.faiss").read_bytes())
        data[100:400] = bytes(b ^ 0xFF for b in data[100:400])
        (current / "index.faiss").unlink()
        (current / "index.faiss").write_bytes(bytes(data))
    else:  # another version's index (same ids, other vectors) put in its place
        shutil.copy(files[1], files[0])
        assert run_cli("build", src, "--out", out, *BUILD_FLAGS).exit_code == 0
        current = (out / "current").resolve() / "index"
        shutil.rmtree(current)
        shutil.copytree(out / "versions" / "v000001" / "index", current)
    assert run_cli("verify", out).exit_code == 3
    for path in files:
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    result = run_cli("build", src, "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 0 and "reused from" not in result.output
    assert run_cli("verify", out).exit_code == 0  # built again, from the shards


@pytest.mark.parametrize("planted", ["link", "grown"])
def test_a_model_file_that_is_a_link_or_larger_is_refused_unread(
    collection: Path, corpus: Path, tmp_path: Path, planted: str
) -> None:
    copy = copy_of(collection, tmp_path)
    model = copy / "current" / MODEL_FILE
    data = model.read_bytes()
    model.unlink()
    if planted == "link":  # even to the right bytes: a version's model is its own file
        (tmp_path / "elsewhere.onnx").write_bytes(data)
        model.symlink_to(tmp_path / "elsewhere.onnx")
    else:
        model.write_bytes(data + b"\0" * 4096)
    image = sorted(corpus.rglob("*.jpg"))[0]
    refused = run_cli("query", image, "--index", copy, "--runtime", "onnx")
    assert refused.exit_code == 3 and "cannot be read" in refused.output
    state = "a symbolic link" if planted == "link" else "its bytes differ"
    assert f"model model.onnx: {state}" in run_cli("verify", copy).output
    assert run_cli("verify", "--repair", copy).exit_code == 0
    assert not (copy / "current" / MODEL_FILE).is_symlink()
    assert (copy / "current" / MODEL_FILE).read_bytes() == data


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_the_portable_model_embeds_from_several_threads_at_once(
    backend: str, tmp_path: Path
) -> None:
    """The service embeds uploads from a thread pool: OpenVINO's infer request serves one call
    at a time ("Infer Request is busy"), so each thread gets its own."""
    from concurrent.futures import ThreadPoolExecutor

    embedder = load_embedder(ModelConfig(pretrained=False, precision="fp32"))
    images = _images(8)
    exported = embedder.portable_model(images, tmp_path)
    assert exported.record is not None, exported.reason
    portable = PortableEmbedder((tmp_path / MODEL_FILE).read_bytes(), embedder.recipe,
                                exported.record, backend)  # fmt: skip
    want = portable.embed(images)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda n: portable.embed(images[n % 8 :][:4]), range(32)))
    for n, vectors in enumerate(got):
        assert np.allclose(vectors, want[n % 8 :][:4], atol=1e-6)


def test_openvino_sends_no_telemetry_and_writes_nothing_home(
    collection: Path, corpus: Path, tmp_path: Path
) -> None:
    """`import openvino` loads its converter's telemetry, which sends an event to Google
    Analytics and counts imports in ~/intel/stats: a query with OpenVINO writes nothing under
    HOME and never loads the telemetry package (OpenVINO's no-op stub stands in)."""
    home = tmp_path / "home"
    home.mkdir()
    image = sorted(corpus.rglob("*.png"))[0]
    script = (
        "import sys\n"
        "from indexer.query.collection import Collection\n"
        f"c = Collection.open({str(collection)!r}, runtime='openvino', device='cpu')\n"
        f"print(c.search_images([{str(image)!r}], k=3)[1].shape[1])\n"
        "print(sys.modules.get('openvino_telemetry'), 'openvino' in sys.modules)\n"
    )
    env = {**os.environ, "HOME": str(home), "CI": ""}  # (its CI check would hide a send)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["3", "None", "True"], done.stdout
    assert not any(home.iterdir()), sorted(home.rglob("*"))


@pytest.mark.parametrize("signal_exc", [None, "Interrupted", "KeyboardInterrupt"])
def test_a_signal_during_a_runtime_import_is_the_signal_not_a_missing_package(
    monkeypatch: pytest.MonkeyPatch, signal_exc: str | None
) -> None:
    """pybind11 turns an exception raised in a module's native initialisation into an
    ImportError (its cause the original): SIGTERM's Interrupted or ^C landing there stops
    the run; only a real ImportError says the package is missing."""
    import importlib.abc
    import sys

    from indexer.errors import InputError, Interrupted
    from indexer.model.portable import import_runtime

    class Failing(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
            if name != "fake_runtime_for_a_test":
                return None
            if signal_exc is None:
                raise ImportError("no module named fake_runtime_for_a_test")
            cause = Interrupted() if signal_exc == "Interrupted" else KeyboardInterrupt()
            raise ImportError("initialization failed") from cause

    monkeypatch.setattr(sys, "meta_path", [Failing(), *sys.meta_path])
    want: type[BaseException] = InputError
    if signal_exc is not None:
        want = Interrupted if signal_exc == "Interrupted" else KeyboardInterrupt
    with pytest.raises(want) as raised:
        import_runtime("fake_runtime_for_a_test", "fake is not installed: pip install it")
    assert type(raised.value) is want
