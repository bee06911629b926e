"""Versions of a collection: built in their own folder, published by an atomic switch, pruned."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from indexer.catalog import CURRENT, ERRORS, INDEX, MANIFEST, SHARDS, VERSIONS
from indexer.errors import CollectionError

BUILDING_PREFIX = ".building-"
# The contract's paths, each a fixed symlink into `current`: they all switch with it.
LINKED = (MANIFEST, SHARDS, INDEX, ERRORS)
VERSION_NAME = re.compile(r"^v(\d{6})$")


def version_numbers(root: Path) -> list[int]:
    folder = root / VERSIONS
    if not folder.is_dir():
        return []
    found = (VERSION_NAME.match(p.name) for p in folder.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def start_version(root: Path) -> tuple[int, Path]:
    """A fresh folder for the next version (leftovers of killed builds are removed first)."""
    folder = root / VERSIONS
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{BUILDING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    number = max(version_numbers(root), default=0) + 1
    building = folder / f"{BUILDING_PREFIX}v{number:06d}"
    building.mkdir()
    return number, building


def publish(root: Path, number: int, building: Path) -> Path:
    """Make the finished version visible: rename it into place, then swap `current` to it."""
    final = root / VERSIONS / f"v{number:06d}"
    os.replace(building, final)
    _fsync_dir(final.parent)
    tmp_link = root / f".{CURRENT}.tmp-{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(Path(VERSIONS) / final.name)
    os.replace(tmp_link, root / CURRENT)  # the atomic switch
    for name in LINKED:
        link = root / name
        if not link.is_symlink():
            if link.exists():
                raise CollectionError(f"{link} is in the way of the collection layout: move it")
            link.symlink_to(Path(CURRENT) / name)
    _fsync_dir(root)
    return final


def prune(root: Path, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` versions (never the current one); the numbers removed."""
    current = (root / CURRENT).resolve() if (root / CURRENT).exists() else None
    numbers = version_numbers(root)
    doomed = numbers[: max(len(numbers) - max(keep, 1), 0)]
    removed = []
    for number in doomed:
        folder = root / VERSIONS / f"v{number:06d}"
        if current is not None and folder.resolve() == current:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(number)
    return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
