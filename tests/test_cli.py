"""The commands as a user runs them: build -> query -> info -> index, and their errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from indexer.cli.main import main
from tests.helpers import BUILD_FLAGS, run_cli


def corpus_images(corpus: Path) -> list[Path]:
    return sorted(p for p in corpus.rglob("*") if p.is_file())


@pytest.mark.parametrize("command", [[], *[[name] for name in main.commands]])
def test_every_command_has_help(command: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output
    assert len(result.output.splitlines()) > 3


def test_help_does_not_import_heavy_libraries() -> None:
    heavy = "{'torch', 'timm', 'faiss', 'datasets'}"
    code = f"import sys, indexer.cli.main; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_image_finds_itself_first(collection: Path, corpus: Path) -> None:
    images = corpus_images(corpus)
    result = run_cli("query", *images, "--index", collection, "-k", "3", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert len(doc) == len(images)
    for entry, image in zip(doc, images, strict=True):
        top = entry["results"][0]
        assert entry["query"] == str(image)
        assert top["key"] == image.relative_to(corpus).as_posix()
        assert top["rank"] == 1 and top["score"] == pytest.approx(1.0, abs=1e-4)
        assert {"id", "width", "height"} <= top.keys()
        assert [r["rank"] for r in entry["results"]] == [1, 2, 3]
        assert entry["results"][0]["score"] >= entry["results"][1]["score"]


def test_query_prints_a_table(collection: Path, corpus: Path) -> None:
    image = corpus_images(corpus)[0]
    result = run_cli("query", image, "--index", collection, "-k", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"query: {image}"
    assert lines[1].split() == ["rank", "score", "key"]
    rank, score, key = lines[2].split()
    assert (rank, key) == ("1", image.relative_to(corpus).as_posix())
    assert float(score) == pytest.approx(1.0, abs=1e-4)


def test_collection_layout_reads_without_indexer(collection: Path, corpus: Path) -> None:
    manifest = json.loads((collection / "manifest.json").read_text())
    n = len(corpus_images(corpus))
    assert manifest["counts"] == {"items": n, "embedded": n, "failed": 0}
    table = pq.read_table(collection / "shards")
    assert table.num_rows == n
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[64]"
    assert table.schema.field("id").type == "int64"
    assert sorted(table.column("id").to_pylist()) == list(range(n))
    frame = pd.read_parquet(collection / "shards")
    assert frame["key"].is_unique and len(frame) == n
    norms = np.linalg.norm(np.stack(frame["embedding"].to_numpy()), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    index = faiss.read_index(str(collection / "index" / "index.faiss"))
    assert index.ntotal == n and index.d == 64
    assert pq.read_table(collection / "errors.parquet").num_rows == 0
    assert not list(collection.rglob("*.tmp"))


def test_info_shows_recipe_counts_and_index(collection: Path) -> None:
    result = run_cli("info", collection)
    assert result.exit_code == 0, result.output
    assert "test_convnext.r160_in1k" in result.output
    assert "random: seed 0" in result.output
    assert "160x160 bicubic" in result.output and "fast decoding" in result.output
    assert "recall@10 1.000" in result.output
    doc = json.loads(run_cli("info", collection, "--json").stdout)
    assert doc["index"]["ntotal"] == doc["manifest"]["counts"]["embedded"]
    assert doc["manifest"]["model"]["weights"] == {"kind": "random", "seed": 0}


def test_index_rebuilds_from_shards_alone(collection: Path, tmp_path: Path, corpus: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(collection, copy, symlinks=True)
    image = corpus_images(corpus)[5]
    before = json.loads(run_cli("query", image, "--index", copy, "--json").stdout)
    shutil.rmtree(copy / "current" / "index")
    missing = run_cli("query", image, "--index", copy)
    assert missing.exit_code == 3 and f"indexer index {copy}" in missing.output
    result = run_cli("index", copy)
    assert result.exit_code == 0, result.output
    after = json.loads(run_cli("query", image, "--index", copy, "--json").stdout)
    assert [r["id"] for r in after[0]["results"]] == [r["id"] for r in before[0]["results"]]
    assert os.readlink(copy / "current") == "versions/v000002"
    assert sorted(p.name for p in (copy / "versions").iterdir()) == ["v000001", "v000002"]


def test_shard_rotation(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    result = run_cli("build", corpus, "--out", out, "--shard-size", "7", *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    n = manifest["counts"]["embedded"]
    assert [s["rows"] for s in manifest["shards"]] == [7] * (n // 7) + ([n % 7] if n % 7 else [])
    for shard in manifest["shards"]:
        assert pq.read_metadata(out / "shards" / shard["name"]).num_rows == shard["rows"]


def test_rebuild_rules(collection: Path, corpus: Path, tmp_path: Path) -> None:
    again = run_cli("build", corpus, "--out", collection, *BUILD_FLAGS)
    assert again.exit_code == 0 and again.output.startswith(f"Nothing changed in {collection}")
    stranger = tmp_path / "stuff"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    refused = run_cli("build", corpus, "--out", stranger, *BUILD_FLAGS)
    assert refused.exit_code == 2 and "not empty" in refused.output
    assert (stranger / "notes.txt").read_text() == "mine"


def test_user_errors_are_one_line(tmp_path: Path, corpus: Path, collection: Path) -> None:
    bad_image = tmp_path / "bad.jpg"
    bad_image.write_text("not an image")
    cases = [
        (["query", bad_image, "--index", collection], 2, "cannot read query image"),
        (["query", corpus_images(corpus)[0], "--index", tmp_path / "nope"], 3, "no collection"),
        (["info", tmp_path], 3, "not a finished collection"),
        (
            ["build", tmp_path / "missing", "--out", tmp_path / "o", *BUILD_FLAGS],
            2,
            "does not exist",
        ),
        (
            ["build", corpus, "--out", tmp_path / "o", "--model", "nope_net", *BUILD_FLAGS],
            2,
            "unknown timm model",
        ),
    ]
    for args, code, text in cases:
        result = run_cli(*args)
        assert result.exit_code == code, (args, result.output)
        assert text in result.output
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1


def test_corrupt_manifest_is_reported(collection: Path, tmp_path: Path, corpus: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(collection, copy, symlinks=True)
    (copy / "manifest.json").write_text("{not json")
    result = run_cli("query", corpus_images(corpus)[0], "--index", copy)
    assert result.exit_code == 3 and "corrupt" in result.output


def test_pretrained_unavailable_fails_before_work(corpus: Path, tmp_path: Path) -> None:
    """A first build fails at once and leaves no folder; an existing folder is left as it was
    (a refused run leaves no history)."""
    out = tmp_path / "c"
    code = "import sys\nfrom indexer.cli.main import main\nmain(sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", code, "build", str(corpus), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 4
    assert "--checkpoint" in done.stderr and "--no-pretrained" in done.stderr
    assert done.stderr.count("\n") == 1
    assert not out.exists()  # nothing was built: nothing left behind
    assert "torch" not in done.stderr
    out.mkdir()
    result = run_cli("build", corpus, "--out", out, "--workers", "0")
    assert result.exit_code == 4 and "cannot be fetched" in result.output
    assert list(out.iterdir()) == []


def test_pretrained_check_is_immediate_without_importing_torch(
    corpus: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nfor name in ('torch', 'timm'):\n    sys.modules[name] = None\n"
    )
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    code = "import sys\nfrom indexer.cli.main import main\nmain(sys.argv[1:])"
    done = subprocess.run(
        [sys.executable, "-c", code, "build", str(corpus), "--out", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 4 and "cannot be fetched" in done.stderr, done.stderr


def test_failed_rebuild_keeps_the_old_collection(
    collection: Path, corpus: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(collection, copy, symlinks=True)
    empty = tmp_path / "empty-source"
    empty.mkdir()
    for args, message in (
        ([corpus, "--model", "nope_net", "--no-pretrained"], "unknown timm model"),
        ([empty, "--no-pretrained"], "hold no images"),
        ([corpus, "--pretrained"], "cannot be fetched"),
    ):
        result = run_cli("build", *args, "--out", copy, "--rebuild", "--workers", "0")
        assert result.exit_code in (2, 4) and message in result.output, result.output
    query = run_cli("query", corpus_images(corpus)[0], "--index", copy, "-k", "1")
    assert query.exit_code == 0, query.output


def test_architecture_lists_every_module_with_its_docstring() -> None:
    repo = Path(__file__).resolve().parents[1]
    text = (repo / "ARCHITECTURE.md").read_text()
    for path in sorted((repo / "indexer").rglob("*.py")):
        rel = path.relative_to(repo).as_posix()
        if rel == "indexer/__init__.py":
            continue
        first = path.read_text().splitlines()[0].strip('"')
        assert f"| `{rel}` | {first} |" in text, rel


def test_console_script_flushes_and_keeps_exit_codes(corpus: Path, tmp_path: Path) -> None:
    """The installed `indexer` skips interpreter teardown; output and files must be complete."""
    script = Path(sys.executable).parent / "indexer"
    out = tmp_path / "c"
    build = subprocess.run(
        [script, "build", corpus / "group1", "--out", out, "--no-pretrained", "--workers", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    count = len(list((corpus / "group1").iterdir()))
    assert build.stdout.startswith(f"Built {out}, version 1: {count} embedded, 0 reused")
    image = sorted((corpus / "group1").iterdir())[0]
    query = subprocess.run(
        [script, "query", image, "--index", out, "--json"], capture_output=True, text=True
    )
    assert query.returncode == 0 and json.loads(query.stdout)[0]["results"][0]["key"] == image.name
    missing = subprocess.run([script, "info", tmp_path / "nope"], capture_output=True, text=True)
    assert missing.returncode == 3 and missing.stderr.startswith("Error: no collection")
    usage = subprocess.run([script, "build"], capture_output=True, text=True)
    assert usage.returncode == 2 and "Missing argument" in usage.stderr
