"""One writer per collection: an flock on DIR/.indexer.lock, freed by the OS if the holder dies."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from indexer.catalog import LOCK
from indexer.errors import CollectionLockedError, InputError


class CollectionLock:
    """Held for a whole build or index run; a second run fails at once, naming the holder.

    A plain ``flock`` rather than the filelock package: filelock 4 falls back to a "soft" lock
    file on filesystems without flock, and a soft lock outlives a SIGKILLed holder.
    """

    def __init__(self, root: Path, command: str) -> None:
        self.path = root / LOCK
        self.command = command
        self._fd: int | None = None

    def __enter__(self) -> CollectionLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(
                f"cannot write to {self.path.parent} ({exc.strerror or exc}): "
                "choose an --out you may write to"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            raise CollectionLockedError(
                f"{self.path.parent} is being updated by {describe_holder(holder)}: try again later"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_info(self.command)).encode(), 0)
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def holder_info(command: str) -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "argv": sys.argv[1:4],
        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        where = f"pid {info['pid']} on {info['host']}, since {info['since']}"
        return f"`indexer {info['command']}` ({where})"
    except (ValueError, KeyError, TypeError):
        return "another indexer run"
