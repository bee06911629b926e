"""Unique keys by construction, and honest merges of parts: nothing stale, mixed or resurrected."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from indexer.collection.lock import CollectionLock
from indexer.sources import unique_labels
from indexer.sources.folder import key_to_relpath, printable_key
from indexer.verify.check import verify
from tests.helpers import BUILD_FLAGS, read_embeddings_by_key, run_cli


@pytest.mark.parametrize(
    ("names", "labels"),
    [
        (["pics", "pics", "pics-2"], ["pics", "pics-3", "pics-2"]),
        (["a", "a", "a"], ["a", "a-2", "a-3"]),
        (["x-2", "x", "x"], ["x-2", "x", "x-3"]),
        (["a", "b"], ["a", "b"]),
    ],
)
def test_source_labels_are_unique(names: list[str], labels: list[str]) -> None:
    assert unique_labels(names) == labels


@pytest.mark.parametrize(
    "name", [b"\xff.jpg", b"\\xff.jpg", b"a\\b.jpg", "é/ß.jpg".encode(), b"x\\\xfe.png"]
)
def test_keys_of_file_names_are_injective_and_reversible(name: bytes) -> None:
    rel = os.fsdecode(name)
    key = printable_key(rel)
    key.encode("utf-8")  # strict UTF-8
    assert key_to_relpath(key) == rel
    assert printable_key(os.fsdecode(b"\xff.jpg")) != printable_key(os.fsdecode(b"\\xff.jpg"))


def _three_pics(corpus: Path, tmp_path: Path) -> list[Path]:
    folders = [tmp_path / "a" / "pics", tmp_path / "b" / "pics", tmp_path / "c" / "pics-2"]
    for n, folder in enumerate(folders):
        shutil.copytree(corpus / f"group{n}", folder)
    return folders


def test_colliding_source_names_do_not_grow_the_collection(corpus: Path, tmp_path: Path) -> None:
    folders = _three_pics(corpus, tmp_path)
    out = tmp_path / "coll"
    assert run_cli("build", *folders, "--out", out, *BUILD_FLAGS).exit_code == 0
    rows = len(read_embeddings_by_key(out))
    assert rows == sum(len(list(f.iterdir())) for f in folders)
    for _ in range(2):
        again = run_cli("build", *folders, "--out", out, *BUILD_FLAGS)
        assert again.exit_code == 0 and "Nothing changed" in again.output, again.output
    assert len(read_embeddings_by_key(out)) == rows and not verify(out).problems


def test_odd_file_names_never_share_a_key(corpus: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    jpg = sorted(corpus.rglob("*.jpg"))
    shutil.copy(jpg[0], os.fsencode(src) + b"/\xff.jpg")
    shutil.copy(jpg[1], os.fsencode(src) + b"/\\xff.jpg")
    out = tmp_path / "c"
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS).exit_code == 0
    keys = read_embeddings_by_key(out).keys()
    assert sorted(keys) == ["\\\\xff.jpg", "\\xff.jpg"]
    again = run_cli("build", src, "--out", out, *BUILD_FLAGS)
    assert "Nothing changed" in again.output and not verify(out).problems
    found = run_cli("query", "--id", "\\\\xff.jpg", "--index", out, "-k", "1", "--paths-only")
    literal = src / "\\xff.jpg"  # its own file, not the one named by the byte 0xFF
    assert found.exit_code == 0 and found.output == f"{literal}\n", found.output


def _parts(src: Path, out: Path, n: int = 2) -> None:
    for i in range(n):
        part = run_cli("build", src, "--out", out, *BUILD_FLAGS, "--partition", f"{i}/{n}")
        assert part.exit_code == 0, part.output


def test_a_whole_build_into_a_parted_collection_is_refused(corpus: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(corpus / "group0", src)
    out = tmp_path / "c"
    _parts(src, out, 1)
    assert run_cli("index", out).exit_code == 0
    rows = len(read_embeddings_by_key(out))
    shutil.copy(sorted(corpus.rglob("*.png"))[-1], src / "new.png")
    whole = run_cli("build", src, "--out", out, *BUILD_FLAGS)
    assert whole.exit_code == 2 and "built in parts" in whole.output, whole.output
    again = run_cli("index", out)  # the same parts: re-indexed, not merged again
    assert again.exit_code == 0, again.output
    assert len(read_embeddings_by_key(out)) == rows and not verify(out).problems


def test_parts_older_than_a_whole_build_are_not_merged_over_it(
    corpus: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    shutil.copytree(corpus / "group0", src)
    out = tmp_path / "c"
    _parts(src, out, 1)
    parts = out / "parts"
    moved = parts.rename(tmp_path / "parts-aside")  # as an older indexer left them
    shutil.copy(sorted(corpus.rglob("*.png"))[-1], src / "new.png")
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS).exit_code == 0
    moved.rename(parts)
    stale = run_cli("index", out)
    assert stale.exit_code == 2 and "bring back older data" in stale.output, stale.output
    assert "new.png" in read_embeddings_by_key(out)


def test_parts_of_different_sources_are_refused(corpus: Path, tmp_path: Path) -> None:
    src, src2 = tmp_path / "src", tmp_path / "src2"
    shutil.copytree(corpus / "group0", src)
    shutil.copytree(corpus / "group0", src2)
    out = tmp_path / "c"
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS, "--partition", "0/2").exit_code == 0
    assert run_cli("build", src2, "--out", out, *BUILD_FLAGS, "--partition", "1/2").exit_code == 0
    merged = run_cli("index", out)
    assert merged.exit_code == 2 and "other sources than part 0" in merged.output, merged.output
    assert not (out / "current").exists()


def test_a_merge_waits_for_no_part_being_rebuilt(corpus: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(corpus / "group0", src)
    out = tmp_path / "c"
    _parts(src, out, 2)
    with CollectionLock(out / "parts" / "00001-of-00002", "build"):
        merged = run_cli("index", out)
    assert merged.exit_code == 75 and "being updated" in merged.output, merged.output
    assert not (out / "current").exists()
    assert run_cli("index", out).exit_code == 0


def test_a_source_folder_with_an_undecodable_name(corpus: Path, tmp_path: Path) -> None:
    odd = Path(os.fsdecode(os.fsencode(tmp_path) + b"/p\xff"))
    shutil.copytree(corpus / "group0", odd)
    literal = tmp_path / "lit" / "p\\xff"  # a folder literally named p\xff
    shutil.copytree(corpus / "group1", literal)
    out = tmp_path / "c"
    result = run_cli("build", odd, literal, "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    keys = read_embeddings_by_key(out).keys()
    labels = {key.split("/")[0] for key in keys}
    assert labels == {"p\\xff", "p\\\\xff"}  # escaped like file names: distinct
    again = run_cli("build", odd, literal, "--out", out, *BUILD_FLAGS)
    assert "Nothing changed" in again.output and not verify(out).problems
