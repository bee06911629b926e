"""Hooks the tests inject (INDEXER_TEST_*_HOOK): crashes, hangs, slow items, a paused repair."""

from __future__ import annotations

import os
import signal
import time


def hostile(key: str) -> None:
    """Crash the decoding process on keys containing 'crash'; hang on keys containing 'hang'."""
    if "crash" in key:
        os.kill(os.getpid(), signal.SIGSEGV)
    if "hang" in key:
        while True:
            time.sleep(1)


def vanishing(key: str) -> None:
    """Delete or rewrite a file between listing and reading (INDEXER_TEST_ROOT holds them)."""
    root = os.environ["INDEXER_TEST_ROOT"]
    if "vanish" in key:
        os.unlink(os.path.join(root, key))
    if "rewrite" in key:
        with open(os.environ["INDEXER_TEST_REPLACEMENT"], "rb") as f:
            data = f.read()
        with open(os.path.join(root, key), "wb") as f:
            f.write(data)


def killer(key: str) -> None:
    """SIGKILL the process at the sixth item it reads (a build killed mid-run)."""
    killer.seen = getattr(killer, "seen", 0) + 1  # type: ignore[attr-defined]
    if killer.seen == 6:  # type: ignore[attr-defined]
        os.kill(os.getpid(), signal.SIGKILL)


def slow(key: str) -> None:
    """Take half a second per item (a build that is still running when the test acts)."""
    time.sleep(0.5)


def pause_before_repair() -> None:
    """Say so in INDEXER_TEST_PAUSED, then wait for INDEXER_TEST_RESUME to exist (2 min max)."""
    with open(os.environ["INDEXER_TEST_PAUSED"], "w") as f:
        f.write("paused")
    deadline = time.monotonic() + 120
    while not os.path.exists(os.environ["INDEXER_TEST_RESUME"]) and time.monotonic() < deadline:
        time.sleep(0.05)
