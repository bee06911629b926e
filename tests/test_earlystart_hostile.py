"""Adversarial checks of the early start (indexer/earlystart.py): a first build from
object-store prefixes is listed, planned and its first batches decoded by a process forked
before anything is listed, which the build adopts as its head start. Against moto's S3 on
127.0.0.1 (tests/s3server.py, and a small fault-injecting endpoint here), through the real
CLI (run_cli, or the console script in a subprocess where signals and stderr matter), with no
network. Bucket builds are compared with the same files built from a folder (fp32, 1e-6)."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from indexer.decode import loader
from tests.helpers import read_embeddings_by_key, run_cli
from tests.hooks import hooked_cli, use_decode_hook
from tests.processes import process_stat
from tests.s3server import S3
from tests.test_buckets import upload

FLAGS = ("--no-pretrained", "--workers", "1", "--no-progress", "--precision", "fp32",
         "--batch-size", "8")  # fmt: skip  # worker processes: the early start is wanted
URL = "s3://photos/pics/"
ADOPTED = "the early start's decoding is this build's head start"
LISTED = "listed while torch loaded (the early start)"
INDEXER = str(Path(sys.executable).parent / "indexer")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def known(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The corpus built from its folder with FLAGS: the reference collection, and (in the
    session's indexer cache, as tests/conftest.py sets it) the export a bucket build adopts."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INDEXER_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "indexer-cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        out = tmp_path_factory.mktemp("known") / "c"
        result = run_cli("build", corpus, "--out", out, *FLAGS)
        assert result.exit_code == 0, result.output
    yield out


@pytest.fixture
def private_cache(known: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the session's indexer cache (the known export, the runtime decided), for a
    test whose build may change what it holds."""
    copy = tmp_path / "private-cache"
    shutil.copytree(os.environ["INDEXER_CACHE_DIR"], copy)
    monkeypatch.setenv("INDEXER_CACHE_DIR", str(copy))
    return copy


def same_vectors(got: Path, want: Path) -> None:
    """The same keys, and vectors within 1e-6 (fp32)."""
    a, b = read_embeddings_by_key(got), read_embeddings_by_key(want)
    assert sorted(a) == sorted(b)
    for key in b:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6)


def error_rows(out: Path) -> list[tuple[str, str, str, int]]:
    """(key, stage, error, file size) of each error row, sorted."""
    rows = pq.read_table(out / "errors.parquet").to_pylist()
    return sorted((r["key"], r["stage"], r["error"], r["file_size"]) for r in rows)


def named_copy(src: Path, where: Path) -> Path:
    """A copy of src at `where` (its folder name: a source's label, as a prefix's is)."""
    shutil.copytree(src, where)
    return where


def build_logged(caplog: pytest.LogCaptureFixture, *args: Any) -> Any:
    with caplog.at_level(logging.INFO, logger="indexer"):
        return run_cli(*args)


def no_early_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from indexer.build import pipeline

    monkeypatch.setattr(pipeline.EarlyStart, "start", classmethod(lambda cls, cfg: None))


# --- adopted however the build is asked for ----------------------------------------------------


@pytest.mark.parametrize(
    ("urls", "folders"),
    [
        (("s3://photos/pics/", "s3://photos/more/"), ("pics", "more")),
        (("s3://photos/pics/", "s3://photos/pics/"), ("pics", "pics")),
        (("s3://photos/pics", "s3://photos/pics/"), ("pics", "pics/")),
        (("s3://photos/", "s3://photos/more/"), (".", "more")),
        (("S3://photos/pics/",), ("pics",)),
    ],
    ids=["two-prefixes", "same-twice", "with-and-without-slash", "nested", "upper-case"],
)
def test_several_prefixes_build_as_the_same_folders(
    s3: S3, corpus: Path, known: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    urls: tuple[str, ...], folders: tuple[str, ...],
) -> None:  # fmt: skip
    """Two prefixes, one prefix twice (as given or without its slash), a prefix and one
    inside it, an upper-case scheme: the early start is adopted, and the keys (label/key,
    labels made unique) and vectors are those of the same folders built locally; no more
    listing requests than one listing per SOURCE, each object read once per SOURCE naming
    it."""
    from indexer.sources.bucket import BucketSource
    from indexer.synthetic import write_corpus

    photos = tmp_path / "photos"
    named_copy(corpus, photos / "pics")
    write_corpus(photos / "more", 6, seed=9)
    upload(s3, photos, prefix="")
    lists = s3.faults.lists
    for url in urls:
        BucketSource(url).listing()
    listing, lists = s3.faults.lists - lists, s3.faults.lists
    remote, local = tmp_path / "remote", tmp_path / "local"
    result = build_logged(caplog, "build", *urls, "--out", remote, *FLAGS)
    assert result.exit_code == 0, result.output
    assert ADOPTED in caplog.text
    assert s3.faults.lists - lists <= listing
    objects = [f"photos/{p.relative_to(photos).as_posix()}" for p in photos.rglob("*.*")]
    roots = [url.lower().removeprefix("s3://").rstrip("/") + "/" for url in urls]
    reads = {f"/{o}": sum(o.startswith(r) for r in roots) for o in objects}
    assert s3.faults.gets == {o: n for o, n in reads.items() if n}  # once per SOURCE naming it
    sources = [str(tmp_path / "photos" / f) for f in folders]
    assert run_cli("build", *sources, "--out", local, *FLAGS).exit_code == 0
    same_vectors(remote, local)


def test_odd_object_names_build_as_the_same_files(
    s3: S3, corpus: Path, known: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Names with spaces, non-ASCII letters, %, +, =, & and a leading dash (as a folder may
    hold them): through the early start's listing and adopted decoding, the same keys and
    vectors as the same files in a folder."""
    folder = named_copy(corpus / "group1", tmp_path / "pics")
    images = sorted(folder.glob("*"))
    for path, name in zip(images, ("a b.jpg", "ünï çødé.png", "100%.jpg", "a+b=c&d.jpg",
                                   "-dash.jpg", "sub dir/x y.png"), strict=False):  # fmt: skip
        (folder / name).parent.mkdir(exist_ok=True)
        path.rename(folder / name)
    upload(s3, folder)
    remote, local = tmp_path / "remote", tmp_path / "local"
    result = build_logged(caplog, "build", URL, "--out", remote, *FLAGS)
    assert result.exit_code == 0, result.output
    assert ADOPTED in caplog.text
    assert run_cli("build", folder, "--out", local, *FLAGS).exit_code == 0
    same_vectors(remote, local)


def test_partitions_of_a_bucket_adopt_and_together_are_the_folders_collection(
    s3: S3, corpus: Path, known: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--partition 0/2 and 1/2 of a first bucket build (each part's folder is fresh): each
    adopts its early start, and the parts together hold exactly the folder build's keys
    and vectors."""
    upload(s3, corpus)
    out, got = tmp_path / "c", {}
    for part in ("0/2", "1/2"):
        caplog.clear()
        result = build_logged(caplog, "build", URL, "--out", out, *FLAGS, "--partition", part)
        assert result.exit_code == 0, result.output
        assert ADOPTED in caplog.text
        index, count = part.split("/")
        built = read_embeddings_by_key(out / "parts" / f"{int(index):05d}-of-{int(count):05d}")
        assert built and not set(built) & set(got)
        got.update(built)
    want = read_embeddings_by_key(known)
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6)


def test_a_job_file_naming_a_bucket_adopts_the_early_start(
    s3: S3, corpus: Path, known: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`indexer run JOB.toml` whose sources are a bucket prefix (not a path relative to the
    file): the early start is adopted and the collection is the folder's."""
    upload(s3, corpus)
    job = tmp_path / "job.toml"
    settings = ('sources = ["s3://photos/pics/"]', 'out = "c"', "pretrained = false",
                "workers = 1", "progress = false", 'precision = "fp32"',
                "batch_size = 8")  # fmt: skip
    job.write_text("\n".join(settings) + "\n")
    result = build_logged(caplog, "run", job)
    assert result.exit_code == 0, result.output
    assert ADOPTED in caplog.text
    same_vectors(tmp_path / "c", known)


def test_the_python_api_from_a_thread_adopts_the_early_start(
    s3: S3, corpus: Path, known: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pipeline.build called from a thread that is not the main one (a service's worker):
    the fork sets its signal dispositions without complaint, the early start is adopted,
    the listing is made once, the vectors are the folder's, and once it returns no process
    it started is left in the host."""
    from indexer.build.pipeline import build
    from indexer.config import BuildConfig, LoaderConfig, ModelConfig, SourceSpec
    from indexer.sources.bucket import BucketSource

    upload(s3, corpus)
    lists = s3.faults.lists
    BucketSource(URL).listing()
    listing, lists = s3.faults.lists - lists, s3.faults.lists
    cfg = BuildConfig((SourceSpec(URL),), tmp_path / "c",
                      model=ModelConfig(pretrained=False, precision="fp32"),
                      loader=LoaderConfig(batch_size=8, workers=1, progress=False))  # fmt: skip
    done: dict[str, Any] = {}

    def run() -> None:
        try:
            done["report"] = build(cfg)
        except BaseException as exc:
            done["error"] = exc

    with caplog.at_level(logging.INFO, logger="indexer"):
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(300)
    assert "error" not in done, done
    assert done["report"].counts["new"] == 28
    assert ADOPTED in caplog.text and s3.faults.lists - lists == listing
    left = survivors(descendants(os.getpid()), 10)
    assert not left, f"processes the build left behind in its host: {left}"
    same_vectors(tmp_path / "c", known)


@pytest.mark.parametrize(("most", "batch"), [(12, 8), (10, 3)])
def test_a_share_smaller_than_the_build_hands_the_rest_to_the_loader(
    s3: S3, corpus: Path, known: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, most: int, batch: int,
) -> None:  # fmt: skip
    """The early start's share capped below the build's size (headstart.MAX_ITEMS, set before
    the fork so both processes cut the same share; a share rounds up to whole batches): its
    batches, then the DataLoader's from where the share ends; every object read once, every
    key once, the folder's vectors."""
    from indexer.decode import head_start as headstart

    monkeypatch.setattr(headstart, "MAX_ITEMS", most)
    upload(s3, corpus)
    out = tmp_path / "c"
    result = build_logged(caplog, "build", URL, "--out", out, *FLAGS, "--batch-size", str(batch))
    assert result.exit_code == 0, result.output
    share = -(-most // batch) * batch
    assert ADOPTED in caplog.text and f"{share} of 28 items decoded while torch" in caplog.text
    assert len(s3.faults.gets) == 28 and set(s3.faults.gets.values()) == {1}
    same_vectors(out, known)


def test_a_huge_listing_crosses_the_pipe_without_a_deadlock(
    s3: S3, corpus: Path, known: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """3,000 more objects (long names, not images: ~1 MB of listing to pickle through a
    64 KB pipe while the main process still imports torch): listed once, adopted, the
    folder's collection."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    from indexer.sources.bucket import BucketSource

    upload(s3, corpus)
    store = s3_backends[DEFAULT_ACCOUNT_ID]["global"]  # (moto in this process: no 3,000 PUTs)
    for i in range(3000):  # two sub-prefixes of 1,500: each listing paged
        store.put_object("photos", f"pics/notes/{i % 2}/{'x' * 180}-{i:05d}.txt", b"n")
    lists = s3.faults.lists
    assert len(BucketSource(URL).listing()) == 3028
    listing, lists = s3.faults.lists - lists, s3.faults.lists
    result = build_logged(caplog, "build", URL, "--out", tmp_path / "c", *FLAGS)
    assert result.exit_code == 0, result.output
    assert ADOPTED in caplog.text and "listed 28 items" in caplog.text
    assert s3.faults.lists - lists == listing
    same_vectors(tmp_path / "c", known)


# --- the store changing under the early start --------------------------------------------------


def test_objects_changed_after_the_early_listing_are_error_rows_then_caught_up(
    s3: S3, corpus: Path, known: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Right after the early start listed (a wrapper its fork inherits), one object is
    overwritten, one deleted and one added. The build plans from that listing: the
    overwritten object is an error row (never the new bytes under the old ETag), the deleted
    one an error row, the new one not in it; the next run (listed by the main process) ends
    with exactly the folder's collection of the store's final state."""
    from indexer.build import early_start as earlystart

    upload(s3, corpus)
    other = next(corpus.rglob("*.png")).read_bytes()
    real = earlystart.list_prefixes

    def then_change(cfg: Any) -> Any:
        listed = real(cfg)
        client = s3.client()
        client.put_object(Bucket="photos", Key="pics/group0/scene0004.jpg", Body=other)
        client.delete_object(Bucket="photos", Key="pics/group1/scene0009.jpg")
        client.put_object(Bucket="photos", Key="pics/group3/added.png", Body=other)
        return listed

    monkeypatch.setattr(earlystart, "list_prefixes", then_change)
    out = tmp_path / "c"
    result = build_logged(caplog, "build", URL, "--out", out, *FLAGS, "--max-failures", "2")
    assert result.exit_code == 5, result.output
    assert ADOPTED in caplog.text
    rows = {row[0]: row for row in error_rows(out)}
    assert sorted(rows) == ["group0/scene0004.jpg", "group1/scene0009.jpg"], rows
    assert rows["group0/scene0004.jpg"][1] == "read"
    assert "changed after it was listed" in rows["group0/scene0004.jpg"][2]
    assert rows["group1/scene0009.jpg"][1] == "read"
    got = read_embeddings_by_key(out)
    assert len(got) == 26 and "group3/added.png" not in got
    monkeypatch.setattr(earlystart, "list_prefixes", real)
    again = run_cli("build", URL, "--out", out, *FLAGS)
    assert again.exit_code == 0, again.output
    final = named_copy(corpus, tmp_path / "final")
    (final / "group0" / "scene0004.jpg").write_bytes(other)
    (final / "group1" / "scene0009.jpg").unlink()
    (final / "group3" / "added.png").write_bytes(other)
    assert run_cli("build", final, "--out", tmp_path / "local", *FLAGS).exit_code == 0
    same_vectors(out, tmp_path / "local")
    assert error_rows(out) == []


# --- what the early start must not do: stage, index, fork for a dry run ------------------------


@pytest.mark.parametrize("kind", ["tars", "parquet"])
def test_tars_or_parquet_under_a_prefix_are_only_listed_by_the_early_start(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:  # fmt: skip
    """Webdataset tars (indexed by range reads) or img2dataset's Parquet files (staged into
    indexer's cache): with the early start the build makes exactly the listing requests and
    object reads (by path) of a build without it, adopts nothing, and builds the same rows."""
    from tests.shapes import write_i2d_parquet, write_webdataset

    folder = tmp_path / kind
    if kind == "tars":
        write_webdataset(folder, 0, 6)
        write_webdataset(folder, 1, 5, failed=(2,))
    else:
        write_i2d_parquet(folder, 0, 6, failed=(3,))
        write_i2d_parquet(folder, 1, 4)
    upload(s3, folder, prefix="data/")
    url, runs = "s3://photos/data/", {}
    for early in (True, False):
        monkeypatch.setenv("INDEXER_CACHE_DIR", str(tmp_path / f"cache-{early}"))
        if not early:
            no_early_start(monkeypatch)
        lists, gets = s3.faults.lists, dict(s3.faults.gets)
        caplog.clear()
        out = tmp_path / f"c-{early}"
        result = build_logged(caplog, "build", url, "--out", out, *FLAGS)
        assert result.exit_code in (0, 5), result.output
        assert (LISTED in caplog.text) is early and "head start" not in caplog.text
        read = {k: v - gets.get(k, 0) for k, v in s3.faults.gets.items() if v != gets.get(k, 0)}
        runs[early] = (s3.faults.lists - lists, read, error_rows(out))
    assert runs[True] == runs[False]
    same_vectors(tmp_path / "c-True", tmp_path / "c-False")


def test_a_dry_run_forks_nothing_and_lists_once(
    s3: S3, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--dry-run on a first bucket build: the plan's counts, one listing, no process forked,
    nothing created."""
    from indexer.sources.bucket import BucketSource

    upload(s3, corpus)
    lists = s3.faults.lists
    BucketSource(URL).listing()
    listing, lists = s3.faults.lists - lists, s3.faults.lists
    forked: list[str] = []
    real = multiprocessing.context.ForkProcess._Popen

    def counting(process: Any) -> Any:
        forked.append(process.name)
        return real(process)

    monkeypatch.setattr(multiprocessing.context.ForkProcess, "_Popen", staticmethod(counting))
    out = tmp_path / "c"
    result = run_cli("build", URL, "--out", out, *FLAGS, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "28 listed" in result.output
    assert forked == [] and s3.faults.lists - lists == listing
    assert not out.exists()


# --- a store that refuses or throttles (an endpoint of our own in front of moto) ---------------


class Front:
    """An HTTP endpoint on 127.0.0.1 in front of `upstream` (or of nothing): answer(method,
    path) gives (status, body) to answer a request itself, or None to pass it on."""

    def __init__(self, answer: Any, upstream: str | None = None) -> None:
        import http.client
        import http.server

        self.requests: list[str] = []
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                front.requests.append(f"{self.command} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                answered = answer(self.command, self.path)
                if answered is None and upstream is not None:
                    host, port = upstream.removeprefix("http://").split(":")
                    conn = http.client.HTTPConnection(host, int(port), timeout=60)
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    got = conn.getresponse()
                    status, data = got.status, got.read()
                    passed = [(k, v) for k, v in got.getheaders()
                              if k.lower() not in ("transfer-encoding", "connection",
                                                   "content-length")]  # fmt: skip
                    conn.close()
                else:
                    status, data = answered or (500, b"")
                    passed = [("Content-Type", "application/xml")]
                self.send_response(status)
                for k, v in passed:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def s3_error(code: str, status: int) -> tuple[int, bytes]:
    body = f"<Error><Code>{code}</Code><Message>{code}</Message><RequestId>1</RequestId></Error>"
    return status, ("<?xml version='1.0' encoding='UTF-8'?>" + body).encode()


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("where", "url", "says"),
    [
        ("forbidden", URL, "cannot be listed (PermissionError"),
        ("closed", URL, "cannot be listed: EndpointConnectionError"),
        ("moto", "s3://", "name a bucket"),
        ("moto", "s3://photos/pics/?versionId=1", "without ? or #"),
        ("moto", "gs://photos/pics/", "gs:// needs gcsfs"),
        ("moto", "s3://photos/nothing-here/", "does not exist or holds nothing"),
    ],
    ids=["bad-credentials", "unreachable", "no-bucket", "query-string", "no-gcsfs", "empty"],
)
def test_a_refused_listing_is_one_line_exit_2_nothing_published_and_asked_once(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, url: str, says: str
) -> None:
    """Bad credentials (403 AccessDenied to everything), an endpoint nobody listens on, a
    URL naming no bucket or holding a query string, a store whose client is not installed,
    a prefix holding nothing: one line naming the cause, exit 2, no traceback, no version;
    and the store asked exactly as often as by a build without the early start."""
    if where == "moto":
        s3.client().create_bucket(Bucket="photos")
        front = Front(lambda method, path: None, s3.endpoint)
    elif where == "forbidden":
        front = Front(lambda method, path: s3_error("AccessDenied", 403))
    else:
        front = Front(lambda method, path: None)
        front.endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", front.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    asked = {}
    try:
        for early in (True, False):
            if not early:
                no_early_start(monkeypatch)
            before = len(front.requests)
            out = tmp_path / f"c-{early}"
            result = run_cli("build", url, "--out", out, *FLAGS)
            assert result.exit_code == 2, result.output
            assert says in result.output and "Traceback" not in result.output, result.output
            assert len(result.output.strip().splitlines()) == 1, result.output
            assert not (out / "versions").exists() and not (out / "current").exists()
            assert not survivors(descendants(os.getpid()), 10)  # the early start was reaped
            asked[early] = sorted(front.requests[before:])
    finally:
        front.stop()
    assert asked[True] == asked[False]


def test_a_malformed_storage_option_is_one_line_exit_2(
    s3: S3, corpus: Path, tmp_path: Path
) -> None:
    """`--storage-option config_kwargs=x` (s3fs takes a table there; the CLI gives text),
    met by the early start and then by the main process: one line naming the option, exit
    2, nothing written, not a ValueError traceback with exit 1."""
    upload(s3, corpus)
    out = tmp_path / "c"
    result = run_cli("build", URL, "--out", out, *FLAGS, "--storage-option", "config_kwargs=x")
    assert not isinstance(result.exception, ValueError), repr(result.exception)
    assert result.exit_code == 2, result.output
    assert "config_kwargs" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (out / "versions").exists()


def test_a_throttled_listing_is_retried_by_the_early_start_alone(
    s3: S3, corpus: Path, known: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """The store answers the first three listing requests 503 SlowDown: the early start's
    client retries them, the main process lists nothing, the build is the folder's."""
    upload(s3, corpus)
    refused: list[str] = []

    def slow_down(method: str, path: str) -> tuple[int, bytes] | None:
        if method == "GET" and "list-type=" in path and len(refused) < 3:
            refused.append(path)
            return s3_error("SlowDown", 503)
        return None

    front = Front(slow_down, s3.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", front.endpoint)
    try:
        out = tmp_path / "c"
        result = build_logged(caplog, "build", URL, "--out", out, *FLAGS)
    finally:
        front.stop()
    assert result.exit_code == 0, result.output
    assert len(refused) == 3 and ADOPTED in caplog.text
    assert "did not list the sources" not in caplog.text
    same_vectors(out, known)


def test_throttled_reads_during_the_adopted_decoding_are_retried_or_error_rows(
    s3: S3, corpus: Path, known: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A third of the object GETs answered 503 SlowDown while the adopted early start reads:
    retried (with backoff); every item is a row or a 'read' error row, none twice, and every
    vector is the folder's."""
    upload(s3, corpus)
    s3.faults.throttle = 0.35
    out = tmp_path / "c"
    result = build_logged(caplog, "build", URL, "--out", out, *FLAGS, "--max-failures", "28")
    assert result.exit_code in (0, 5), result.output
    assert ADOPTED in caplog.text and s3.faults.throttled > 0
    got, want = read_embeddings_by_key(out), read_embeddings_by_key(known)
    failed = [row for row in error_rows(out)]
    assert all(row[1] == "read" for row in failed), failed
    assert sorted([*got, *(row[0] for row in failed)]) == sorted(want)
    for key in got:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6)


def test_read_retries_zero_asks_a_throttled_object_once(
    s3: S3, corpus: Path, known: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """One object always answered 503 SlowDown while the adopted early start reads, with
    --read-retries 0 and botocore's own attempts set to 1 (AWS_MAX_ATTEMPTS): it is its
    error row ('read') after one request. (s3fs used to try it 5 times by itself first,
    inside botocore's 5: 25 requests, ~40 s, for one object with --read-retries 0.)"""
    upload(s3, corpus)
    throttled = "/photos/pics/group0/scene0004.jpg"
    asked: list[str] = []

    def slow_down(method: str, path: str) -> tuple[int, bytes] | None:
        if method == "GET" and path == throttled:
            asked.append(path)
            return s3_error("SlowDown", 503)
        return None

    front = Front(slow_down, s3.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", front.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off: s3fs's remain
    try:
        out = tmp_path / "c"
        result = build_logged(caplog, "build", URL, "--out", out, *FLAGS, "--read-retries", "0",
                              "--max-failures", "1")  # fmt: skip
    finally:
        front.stop()
    assert result.exit_code == 5, result.output
    assert ADOPTED in caplog.text
    assert [(row[0], row[1]) for row in error_rows(out)] == [("group0/scene0004.jpg", "read")]
    assert len(asked) == 1, f"asked {len(asked)} times with --read-retries 0"


# --- items that fail in the adopted decoding ---------------------------------------------------


def with_hostile(corpus: Path, tmp_path: Path, hang: bool = True) -> Path:
    """Two of the corpus's folders (12 images) and copies of an image whose keys make
    tests.hooks.hostile crash its decoder (first in listing order) and hang it."""
    folder = tmp_path / "hostile"
    for group in ("group0", "group2"):
        shutil.copytree(corpus / group, folder / group)
    image = next(corpus.rglob("*.jpg")).read_bytes()
    (folder / "a-crash.jpg").write_bytes(image)
    if hang:
        (folder / "group2" / "z-hang.jpg").write_bytes(image)
    return folder


def counted_isolated(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Positions the main process decodes one by one, each in a process of its own."""
    seen: list[int] = []
    real = loader.isolated

    def counting(dataset: Any, position: int, timeout: float) -> Any:
        seen.append(position)
        return real(dataset, position, timeout)

    monkeypatch.setattr(loader, "isolated", counting)
    return seen


def bad_images(corpus: Path, folder: Path) -> Path:
    """The corpus and five bad files: garbage named .jpg, a truncated JPEG and PNG, an
    empty file, and a PNG named .jpg (decodes: not an error)."""
    named_copy(corpus, folder)
    jpeg, png = next(corpus.rglob("*.jpg")).read_bytes(), next(corpus.rglob("*.png")).read_bytes()
    bad = folder / "bad"
    bad.mkdir()
    (bad / "garbage.jpg").write_bytes(b"not an image at all" * 50)
    (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (bad / "truncated.png").write_bytes(png[: len(png) // 2])
    (bad / "empty.png").write_bytes(b"")
    (bad / "png-named.jpg").write_bytes(png)
    return folder


def test_a_crash_and_a_hang_in_the_adopted_decoding_are_the_folders_error_rows(
    s3: S3, corpus: Path, known: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A decoder that crashes (SIGSEGV) and one that hangs past --decode-timeout in the
    adopted early start: each is its item's error row, exactly the folder build's; every
    other item is embedded as from the folder."""
    folder = with_hostile(corpus, tmp_path)
    upload(s3, folder)
    use_decode_hook(monkeypatch, "tests.hooks:hostile")
    flags = (*FLAGS, "--decode-timeout", "1", "--max-failures", "5")
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert run_cli("build", folder, "--out", local, *flags).exit_code == 5
    with caplog.at_level(logging.INFO, logger="indexer"):
        result = run_cli("build", URL, "--out", remote, *flags)
    assert result.exit_code == 5, result.output
    assert ADOPTED in caplog.text
    assert error_rows(remote) == error_rows(local)
    assert [row[0] for row in error_rows(remote)] == ["a-crash.jpg", "group2/z-hang.jpg"]
    same_vectors(remote, local)


def test_a_crash_in_the_adopted_decoding_costs_its_batches_not_its_whole_share(
    s3: S3, corpus: Path, known: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """The adopted process dies on the first batch's first item. As when a worker or a
    plain head start dies, the batches it had taken (the one it decoded and the one it
    fetched ahead) are decoded again one item per process; the rest of its share by a
    loader. Not: every item of the share (up to 1,024) forked and read alone, one after
    the other, while the workers idle."""
    upload(s3, with_hostile(corpus, tmp_path, hang=False))
    use_decode_hook(monkeypatch, "tests.hooks:hostile")
    one_by_one = counted_isolated(monkeypatch)
    batch = 4
    with caplog.at_level(logging.INFO, logger="indexer"):
        result = run_cli("build", URL, "--out", tmp_path / "c", *FLAGS, "--batch-size",
                         str(batch), "--max-failures", "1")  # fmt: skip
    assert result.exit_code == 5, result.output
    assert ADOPTED in caplog.text
    assert [row[0] for row in error_rows(tmp_path / "c")] == ["a-crash.jpg"]
    assert len(read_embeddings_by_key(tmp_path / "c")) == 12
    assert len(one_by_one) <= 2 * batch, f"{len(one_by_one)} of 13 items decoded one by one"


def killed_early_start(key: str) -> None:
    """A decode hook: SIGKILL the early start's process at the sixth item it decodes (the
    OOM killer, say); every other process decodes as usual."""
    if multiprocessing.current_process().name != "indexer-early-start":
        return
    seen = killed_early_start.__dict__.get("seen", 0) + 1
    killed_early_start.__dict__["seen"] = seen
    if seen == 6:
        os.kill(os.getpid(), signal.SIGKILL)


def test_an_adopted_early_start_killed_mid_share_loses_nothing(
    s3: S3, corpus: Path, known: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """The adopted process SIGKILLed in its second batch (batch size 4): the batch it
    delivered is used, the two it had taken (decoding, fetched ahead) are decoded one item
    per process, the rest of its share by a loader; no error row, every key once, the
    folder's vectors, no object read more than twice."""
    upload(s3, corpus)
    use_decode_hook(monkeypatch, f"{__name__}:killed_early_start")
    one_by_one = counted_isolated(monkeypatch)
    out = tmp_path / "c"
    result = build_logged(caplog, "build", URL, "--out", out, *FLAGS, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert ADOPTED in caplog.text and "decoding process died" in caplog.text
    assert error_rows(out) == []
    same_vectors(out, known)
    # its sending thread may not have sent the first batch before the kill (a loaded machine):
    # then that batch is decoded one by one too
    assert sorted(one_by_one) in (list(range(4, 12)), list(range(0, 12))), one_by_one
    assert len(s3.faults.gets) == 28 and max(s3.faults.gets.values()) <= 2


@pytest.mark.parametrize(("budget", "code"), [("4", 5), ("3", 6)])
def test_bad_images_are_the_folders_error_rows_within_and_over_the_budget(
    s3: S3, corpus: Path, known: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    budget: str, code: int,
) -> None:  # fmt: skip
    """Four undecodable objects decoded by the adopted early start: the error rows (key,
    stage, message, size) are the folder build's, and so are the exit code within the
    failure budget (5) and over it (6, the collection still written) and the vectors."""
    folder = bad_images(corpus, tmp_path / "pics")
    upload(s3, folder)
    local, remote = tmp_path / "local", tmp_path / "remote"
    flags = (*FLAGS, "--max-failures", budget)
    result = build_logged(caplog, "build", URL, "--out", remote, *flags)
    assert result.exit_code == code, result.output
    assert ADOPTED in caplog.text
    assert run_cli("build", folder, "--out", local, *flags).exit_code == code
    assert error_rows(remote) == error_rows(local) and len(error_rows(local)) == 4
    same_vectors(remote, local)


# --- processes, signals and logs (the console script in a subprocess) --------------------------


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live descendant of root."""
    table = {int(e): process_stat(int(e)) for e in os.listdir("/proc") if e.isdigit()}
    live = {pid: st for pid, st in table.items() if st is not None}
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start) in live.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def survivors(seen: dict[int, int], seconds: float) -> list[int]:
    """Those of `seen` still alive after `seconds` (then killed: no test leaks them)."""
    deadline = time.monotonic() + seconds
    alive = dict(seen)
    while alive and time.monotonic() < deadline:
        alive = {p: s for p, s in alive.items() if (process_stat(p) or (0, -1))[1] == s}
        time.sleep(0.1)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return sorted(alive)


class Watched:
    """A build in a subprocess (the console script, as a scheduler runs it, -v), its stderr
    collected line by line and every descendant it ever had."""

    def __init__(self, *argv: str, hook: str | None = None, path: Path | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (path, REPO) if p)}
        cli = hooked_cli(decode=hook) if hook else [INDEXER]
        self.proc = subprocess.Popen([*cli, "-v", *argv], env=env, text=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)  # fmt: skip
        self.lines: list[str] = []
        self.seen: dict[int, int] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, ready: Any, seconds: float = 120) -> None:
        """Until ready(self) (a guard against a hung test, not a timing assertion)."""
        deadline = time.monotonic() + seconds
        while not ready(self):
            assert self.proc.poll() is None, "\n".join(self.lines)
            assert time.monotonic() < deadline, "\n".join(self.lines)
            self.seen.update(descendants(self.proc.pid))
            time.sleep(0.02)
        self.seen.update(descendants(self.proc.pid))

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def end(self, signum: int, group: bool) -> tuple[int, list[str], list[int]]:
        """Send the signal (to the build, or its whole process group as a terminal's ^C or
        systemd does); its exit code, its stderr after the signal, and those of its processes
        still alive 15 s later."""
        self.seen.update(descendants(self.proc.pid))
        before = len(self.lines)
        (os.killpg if group else os.kill)(self.proc.pid, signum)
        try:
            code = self.proc.wait(60)
        finally:
            self.proc.kill()
        left = survivors(self.seen, 15)
        self._reader.join(5)
        return code, self.lines[before:], left


def lock_is_free(out: Path) -> bool:
    from indexer.collection.lock import CollectionLock
    from indexer.errors import CollectionLockedError

    try:
        with CollectionLock(out, "build"):
            return True
    except CollectionLockedError:
        return False


def early_listing(w: Watched) -> bool:
    return bool(w.seen)  # the early start, forked before anything is listed


def embedding(w: Watched) -> bool:
    return w.said(ADOPTED) and w.said("first batch embedded")  # the adopted one's batch


@pytest.mark.parametrize(
    ("moment", "signum", "group", "code", "says"),
    [
        (early_listing, signal.SIGTERM, False, 143, "Terminated (SIGTERM)"),
        (early_listing, signal.SIGTERM, True, 143, "Terminated (SIGTERM)"),
        (early_listing, signal.SIGINT, True, 130, "Interrupted."),
        (embedding, signal.SIGTERM, False, 143, "Terminated (SIGTERM)"),
        (embedding, signal.SIGTERM, True, 143, "Terminated (SIGTERM)"),
        (embedding, signal.SIGINT, True, 130, "Interrupted."),
        (embedding, signal.SIGKILL, False, -9, None),
    ],
    ids=[
        "term-listing",
        "term-group-listing",
        "int-group-listing",
        "term-embedding",
        "term-group-embedding",
        "int-group-embedding",
        "kill-embedding",
    ],
)
def test_a_signal_before_or_after_adoption_leaves_no_process_lock_or_version(
    s3: S3, corpus: Path, known: Path, tmp_path: Path, moment: Any, signum: int, group: bool,
    code: int, says: str | None,
) -> None:  # fmt: skip
    """SIGTERM, ^C (SIGINT to the process group) or SIGKILL while the early start lists (a
    slow store) or after the build adopted its decoding (slow items): the build's exit code
    and one clean line, no process left behind, the lock free, nothing published, the run
    recorded as interrupted."""
    upload(s3, corpus)
    if moment is early_listing:
        s3.faults.latency = 1.5
    out = tmp_path / "c"
    w = Watched("build", URL, "--out", str(out), *FLAGS, hook="tests.hooks:slow")
    w.wait_for(moment)
    exit_code, after, left = w.end(signum, group)
    assert not left, f"alive 15 s after the signal: {left}\n" + "\n".join(w.lines)
    assert exit_code == code, "\n".join(w.lines)
    assert lock_is_free(out)
    assert not (out / "current").exists()
    if says is not None:
        assert "Traceback" not in "\n".join(w.lines), "\n".join(w.lines)
        assert after and after[-1].startswith(says), after
        last = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
        assert last["status"] == "interrupted", last


TERM_IN_INIT = """
import ctypes, os, signal, sys


class _Event(ctypes.Structure):  # struct sigevent (Linux): SIGEV_SIGNAL
    _fields_ = [("value", ctypes.c_void_p), ("signo", ctypes.c_int), ("notify", ctypes.c_int),
                ("pad", ctypes.c_byte * 48)]


class _Spec(ctypes.Structure):  # struct itimerspec: no interval, a first expiry in ns
    _fields_ = [("i_sec", ctypes.c_long), ("i_nsec", ctypes.c_long), ("sec", ctypes.c_long),
                ("nsec", ctypes.c_long)]


class _TermDuringInit:
    \"\"\"A kernel timer's SIGTERM 8 ms after the build, having listed (torch imported),
    starts loading a runtime's native module: it lands in the module's initialisation.\"\"\"

    done = False

    def find_spec(self, name, path=None, target=None):
        native = ("onnxruntime.capi.onnxruntime_pybind11_state", "openvino._pyopenvino")
        if name in native and "indexer.decode.loader" in sys.modules and not self.done:
            self.done = True
            libc, timer = ctypes.CDLL(None), ctypes.c_void_p()
            event = _Event(signo=signal.SIGTERM, notify=0)
            libc.timer_create(1, ctypes.byref(event), ctypes.byref(timer))
            libc.timer_settime(timer, 0, ctypes.byref(_Spec(nsec=8_000_000)), None)
            sys.stderr.write("SIGTERM armed while loading " + name + "\\n")
        return None


sys.meta_path.insert(0, _TermDuringInit())
"""


def test_sigterm_while_the_adopted_build_loads_its_runtime_stops_it(
    s3: S3, corpus: Path, private_cache: Path, tmp_path: Path
) -> None:
    """Right after adoption the main process imports the known export's runtime; a SIGTERM
    landing in onnxruntime's or OpenVINO's native initialisation (pybind11 turns the
    handler's exception into ImportError('initialization failed'), its cause the
    Interrupted) must still end the build (143, one line, nothing published), not become
    "onnxruntime is not installed" and a build that runs to the end, published, exit 0
    (the cached runtime choice discarded as "does not load")."""
    upload(s3, corpus)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(TERM_IN_INIT)
    out = tmp_path / "c"
    w = Watched("build", URL, "--out", str(out), *FLAGS, path=tmp_path / "site")
    code = w.proc.wait(120)
    w._reader.join(5)
    text = "\n".join(w.lines)
    assert w.said(ADOPTED) and w.said("SIGTERM armed while loading"), text
    assert "package is not installed" not in text, text
    assert code == 143, text
    assert not (out / "current").exists()


def test_a_damaged_cached_export_is_warned_about_once_and_not_adopted(
    s3: S3, corpus: Path, known: Path, private_cache: Path, tmp_path: Path
) -> None:
    """The known export's model file (exports/known/) truncated: the build (a subprocess,
    its stderr whole) warns once (the early start, which plans too, says nothing), adopts
    nothing, embeds with torch and ends with the folder's vectors; no warning line is
    printed twice."""
    models = sorted((private_cache / "exports" / "known").glob("*.onnx"))
    assert models, sorted(private_cache.rglob("*"))
    for model in models:
        model.write_bytes(model.read_bytes()[:1000])
    upload(s3, corpus)
    out = tmp_path / "c"
    w = Watched("build", URL, "--out", str(out), *FLAGS)
    code = w.proc.wait(300)
    w._reader.join(5)
    text = "\n".join(w.lines)
    assert code == 0, text
    assert sum("is not usable" in line for line in w.lines) == 1, text
    warnings = [line.split(" ", 2)[2] for line in w.lines if " WARNING " in line]
    assert len(warnings) == len(set(warnings)), text
    assert ADOPTED not in text and "Traceback" not in text
    same_vectors(out, known)


SILENCED = """
import logging, sys
from pathlib import Path
from indexer.config import BuildConfig, LoaderConfig, ModelConfig, SourceSpec
from indexer.build.pipeline import build

logging.basicConfig(level=logging.INFO, format="LOG %(process)d %(name)s: %(message)s")
logging.disable(logging.CRITICAL)  # the host application silences every log record
cfg = BuildConfig((SourceSpec(sys.argv[1]),), Path(sys.argv[2]),
                  model=ModelConfig(pretrained=False, precision="fp32"),
                  loader=LoaderConfig(batch_size=8, workers=1, progress=False))
report = build(cfg)
print(report.counts["new"], logging.root.manager.disable)
"""


def test_the_early_start_keeps_the_hosts_logging_disabled(
    s3: S3, corpus: Path, known: Path, tmp_path: Path
) -> None:
    """A program using the Python API that silenced logging (logging.disable(CRITICAL)):
    its build's processes print no log record; the adopted early start, which silences
    logging while it lists and plans, must restore the host's level rather than none."""
    upload(s3, corpus)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", SILENCED, URL, str(tmp_path / "c")], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["28", "50"], done.stdout
    printed = [line for line in done.stderr.splitlines() if line.startswith("LOG ")]
    assert printed == [], printed


def test_a_build_failing_after_adoption_stops_the_early_start_at_once(
    s3: S3, corpus: Path, known: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """The disk refuses the version folder (ENOSPC, as a full disk or quota does) after the
    early start was adopted and before its batches are read: the build fails with one line
    (nothing published), and the adopted process is stopped with it, not left reading and
    decoding its whole share in the background of the program that called it (the Python
    API, a service, these tests)."""
    import errno

    from indexer.build import new_version

    def full(root: Path, request: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", str(root / "versions"))

    monkeypatch.setattr(new_version, "start_version", full)
    upload(s3, corpus)
    out = tmp_path / "c"
    use_decode_hook(monkeypatch, "tests.hooks:slow")  # (0.5 s an item)
    result = build_logged(caplog, "build", URL, "--out", out, *FLAGS)
    assert result.exit_code != 0 and "No space left" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert ADOPTED in caplog.text and not (out / "current").exists()
    gets = s3.faults.object_gets()
    names = {p.pid: p.name for p in multiprocessing.active_children()}
    left = survivors(descendants(os.getpid()), 5)
    read = s3.faults.object_gets() - gets
    assert not left, f"alive 5 s after the build failed: {[names.get(p, p) for p in left]}"
    assert read == 0, f"{read} objects read after the build failed"
