"""One writer per collection: a POSIX record lock on DIR/.indexer.lock, freed if the holder dies."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from indexer.collection.layout import LOCK, VERSIONS
from indexer.errors import (
    CollectionLockedError,
    IndexerError,
    InputError,
    TooManyFailuresError,
)
from indexer.safeio import open_regular

FileKey = tuple[int, int]  # (st_dev, st_ino) of a lock file


class CollectionLock:
    """Held for a whole build or index run; a second run fails at once, naming the holder.

    A POSIX record lock (``lockf``, F_SETLK), not ``flock``: an flock belongs to the open file
    description, which forked children (DataLoader workers) share, so after a SIGKILLed build
    its orphaned workers kept the collection locked. A record lock belongs to the process and
    is not passed on by fork. Nor the filelock package: its "soft" fallback outlives a holder.

    Record locks never conflict within one process, and closing any descriptor of the file
    drops them, so a class-level registry of the lock files this process holds, keyed by
    (st_dev, st_ino), refuses a second lock here without ever opening the file.
    """

    _held: ClassVar[dict[FileKey, str]] = {}  # lock file -> holder JSON, in this process
    _mutex: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, root: Path, command: str) -> None:
        self.path = root / LOCK
        self.command = command
        self._fd: int | None = None
        self._key: FileKey | None = None
        self._pid = os.getpid()

    def __enter__(self) -> CollectionLock:
        with CollectionLock._mutex:
            self._refuse_if_held_here()
            fd, key = self._open_and_lock()
            holder = json.dumps(holder_info(self.command))
            _write_holder(fd, holder)
            CollectionLock._held[key] = holder
            self._fd, self._key, self._pid = fd, key, os.getpid()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is None:
            return
        with CollectionLock._mutex:
            if os.getpid() == self._pid:  # a forked child must not erase its parent's name
                _write_holder(self._fd, "")
            os.close(self._fd)  # drops the record lock; then another thread may take it
            if self._key is not None and os.getpid() == self._pid:
                CollectionLock._held.pop(self._key, None)
            self._fd = self._key = None

    def _open_and_lock(self) -> tuple[int, FileKey]:
        """The lock file opened and locked; again if it was removed or replaced before the
        lock was ours (a refused first run removes the folder it made, lock file and all)."""
        for attempt in range(100):
            try:
                fd = self._open(again=attempt < 99)
            except FileNotFoundError:  # its folder removed under us (a refused first run's)
                continue
            try:
                key = self._lock(fd)
                st = os.lstat(self.path)
            except FileNotFoundError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)  # nothing of this process is locked on it: closing drops nothing
                raise
            if (st.st_dev, st.st_ino) == key:
                return fd, key
            os.close(fd)  # locked a file no longer at the path: another run owns the new one
        raise self._locked("another run that keeps replacing the lock file")

    def discard(self, made: list[Path], lock_file: bool = True) -> None:
        """Remove the lock file (still held; `lock_file`: this run made it) and the folders
        in `made` where empty, deepest first (with the empty folders under them): what a
        refused run made, so that it leaves nothing behind."""
        if self._fd is None:
            return
        try:
            if lock_file:
                os.unlink(self.path)
        except OSError:
            return  # not ours to remove any more: leave the folders too
        under = [entry[0] for top in made for entry in os.walk(top)]
        for folder in sorted({*under, *map(str, made)}, key=len, reverse=True):
            with contextlib.suppress(OSError):  # only an empty one: what is in it is not ours
                os.rmdir(folder)

    def _refuse_if_held_here(self) -> None:
        """CollectionLockedError if this process holds the lock already (the file is not opened)."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return  # no lock file (or none we can see): this process cannot be holding it
        holder = CollectionLock._held.get((st.st_dev, st.st_ino))
        if holder is not None:
            raise self._locked(holder)

    def _open(self, again: bool = False) -> int:
        """The lock file: regular, its own (no link of any kind), opened without blocking.
        `again`: a folder removed between its mkdir and the open is FileNotFoundError."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return open_regular(self.path, os.O_RDWR | os.O_CREAT, own=True)
        except FileNotFoundError:
            if again:
                raise
            raise self._unwritable("No such file or directory") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InputError(
                    f"{self.path} is a symbolic link: remove it (the indexer never writes "
                    "through a link it did not create)"
                ) from None
            if exc.errno in (errno.EISDIR, errno.EINVAL):
                raise self._not_a_file() from None
            raise self._unwritable(exc.strerror or str(exc)) from exc

    def _unwritable(self, why: str) -> InputError:
        return InputError(
            f"cannot write to {self.path.parent} ({why}): choose an --out you may write to"
        )

    def _lock(self, fd: int) -> FileKey:
        """Take the record lock on fd; CollectionLockedError naming the holder if taken."""
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            raise self._locked(os.pread(fd, 4096, 0).decode("utf-8", "replace")) from None
        except OSError as exc:
            raise InputError(
                f"cannot lock {self.path} ({exc.strerror or exc}): "
                "choose an --out on a filesystem that supports POSIX locks"
            ) from exc
        st = os.fstat(fd)
        return st.st_dev, st.st_ino

    def _locked(self, holder: str) -> CollectionLockedError:
        return CollectionLockedError(
            f"{self.path.parent} is being updated by {describe_holder(holder)}: try again later"
        )

    def _not_a_file(self) -> InputError:
        return InputError(
            f"{self.path} is not a regular file of its own (a FIFO, folder or hard link): "
            "remove it and run again"
        )


def _write_holder(fd: int, text: str) -> None:
    """Replace the file's text; a full disk only costs the holder's name, never the lock."""
    try:
        os.ftruncate(fd, 0)
        if text:
            os.pwrite(fd, text.encode(), 0)
    except OSError:
        pass


def _forget_inherited_locks() -> None:
    """In a forked child: record locks are not inherited, so neither is the registry."""
    CollectionLock._held = {}
    CollectionLock._mutex = threading.Lock()


os.register_at_fork(after_in_child=_forget_inherited_locks)


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


@dataclass
class Run:
    """A locked run's outcome as far as its traces go: refused runs leave none."""

    refused: bool = False


@contextmanager
def locked_run(root: Path, command: str) -> Iterator[Run]:
    """The collection's lock for a run. A run refused before it wrote a version (bad input, a
    model it cannot load, a collection it must not change) leaves nothing: the lock file if it
    made it, the folders it made; its caller records no history (`Run.refused`). A locked
    collection and a run over its failure budget are not refusals."""
    real = Path(os.path.abspath(root))  # `a/../b` names b: what is there, and what is not
    made, lock_file, versions = missing_folders(root), (real / LOCK).exists(), _versions(real)
    run = Run()
    with CollectionLock(root, command) as lock:
        try:
            yield run
        except IndexerError as exc:
            contention = isinstance(exc, (CollectionLockedError, TooManyFailuresError))
            run.refused = not contention and not (_versions(real) - versions)
            if run.refused and (made or not lock_file):
                lock.discard(made, lock_file=not lock_file)
            raise


def missing_folders(root: Path) -> list[Path]:
    """The folders that making root (mkdir -p) would create, as absolute paths: each prefix
    of root as written (`missing/../b` makes `missing` and `b`) that does not exist yet."""
    made: list[Path] = []
    parts = root.parts
    for n in range(1, len(parts) + 1):
        prefix, real = Path(*parts[:n]), Path(os.path.abspath(Path(*parts[:n])))
        there = prefix.exists() or prefix.is_symlink() or real.exists()
        if parts[n - 1] not in ("..", ".") and not there:
            made.append(real)
    return made


def _versions(root: Path) -> set[str]:
    try:
        return {entry.name for entry in (root / VERSIONS).iterdir()}
    except OSError:
        return set()
