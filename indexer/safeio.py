"""Safe file I/O: no planted link or FIFO followed, reads bounded, writes atomic, errors typed."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from indexer.errors import IndexerError, InputError, StorageError

BYTES_PER_PIXEL = 8  # 16-bit RGBA stored uncompressed: the largest file an image can need
HEADROOM = 1 << 20  # headers, metadata and colour profiles on top

# the caller chose a place it may not write to: bad input (exit 2), not a fault of the disk
NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR,
                          errno.EISDIR, errno.ELOOP})  # fmt: skip
FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def os_error(exc: OSError, doing: str) -> IndexerError:
    """An OSError met while `doing` something, as one actionable line (typed by its cause)."""
    reason = exc.strerror or str(exc)
    where = f"{exc.filename}: {reason}" if exc.filename is not None else reason
    if exc.errno in FULL:
        return StorageError(
            f"{doing} failed: {where}: free some space (or raise the quota) and run "
            "again; the published version is unchanged"
        )
    if exc.errno in NOT_WRITABLE:
        return InputError(
            f"{doing} failed: {where}: choose a location you may write to (or fix "
            "its permissions); the published version is unchanged"
        )
    return StorageError(f"{doing} failed: {where}; the published version is unchanged")


@contextmanager
def os_errors_as(doing: str) -> Iterator[None]:
    """Turn an OSError raised inside into a typed IndexerError saying what was being done."""
    try:
        yield
    except OSError as exc:
        raise os_error(exc, doing) from exc


def write_bytes_atomic(path: Path, data: bytes, sync: bool = True) -> None:
    """Write to a fresh temporary beside path (O_EXCL, O_NOFOLLOW), then rename it over path.

    A symlink planted at the temporary name is refused (never written through); one at path
    itself is replaced, not followed.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(path: Path, flag: str) -> None:
    """Refuse, before any work, an output file that cannot be written: InputError naming flag."""
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder: give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InputError(
            f"{flag} {path}: {parent} is not a folder you may write to: choose another path"
        )


def open_regular(path: Path, flags: int, follow: bool = False, own: bool = False) -> int:
    """fd of the regular file at path (created 0644 with O_CREAT), never blocking on a FIFO;
    not through a symlink unless `follow`; with `own`, refused when hard-linked elsewhere (a
    write there would change another file). OSError (ELOOP, EINVAL) names what is wrong."""
    flags |= os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise OSError(exc.errno, "a symbolic link: remove it", str(path)) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (own and st.st_nlink != 1):
        os.close(fd)
        what = "a hard link to another file" if stat.S_ISREG(st.st_mode) else "not a regular file"
        raise OSError(errno.EINVAL, f"{what}: remove it", str(path))
    return fd


def read_regular_text(path: Path) -> str:
    """A regular file's text; a FIFO, device or folder there is refused without blocking."""
    with os.fdopen(open_regular(path, os.O_RDONLY, follow=True), "rb") as f:
        return f.read().decode("utf-8")


class FileRefused(OSError):
    """An image file that is not read: not a regular file, or larger than any image can be."""


def byte_limit(max_pixels: int) -> int:
    """The most bytes a file holding an image of at most max_pixels pixels needs."""
    return max_pixels * BYTES_PER_PIXEL + HEADROOM


IMAGE_LIMIT = "more than an image within the pixel limit needs"


def read_bounded(path: str | os.PathLike[str], max_bytes: int, limit: str = IMAGE_LIMIT) -> bytes:
    """A regular file's bytes (links followed). A device, FIFO, socket or folder is refused
    without being read, a file over max_bytes without reading more than max_bytes + 1."""
    _check_regular(os.stat(path), path, max_bytes, limit)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)  # a FIFO never blocks
    with os.fdopen(os.open(path, flags), "rb") as f:
        st = os.fstat(f.fileno())
        _check_regular(st, path, max_bytes, limit)  # replaced since the stat?
        # what the file holds, and a byte more to see it grew: not a max_bytes buffer for
        # every photo (bench/ceiling.py: -3% of a worker's CPU per photo)
        data = f.read(st.st_size + 1)
        if len(data) > st.st_size:  # it grew since: read on, up to the limit
            data += f.read(max_bytes + 1 - len(data))
    if len(data) > max_bytes:
        raise FileRefused(f"{os.fspath(path)} grew over the limit of {max_bytes} bytes")
    return data


def _check_regular(
    st: os.stat_result, path: str | os.PathLike[str], max_bytes: int, limit: str
) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a device, FIFO or socket"
        raise FileRefused(f"{os.fspath(path)} is not a regular file ({kind})")
    if st.st_size > max_bytes:
        raise FileRefused(
            f"{os.fspath(path)} is {st.st_size} bytes, over the limit of {max_bytes} bytes "
            f"({limit})"
        )
