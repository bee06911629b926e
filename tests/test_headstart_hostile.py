"""Adversarial checks of the head start (indexer/headstart.py) and of trusted known exports
(indexer/knownexport.py): killed builds, signals to the whole process group, hostile items,
odd batch sizes, and cache entries that are not what a build wrote.

Hooks below are injected into decoding processes (tests.hooks.use_decode_hook); this module
keeps its top-level imports light, since a decoding process imports it to find them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hooks import hooked_cli, use_decode_hook
from tests.processes import process_stat

REPO = Path(__file__).resolve().parent.parent
INDEXER = str(Path(sys.executable).parent / "indexer")
HOOK = "tests.test_headstart_hostile"


# --- hooks run inside decoding processes -----------------------------------------------------


def counting(key: str) -> None:
    """Append the key read (and this process's id) to $ADV_COUNT_FILE."""
    with open(os.environ["ADV_COUNT_FILE"], "a") as f:
        f.write(f"{key}\t{os.getpid()}\n")


def counting_hostile(key: str) -> None:
    """counting, then tests.hooks.hostile (crash on 'crash', hang on 'hang')."""
    counting(key)
    from tests.hooks import hostile

    hostile(key)


def counting_slow(key: str) -> None:
    counting(key)
    time.sleep(0.4)


# --- process helpers ---------------------------------------------------------------------------


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live descendant of root."""
    parents: dict[int, int] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = process_stat(int(entry))
            if st is not None:
                parents[int(entry)], starts[int(entry)] = st
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                found[child] = starts[child]
                frontier.append(child)
    return found


def _survivors(seen: dict[int, int], seconds: float) -> dict[int, str]:
    """Those of `seen` still alive after `seconds` (killed then, so no test leaks them)."""
    deadline = time.monotonic() + seconds
    alive = dict(seen)
    while alive and time.monotonic() < deadline:
        alive = {p: s for p, s in alive.items() if (process_stat(p) or (0, -1))[1] == s}
        time.sleep(0.1)
    report = {}
    for pid in alive:
        try:
            threads = sorted(Path(f"/proc/{pid}/task").iterdir())
            report[pid] = ", ".join(Path(t / "wchan").read_text() for t in threads)
        except OSError:
            report[pid] = "?"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return report


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


# --- fixtures ----------------------------------------------------------------------------------

FLAGS = ("--no-pretrained", "--no-progress", "--precision", "fp32", "--runtime", "onnx")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A folder of 12 images and a collection of it (--workers 0, portable model published)."""
    from indexer.synthetic import write_corpus
    from tests.helpers import run_cli

    top = tmp_path_factory.mktemp("advbase")
    src = top / "src"
    write_corpus(src, 12, seed=11)
    out = top / "c"
    result = run_cli("build", src, "--out", out, *FLAGS, "--workers", "0")
    assert result.exit_code == 0, result.output
    return src, out


def _incremental(base: tuple[Path, Path], tmp_path: Path, new: int, seed: int = 21
                 ) -> tuple[Path, Path]:  # fmt: skip
    """A copy of the base collection whose source gained `new` images (an incremental run)."""
    from indexer.synthetic import write_corpus

    src, out = tmp_path / "src", tmp_path / "c"
    shutil.copytree(base[0], src)
    shutil.copytree(base[1], out, symlinks=True)
    if new:
        write_corpus(src / "more", new, seed=seed)
    return src, out


def _watch_build(argv: list[str], env: dict[str, str], new_session: bool = False
                 ) -> tuple[subprocess.Popen[str], dict[int, int]]:  # fmt: skip
    """Start a build; return once it has forked a child (the head start), with the
    descendants seen so far."""
    proc = subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=new_session)  # fmt: skip
    seen: dict[int, int] = {}
    deadline = time.monotonic() + 60
    while not seen:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the build never forked"
        seen.update(_descendants(proc.pid))
        time.sleep(0.02)
    return proc, seen


# --- the head start: killed builds ------------------------------------------------------------

ORPHAN = """
import os, sys, time
sys.path.insert(0, {repo!r})
from indexer.config import LoaderConfig, SourceSpec
from indexer.decode.item_dataset import loader_work
from indexer.decode.head_start import HeadStart
from indexer.decode.preprocess import DataConfig, Preprocessor
from indexer.sources import list_items, open_sources
sources = open_sources((SourceSpec({root!r}),))
items = list_items(sources)
prep = Preprocessor(DataConfig((3, 160, 160), "bicubic", 0.875, "center", (0.5,) * 3,
                               (0.5,) * 3), "fast")
cfg = LoaderConfig(batch_size=2, workers=2)
head = HeadStart.start(*loader_work(items, sources, prep, cfg), cfg)
print(head._process.pid, flush=True)
time.sleep(1.0)  # a batch (2 x 77 KB at 160x160) is decoded and waits in the pipe
os._exit(0)  # SIGKILL, OOM: no exit handler ends the head start
"""


def test_a_head_start_whose_build_died_with_a_batch_unsent_ends(base: tuple[Path, Path]) -> None:
    """Any batch of the default model's images (160x160: 77 KB each) is more than a pipe
    holds. When the build dies, the head start's sending thread must not block forever on a
    pipe whose read end the head start itself still holds (inherited at the fork)."""
    script = ORPHAN.format(repo=str(REPO), root=str(base[0]))
    # (not communicate(): a surviving head start holds the build's stdout open, as it would
    # a shell's $(indexer build ...) or a CI runner's log pipe, which then never ends)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=REPO)  # fmt: skip
    assert proc.stdout is not None
    pid = int(proc.stdout.readline())
    proc.wait(60)
    proc.stdout.close()
    st = process_stat(pid)
    if st is None:
        return
    left = _survivors({pid: st[1]}, 8)
    assert not left, f"the head start outlived its build by 8 s, blocked in: {left}"


def test_sigkill_during_the_head_start_leaves_no_process_and_reruns(
    base: tuple[Path, Path], tmp_path: Path
) -> None:
    """An incremental build SIGKILLed while its head start decodes: every process it forked
    ends, no version is published, and a re-run completes."""
    from indexer.verify.check import verify

    src, out = _incremental(base, tmp_path, 10)
    before = os.readlink(out / "current")
    env = _env()
    argv = [*hooked_cli(decode="tests.hooks:slow"), "build", str(src), "--out", str(out), *FLAGS,
            "--workers", "2", "--batch-size", "2"]  # fmt: skip
    proc, seen = _watch_build(argv, env)
    time.sleep(1.5)  # the first batch decoded (0.5 s an item), waiting in the pipe
    seen.update(_descendants(proc.pid))
    proc.kill()
    proc.wait(30)
    left = _survivors(seen, 10)
    assert os.readlink(out / "current") == before
    argv = [INDEXER, "build", str(src), "--out", str(out), *FLAGS, "--workers", "2"]
    again = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert not verify(out).problems
    assert not left, f"processes of the killed build still alive after 10 s: {left}"


def _term_during_head_start(
    base: tuple[Path, Path], tmp_path: Path, group: bool
) -> tuple[subprocess.Popen[str], str, dict[int, str], Path]:
    src, out = _incremental(base, tmp_path, 10)
    env = _env()
    argv = [*hooked_cli(decode="tests.hooks:slow"), "build", str(src), "--out", str(out), *FLAGS,
            "--workers", "2", "--batch-size", "2"]  # fmt: skip
    proc, seen = _watch_build(argv, env, new_session=True)
    time.sleep(0.7)
    seen.update(_descendants(proc.pid))
    if group:  # as `timeout`, systemd (KillMode=control-group) and `kill -TERM -PGID` do
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    finally:
        proc.kill()
    left = _survivors(seen, 10)
    assert proc.stderr is not None
    stderr = proc.stderr.read() if not left else "(stderr held open by survivors)"
    return proc, stderr, left, out


def test_sigterm_to_the_process_group_during_the_head_start_is_one_clean_line(
    base: tuple[Path, Path], tmp_path: Path
) -> None:
    """`timeout 60 indexer build ...` sends SIGTERM to the whole group: the head start (which
    inherited the build's SIGTERM handler) must not print a traceback of its own."""
    proc, stderr, left, out = _term_during_head_start(base, tmp_path, group=True)
    assert not left, f"processes still alive 10 s after SIGTERM: {left}"
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr, stderr
    assert len([line for line in stderr.splitlines() if line.strip()]) == 1, stderr
    last = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert last["status"] == "interrupted"


def test_sigterm_to_the_build_during_the_head_start_leaves_no_process(
    base: tuple[Path, Path], tmp_path: Path
) -> None:
    proc, stderr, left, _ = _term_during_head_start(base, tmp_path, group=False)
    assert not left, f"processes still alive 10 s after SIGTERM: {left}"
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr, stderr


# --- the head start: what it hands over -------------------------------------------------------


def _copy_new(base: tuple[Path, Path], tmp_path: Path, names: list[str]) -> tuple[Path, Path]:
    """The base collection, its source gained images named `names` under new/ (each a
    distinct scene)."""
    from indexer.synthetic import scene

    src, out = _incremental(base, tmp_path, 0)
    (src / "new").mkdir()
    for i, name in enumerate(names):
        scene(500 + i, (200, 150)).save(src / "new" / name)
    return src, out


def _claim_first(monkeypatch: pytest.MonkeyPatch, batches: int) -> list[tuple[int, int]]:
    """Hand over only once the head start claimed `batches` batches (or died): in this process
    torch is loaded already, so without this the handover comes before any batch."""
    from indexer.decode.head_start import HeadStart

    stop = HeadStart.stop
    handed: list[tuple[int, int]] = []

    def waiting(head: HeadStart) -> int:
        if head._taken is None:
            deadline = time.monotonic() + 30
            while (head._claimed.value < batches and head._process.is_alive()
                   and time.monotonic() < deadline):  # fmt: skip
                time.sleep(0.01)
            time.sleep(0.3)  # the last claimed batch decoded (or its item crashed)
        taken = stop(head)
        handed.append((taken, len(head.todo)))
        return taken

    monkeypatch.setattr(HeadStart, "stop", waiting)
    return handed


def _reads(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key = line.split("\t")[0]
            counts[key] = counts.get(key, 0) + 1
    return counts


def _cli_build(src: Path | str, out: Path, *flags: str, codes: tuple[int, ...] = (0,)) -> str:
    from tests.helpers import run_cli

    result = run_cli("build", src, "--out", out, *FLAGS, *flags)
    assert result.exit_code in codes, result.output
    return result.output


def _children_left(seconds: float = 5.0) -> dict[int, int]:
    deadline = time.monotonic() + seconds
    left = _descendants(os.getpid())
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _descendants(os.getpid())
    return left


@pytest.mark.parametrize(
    ("new", "flags", "claim"),
    [
        (1, ("--workers", "2", "--batch-size", "4"), 1),  # a build of one item
        (4, ("--workers", "2", "--batch-size", "4"), 1),  # exactly one batch
        (9, ("--workers", "1", "--batch-size", "2"), 3),  # one worker, a partial last batch
        (9, ("--workers", "2", "--batch-size", "100000"), 1),  # a batch far over MAX_ITEMS
    ],
    ids=["one-item", "one-batch", "one-worker", "huge-batch"],
)
def test_every_new_item_is_read_once_and_embeds_as_without_workers(
    base: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    new: int,
    flags: tuple[str, ...],
    claim: int,
) -> None:
    names = [f"{i:02d}.png" for i in range(new)]
    out, plain, reads, handed = _headed_run(base, tmp_path, monkeypatch, names, claim,
                                            "counting", *flags)  # fmt: skip
    assert handed and handed[0][1] == new and handed[0][0] > 0  # the head start took some
    counts = _reads(reads)
    assert counts == {f"new/{n}": 1 for n in names}, counts
    _all_but(out, plain)


def _headed_run(
    base: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    names: list[str],
    claims: int,
    hook: str,
    *flags: str,
) -> tuple[Path, Path, Path, list[tuple[int, int]]]:
    """New items `names` built incrementally (the decode hook `hook` counting reads) with a
    head start held until it claimed `claims` batches; the same built without workers
    (plain). Returns out, plain, the reads file and the handovers."""
    src, out = _copy_new(base, tmp_path, names)
    plain = tmp_path / "plain"
    shutil.copytree(out, plain, symlinks=True)
    _cli_build(src, plain, "--workers", "0")
    reads = tmp_path / "reads.txt"
    monkeypatch.setenv("ADV_COUNT_FILE", str(reads))
    use_decode_hook(monkeypatch, f"{HOOK}:{hook}")
    handed = _claim_first(monkeypatch, claims)
    _cli_build(src, out, *flags, codes=(0, 5))  # 5: partial
    return out, plain, reads, handed


HOSTILE = ("--workers", "2", "--batch-size", "2", "--max-failures", "0.5")


def _all_but(out: Path, plain: Path, failed: str | None = None) -> None:
    """Every other item embedded as the build without workers embedded it."""
    from tests.helpers import read_embeddings_by_key

    got, want = read_embeddings_by_key(out), read_embeddings_by_key(plain)
    assert got.keys() == want.keys() - {failed}
    assert max(float(abs(got[k] - want[k]).max()) for k in got) < 1e-5
    assert not _children_left(), "decoding processes outlived the build"


def test_a_crash_in_a_later_head_start_batch_costs_only_its_item(
    base: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head start decodes batches 0 and 1 (2 x 77 KB each: batch 0 is half in the pipe,
    batch 1 queued), then crashes on an item of batch 2: only that item fails."""
    names = [f"{i:02d}.png" for i in range(10)]
    names[5] = "05-crash.png"
    out, plain, reads, handed = _headed_run(base, tmp_path, monkeypatch, names, 3,
                                            "counting_hostile", *HOSTILE)  # fmt: skip
    assert handed and handed[0] == (6, 10), handed  # 3 batches claimed, the last one crashed
    errors = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["counts"]
    assert errors["failed"] == 1, errors
    _all_but(out, plain, "new/05-crash.png")
    counts = _reads(reads)
    assert all(counts.get(f"new/{n}", 0) >= 1 for n in names), counts
    assert all(counts[f"new/{n}"] == 1 for n in names[6:]), counts  # the loader's: once


def _errors(out: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "errors.parquet").to_pylist()
    return {r["key"]: str(r.get("reason") or r.get("error")) for r in rows}


def test_a_hanging_item_in_the_head_start_times_out_alone(
    base: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An item that hangs in the head start's second batch with --decode-timeout 2: that item
    fails as timed out and every other embeds."""
    names = [f"{i:02d}.png" for i in range(8)]
    names[3] = "03-hang.png"
    out, plain, _, handed = _headed_run(
        base, tmp_path, monkeypatch, names, 2, "counting_hostile", *HOSTILE, "--decode-timeout", "2"
    )
    assert handed and handed[0][0] == 4, handed
    errors = _errors(out)
    assert list(errors) == ["new/03-hang.png"] and "longer than 2s" in errors["new/03-hang.png"]
    _all_but(out, plain, "new/03-hang.png")


# --- the head start on remote sources ----------------------------------------------------------


def test_an_incremental_bucket_build_reads_what_a_build_without_workers_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s3:// on moto (127.0.0.1): the head start and the DataLoader fetch between them what a
    --workers 0 run fetches (no object twice more), and the vectors are that run's."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from indexer.synthetic import write_corpus
    from tests.helpers import read_embeddings_by_key
    from tests.s3server import S3

    server = S3()
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        client = server.client()
        client.create_bucket(Bucket="photos")

        def upload(folder: Path, prefix: str) -> None:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    client.upload_file(str(path), "photos",
                                       prefix + path.relative_to(folder).as_posix())  # fmt: skip

        write_corpus(tmp_path / "a", 6, seed=4)
        upload(tmp_path / "a", "pics/a/")
        out, plain = tmp_path / "c", tmp_path / "plain"
        _cli_build("s3://photos/pics/", out, "--workers", "0")
        write_corpus(tmp_path / "b", 10, seed=8)
        upload(tmp_path / "b", "pics/b/")
        shutil.copytree(out, plain, symlinks=True)
        server.faults.gets.clear()
        _cli_build("s3://photos/pics/", plain, "--workers", "0")
        without = dict(server.faults.gets)  # what a run without the head start reads
        server.faults.gets.clear()
        handed = _claim_first(monkeypatch, 2)
        _cli_build("s3://photos/pics/", out, "--workers", "2",
                   "--batch-size", "3")  # fmt: skip
        assert handed and handed[0][1] == 10 and handed[0][0] >= 6, handed
        gets = dict(server.faults.gets)
        new = {k: v for k, v in gets.items() if "/pics/b/" in k}  # fetched to embed: as many
        assert new == {k: v for k, v in without.items() if "/pics/b/" in k}, (gets, without)
        assert len(new) == 10 and sum(gets.values()) - sum(new.values()) <= 8  # + the check
        got, want = read_embeddings_by_key(out), read_embeddings_by_key(plain)
        assert got.keys() == want.keys() and len(got) == 16
        assert max(float(abs(got[k] - want[k]).max()) for k in want) < 1e-5
    finally:
        server.stop()
    assert not _children_left(), "decoding processes outlived the build"


def test_an_incremental_url_list_build_fetches_what_a_build_without_workers_fetches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("aiohttp")
    import functools
    import http.server
    import threading

    import pyarrow as pa
    import pyarrow.parquet as pq

    from indexer.synthetic import scene
    from tests.helpers import read_embeddings_by_key

    www = tmp_path / "www"
    www.mkdir()
    for n in range(14):
        scene(700 + n, (120, 90)).save(www / f"{n:02d}.png")
    counts: dict[str, int] = {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            counts[self.path] = counts.get(self.path, 0) + 1
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(www))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        listing = tmp_path / "list.parquet"

        def write(n: int) -> None:
            pq.write_table(pa.table({"url": [f"{url}/{i:02d}.png" for i in range(n)]}), listing)

        write(4)
        out, plain = tmp_path / "c", tmp_path / "plain"
        _cli_build(listing, out, "--workers", "0")
        write(14)
        shutil.copytree(out, plain, symlinks=True)
        counts.clear()
        _cli_build(listing, plain, "--workers", "0")
        without = dict(counts)  # what a run without the head start fetches
        counts.clear()
        handed = _claim_first(monkeypatch, 2)
        _cli_build(listing, out, "--workers", "2", "--batch-size", "3")
        assert handed and handed[0][1] == 10 and handed[0][0] >= 6, handed
        assert counts == without, (counts, without)
        got, want = read_embeddings_by_key(out), read_embeddings_by_key(plain)
        assert got.keys() == want.keys() and len(got) == 14
        assert max(float(abs(got[k] - want[k]).max()) for k in want) < 1e-5
    finally:
        server.shutdown()
        server.server_close()
    assert not _children_left(), "decoding processes outlived the build"


def test_renamed_items_reuse_their_vectors_through_the_head_start(
    base: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every item moved to another folder (and one new): the head start and the loader find
    the moved items' bytes known (reused, not embedded), each read once, vectors unchanged."""
    from tests.helpers import read_embeddings_by_key

    src, out = _incremental(base, tmp_path, 0)
    before = read_embeddings_by_key(out)
    shutil.move(str(src), str(tmp_path / "moved"))
    src.mkdir()
    shutil.move(str(tmp_path / "moved"), str(src / "moved"))
    from indexer.synthetic import scene

    scene(901, (200, 150)).save(src / "zz-new.png")  # one new item: else nothing decodes
    reads = tmp_path / "reads.txt"
    monkeypatch.setenv("ADV_COUNT_FILE", str(reads))
    use_decode_hook(monkeypatch, f"{HOOK}:counting")
    handed = _claim_first(monkeypatch, 2)
    _cli_build(src, out, "--workers", "2", "--batch-size", "3")
    assert handed and handed[0][1] == 13 and handed[0][0] >= 6, handed
    counts = _reads(reads)
    want = sorted([*(f"moved/{k}" for k in before), "zz-new.png"])
    assert sorted(counts) == want and set(counts.values()) == {1}, counts
    after = read_embeddings_by_key(out)
    assert after.keys() == {f"moved/{k}" for k in before} | {"zz-new.png"}
    assert all(float(abs(after[f"moved/{k}"] - v).max()) < 1e-6 for k, v in before.items())
    run = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["counts"]
    assert run["reused"] == 12, run
    assert not _children_left(), "decoding processes outlived the build"


def test_new_items_that_all_fail_in_the_head_start(
    base: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every new item undecodable: each is an error row, the old vectors stay, no process
    is left behind."""
    from tests.helpers import read_embeddings_by_key

    src, out = _incremental(base, tmp_path, 0)
    before = read_embeddings_by_key(out)
    (src / "bad").mkdir()
    for i in range(7):
        (src / "bad" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes([i]) * 40)
    handed = _claim_first(monkeypatch, 2)
    _cli_build(src, out, "--workers", "2", "--batch-size", "2", "--max-failures", "0.9",
               codes=(0, 5))  # fmt: skip
    assert handed and handed[0][0] >= 4, handed
    assert sorted(_errors(out)) == [f"bad/{i}.png" for i in range(7)]
    assert read_embeddings_by_key(out).keys() == before.keys()
    assert not _children_left(), "decoding processes outlived the build"


# --- trusted known exports -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def known_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A source, a cache holding the export a seeded first build made of it (torch, then its
    own export checked), and that build's collection (the vectors every later build must
    reproduce)."""
    from indexer.synthetic import write_corpus
    from tests.helpers import BUILD_FLAGS, run_cli

    top = tmp_path_factory.mktemp("advknown")
    src = top / "src"
    write_corpus(src, 10, seed=13)
    cache = top / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INDEXER_CACHE_DIR", str(cache))
        result = run_cli("build", src, "--out", top / "clean", *BUILD_FLAGS, "--batch-size", "8",
                         "--runtime", "onnx")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list((cache / "exports" / "known").glob("*.json"))) == 1
    return src, cache, top / "clean"


def _tampered_cache(known_cache: tuple[Path, Path, Path], tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> Path:  # fmt: skip
    cache = tmp_path / "cache"
    shutil.copytree(known_cache[1], cache)
    monkeypatch.setenv("INDEXER_CACHE_DIR", str(cache))
    return next((cache / "exports" / "known").glob("*.json"))


def _build_known(known_cache: tuple[Path, Path, Path], out: Path) -> None:
    from tests.helpers import BUILD_FLAGS, read_embeddings_by_key, run_cli

    result = run_cli("build", known_cache[0], "--out", out, *BUILD_FLAGS, "--batch-size", "8",
                     "--runtime", "onnx")  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    got, want = read_embeddings_by_key(out), read_embeddings_by_key(known_cache[2])
    assert got.keys() == want.keys()
    assert max(float(abs(got[k] - want[k]).max()) for k in want) < 1e-5


def _min_cosine(value: object) -> object:
    def change(entry: dict) -> None:
        fidelity = entry["record"].setdefault("fidelity", {})
        if value is None:
            fidelity.pop("min_cosine", None)
        else:
            fidelity["min_cosine"] = value

    return change


TAMPERED = {  # a cache entry a build did not write: used, confirmed or ignored, never a crash
    # cosines() of two equal float32 vectors, in float64, can be one ulp over 1: an export
    # whose record says so is trusted (its angle clipped)
    "min_cosine one ulp over 1": _min_cosine(1.0000000000000002),
    "min_cosine huge": _min_cosine(1e308),
    "min_cosine NaN": _min_cosine(float("nan")),
    "min_cosine a string": _min_cosine("0.99999"),
    "min_cosine a bool": _min_cosine(True),
    "min_cosine missing": _min_cosine(None),
    "recipe a list": lambda e: e.update(recipe=[]),
    "recipe a string": lambda e: e.update(recipe="x"),
    "recipe weights a string": lambda e: e["recipe"].update(weights="x"),
    "record a string": lambda e: e.update(record="x"),
    "entry a list": lambda e: (e.clear(), e.update({"_list": True})),
}


@pytest.mark.parametrize("tampering", list(TAMPERED))
def test_a_tampered_cache_entry_never_fails_the_build(
    known_cache: tuple[Path, Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tampering: str,
) -> None:
    entry_path = _tampered_cache(known_cache, tmp_path, monkeypatch)
    entry = json.loads(entry_path.read_text())
    TAMPERED[tampering](entry)
    entry_path.write_text(json.dumps([1, 2] if entry.get("_list") else entry))
    _build_known(known_cache, tmp_path / "out")


def test_a_killed_known_export_build_leaves_nothing_a_failed_check_would_keep(
    known_cache: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first build embedding with the known export is SIGKILLed mid-way (its shards written
    before any check); the re-run's check of the export fails: it must embed everything
    again with torch, salvaging none of the killed run's shards."""
    import indexer.model.known_export as known

    cache = tmp_path / "cache"
    shutil.copytree(known_cache[1], cache)
    out = tmp_path / "out"
    argv = [*hooked_cli(decode="tests.hooks:killer"), "build", str(known_cache[0]), "--out",
            str(out), "--no-pretrained", "--workers", "0", "--no-progress", "--precision", "fp32",
            "--batch-size", "2", "--runtime", "onnx"]  # fmt: skip
    killed = subprocess.run(argv, env=_env(INDEXER_CACHE_DIR=str(cache)),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "current").exists()
    monkeypatch.setenv("INDEXER_CACHE_DIR", str(cache))
    monkeypatch.setattr(known, "chained_bound", lambda bound, export_min: 1.5)
    _build_known(known_cache, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "cached" not in manifest["portable_model"]
    assert not (out / "versions" / ".salvage").exists()
    run = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert run["counts"]["new"] == 10, run


def test_two_first_builds_at_once_leave_a_cache_entry_a_third_build_trusts(
    known_cache: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two first builds of one request, at once, sharing an empty cache: both succeed, and the
    entry they leave is whole (a third build embeds with it, without timm)."""
    import indexer.model.known_export as known

    cache = tmp_path / "cache"
    env = _env(INDEXER_CACHE_DIR=str(cache))
    procs = [
        subprocess.Popen([INDEXER, "build", str(known_cache[0]), "--out", str(tmp_path / n),
                          "--no-pretrained", "--workers", "0", "--no-progress", "--precision",
                          "fp32", "--batch-size", "8", "--runtime", "onnx"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in ("a", "b")
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    monkeypatch.setenv("INDEXER_CACHE_DIR", str(cache))

    def no_timm(cfg: object) -> None:
        raise AssertionError("the entry two builds wrote was not usable")

    monkeypatch.setattr(known, "Confirmation", no_timm)
    _build_known(known_cache, tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["portable_model"].get("cached") is True
