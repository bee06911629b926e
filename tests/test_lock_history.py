"""The collection lock and the run history: nothing lost, nothing clobbered, no traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from indexer.collection.history import RunRecord, append_run, read_runs, write_metrics
from indexer.collection.lock import CollectionLock
from indexer.errors import CollectionLockedError, InputError
from tests.helpers import BUILD_FLAGS, copy_of, run_cli
from tests.hooks import hooked_cli

REPO = Path(__file__).resolve().parent.parent
LOCKED = 75
MakeNode = Callable[[Path], object]  # os.mkdir, os.mkfifo

TRY_LOCK = """
import sys
from pathlib import Path
from indexer.errors import CollectionLockedError
from indexer.collection.lock import CollectionLock
try:
    with CollectionLock(Path(sys.argv[1]), "index"):
        pass
except CollectionLockedError as exc:
    print(exc)
    sys.exit(75)
"""

LOCK_FORK_DIE = """
import os, signal, sys, time
from pathlib import Path
from indexer.collection.lock import CollectionLock
CollectionLock(Path(sys.argv[1]), "build").__enter__()
child = os.fork()
if child == 0:
    time.sleep(30)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""

BUILD = "import sys\nfrom indexer.cli.main import main\nmain(sys.argv[1:])"


def slow(key: str) -> None:
    """Decode hook (tests.test_lock_history:slow): 0.5 s per item."""
    time.sleep(0.5)


def python(code: str, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with suppress(OSError):
            found += [int(c) for c in task.read_text().split()]
    return found


@contextmanager
def killed_afterwards(pids: list[int]) -> Iterator[None]:
    """SIGKILL the listed processes (filled in by the body) when the block ends."""
    try:
        yield
    finally:
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def record(status: str = "success") -> RunRecord:
    return RunRecord("build", 1000.0, 1002.5, status, {"listed": 3, "new": 3}, None)


# the lock is not inherited by forked children


def test_a_forked_child_does_not_keep_the_lock_of_its_killed_parent(tmp_path: Path) -> None:
    out = tmp_path / "c"
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_FORK_DIE, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None
    pids = [int(holder.stdout.readline())]
    with killed_afterwards(pids):
        assert holder.wait(timeout=30) == -signal.SIGKILL
        assert alive(pids[0]), "the forked child should still be sleeping"
        assert python(TRY_LOCK, out).returncode == 0
        assert alive(pids[0])


@pytest.mark.slow
def test_a_build_killed_with_live_workers_does_not_block_the_next(
    corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "c"
    argv = ["build", corpus, "--out", out, "--no-pretrained", "--workers", "2",
            "--batch-size", "1", "--no-progress"]  # fmt: skip
    first = subprocess.Popen(
        [*hooked_cli(decode="tests.test_lock_history:slow"), *map(str, argv)],
        cwd=REPO,
        stderr=subprocess.DEVNULL,
    )
    pids = [first.pid]
    with killed_afterwards(pids):
        for _ in range(1200):  # until both decoding workers run
            workers = children(first.pid)
            if len(workers) >= 2 or first.poll() is not None:
                break
            time.sleep(0.05)
        pids += workers
        assert len(workers) >= 2, "the build ended before its workers started"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert any(alive(pid) for pid in workers), "the orphaned workers should still run"
        result = run_cli("build", corpus / "group0", "--out", out, *BUILD_FLAGS)
        assert result.exit_code != LOCKED, result.output
        assert result.exit_code == 0, result.output


# never through a symlink we did not create


def test_a_symlinked_lock_file_is_refused_and_not_written_through(
    collection: Path, corpus: Path, tmp_path: Path
) -> None:
    out = copy_of(collection, tmp_path)
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (out / ".indexer.lock").unlink(missing_ok=True)
    (out / ".indexer.lock").symlink_to(target)
    result = run_cli("build", corpus, "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and str(out / ".indexer.lock") in result.output
    assert "remove it" in result.output
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("make", [os.mkfifo, os.mkdir])
def test_a_lock_path_that_is_not_a_file_is_refused(tmp_path: Path, make: MakeNode) -> None:
    make(tmp_path / ".indexer.lock")
    with (
        pytest.raises(InputError, match="not a regular file of its own"),
        CollectionLock(tmp_path, "build"),
    ):
        pass


def test_a_symlinked_history_is_not_written_through(
    collection: Path, corpus: Path, tmp_path: Path
) -> None:
    out = copy_of(collection, tmp_path)
    target = tmp_path / "precious.jsonl"
    target.write_text("keep me\n")
    (out / "runs.jsonl").unlink()
    (out / "runs.jsonl").symlink_to(target)
    result = run_cli("build", corpus, "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert target.read_text() == "keep me\n"
    assert read_runs(out) == []  # a link is not read either
    info = run_cli("info", out)
    assert info.exit_code == 0 and "none recorded" in info.output


# the in-process registry


def test_a_second_lock_in_the_same_process_is_refused_and_keeps_the_first(
    tmp_path: Path,
) -> None:
    out = tmp_path / "c"
    with CollectionLock(out, "build"):
        with (
            pytest.raises(CollectionLockedError, match=f"pid {os.getpid()}"),
            CollectionLock(out, "index"),
        ):
            pass
        other = python(TRY_LOCK, out)
        assert other.returncode == LOCKED, other.stderr
        assert f"pid {os.getpid()}" in other.stdout
    assert python(TRY_LOCK, out).returncode == 0


# a full disk or a read-only place never masks the real error

FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from indexer.errors import InputError
from indexer.collection.history import RunRecord, append_run, write_metrics
from indexer.collection.lock import CollectionLock
root = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # every write past byte 0 fails (EFBIG)
record = RunRecord("build", 0.0, 1.0, "success")
with CollectionLock(root, "build"):
    print("held", flush=True)
    append_run(root, record)
    try:
        write_metrics(root / "m.prom", root, record)
    except InputError as exc:
        print(exc, flush=True)
    sys.stdin.read()  # held until the test closes stdin
"""


def test_writes_that_fail_cost_the_record_not_the_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", FULL_DISK, str(tmp_path)], cwd=REPO,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdin is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        assert holder.stdout.readline().startswith(f"cannot write metrics file {tmp_path}")
        assert python(TRY_LOCK, tmp_path).returncode == LOCKED
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    assert "Traceback" not in (holder.stderr.read() if holder.stderr else "")
    assert (tmp_path / "runs.jsonl").read_text() == ""
    assert not list(tmp_path.glob(".m.prom.*"))  # the temporary file was cleaned up


def test_an_unwritable_metrics_file_is_a_one_line_input_error(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(InputError) as caught:
        write_metrics(blocked / "sub" / "indexer.prom", tmp_path, record())
    message = str(caught.value)
    assert message.startswith(f"cannot write metrics file {blocked / 'sub' / 'indexer.prom'} (")
    assert "choose a --metrics-file" in message and "\n" not in message


def test_metrics_never_write_through_a_planted_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    path = tmp_path / "indexer.prom"
    (tmp_path / f".indexer.prom.{os.getpid()}.tmp").symlink_to(target)
    write_metrics(path, tmp_path, record())
    assert target.read_text() == "keep me"
    assert "indexer_last_run_success" in path.read_text() and not path.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["indexer.prom", "precious.txt"]


@pytest.mark.parametrize("make", [os.mkdir, os.mkfifo])
def test_history_that_is_not_a_file_never_raises(
    tmp_path: Path, make: MakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    make(tmp_path / "runs.jsonl")
    append_run(tmp_path, record())
    assert "run not recorded" in caplog.text
    assert read_runs(tmp_path) == []


# history lines that are not run objects


def test_lines_that_are_not_runs_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = ['[1, 2]', '{"command": 5}', '"x"', "garbage {", "",
           json.dumps({**record().to_json(), "seconds": True}),
           json.dumps({**record().to_json(), "counts": [1]}),
           json.dumps({**record().to_json(), "error": 3})]  # fmt: skip
    (tmp_path / "runs.jsonl").write_text("\n".join(bad) + "\n")
    append_run(tmp_path, record())
    runs = read_runs(tmp_path)
    assert runs == [json.loads(json.dumps(record().to_json()))]
    for line in range(1, len(bad) + 1):
        assert f"runs.jsonl line {line} is not a run record" in caplog.text


def test_info_survives_a_damaged_history(collection: Path, tmp_path: Path) -> None:
    out = copy_of(collection, tmp_path)
    with (out / "runs.jsonl").open("a") as f:
        f.write('[1,2]\n{"command": 5}\n"x"\ngarbage\n{"command": "build", "status": 1}\n')
    result = run_cli("info", out)
    assert result.exit_code == 0, result.output
    assert "last runs:" in result.output and " build " in result.output
    assert "Traceback" not in result.output


def test_a_hard_linked_lock_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.link(victim, tmp_path / ".indexer.lock")
    with (
        pytest.raises(InputError, match="hard link"),
        CollectionLock(tmp_path, "build"),
    ):
        pass
    assert victim.read_text() == "keep me"


def test_a_hard_linked_history_is_never_appended_to(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    assert run_cli("build", corpus / "group0", "--out", out, *BUILD_FLAGS).exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (out / "runs.jsonl").unlink()
    os.link(victim, out / "runs.jsonl")
    result = run_cli("build", corpus / "group0", "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert victim.read_text() == "keep me\n"
