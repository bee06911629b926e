"""Scheduled-run plumbing: the collection lock, the run history, failure budgets, metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from indexer.build.pipeline import run_status
from indexer.collection.lock import CollectionLock
from tests.helpers import BUILD_FLAGS, run_cli


def runs(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "runs.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("failed", "items", "budget", "status"),
    [
        (0, 100, 0.0, "success"),
        (1, 100, 0.0, "failed"),
        (5, 100, 0.05, "partial"),
        (6, 100, 0.05, "failed"),
        (3, 10, 3, "partial"),
        (4, 10, 3, "failed"),
        (1, 10, 0.05, "failed"),  # 5% of 10 rounds down to no failure allowed
    ],
)
def test_failure_budget(failed: int, items: int, budget: float, status: str) -> None:
    assert run_status(failed, items, budget) == status


def test_history_records_each_run_and_survives_rebuilds(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    metrics = tmp_path / "metrics" / "indexer.prom"
    flags = ("--metrics-file", metrics, *BUILD_FLAGS)
    assert run_cli("build", corpus / "group0", "--out", out, *flags).exit_code == 0
    assert run_cli("build", corpus / "group0", "--out", out, "--seed", "3", *flags).exit_code == 2
    assert run_cli("build", corpus / "group0", "--out", out, "--rebuild", *flags).exit_code == 0
    assert run_cli("build", corpus / "group0", "--out", out, *flags).exit_code == 0
    history = runs(out)
    assert [r["status"] for r in history] == ["success", "success", "success"]  # (refused: none)
    n = len(list((corpus / "group0").iterdir()))
    assert history[0]["counts"] == {
        "listed": n, "new": n, "changed": 0, "unchanged": 0, "deleted": 0, "failed": 0,
        "reused": 0, "embedded": n,
    }  # fmt: skip
    assert history[1]["images_per_second"] > 0 and history[1]["seconds"] > 0
    assert history[2]["counts"]["unchanged"] == n and history[2]["counts"]["new"] == 0
    text = metrics.read_text()
    assert f'indexer_last_run_success{{collection="{out}"}} 1' in text
    assert f'indexer_last_run_items{{collection="{out}",state="unchanged"}} {n}' in text
    info = run_cli("info", out)
    assert "last runs:" in info.output and info.output.count(" build ") == 3


def test_second_run_exits_locked_naming_the_holder(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    with CollectionLock(out, "build"):
        result = run_cli("build", corpus / "group0", "--out", out, *BUILD_FLAGS)
        assert result.exit_code == 75
        assert f"pid {os.getpid()}" in result.output and "try again later" in result.output
        assert run_cli("index", out).exit_code == 75
    assert runs(out)[-1]["status"] == "locked"
    assert not (out / "manifest.json").exists()
    assert run_cli("build", corpus / "group0", "--out", out, *BUILD_FLAGS).exit_code == 0


def test_lock_of_a_killed_run_does_not_block(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path\n"
         "from indexer.collection.lock import CollectionLock\n"
         "with CollectionLock(Path(sys.argv[1]), 'build'):\n"
         "    print('held', flush=True); time.sleep(600)", str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    assert run_cli("build", corpus / "group0", "--out", out, *BUILD_FLAGS).exit_code == 75
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    result = run_cli("build", corpus / "group0", "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_two_real_builds_one_wins_one_exits_locked(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    code = "import sys\nfrom indexer.cli.main import main\nmain(sys.argv[1:])"
    argv = ["build", str(corpus), "--out", str(out), "--no-pretrained", "--workers", "0",
            "--batch-size", "1", "--no-progress"]  # fmt: skip
    first = subprocess.Popen([sys.executable, "-c", code, *argv], stderr=subprocess.PIPE)
    lock = out / ".indexer.lock"
    for _ in range(600):  # until the first run holds the lock (it writes its name into it)
        if lock.is_file() and lock.read_text():
            break
        first.poll()
        assert first.returncode is None, "the first build ended before taking the lock"
        threading.Event().wait(0.05)
    second = run_cli("build", corpus, "--out", out, "--no-pretrained", "--workers", "0")
    assert second.exit_code == 75 and "try again later" in second.output
    assert first.wait(timeout=300) == 0
    statuses = [r["status"] for r in runs(out)]
    assert sorted(statuses) == ["locked", "success"]


def test_an_unwritable_out_is_a_one_line_error(corpus: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("x")
    result = run_cli("build", corpus / "group0", "--out", blocked / "c", *BUILD_FLAGS)
    assert result.exit_code == 2 and "cannot write to" in result.output
    assert result.output.count("\n") == 1
