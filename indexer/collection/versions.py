"""Versions of a collection: built in their own folder, published by an atomic switch, pruned."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from indexer.collection.layout import (
    BUILDING_PREFIX,
    CURRENT,
    ERRORS,
    INDEX,
    MANIFEST,
    SALVAGE,
    SHARDS,
    VERSION_NAME,
    VERSIONS,
    published_folder,
    version_number,
)
from indexer.errors import CollectionError
from indexer.safeio import write_bytes_atomic

SALVAGEABLE = ("part-v", "reused-v")  # shards of newly embedded rows (see new_shard_prefixes)
REQUEST = ".request.json"
RUNTIME = ".runtime.json"  # the runtime a version's new shards are embedded with (decide.py)
# The contract's paths, each a fixed symlink into `current`: they all switch with it.
LINKED = (MANIFEST, SHARDS, INDEX, ERRORS)


MAX_VERSION = 999_999  # vNNNNNN


def new_shard_prefixes(number: int) -> tuple[str, str]:
    """Name prefixes of version ``number``'s new shards: embedded rows, and reused vectors."""
    embedded, reused = SALVAGEABLE
    return f"{embedded}{number:06d}", f"{reused}{number:06d}"


def version_numbers(root: Path) -> list[int]:
    folder = root / VERSIONS
    if not folder.is_dir():
        return []
    found = (VERSION_NAME.match(p.name) for p in folder.iterdir() if _own_dir(p))
    return sorted(int(m.group(1)) for m in found if m)


def _own_dir(path: Path) -> bool:
    """A real folder (not a link, not a file someone left there)."""
    return path.is_dir() and not path.is_symlink()


def salvage(root: Path, request: dict[str, Any]) -> list[Path]:
    """Finished new shards of killed builds, kept so a re-run does not embed them again.

    A killed build leaves `.building-vN` (or a renamed `vN` never switched to). Its complete
    shards of newly embedded rows move to `.salvage/<recipe digest>/`; the rest is deleted.
    Only shards made with the recipe asked for now are returned, and of one runtime (the
    one most of them were made with: salvaged_runtime() names it; a re-run must embed with
    it, so that no collection mixes runtimes).
    """
    folder = root / VERSIONS
    if not folder.is_dir():
        return []
    published = version_number(published_folder(root)) if (root / CURRENT).exists() else 0
    leftovers = [p for p in folder.glob(f"{BUILDING_PREFIX}*")]
    leftovers += [folder / f"v{n:06d}" for n in version_numbers(root) if n > published]
    for leftover in leftovers:
        if leftover.is_symlink():  # never ours: nothing is taken from where it points
            leftover.unlink()
            continue
        _salvage_one(leftover, folder / SALVAGE)
        shutil.rmtree(leftover, ignore_errors=True)
    found = sorted((folder / SALVAGE / recipe_digest(request)).glob("*.parquet"))
    runtime = salvaged_runtime(found)
    return [p for p in found if _runtime_of(p) == runtime]


def salvaged_runtime(shards: list[Path]) -> dict[str, Any] | None:
    """The runtime (name, precision) most of these salvaged shards were embedded with; None
    when none says (shards of a run killed before its runtime was recorded)."""
    runtimes = [_runtime_of(p) for p in shards]
    known = [r for r in runtimes if r is not None]
    if not known:
        return None
    return max(known, key=lambda r: (known.count(r), json.dumps(r, sort_keys=True)))


def _runtime_of(shard: Path) -> dict[str, Any] | None:
    """The runtime a salvaged shard was embedded with (its version's RUNTIME file, kept)."""
    leftover = re.match(r"(?:\.building-)?v\d+", shard.name)
    return None if leftover is None else _read_runtime(shard.with_name(leftover.group(0) + RUNTIME))


def _salvage_one(leftover: Path, salvage_dir: Path) -> None:
    try:
        asked = json.loads((leftover / REQUEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # killed before it embedded anything
    match = VERSION_NAME.match(leftover.name.removeprefix(BUILDING_PREFIX))
    if match is None:
        return
    # only what this version embedded itself: shards linked from the published version (an
    # interrupted re-index or repair) are not new work, and may be the damaged ones
    own = new_shard_prefixes(int(match.group(1)))
    target = salvage_dir / recipe_digest(asked)
    shards = [p for p in (leftover / SHARDS).glob("*.parquet") if p.name.startswith(own)]
    if not shards:
        return
    runtime = _read_runtime(leftover / RUNTIME)
    if target.is_dir() and any(_read_runtime(p) != runtime for p in target.glob("*" + RUNTIME)):
        shutil.rmtree(target)  # an earlier killed run's shards of another runtime: never mixed
    target.mkdir(parents=True, exist_ok=True)  # only for something kept
    if runtime is not None:
        os.replace(leftover / RUNTIME, target / (leftover.name + RUNTIME))
    for shard in shards:
        os.replace(shard, target / f"{leftover.name}-{shard.name}")


def _read_runtime(path: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def recipe_digest(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]


def clear_salvage(root: Path) -> None:
    shutil.rmtree(root / VERSIONS / SALVAGE, ignore_errors=True)


def start_version(root: Path, request: dict[str, Any]) -> tuple[int, Path]:
    """A fresh folder for the next version, marked with the recipe its new shards are made by.

    Call salvage() first: it clears what killed builds left.
    """
    folder = root / VERSIONS
    if folder.is_symlink():
        raise CollectionError(f"{folder} is a symbolic link: remove it (refusing to write there)")
    folder.mkdir(parents=True, exist_ok=True)
    number = max(version_numbers(root), default=0) + 1
    if number > MAX_VERSION:
        raise CollectionError(
            f"{folder} already holds version {number - 1}, the last one a name can hold: "
            "rebuild the collection into a new --out"
        )
    building = folder / f"{BUILDING_PREFIX}v{number:06d}"
    building.mkdir()
    mark_request(building, request)
    return number, building


def mark_request(building: Path, request: dict[str, Any]) -> None:
    """Record the recipe the version's new shards are made by (salvage() reads it)."""
    write_bytes_atomic(building / REQUEST, json.dumps(request, sort_keys=True).encode("utf-8"))


def mark_runtime(building: Path, runtime: dict[str, Any]) -> None:
    """Record the runtime (name, precision) the version's new shards are embedded with, before
    the first is written: a re-run reusing them after a kill embeds with it too."""
    write_bytes_atomic(building / RUNTIME, json.dumps(runtime, sort_keys=True).encode("utf-8"))


def publish(root: Path, number: int, building: Path) -> Path:
    """Make the finished version visible: rename it into place, then swap `current` to it."""
    blocked = [root / n for n in LINKED if (root / n).exists() and not (root / n).is_symlink()]
    if blocked:  # checked before the switch: a refused publish changes nothing
        raise CollectionError(
            f"{blocked[0]} is in the way of the collection layout (it must be the link "
            f"{CURRENT}/{blocked[0].name}): move it away and run again"
        )
    final = root / VERSIONS / f"v{number:06d}"
    (building / REQUEST).unlink(missing_ok=True)
    os.replace(building, final)
    _fsync_dir(final.parent)
    tmp_link = root / f".{CURRENT}.tmp-{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(Path(VERSIONS) / final.name)
    os.replace(tmp_link, root / CURRENT)  # the atomic switch
    for name in LINKED:  # each a fixed link into current; one pointing elsewhere is reset
        if not (root / name).is_symlink() or os.readlink(root / name) != f"{CURRENT}/{name}":
            _replace_link(root / name, Path(CURRENT) / name)
    _fsync_dir(root)
    return final


def _replace_link(link: Path, target: Path) -> None:
    tmp = link.with_name(f".{CURRENT}.tmp-{os.getpid()}-{link.name}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def prune(root: Path, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` versions (never the current one); the numbers removed."""
    current = published_folder(root) if (root / CURRENT).exists() else None
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
