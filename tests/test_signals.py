"""SIGTERM (systemd, Kubernetes, timeout) ends a build like Ctrl-C: a line, a record, no lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from indexer.verify.check import verify
from tests.helpers import BUILD_FLAGS, run_cli
from tests.hooks import hooked_cli

INDEXER = str(Path(sys.executable).parent / "indexer")


def _started(out: Path, proc: subprocess.Popen[str], seconds: float = 120) -> None:
    """Wait until the build holds its lock and has begun reading items."""
    deadline = time.monotonic() + seconds
    building = out / "versions"
    while not (building.is_dir() and any(building.glob(".building-*"))):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the build never started"
        time.sleep(0.05)
    time.sleep(1.0)  # inside the DataLoader, workers alive


@pytest.mark.slow
def test_sigterm_records_the_run_frees_the_lock_and_exits_143(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    assert run_cli("build", corpus / "group0", "--out", out, *BUILD_FLAGS).exit_code == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    argv = [*hooked_cli(decode="tests.hooks:slow"), "build", str(corpus), "--out", str(out),
            "--no-pretrained", "--workers", "2", "--batch-size", "2", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        _started(out, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "Terminated (SIGTERM)" in stderr
    assert len([line for line in stderr.splitlines() if line.strip()]) == 1, stderr
    last = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert last["status"] == "interrupted" and "SIGTERM" in last["error"]
    assert os.readlink(out / "current") == "versions/v000001"  # nothing half-published
    again = run_cli("build", corpus, "--out", out, *BUILD_FLAGS)  # at once: the lock is free
    assert again.exit_code == 0, again.output
    assert not verify(out).problems
