"""A folder of image files, walked recursively in a deterministic order."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from indexer.config import DEFAULT_MAX_PIXELS
from indexer.errors import InputError
from indexer.safeio import byte_limit, read_bounded

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class FolderSource:
    """Every image file below ``root``; hidden files and folders are skipped.

    Symbolic links are followed when they point inside ``root`` (a folder reached twice is
    walked once, so a cycle never loops); links pointing outside are listed but fail to read,
    and outside folders are not walked, unless ``follow_symlinks``.
    """

    def __init__(
        self,
        root: Path,
        label: str | None = None,
        follow_symlinks: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if not root.exists():
            raise InputError(f"source folder {root} does not exist: check the path")
        if not root.is_dir():
            raise InputError(
                f"source {root} is a file, not a folder: pass the folder that holds the images"
            )
        self.root = root.resolve()
        self.label = label or printable_key(self.root.name) or "root"  # escaped like keys
        self.follow_symlinks = follow_symlinks
        self.max_bytes = byte_limit(max_pixels)  # no FIFO, device or endless file is read

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "folder",
            "path": str(self.root),
            "label": self.label,
            "follow_symlinks": self.follow_symlinks,
        }

    def keys_and_locators(self) -> list[tuple[str, Any, tuple[int, int] | None]]:
        listed = walk_images(self.root, self.follow_symlinks)
        return [(printable_key(rel), rel, self._fingerprint(rel)) for rel in listed]

    def _fingerprint(self, rel: str) -> tuple[int, int] | None:
        try:
            st = os.stat(self.root / rel)
        except OSError:
            return None  # unreadable now: it will be read, and fail, as an error row
        return st.st_size, st.st_mtime_ns

    def metadata_schema(self) -> pa.Schema:
        return pa.schema([])

    def read(self, locator: Any) -> tuple[bytes, dict[str, Any]]:
        path = self.root / locator
        real = os.path.realpath(path)
        if not self.follow_symlinks and os.path.exists(real) and not _inside(real, self.root):
            raise PermissionError(
                "it is a symlink to a file outside the source folder (pass --follow-symlinks)"
            )
        return read_bounded(path, self.max_bytes), {}

    def url(self, locator: Any) -> str | None:
        return None


def printable_key(rel: str) -> str:
    """A UTF-8 key even for a non-UTF-8 file name: its odd bytes written as \\xNN escapes and
    its backslashes doubled, so no two names share a key (the byte 0xFF and a file literally
    named \\xff get different keys)."""
    escaped = rel.replace("\\", "\\\\")
    return escaped.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def key_to_relpath(key: str) -> str:
    """The file name a key stands for: printable_key undone (a str holding its odd bytes)."""
    import re

    def undo(match: re.Match[str]) -> str:
        text = match.group(0)
        return (
            "\\"
            if text == "\\\\"
            else bytes([int(text[2:], 16)]).decode("utf-8", "surrogateescape")
        )

    return re.sub(r"\\\\|\\x[0-9a-f]{2}", undo, key)


def _inside(real: str, root: Path) -> bool:
    return real == str(root) or real.startswith(str(root) + os.sep)


def walk_images(root: Path, follow_symlinks: bool = False) -> list[str]:
    """Relative POSIX paths of image files below root, sorted by path components.

    Each real folder is walked once (the first path reaching it), so symlink cycles end;
    folders outside root are walked only with follow_symlinks.
    """
    found: list[str] = []
    stack = [""]
    seen = {os.path.realpath(root)}
    while stack:
        rel_dir = stack.pop()
        try:
            entries = sorted(os.scandir(root / rel_dir), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if _is_dir(entry):
                real = os.path.realpath(entry.path)
                if real not in seen and (follow_symlinks or _inside(real, root)):
                    seen.add(real)
                    subdirs.append(rel)
            elif is_image_name(entry.name):
                found.append(rel)
        stack.extend(reversed(subdirs))
    found.sort(key=lambda p: p.split("/"))
    return found


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows a symlink; a broken or looping one is not a folder
    except OSError:
        return False
