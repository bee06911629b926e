"""File-system errors on the write paths: one line, the right exit code, the collection intact.

A full disk is a small tmpfs and a read-only one a read-only bind mount, where this machine
lets the tests mount (as root in CI); elsewhere those tests are skipped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from indexer.verify.check import verify
from tests.helpers import BUILD_FLAGS, read_embeddings_by_key, run_cli


def _mount(*args: str) -> bool:
    done = subprocess.run(["mount", *args], capture_output=True)
    return done.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None or not _mount("-t", "tmpfs", "-o", "size=3m", "tmpfs",
                                                   str(disk)):  # fmt: skip
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    _umount(disk)


def _fill(disk: Path, leave_kib: int) -> None:
    """Take all but about leave_kib of the disk's free space."""
    import os

    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave_kib * 1024, 0))


def _clean(output: str) -> None:
    assert "Traceback" not in output
    assert len([line for line in output.splitlines() if line.startswith("Error:")]) == 1


def _whole(root: Path, rows: int) -> None:
    report = verify(root)
    assert not report.problems and report.rows == rows


def test_a_full_disk_while_writing_shards(small_disk: Path, corpus: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(corpus / "group0", src / "group0")
    out = small_disk / "c"
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS).exit_code == 0
    rows = len(read_embeddings_by_key(out))
    shutil.copytree(corpus / "group1", src / "group1")
    _fill(small_disk, 0)
    nothing = run_cli("build", src / "group0", "--out", small_disk / "c2", *BUILD_FLAGS)
    assert nothing.exit_code == 1 and "No space left on device" in nothing.output
    _clean(nothing.output)
    failed = run_cli("build", src, "--out", out, *BUILD_FLAGS)
    assert failed.exit_code == 1, failed.output
    assert "No space left on device" in failed.output and "free some space" in failed.output
    _clean(failed.output)
    _whole(out, rows)
    (small_disk / "filler").unlink()
    again = run_cli("build", src, "--out", out, *BUILD_FLAGS)
    assert again.exit_code == 0, again.output
    _whole(out, rows + len(list((src / "group1").iterdir())))


def test_a_full_disk_while_writing_the_index(
    small_disk: Path, corpus: Path, tmp_path: Path
) -> None:
    out = small_disk / "c"
    assert run_cli("build", corpus, "--out", out, *BUILD_FLAGS).exit_code == 0
    rows = len(read_embeddings_by_key(out))
    index_bytes = json.loads((out / "index" / "meta.json").read_text())["bytes"]
    _fill(small_disk, index_bytes // 1024 // 2)  # room for the manifest, not for the index
    failed = run_cli("index", out, "--index-type", "flat")
    assert failed.exit_code == 1 and "No space left on device" in failed.output, failed.output
    _clean(failed.output)
    _whole(out, rows)
    nothing = run_cli("build", corpus, "--out", out, *BUILD_FLAGS)  # the lock's note: no room
    assert nothing.exit_code == 0 and "Nothing changed" in nothing.output, nothing.output


@pytest.fixture
def read_only(tmp_path: Path, corpus: Path) -> Iterator[Path]:
    out = tmp_path / "c"
    assert run_cli("build", corpus / "group0", "--out", out, *BUILD_FLAGS).exit_code == 0
    if not (_mount("--bind", str(out), str(out)) and _mount("-o", "remount,bind,ro", str(out))):
        _umount(out)
        pytest.skip("cannot make a read-only bind mount here (needs root)")
    yield out
    _umount(out)


def test_a_read_only_collection(read_only: Path, corpus: Path, tmp_path: Path) -> None:
    rows = len(read_embeddings_by_key(read_only))
    failed = run_cli("build", corpus, "--out", read_only, *BUILD_FLAGS)
    assert failed.exit_code == 2 and "Read-only file system" in failed.output, failed.output
    _clean(failed.output)
    _whole(read_only, rows)
    for args in (
        ("query", "--id", "group0/scene0004.jpg", "--index", read_only, "--grid",
         read_only / "g.png"),
        ("dedup", read_only, "--out", read_only / "d.parquet"),
        ("dedup", read_only, "--out", tmp_path / "d.parquet", "--grid", read_only / "g.png"),
    ):  # fmt: skip
        result = run_cli(*args)
        assert result.exit_code == 2 and "you may write to" in result.output, (args, result.output)
        _clean(result.output)
    assert not (tmp_path / "d.parquet").exists()  # refused before the work


def test_outputs_under_a_file_are_refused_before_the_work(
    collection: Path, corpus: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    bad = blocker / "sub" / "out"
    for args in (
        ("query", "--id", "group0/scene0004.jpg", "--index", collection, "--grid", bad),
        ("dedup", collection, "--out", bad),
        ("dedup", collection, "--out", tmp_path / "d.parquet", "--grid", bad),
        ("build", corpus / "group0", "--out", tmp_path / "new", *BUILD_FLAGS,
         "--metrics-file", bad),
    ):  # fmt: skip
        result = run_cli(*args)
        assert result.exit_code == 2 and str(bad) in result.output, (args, result.output)
        _clean(result.output)
    assert not (tmp_path / "d.parquet").exists() and not (tmp_path / "new").exists()
