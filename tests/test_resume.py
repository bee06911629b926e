"""Killed builds (SIGKILL at seeded random moments) resume to exactly a clean build's collection."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from indexer.synthetic import write_corpus
from tests.helpers import read_embeddings_by_key, run_cli

FLAGS = ("--no-pretrained", "--workers", "0", "--batch-size", "2", "--shard-size", "4",
         "--precision", "fp32", "--runtime", "onnx")  # fmt: skip  # compared at 1e-6


def start_build(
    src: Path, out: Path, *flags: str, hook: str | None = None
) -> subprocess.Popen[bytes]:
    """The build in a subprocess (`hook`: a decode hook of tests.hooks, such as slow)."""
    from tests.hooks import hooked_cli

    argv = ["build", str(src), "--out", str(out), *FLAGS, "--no-progress", *flags]
    return subprocess.Popen([*hooked_cli(decode=hook), *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip


def kill_after_a_shard(proc: subprocess.Popen[bytes], out: Path, runtime: str = "") -> None:
    """SIGKILL the build right after its first finished shard (embedded with `runtime`, when
    given: not an earlier killed run's, still in the same folder until this run salvages it)."""
    finished: list[Path] = []
    deadline = time.monotonic() + 300  # a guard against a hung test, not a timing assertion
    while not finished and proc.poll() is None and time.monotonic() < deadline:
        for building in (out / "versions").glob(".building-*"):
            marker = building / ".runtime.json"
            ours = not runtime or (marker.exists() and runtime in marker.read_text())
            if ours:
                finished += list(building.glob("shards/part-v*.parquet"))
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert finished, "the build ended before a shard was seen"


def kill_when_confirmed(proc: subprocess.Popen[bytes], out: Path) -> None:
    """SIGKILL the build once its version is marked with the plain request (a known export
    it embeds with is confirmed) and it has finished a shard."""
    deadline = time.monotonic() + 300  # a guard against a hung test, not a timing assertion
    ready = False
    while not ready and proc.poll() is None and time.monotonic() < deadline:
        for building in (out / "versions").glob(".building-*"):
            request = building / ".request.json"
            confirmed = request.exists() and "unconfirmed_model" not in request.read_text()
            ready = ready or (confirmed and any(building.glob("shards/part-v*.parquet")))
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert ready, "the build ended before it was confirmed with a shard finished"


def check_same_as_clean(out: Path, clean: dict[str, np.ndarray]) -> None:
    got = read_embeddings_by_key(out)
    assert got.keys() == clean.keys()
    for key in clean:
        np.testing.assert_allclose(got[key], clean[key], atol=1e-6)
    ids = pq.read_table(out / "shards", columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(clean)
    assert faiss.read_index(str(out / "index" / "index.faiss")).ntotal == len(clean)
    leftovers = [p.name for p in (out / "versions").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert not list(out.rglob("*.tmp"))


@pytest.fixture(scope="module")
def clean_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A corpus and the embeddings of its uninterrupted build."""
    src = tmp_path_factory.mktemp("resume") / "src"
    write_corpus(src, 40, duplicates=4, seed=11)
    clean_dir = src.parent / "clean"
    assert run_cli("build", src, "--out", clean_dir, *FLAGS).exit_code == 0
    return src, read_embeddings_by_key(clean_dir)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(
    clean_build: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    src, clean = clean_build
    rng = np.random.default_rng(2026)
    for trial in range(4):
        out = tmp_path / f"trial{trial}"
        for _ in range(2):  # killed twice, at different moments
            proc = start_build(src, out)
            time.sleep(float(rng.uniform(1.5, 5.0)))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        result = run_cli("build", src, "--out", out, *FLAGS)
        assert result.exit_code == 0, result.output
        check_same_as_clean(out, clean)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_cache")  # a first build's known export: see test_knownexport
def test_only_unfinished_work_is_redone(
    clean_build: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """Killed right after its first finished shard, a build's vectors are reused, not redone."""
    src, clean = clean_build
    out = tmp_path / "killed"
    kill_after_a_shard(start_build(src, out), out)
    result = run_cli("build", src, "--out", out, *FLAGS)
    assert result.exit_code == 0, result.output
    counts = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["counts"]
    assert counts["reused"] >= 4  # at least the finished shard's rows: not embedded again
    assert counts["new"] == counts["listed"]
    check_same_as_clean(out, clean)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_cache")  # the known export: the warm build's, made here
def test_a_killed_build_with_a_known_export_resumes(
    clean_build: tuple[Path, dict[str, np.ndarray]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A build embedding with a known export (another build's) is killed once the export
    is confirmed (on its first batch): its finished shards are reused, not thrown away."""
    src, clean = clean_build
    assert run_cli("build", src, "--out", tmp_path / "warm", *FLAGS).exit_code == 0
    out = tmp_path / "killed"
    kill_when_confirmed(start_build(src, out, hook="tests.hooks:slow"), out)  # (still running)
    result = run_cli("build", src, "--out", out, *FLAGS)
    assert result.exit_code == 0, result.output
    counts = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["counts"]
    assert 4 <= counts["reused"] < counts["new"], counts  # killed mid-way, its work kept
    check_same_as_clean(out, clean)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_cache")
@pytest.mark.parametrize(
    ("killed", "rerun", "reused"),
    [
        ("onnx", "auto", True),  # auto takes the killed run's runtime (on another machine, say)
        ("torch", "onnx", False),  # another runtime asked for: embedded again, never mixed
    ],
)
def test_a_resumed_first_build_never_mixes_runtimes(
    clean_build: tuple[Path, dict[str, np.ndarray]],
    tmp_path: Path,
    killed: str,
    rerun: str,
    reused: bool,
) -> None:
    src, _ = clean_build
    out, ref = tmp_path / "killed", tmp_path / "ref"
    fp32 = ("--precision", "fp32")
    kill_after_a_shard(start_build(src, out, "--runtime", killed, *fp32), out)
    result = run_cli("build", src, "--out", out, *FLAGS, "--runtime", rerun, *fp32)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    expected = {"onnx": "onnxruntime", "torch": "torch"}[killed if reused else rerun]
    assert run["choice"]["name"] == expected and run["runtime"] == expected
    assert (run["choice"]["how"] == "resumed") == reused
    assert (run["counts"]["reused"] >= 4) == reused
    flags = (*FLAGS, "--runtime", {"onnxruntime": "onnx"}.get(expected, expected), *fp32)
    assert run_cli("build", src, "--out", ref, *flags).exit_code == 0
    check_same_as_clean(out, read_embeddings_by_key(ref))


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_cache")
def test_two_killed_runs_of_different_runtimes_never_mix(
    clean_build: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """Killed with onnxruntime, then with torch (which embeds the first run's items again),
    then resumed with auto: the salvage holds torch's shards only, and the rerun takes torch."""
    src, _ = clean_build
    out, ref = tmp_path / "killed", tmp_path / "ref"
    fp32 = ("--precision", "fp32")
    kill_after_a_shard(start_build(src, out, "--runtime", "onnx", *fp32), out)
    kill_after_a_shard(start_build(src, out, "--runtime", "torch", *fp32), out, "torch")
    result = run_cli("build", src, "--out", out, *FLAGS, "--runtime", "auto", *fp32)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert (run["choice"]["name"], run["choice"]["how"]) == ("torch", "resumed")
    assert run["counts"]["reused"] >= 4
    assert run_cli("build", src, "--out", ref, *FLAGS, "--runtime", "torch", *fp32).exit_code == 0
    check_same_as_clean(out, read_embeddings_by_key(ref))
