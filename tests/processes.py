"""Processes as /proc shows them, for tests that check nothing outlives a build."""

from __future__ import annotations

from pathlib import Path


def process_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live, non-zombie process, from /proc; None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else (int(fields[1]), int(fields[19]))
