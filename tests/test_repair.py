"""Repair is a build: under the lock from its check on, one publish with every item, or none."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from indexer.verify.check import verify
from indexer.verify.repair import repair
from tests.helpers import BUILD_FLAGS, read_embeddings_by_key, run_cli
from tests.hooks import hooked_cli

INDEXER = str(Path(sys.executable).parent / "indexer")


def _source(corpus: Path, tmp_path: Path, groups: tuple[str, ...]) -> Path:
    src = tmp_path / "src"
    for group in groups:
        shutil.copytree(corpus / group, src / group, dirs_exist_ok=True)
    return src


def _damage_index(root: Path) -> None:
    path = (root / "current").resolve() / "index" / "index.faiss"
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])


def _damage_shard(root: Path) -> str:
    shard = sorted(((root / "current").resolve() / "shards").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.unlink()  # it may be hard-linked into another version
    shard.write_bytes(bytes(data))
    return shard.name


def _wait_for(path: Path, proc: subprocess.Popen[str], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the repair never reached its pause"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_build_published_between_repairs_check_and_lock_is_kept(
    corpus: Path, tmp_path: Path
) -> None:
    src = _source(corpus, tmp_path, ("group0",))
    out = tmp_path / "c"
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS).exit_code == 0
    _damage_index(out)
    paused, resume = tmp_path / "paused", tmp_path / "resume"
    env = {**os.environ, "INDEXER_TEST_PAUSED": str(paused), "INDEXER_TEST_RESUME": str(resume),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}  # fmt: skip
    cli = hooked_cli(repair="tests.hooks:pause_before_repair")
    proc = subprocess.Popen([*cli, "verify", "--repair", str(out)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        _wait_for(paused, proc)  # repair has seen the damaged version and not yet locked
        shutil.copytree(corpus / "group1", src / "group1")
        built = run_cli("build", src, "--out", out, *BUILD_FLAGS)
        assert built.exit_code == 0 and "version 2" in built.output, built.output
        resume.touch()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "needs no repair now" in stdout and "Traceback" not in stderr
    keys = read_embeddings_by_key(out).keys()
    expected = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    assert set(keys) == expected  # the build's items all stayed
    assert not verify(out).problems
    assert os.readlink(out / "current") == "versions/v000002"


def test_repair_of_a_stale_report_checks_again(corpus: Path, tmp_path: Path) -> None:
    src = _source(corpus, tmp_path, ("group2",))
    out = tmp_path / "c"
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS).exit_code == 0
    _damage_index(out)
    assert verify(out).problems  # what the caller saw
    shutil.copytree(corpus / "group3", src / "group3")
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS).exit_code == 0
    rows = len(read_embeddings_by_key(out))
    assert "needs no repair now" in repair(out, keep=2)
    assert len(read_embeddings_by_key(out)) == rows


@pytest.mark.slow
def test_a_repair_that_cannot_finish_publishes_nothing(corpus: Path, tmp_path: Path) -> None:
    src = _source(corpus, tmp_path, ("group0", "group1"))
    out = tmp_path / "c"
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS, "--shard-size", "4").exit_code == 0
    before = read_embeddings_by_key(out)
    victim = _damage_shard(out)
    moved = src.rename(tmp_path / "moved")  # the source is gone: nothing to embed again from
    failed = run_cli("verify", "--repair", out)
    assert failed.exit_code == 2, failed.output
    assert "nothing was repaired and the damage remains" in failed.output
    assert "Traceback" not in failed.output
    assert os.readlink(out / "current") == "versions/v000001"  # nothing published
    still = run_cli("verify", out)
    assert still.exit_code == 3 and victim in still.output
    moved.rename(src)
    mended = run_cli("verify", "--repair", out)
    assert mended.exit_code == 0 and "is whole again" in mended.output, mended.output
    assert os.readlink(out / "current") == "versions/v000002"  # one publish
    after = read_embeddings_by_key(out)
    assert after.keys() == before.keys()
    assert not verify(out).problems


def test_intact_rows_stay_though_their_files_are_gone(corpus: Path, tmp_path: Path) -> None:
    src = _source(corpus, tmp_path, ("group0", "group1"))
    out = tmp_path / "c"
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS, "--shard-size", "4").exit_code == 0
    before = read_embeddings_by_key(out)
    victim = _damage_shard(out)  # the first shard: its items are embedded again
    shards = sorted(((out / "current").resolve() / "shards").glob("*.parquet"))
    intact = pq.read_table(shards[-1], columns=["key"]).column("key").to_pylist()
    for key in intact:
        (src / key).unlink()  # rows of an intact shard whose files are gone
    mended = run_cli("verify", "--repair", out)
    assert mended.exit_code == 0 and "whole again" in mended.output, mended.output
    after = read_embeddings_by_key(out)
    assert after.keys() == before.keys()  # nothing lost, nothing added
    assert all(np.allclose(after[k], before[k], atol=1e-6) for k in before)
    assert victim not in {p.name for p in ((out / "current").resolve() / "shards").iterdir()}


def test_a_repair_that_would_lose_damaged_items_publishes_nothing(
    corpus: Path, tmp_path: Path
) -> None:
    src = _source(corpus, tmp_path, ("group0", "group1"))
    out = tmp_path / "c"
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS, "--shard-size", "4").exit_code == 0
    shard = sorted(((out / "current").resolve() / "shards").glob("*.parquet"))[0]
    lost = pq.read_table(shard, columns=["key"]).column("key").to_pylist()[0]
    size = shard.stat().st_size
    shard.unlink()
    shard.write_bytes(b"\0" * size)  # not even its keys can be read: only their count is known
    (src / lost).unlink()  # one of the damaged shard's items can no longer be read
    failed = run_cli("verify", "--repair", out)
    assert failed.exit_code == 2 and "could be embedded again" in failed.output, failed.output
    assert os.readlink(out / "current") == "versions/v000001"
    assert run_cli("verify", out).exit_code == 3


def test_a_new_file_never_stands_in_for_a_lost_damaged_item(corpus: Path, tmp_path: Path) -> None:
    src = _source(corpus, tmp_path, ("group0", "group1"))
    out = tmp_path / "c"
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS, "--shard-size", "4").exit_code == 0
    shard = sorted(((out / "current").resolve() / "shards").glob("*.parquet"))[0]
    keys = pq.read_table(shard, columns=["key"]).column("key").to_pylist()
    _damage_shard(out)
    (src / keys[0]).rename(tmp_path / "aside.png")  # a damaged item is gone...
    shutil.copy(sorted(corpus.rglob("*.png"))[-1], src / "group0" / "zz-new.png")  # ...one is new
    failed = run_cli("verify", "--repair", out)
    assert failed.exit_code == 2 and "no longer in the sources" in failed.output, failed.output
    assert keys[0] in failed.output and os.readlink(out / "current") == "versions/v000001"
    (tmp_path / "aside.png").rename(src / keys[0])
    mended = run_cli("verify", "--repair", out)
    assert mended.exit_code == 0, mended.output
    after = read_embeddings_by_key(out)
    assert set(keys) <= after.keys() and "group0/zz-new.png" not in after  # repair only


def _ids_by_key(root: Path) -> dict[str, int]:
    table = pq.read_table(root / "shards", columns=["key", "id"])
    return dict(zip(table.column("key").to_pylist(), table.column("id").to_pylist(), strict=True))


def test_repaired_items_keep_their_ids(corpus: Path, tmp_path: Path) -> None:
    src = _source(corpus, tmp_path, ("group0", "group1"))
    out = tmp_path / "c"
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS, "--shard-size", "4").exit_code == 0
    before = _ids_by_key(out)
    next_id = json.loads((out / "manifest.json").read_text())["next_id"]
    _damage_shard(out)
    assert run_cli("verify", "--repair", out).exit_code == 0
    assert _ids_by_key(out) == before  # ids stay with their keys
    assert json.loads((out / "manifest.json").read_text())["next_id"] == next_id


def _parted(corpus: Path, tmp_path: Path) -> tuple[Path, Path]:
    src = _source(corpus, tmp_path, ("group0", "group1"))
    out = tmp_path / "c"
    for i in range(2):
        part = run_cli("build", src, "--out", out, *BUILD_FLAGS, "--partition", f"{i}/2",
                       "--shard-size", "3")  # fmt: skip
        assert part.exit_code == 0, part.output
    assert run_cli("index", out).exit_code == 0
    return src, out


@pytest.mark.slow
def test_a_repaired_merge_still_takes_newer_parts(corpus: Path, tmp_path: Path) -> None:
    src, out = _parted(corpus, tmp_path)
    before = _ids_by_key(out)
    _damage_shard(out)
    assert run_cli("verify", "--repair", out).exit_code == 0
    assert _ids_by_key(out) == before
    shutil.copy(sorted(corpus.rglob("*.png"))[-1], src / "group0" / "zz-new.png")
    for i in range(2):
        assert (
            run_cli("build", src, "--out", out, *BUILD_FLAGS, "--partition", f"{i}/2").exit_code
            == 0
        )
    merged = run_cli("index", out)
    assert merged.exit_code == 0, merged.output
    assert "group0/zz-new.png" in _ids_by_key(out) and not verify(out).problems


def test_a_part_folder_is_repaired_with_its_own_ids(corpus: Path, tmp_path: Path) -> None:
    _, out = _parted(corpus, tmp_path)
    part = out / "parts" / "00000-of-00002"
    before = _ids_by_key(part)
    _damage_shard(part)
    assert run_cli("verify", part).exit_code == 3
    mended = run_cli("verify", "--repair", part)
    assert mended.exit_code == 0 and "whole again" in mended.output, mended.output
    assert _ids_by_key(part) == before and all(i % 2 == 0 for i in before.values())
    assert run_cli("index", out).exit_code == 0 and not verify(out).problems
