"""Decode hooks the tests inject (INDEXER_TEST_DECODE_HOOK): a native crash and an endless hang."""

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
