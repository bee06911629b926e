"""Incremental builds: only new and changed items are embedded; the result equals a clean build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from indexer.synthetic import scene
from tests.helpers import (
    BUILD_FLAGS,
    read_embeddings_by_key,
    reference_embedding,
    run_cli,
    seeded_model,
)


def build(src: Path, out: Path, *flags: str) -> dict:
    result = run_cli("build", src, "--out", out, *BUILD_FLAGS, *flags)
    assert result.exit_code == 0, result.output
    return json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["counts"]


def ids_by_key(out: Path) -> dict[str, int]:
    table = pq.read_table(out / "shards", columns=["key", "id"])
    return dict(zip(table.column("key").to_pylist(), table.column("id").to_pylist(), strict=True))


@pytest.fixture
def photos(corpus: Path, tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    shutil.copytree(corpus / "group0", root / "a")
    shutil.copytree(corpus / "group1", root / "b")
    return root


def test_each_kind_of_change(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    first = build(photos, out)
    n = first["listed"]
    assert first == {
        "listed": n, "new": n, "changed": 0, "unchanged": 0, "deleted": 0, "failed": 0, "reused": 0,
        "embedded": n,
    }  # fmt: skip
    before, ids_before = read_embeddings_by_key(out), ids_by_key(out)

    a = sorted((photos / "a").iterdir())
    (photos / "b" / sorted(p.name for p in (photos / "b").iterdir())[0]).unlink()  # deleted
    os.utime(a[0], ns=(1, 10**18))  # touched, same bytes
    scene(999, (320, 240)).save(a[1].with_name("added.png"))  # new
    scene(998, (320, 240)).save(a[2])  # same name, new content
    a[3].rename(a[3].with_name("renamed" + a[3].suffix))  # renamed
    shutil.copy(a[4], photos / "b" / ("copy" + a[4].suffix))  # duplicated
    counts = build(photos, out)
    assert counts == {
        "listed": n + 1, "new": 3, "changed": 1, "unchanged": n - 3, "deleted": 2, "failed": 0,
        "reused": 3,  # the touched, the renamed and the duplicated file: no model run for them
        "embedded": 2,  # the added and the changed file: the model ran for these alone
    }  # fmt: skip

    after, ids_after = read_embeddings_by_key(out), ids_by_key(out)
    rel = lambda p: p.relative_to(photos).as_posix()  # noqa: E731
    assert np.array_equal(after[rel(a[0])], before[rel(a[0])])  # touched: kept
    renamed = f"a/renamed{a[3].suffix}"
    assert np.array_equal(after[renamed], before[rel(a[3])])  # vector reused, not re-embedded
    assert np.array_equal(after[f"b/copy{a[4].suffix}"], before[rel(a[4])])
    assert ids_after[rel(a[2])] == ids_before[rel(a[2])]  # a changed file keeps its id
    assert ids_after[rel(a[0])] == ids_before[rel(a[0])]
    assert len(set(ids_after.values())) == len(ids_after)
    assert max(ids_after.values()) >= max(ids_before.values()) + 3  # new ids, never reused
    model = seeded_model(0)
    for key in (rel(a[2]), "a/added.png"):
        assert float(after[key] @ reference_embedding(model, photos / key)) >= 0.9999

    clean = tmp_path / "clean"
    build(photos, clean)
    fresh = read_embeddings_by_key(clean)
    assert fresh.keys() == after.keys()
    for key in fresh:
        np.testing.assert_allclose(after[key], fresh[key], atol=1e-6)
    index = faiss.read_index(str(out / "index" / "index.faiss"))
    assert index.ntotal == len(after)


def test_nothing_changed_does_not_load_the_model(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    build(photos, out)
    code = (
        "import sys\nfrom indexer.cli.main import main\n"
        "try:\n    main(sys.argv[1:])\n"
        "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print(sorted({'torch', 'timm', 'faiss'} & set(sys.modules)))"
    )
    argv = ["build", str(photos), "--out", str(out), *BUILD_FLAGS]
    run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"Nothing changed in {out}")
    assert run.stdout.strip().endswith("[]")
    assert os.readlink(out / "current") == "versions/v000001"


def test_a_different_recipe_is_refused_until_rebuild(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    build(photos, out)
    for flags in (("--seed", "1"), ("--exact-preprocessing",), ("--no-normalize",)):
        refused = run_cli("build", photos, "--out", out, *BUILD_FLAGS, *flags)
        assert refused.exit_code == 2 and "--rebuild" in refused.output, refused.output
    counts = build(photos, out, "--seed", "1", "--rebuild")
    assert counts["new"] == counts["listed"]
    assert build(photos, out, "--seed", "1")["unchanged"] == counts["listed"]


def test_unchanged_failures_are_not_retried_unless_asked(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    broken = photos / "a" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    flags = ("--max-failures", "1")
    result = run_cli("build", photos, "--out", out, *BUILD_FLAGS, *flags)
    assert result.exit_code == 5, result.output  # partial
    again = run_cli("build", photos, "--out", out, *BUILD_FLAGS, *flags)
    assert again.exit_code == 5 and again.output.startswith("Nothing changed"), again.output
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert [e["key"] for e in errors] == ["a/broken.jpg"]
    retried = run_cli("build", photos, "--out", out, *BUILD_FLAGS, *flags, "--retry-failed")
    assert retried.exit_code == 5 and "1 failed" in retried.output
    assert os.readlink(out / "current") == "versions/v000002"
    scene(7, (64, 48)).save(broken, "JPEG")  # fixed: now it embeds
    fixed = build(photos, out, *flags)
    assert fixed["new"] == 1 and fixed["failed"] == 0
    assert pq.read_table(out / "errors.parquet").num_rows == 0


def test_dry_run_prints_the_plan_and_changes_nothing(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    build(photos, out)
    history = (out / "runs.jsonl").read_text()
    scene(5, (64, 48)).save(photos / "a" / "new.png")
    victim = sorted((photos / "b").iterdir())[0]
    victim.unlink()
    result = run_cli("build", photos, "--out", out, "--dry-run", *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    assert "1 to read (new or changed)" in result.output and "1 to delete" in result.output
    assert "Nothing was changed" in result.output and "s of embedding" in result.output
    assert (out / "runs.jsonl").read_text() == history
    assert os.readlink(out / "current") == "versions/v000001"
    assert victim.relative_to(photos).as_posix() in ids_by_key(out)
