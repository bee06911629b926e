"""The early start (indexer/earlystart.py): a first build from buckets is listed, and its
first batches decoded, by a process forked before the listing while torch loads. Through the
CLI against moto's S3 server on 127.0.0.1 (counting requests at its proxy), and its pieces."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer.config import BuildConfig, EngineConfig, LoaderConfig, SourceSpec
from indexer.errors import InputError
from tests.helpers import read_embeddings_by_key, run_cli

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from indexer.build import early_start as earlystart
from indexer.build.early_start import EarlyStart, wanted
from tests.s3server import S3
from tests.test_buckets import upload

FLAGS = ("--no-pretrained", "--workers", "1", "--no-progress", "--precision", "fp32",
         "--batch-size", "8")  # fmt: skip  # worker processes: the early start is wanted
URL = "s3://photos/pics/"


def built_alike(s3: S3, corpus: Path, tmp_path: Path, caplog: Any, first: bool = True) -> str:
    """The corpus built from a folder (with `first`: before, so its export is known), then
    from the bucket; the same keys and vectors, each object read once. The bucket build's log."""
    from indexer.sources.bucket import BucketSource

    upload(s3, corpus)
    lists = s3.faults.lists
    BucketSource(URL).listing()
    one_listing = s3.faults.lists - lists  # (split by sub-prefix: several requests)
    local, remote = tmp_path / "local", tmp_path / "remote"
    if first:
        assert run_cli("build", corpus, "--out", local, *FLAGS).exit_code == 0
    lists, gets = s3.faults.lists, s3.faults.object_gets()
    with caplog.at_level(logging.INFO, logger="indexer"):
        result = run_cli("build", URL, "--out", remote, *FLAGS)
    assert result.exit_code == 0, result.output
    assert s3.faults.lists - lists == one_listing  # by the early start, never again
    assert s3.faults.object_gets() - gets == 28 and max(s3.faults.gets.values()) == 1
    if not first:
        assert run_cli("build", corpus, "--out", local, *FLAGS).exit_code == 0
    want, got = read_embeddings_by_key(local), read_embeddings_by_key(remote)
    assert sorted(got) == sorted(want) and len(got) == 28
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6)
    return str(caplog.text)


def test_a_first_bucket_build_adopts_the_early_start(
    s3: S3, corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = built_alike(s3, corpus, tmp_path, caplog)
    assert "listed while torch loaded (the early start)" in text
    assert "the early start's decoding is this build's head start" in text
    assert "28 of 28 items decoded while torch loaded" in text  # its whole share


def test_without_a_known_export_the_early_start_only_lists(
    s3: S3, corpus: Path, tmp_path: Path, fresh_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = built_alike(s3, corpus, tmp_path, caplog, first=False)  # torch embeds, timm's way
    assert "listed while torch loaded (the early start)" in text
    assert "head start" not in text


@pytest.mark.parametrize(
    ("change", "want"),
    [
        ({}, True),
        ({"sources": (SourceSpec(URL), SourceSpec("s3://photos/more/"))}, True),
        ({"sources": (SourceSpec("gs://photos/pics/"),)}, True),
        ({"sources": (SourceSpec(URL), SourceSpec("folder"))}, False),  # a folder lists fast
        ({"sources": (SourceSpec("folder"),)}, False),
        ({"sources": (SourceSpec("hf:" + URL),)}, False),  # Parquet: staged by the main one
        ({"sources": ()}, False),
        ({"engine": EngineConfig(kind="ray")}, False),
        ({"loader": LoaderConfig(workers=0)}, False),  # no worker processes at all
        ({"drop_shards": frozenset({"part-0.parquet"})}, False),  # a repair
    ],
)
def test_the_early_start_is_wanted_for_first_builds_from_buckets(
    tmp_path: Path, change: dict[str, Any], want: bool
) -> None:
    cfg = replace(BuildConfig((SourceSpec(URL),), tmp_path / "c"), **change)
    assert wanted(cfg) is want


@pytest.mark.parametrize("left", ["current", "versions"])
def test_a_collection_already_there_is_listed_by_the_main_process(
    tmp_path: Path, left: str
) -> None:
    """A later run (or a killed first one's leftovers): nothing loads before it is known that
    something changed, and the killed run's work is salvaged by the main process alone."""
    out = tmp_path / "c"
    cfg = BuildConfig((SourceSpec(URL),), out)
    assert wanted(cfg)
    out.mkdir()
    (out / left).mkdir() if left == "versions" else (out / "current").write_text("v000001")
    assert not wanted(cfg)


def test_a_refusal_is_raised_as_the_main_process_would_and_listed_once(
    s3: S3, tmp_path: Path
) -> None:
    from indexer.sources.bucket import BucketSource

    s3.client().create_bucket(Bucket="empty")
    for url, says in (("s3://nothere/pics/", "does not exist"), ("s3://empty/x/", "holds nothing")):
        lists = s3.faults.lists
        with pytest.raises(InputError, match=says):
            BucketSource(url).listing()
        one_listing, lists = s3.faults.lists - lists, s3.faults.lists
        result = run_cli("build", url, "--out", tmp_path / url[5:10], *FLAGS)
        assert result.exit_code != 0 and says in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert "Traceback" not in result.output
        assert s3.faults.lists - lists == one_listing  # the early start's alone
        assert not (tmp_path / url[5:10] / "versions").exists()


def test_an_early_start_that_fails_leaves_the_listing_to_the_main_process(
    s3: S3, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    def broken(cfg: BuildConfig) -> Any:
        raise RuntimeError("a bug in the early start")

    monkeypatch.setattr(earlystart, "list_prefixes", broken)  # (the fork inherits it)
    upload(s3, corpus)
    with caplog.at_level(logging.INFO, logger="indexer"):
        result = run_cli("build", URL, "--out", tmp_path / "c", *FLAGS)
    assert result.exit_code == 0, result.output
    assert "did not list the sources: listing them here" in caplog.text
    assert len(read_embeddings_by_key(tmp_path / "c")) == 28


def test_other_work_is_not_adopted_and_the_build_is_still_right(
    s3: S3, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """The early start's plan differs from the main process's (here: its items reversed):
    it is stopped, and the build decodes its own work, every item under its own key."""
    first_work = earlystart.first_work

    def reversed_work(cfg: BuildConfig, listed: Any) -> Any:
        work = first_work(cfg, listed)
        return None if work is None else (work[0], work[1][::-1])

    monkeypatch.setattr(earlystart, "first_work", reversed_work)
    upload(s3, corpus)
    local = tmp_path / "local"
    assert run_cli("build", corpus, "--out", local, *FLAGS).exit_code == 0  # (the export)
    with caplog.at_level(logging.INFO, logger="indexer"):
        result = run_cli("build", URL, "--out", tmp_path / "c", *FLAGS)
    assert result.exit_code == 0, result.output
    assert "decoded other work than this build's: stopped" in caplog.text
    assert "is this build's head start" not in caplog.text
    want, got = read_embeddings_by_key(local), read_embeddings_by_key(tmp_path / "c")
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6)


def test_a_dead_early_start_is_no_listing(s3: S3, corpus: Path, tmp_path: Path) -> None:
    """Killed before it sent anything: the main process is told nothing (it lists itself)."""
    upload(s3, corpus)
    s3.faults.latency = 1.0  # (still listing when killed)
    early = EarlyStart.start(BuildConfig((SourceSpec(URL),), tmp_path / "c",
                                         loader=LoaderConfig(workers=1)))  # fmt: skip
    assert early is not None
    pid = early._process.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert early.listings() is None
    assert not early._process.is_alive()
    early.close()  # (again: nothing happens)


def test_a_refusal_sent_by_the_early_start_is_the_main_process_error(
    s3: S3, tmp_path: Path
) -> None:
    early = EarlyStart.start(BuildConfig((SourceSpec("s3://nothere/x/"),), tmp_path / "c",
                                         loader=LoaderConfig(workers=1)))  # fmt: skip
    assert early is not None
    with pytest.raises(InputError, match="does not exist"):
        early.listings()
    assert not early._process.is_alive()


def test_the_early_start_ends_when_the_build_is_killed_while_it_lists(
    s3: S3, corpus: Path, tmp_path: Path
) -> None:
    """SIGKILL of the build while its early start waits on a slow store: the early start
    finds itself orphaned once its listing returns and ends; it never decodes."""
    upload(s3, corpus)
    s3.faults.latency = 1.5
    code = "import sys\nfrom indexer.cli.main import main\nmain(sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", code, "build", URL, "--out",
                             str(tmp_path / "c"), *FLAGS], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **s3.env()})  # fmt: skip
    children: list[int] = []
    deadline = time.monotonic() + 60  # a guard against a hung test, not a timing assertion
    while not children and time.monotonic() < deadline:
        children = _children(proc.pid)
        time.sleep(0.05)
    assert children, "no early start was forked"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    gets = s3.faults.object_gets()
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in children):
        assert time.monotonic() < deadline, "the early start outlived its build"
        time.sleep(0.1)
    assert s3.faults.object_gets() == gets == 0  # it read no object
    assert not (tmp_path / "c" / "versions").exists()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_killed_first_bucket_build_resumes_item_exactly(
    s3: S3, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL mid-build while the adopted early start decodes (a known export, confirmed on
    the first batch): the next run salvages the finished shards and ends with exactly the
    folder's collection."""
    import json

    from tests.test_resume import FLAGS as RESUME
    from tests.test_resume import check_same_as_clean, kill_when_confirmed, start_build

    upload(s3, corpus)
    clean = tmp_path / "clean"
    assert run_cli("build", corpus, "--out", clean, *RESUME).exit_code == 0  # (the export)
    out = tmp_path / "killed"
    slow = start_build(URL, out, "--workers", "1", hook="tests.hooks:slow")  # type: ignore[arg-type]
    kill_when_confirmed(slow, out)  # (still running)
    result = run_cli("build", URL, "--out", out, *RESUME, "--workers", "1")
    assert result.exit_code == 0, result.output
    counts = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["counts"]
    assert 4 <= counts["reused"] < counts["new"] == 28, counts  # killed mid-way, work kept
    check_same_as_clean(out, read_embeddings_by_key(clean))


def test_an_item_decoded_alone_is_fetched_outside_its_decode_alarm(s3: S3, corpus: Path) -> None:
    """An item decoded in a process of its own (after a crash in its batch) is fetched by
    the loader's process first: a slow store (1.5 s a request here, or a fresh process
    loading the store's client) is not a decode timeout (1 s), and its bytes are read once."""
    from indexer.config import DataConfig
    from indexer.decode.item_dataset import loader_work
    from indexer.decode.loader import isolated
    from indexer.decode.preprocess import Preprocessor
    from indexer.sources import list_items
    from indexer.sources.bucket import BucketSource

    upload(s3, corpus)
    source = BucketSource(URL)
    items = list_items([source])
    prep = Preprocessor(DataConfig((3, 64, 64), "bicubic", 0.875, "center", (0.5,) * 3,
                                   (0.5,) * 3), "exact")  # fmt: skip
    dataset, _ = loader_work(items, [source], prep, LoaderConfig(workers=1, decode_timeout=1.0))
    s3.faults.latency = 1.5
    sample = isolated(dataset, 0, 1.0)
    assert "error" not in sample, sample
    assert sample["position"] == 0 and s3.faults.object_gets() == 1
