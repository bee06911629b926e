"""Adversarial checks of the first-hour promises: a refused command writes nothing, runs that
are not refusals are recorded, build summaries count right, `indexer serve` says where it is."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from indexer.synthetic import scene
from tests.helpers import BUILD_FLAGS, run_cli
from tests.hooks import hooked_cli

INDEXER = str(Path(sys.executable).parent / "indexer")
REPO = Path(__file__).resolve().parents[1]
LOCK = ".indexer.lock"


def contents(root: Path) -> dict[str, Any]:
    """Every path under root (links not followed): a file's sha256 and inode, a link's target,
    a folder as such."""
    found: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            found[rel] = ("dir",)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[rel] = ("file", digest, path.stat().st_ino)
    return found


def runs(out: Path) -> list[dict[str, Any]]:
    path = out / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def copy_pics(corpus: Path, dest: Path) -> Path:
    shutil.copytree(corpus / "group0", dest)
    return dest


@pytest.fixture(scope="module")
def built(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work folder holding pics/ and a collection built from it (built/)."""
    root = tmp_path_factory.mktemp("adv")
    copy_pics(corpus, root / "pics")
    result = run_cli("build", root / "pics", "--out", root / "built", *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    return root


# --- 1. A refused command writes nothing ------------------------------------------------------


def test_a_refused_first_build_into_a_partly_existing_chain_leaves_the_chain_as_it_was(
    built: Path, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("mine")
    before = contents(tmp_path)
    result = run_cli("build", built / "pics", "--out", tmp_path / "a" / "b" / "c",
                     "--model", "no_such_model_x", *BUILD_FLAGS)  # fmt: skip
    assert result.exit_code in (2, 4), result.output
    assert contents(tmp_path) == before


@pytest.mark.parametrize("out", ["have/../y", "y/sub/..", "missing/../y"])
def test_a_refused_first_build_with_dotdot_in_a_relative_out_leaves_nothing(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str
) -> None:
    # Was a bug: (for "missing/../y") locked_run's outermost_missing() reads the path lexically: it
    # calls "missing" the folder it made, CollectionLock._open's mkdir(parents=True) makes
    # "missing" and "y", and discard() removes "missing" only: "y" stays behind
    (tmp_path / "have").mkdir()
    monkeypatch.chdir(tmp_path)
    before = contents(tmp_path)
    result = run_cli("build", built / "pics", "--out", out, "--model", "no_such_model_x",
                     *BUILD_FLAGS)  # fmt: skip
    assert result.exit_code in (2, 4), result.output
    assert contents(tmp_path) == before


def test_a_refused_build_of_a_collection_named_through_a_missing_folder_and_dotdot(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was a bug: `--out gone/../built` (gone missing): locked_run snapshots _versions() and
    # outermost_missing() before the lock's mkdir creates "gone", so the refusal is taken for
    # a run that wrote a version (it is recorded in runs.jsonl) and "gone" is left behind
    coll = shutil.copytree(built / "built", tmp_path / "built", symlinks=True)
    monkeypatch.chdir(tmp_path)
    before = contents(tmp_path)
    result = run_cli("build", built / "pics", "--out", "gone/../built", "--seed", "3",
                     *BUILD_FLAGS)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert len(runs(coll)) == 1  # the first build's line only: a refusal leaves no history
    assert contents(tmp_path) == before


def test_a_build_into_a_symlink_to_a_new_location_writes_nothing_when_refused(
    built: Path, tmp_path: Path
) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target")
    before = contents(tmp_path)
    refused = run_cli("build", built / "pics", "--out", link, "--model", "no_such_model_x",
                      *BUILD_FLAGS)  # fmt: skip
    assert refused.exit_code in (2, 4), refused.output
    assert refused.output.count("\n") == 1, refused.output
    assert contents(tmp_path) == before and not (tmp_path / "target").exists()
    valid = run_cli("build", built / "pics", "--out", link, *BUILD_FLAGS)
    if valid.exit_code != 0:  # refused (a link is never written through): then nothing at all
        assert valid.exit_code == 2 and valid.output.startswith("Error: "), valid.output
        assert contents(tmp_path) == before


def test_a_collection_inside_its_source_folder(built: Path, tmp_path: Path) -> None:
    src = shutil.copytree(built / "pics", tmp_path / "src")
    n = len(list(src.iterdir()))
    before = contents(src)
    refused = run_cli("build", src, "--out", src / "idx", "--model", "no_such_model_x",
                      *BUILD_FLAGS)  # fmt: skip
    assert refused.exit_code in (2, 4), refused.output
    assert contents(src) == before
    first = run_cli("build", src, "--out", src / "idx", *BUILD_FLAGS)
    assert first.exit_code == 0 and f"of {n} listed" in first.stdout, first.output
    again = run_cli("build", src, "--out", src / "idx", *BUILD_FLAGS)
    assert again.exit_code == 0 and again.stdout.startswith("Nothing changed"), again.output


def test_a_refused_first_build_keeps_a_file_someone_wrote_into_its_folder_meanwhile(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import indexer.build.pipeline as pipeline

    real = pipeline.build_unlocked
    out = tmp_path / "a" / "b" / "c"
    (tmp_path / "a").mkdir()

    def someone_writes(cfg: Any) -> Any:
        (out / "theirs").mkdir()
        (out / "theirs" / "notes.txt").write_text("someone's")
        (tmp_path / "a" / "b" / "mine.txt").write_text("someone else's")
        return real(cfg)

    monkeypatch.setattr(pipeline, "build_unlocked", someone_writes)
    result = run_cli("build", built / "pics", "--out", out, "--model", "no_such_model_x",
                     *BUILD_FLAGS)  # fmt: skip
    assert result.exit_code in (2, 4), result.output
    assert (out / "theirs" / "notes.txt").read_text() == "someone's"
    assert (tmp_path / "a" / "b" / "mine.txt").read_text() == "someone else's"
    assert not (out / LOCK).exists() and not (out / "runs.jsonl").exists()


def test_a_run_locked_out_by_a_refused_first_build_does_not_wedge_the_folder(
    built: Path, tmp_path: Path
) -> None:
    # Was a bug: the locked run records itself (history.append_run) into the folder the refused run
    # made; the refused run's CollectionLock.discard() then removes the lock file but cannot
    # rmdir the folder, which now holds runs.jsonl alone, and check_build_dir (_is_ours: a
    # runs.jsonl is ours only next to a lock file) refuses every later build into it
    from indexer.collection.lock import locked_run
    from indexer.errors import InputError

    out = tmp_path / "c"
    with pytest.raises(InputError), locked_run(out, "build"):  # a first build being refused
        locked = run_cli("build", built / "pics", "--out", out, *BUILD_FLAGS)
        assert locked.exit_code == 75, locked.output
        raise InputError("refused")
    later = run_cli("build", built / "pics", "--out", out, *BUILD_FLAGS)
    assert later.exit_code == 0, later.output


def test_a_first_build_whose_folder_a_refused_run_removes_before_its_lock_file_is_made(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was a bug: CollectionLock._open_and_lock retries when the lock file vanishes after open (a
    # refused first run's discard), but not when discard rmdirs the folder between _open's
    # mkdir and its open(O_CREAT): that ENOENT becomes InputError "cannot write to" (exit 2)
    import indexer.collection.lock as lock

    out = tmp_path / "c"
    real, raced = lock.open_regular, []

    def after_the_refused_run_discards(path: Path, *args: Any, **kwargs: Any) -> int:
        if not raced and Path(path).name == LOCK:
            raced.append(path)
            os.rmdir(Path(path).parent)  # the refused run's discard(made), just now
        return real(path, *args, **kwargs)

    monkeypatch.setattr(lock, "open_regular", after_the_refused_run_discards)
    result = run_cli("build", built / "pics", "--out", out, *BUILD_FLAGS)
    assert raced
    assert result.exit_code == 0, result.output


def _lock_holders(pids: set[int]) -> set[int]:
    """The pids among `pids` holding a POSIX write lock now (/proc/locks)."""
    holders = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields:
                continue  # a waiter, not a holder
            posix_write = len(fields) > 4 and fields[1] == "POSIX" and fields[3] == "WRITE"
            if posix_write and int(fields[4]) in pids:
                holders.add(int(fields[4]))
    return holders


@pytest.mark.slow
def test_a_refused_and_a_valid_first_build_at_once(built: Path, tmp_path: Path) -> None:
    if not Path("/proc/locks").exists():
        pytest.skip("no /proc/locks")
    out = tmp_path / "c"
    base = [INDEXER, "build", str(built / "pics"), "--out", str(out), *BUILD_FLAGS]
    procs = [
        subprocess.Popen([*base, "--model", "no_such_model_x"], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        subprocess.Popen(base, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
    ]  # fmt: skip
    pids = {p.pid for p in procs}
    both: list[set[int]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            holders = _lock_holders(pids)
            if len(holders) > 1:
                both.append(holders)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        stop.set()
        watcher.join()
        for p in procs:
            p.kill()
    refused, valid = procs[0].returncode, procs[1].returncode
    assert refused in (2, 4, 75), outputs[0]
    assert valid in (0, 75), outputs[1]
    assert not both, f"two runs held a lock at once: {both}"
    # Was a bug: (timing-dependent, fails about 3 runs in 4 here) when the valid run is locked out,
    # it
    # records "locked" into the refused run's new folder, which discard() then cannot remove:
    # the folder keeps runs.jsonl alone and the retry is refused "not empty and not a collection"
    if valid == 75:  # the refused run held the lock: once it is gone, the build goes through
        again = run_cli("build", built / "pics", "--out", out, *BUILD_FLAGS)
        assert again.exit_code == 0, again.output
    assert run_cli("verify", out).exit_code == 0
    statuses = [r["status"] for r in runs(out)]
    assert statuses.count("success") == 1 and set(statuses) <= {"success", "locked"}, statuses


EXISTING_REFUSALS = {
    "other weights": ("--seed", "3"),
    "an unknown model": ("--model", "no_such_model_x", "--rebuild"),
    "a partition of an unknown model": ("--partition", "0/2", "--model", "nope_y"),
    "a missing source": ("--source-is-missing",),
}


@pytest.mark.parametrize("case", sorted(EXISTING_REFUSALS))
def test_a_refused_run_on_a_collection_keeps_every_byte_and_its_lock_file(
    built: Path, tmp_path: Path, case: str
) -> None:
    coll = shutil.copytree(built / "built", tmp_path / "c", symlinks=True)
    assert (coll / LOCK).is_file()
    before = contents(coll)
    extra = list(EXISTING_REFUSALS[case])
    source = built / "pics"
    if extra == ["--source-is-missing"]:
        extra, source = [], tmp_path / "none"
    metrics = tmp_path / "m.prom"
    result = run_cli("build", source, "--out", coll, *extra, *BUILD_FLAGS,
                     "--metrics-file", metrics)  # fmt: skip
    assert result.exit_code in (2, 3, 4), result.output
    assert contents(coll) == before  # the lock file the same inode, every file the same bytes
    assert not metrics.exists()


def test_a_refused_job_on_a_collection_keeps_every_byte(built: Path, tmp_path: Path) -> None:
    coll = shutil.copytree(built / "built", tmp_path / "c", symlinks=True)
    job = tmp_path / "job.toml"
    flags = 'pretrained = false\nworkers = 0\nprogress = false\nprecision = "fp32"\n'
    job.write_text(f'sources = ["{built / "pics"}"]\nout = "{coll}"\nseed = 7\n' + flags)
    before = contents(coll)
    result = run_cli("run", job)
    assert result.exit_code == 2, result.output
    assert contents(coll) == before


def test_a_refused_partition_on_a_new_nested_folder_leaves_nothing(
    built: Path, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    before = contents(tmp_path)
    for extra in (("--model", "no_such_model_x"), ("--index-type", "IVF-nonsense")):
        result = run_cli("build", built / "pics", "--out", tmp_path / "a" / "b" / "c",
                         "--partition", "0/2", *extra, *BUILD_FLAGS)  # fmt: skip
        assert result.exit_code in (2, 4), result.output
        assert contents(tmp_path) == before


@pytest.mark.parametrize("bad", ["ragged", "nocolumn", "notparquet", "empty"])
def test_a_refused_index_from_parquet_three_levels_deep_leaves_nothing(
    tmp_path: Path, bad: str
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    path = files / f"{bad}.parquet"
    if bad == "ragged":
        pq.write_table(pa.table({"key": ["a", "b"], "embedding": [[1.0, 2.0], [3.0]]}), path)
    elif bad == "nocolumn":
        pq.write_table(pa.table({"key": ["a"], "vec": [[1.0, 2.0]]}), path)
    elif bad == "empty":
        schema = pa.schema([("key", pa.string()), ("embedding", pa.list_(pa.float32()))])
        pq.write_table(pa.table({"key": [], "embedding": []}, schema=schema), path)
    else:
        path.write_bytes(b"PAR1 not really")
    (tmp_path / "w").mkdir()
    before = contents(tmp_path)
    out = tmp_path / "w" / "one" / "two" / "three"
    result = run_cli("index", "--from-parquet", path, "--out", out)
    assert result.exit_code in (2, 3), result.output
    assert result.output.strip().count("\n") == 0, result.output
    assert contents(tmp_path) == before


# --- 2. What is not a refusal is recorded ------------------------------------------------------


def _broken(folder: Path, n: int) -> None:
    for i in range(n):
        (folder / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg" * (i + 1))


def test_a_run_over_its_failure_budget_is_recorded_first_build_and_later(
    built: Path, tmp_path: Path
) -> None:
    src = shutil.copytree(built / "pics", tmp_path / "src")
    _broken(src, 2)
    out, metrics = tmp_path / "c", tmp_path / "m.prom"
    first = run_cli("build", src, "--out", out, *BUILD_FLAGS, "--max-failures", "0",
                    "--metrics-file", metrics)  # fmt: skip
    assert first.exit_code == 6, first.output
    assert [r["status"] for r in runs(out)] == ["failed"]
    assert runs(out)[0]["counts"]["failed"] == 2
    assert "indexer_last_run_success" in metrics.read_text()
    again = run_cli("build", src, "--out", out, *BUILD_FLAGS, "--max-failures", "1")
    assert again.exit_code == 6, again.output  # nothing changed, still over the budget
    assert [r["status"] for r in runs(out)] == ["failed", "failed"]


def test_a_locked_build_and_a_locked_job_are_recorded(built: Path, tmp_path: Path) -> None:
    coll = shutil.copytree(built / "built", tmp_path / "c", symlinks=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path\n"
         "from indexer.collection.lock import CollectionLock\n"
         "with CollectionLock(Path(sys.argv[1]), 'build'):\n"
         "    print('held', flush=True); time.sleep(600)", str(coll)],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        metrics = tmp_path / "m.prom"
        locked = run_cli("build", built / "pics", "--out", coll, *BUILD_FLAGS,
                         "--metrics-file", metrics)  # fmt: skip
        assert locked.exit_code == 75, locked.output
        job = tmp_path / "job.toml"
        job.write_text(f'sources = ["{built / "pics"}"]\nout = "{coll}"\npretrained = false\n'
                       'workers = 0\nprogress = false\nprecision = "fp32"\n')  # fmt: skip
        assert run_cli("run", job).exit_code == 75
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert [r["status"] for r in runs(coll)][-2:] == ["locked", "locked"]
    assert 'indexer_last_run_success{collection="' in metrics.read_text()


@pytest.mark.slow
def test_a_sigtermed_first_build_is_recorded_and_the_next_one_goes_through(
    built: Path, tmp_path: Path
) -> None:
    out = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [*hooked_cli(decode="tests.hooks:slow"), "build", str(built / "pics"), "--out",
            str(out), *BUILD_FLAGS, "--batch-size", "1"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ((out / "versions").is_dir() and any((out / "versions").glob(".building-*"))):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
        time.sleep(0.7)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    last = runs(out)[-1]
    assert last["status"] == "interrupted" and "SIGTERM" in last["error"], last
    again = run_cli("build", built / "pics", "--out", out, *BUILD_FLAGS)
    assert again.exit_code == 0, again.output
    assert [r["status"] for r in runs(out)] == ["interrupted", "success"]


# --- 3. Build summaries ---------------------------------------------------------------------


def _counts(stdout: str) -> dict[str, int]:
    """The numbers of "E embedded, R reused (renamed or copied), U unchanged, D deleted,
    F failed of L listed (n new, c changed)"."""
    import re

    m = re.search(
        r": (\d+) embedded, (\d+) reused \(renamed or copied\), (\d+) unchanged, (\d+) deleted, "
        r"(\d+) failed of (\d+) listed \((\d+) new, (\d+) changed\); (\d+) items in",
        stdout,
    )
    assert m, stdout
    names = ("E", "R", "U", "D", "F", "L", "new", "changed", "rows")
    return dict(zip(names, map(int, m.groups()), strict=True))


def test_one_incremental_run_counts_each_kind_of_change(built: Path, tmp_path: Path) -> None:
    src = shutil.copytree(built / "pics", tmp_path / "src")
    files = sorted(src.iterdir())
    assert len(files) >= 6
    out = tmp_path / "c"
    flags = (*BUILD_FLAGS, "--max-failures", "10")
    first = run_cli("build", src, "--out", out, *flags)
    assert first.exit_code == 0, first.output
    n = len(files)
    files[0].rename(src / f"renamed-{files[0].name}")  # reused, 1 new, 1 deleted
    shutil.copy2(files[1], src / f"copy-{files[1].name}")  # reused, 1 new
    st = files[2].stat()
    os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # unchanged
    files[3].unlink()  # 1 deleted
    scene(424242).save(files[4], format="PNG" if files[4].suffix == ".png" else "JPEG")
    files[5].write_bytes(b"\xff\xd8\xff garbage")  # a known file now corrupt: failed
    (src / "new-broken.jpg").write_bytes(b"not an image at all")  # a new corrupt file: failed
    second = run_cli("build", src, "--out", out, *flags)
    assert second.exit_code == 5, second.output  # partial: within the budget
    c = _counts(second.stdout)
    listed = n + 1
    assert c == {"E": 1, "R": 2, "U": n - 4, "D": 2, "F": 2, "L": listed, "new": 2,
                 "changed": 1, "rows": listed - 2}, second.stdout  # fmt: skip
    assert c["E"] + c["R"] + c["U"] + c["F"] == c["L"]
    assert "images/s embedded" in second.stdout
    os.utime(files[1])  # a touch alone: a version with nothing embedded, and no rate
    third = run_cli("build", src, "--out", out, *flags)
    assert third.exit_code == 5, third.output  # the two failures stay
    c = _counts(third.stdout)
    assert c == {"E": 0, "R": 0, "U": listed - 2, "D": 0, "F": 2, "L": listed, "new": 0,
                 "changed": 0, "rows": listed - 2}, third.stdout  # fmt: skip
    assert "images/s" not in third.stdout


def test_a_copy_of_a_file_changed_in_the_same_run_counts_once_each(
    built: Path, tmp_path: Path
) -> None:
    src = shutil.copytree(built / "pics", tmp_path / "src")
    files = sorted(p for p in src.iterdir() if p.suffix == ".jpg")
    out = tmp_path / "c"
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS).exit_code == 0
    n = len(list(src.iterdir()))
    scene(777).save(files[0], format="JPEG")
    shutil.copy2(files[0], src / "twin.jpg")  # a new file, the same bytes as the changed one
    second = run_cli("build", src, "--out", out, *BUILD_FLAGS)
    assert second.exit_code == 0, second.output
    c = _counts(second.stdout)
    # two new vectors, each counted once (embedded twice or reused: either is right)
    assert c["E"] + c["R"] == 2 and c["new"] == 1 and c["changed"] == 1, second.stdout
    assert c["U"] == n - 1 and c["rows"] == n + 1, second.stdout
    assert c["E"] + c["R"] + c["U"] + c["F"] == c["L"] == n + 1


# --- 4. indexer serve -----------------------------------------------------------------------


def _serve(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([INDEXER, "serve", *args], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return err


@pytest.fixture(scope="module")
def two(built: Path, corpus: Path) -> tuple[Path, Path]:
    other = built / "other"
    result = run_cli("build", corpus / "group1", "--out", other, *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    return built / "built", other


@pytest.mark.slow
def test_serve_two_collections_says_each_then_ready_and_the_url_answers(
    two: tuple[Path, Path],
) -> None:
    proc = _serve([str(two[0]), str(two[1]), "--port", "0"])
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith(f"built: {two[0]} (version v"), lines
        assert lines[1].startswith(f"other: {two[1]} (version v"), lines
        assert lines[2].startswith("Ready: open http://127.0.0.1:"), lines
        url = lines[2].split()[2]
        assert url.endswith("/") and not url.endswith(":0/"), url
        with urllib.request.urlopen(url, timeout=30) as answer:
            assert answer.status == 200
        with urllib.request.urlopen(url + "healthz", timeout=30) as answer:
            assert answer.status == 200
    finally:
        _stop(proc)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_serve_on_ipv6_loopback_brackets_the_address(two: tuple[Path, Path]) -> None:
    proc = _serve([str(two[0]), "--host", "::1", "--port", "0"])
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("built: ")
        ready = proc.stdout.readline()
        assert ready.startswith("Ready: open http://[::1]:"), ready
        url = ready.split()[2]
        with urllib.request.urlopen(url + "healthz", timeout=30) as answer:
            assert answer.status == 200
    finally:
        _stop(proc)


@pytest.mark.slow
def test_serve_on_a_port_in_use_fails_clearly_and_never_says_ready(
    two: tuple[Path, Path],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([INDEXER, "serve", str(two[0]), "--port", str(port)],
                              capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode != 0, done.stdout
    assert "Ready" not in done.stdout and "Ready" not in done.stderr
    assert "address already in use" in done.stderr.lower(), done.stderr
    assert str(port) in done.stderr, done.stderr
