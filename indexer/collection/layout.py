"""The collection directory on disk: its paths, the manifest, and preparing a build directory."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indexer.collection.manifest_check import first_bad_field
from indexer.errors import CollectionError, InputError

SCHEMA_VERSION = 1
SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.parquet$")  # no paths: nothing outside
MANIFEST = "manifest.json"
SHARDS = "shards"
ERRORS = "errors.parquet"
INDEX = "index"
LOCK = ".indexer.lock"
RUNS = "runs.jsonl"
VERSIONS = "versions"
CURRENT = "current"
PARTS = (
    "parts"  # parts/IIIII-of-NNNNN/: collections of one partition each (indexer.build.partitions)
)
BUILDING_PREFIX = ".building-"  # versions/.building-vNNNNNN: a version being written
SALVAGE = ".salvage"  # versions/.salvage/: finished shards of killed builds
VERSION_NAME = re.compile(r"^v(\d{6})$")


@dataclass(frozen=True)
class CollectionPaths:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def shards(self) -> Path:
        return self.root / SHARDS

    @property
    def errors(self) -> Path:
        return self.root / ERRORS

    @property
    def index(self) -> Path:
        return self.root / INDEX

    def shard_paths(self, manifest: dict[str, Any]) -> list[Path]:
        return [self.shards / s["name"] for s in manifest["shards"]]


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    from indexer.safeio import write_bytes_atomic

    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of the collection at root, every shard it names present; CollectionError
    when it is missing or broken."""
    manifest = parse_manifest(root)
    check_shard_files(root, manifest)
    return manifest


def check_shard_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every shard the manifest names is a file in root/shards (CollectionError otherwise)."""
    missing = [p.name for p in CollectionPaths(root).shard_paths(manifest) if not p.is_file()]
    if missing:
        raise CollectionError(
            f"{root} is missing {len(missing)} shard file(s) named in its manifest "
            f"(e.g. {missing[0]}): run `indexer verify --repair {root.parent.parent}`"
        )


def parse_manifest(root: Path) -> dict[str, Any]:
    """The manifest's JSON, checked (fields, schema version, plain shard names), without
    looking at the shards (verify and repair read a damaged collection's manifest too)."""
    paths = CollectionPaths(root)
    if not root.is_dir():
        raise CollectionError(
            f"no collection at {root}: build one with `indexer build SOURCE --out {root}`"
        )
    if paths.manifest.exists() and not paths.manifest.is_file():
        raise CollectionError(
            f"{paths.manifest} is not a regular file: the collection was tampered with; "
            "restore it from a copy or rebuild it"
        )
    if not paths.manifest.is_file():
        raise CollectionError(
            f"{root} is not a finished collection (no {MANIFEST}): "
            f"run `indexer build SOURCE --out {root}` to (re)build it"
        )
    from indexer.safeio import read_regular_text

    try:
        manifest = json.loads(read_regular_text(paths.manifest))
    except (OSError, ValueError) as exc:
        raise CollectionError(
            f"{paths.manifest} is corrupt ({type(exc).__name__}: {exc}): rebuild the collection "
            "with `indexer build ... --rebuild`"
        ) from exc
    check_manifest_fields(manifest, paths.manifest)
    unsafe = [s["name"] for s in manifest["shards"] if not SHARD_NAME.match(str(s.get("name")))]
    if unsafe:
        raise CollectionError(
            f"{paths.manifest} names a shard {unsafe[0]!r} that is not a plain file in shards/: "
            "refusing to read it; rebuild the collection with `indexer build ... --rebuild`"
        )
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise CollectionError(
            f"{root} has collection schema version {manifest['schema_version']}, this indexer "
            f"reads version {SCHEMA_VERSION}: use a matching indexer release or rebuild the "
            "collection"
        )
    return manifest


def check_manifest_fields(manifest: Any, path: Path) -> None:
    """The fields readers rely on, of their types; CollectionError naming the first wrong one."""
    problem = first_bad_field(manifest)
    if problem:
        raise CollectionError(
            f"{path} is corrupt ({problem}): rebuild the collection with "
            "`indexer build ... --rebuild` (or restore it from a copy)"
        )


def open_version(root: Path) -> Path:
    """The folder of the collection's published version, resolved once (CollectionError if none).

    Readers take everything from this folder, so a build publishing meanwhile never mixes in.
    """
    if not root.is_dir():
        raise CollectionError(
            f"no collection at {root}: build one with `indexer build SOURCE --out {root}`"
        )
    current = root / CURRENT
    if current.exists():
        published_folder(root)  # refuse a `current` that points outside versions/ first
        if (current / MANIFEST).exists() and not (current / MANIFEST).is_file():
            raise CollectionError(
                f"{current / MANIFEST} is not a regular file: the collection was tampered "
                "with; restore it from a copy or rebuild it"
            )
    if not current.exists() or not (current / MANIFEST).is_file():
        raise CollectionError(
            f"{root} is not a finished collection (no published version): "
            f"run `indexer build SOURCE --out {root}` to build it"
        )
    return published_folder(root)


def published_folder(root: Path) -> Path:
    """Where `current` points, which must be DIR/versions/vNNNNNN (CollectionError otherwise)."""
    if (root / VERSIONS).is_symlink():
        raise CollectionError(
            f"{root / VERSIONS} is a symbolic link, not the collection's own folder: the "
            "collection was tampered with; restore it from a copy or rebuild it elsewhere"
        )
    target = (root / CURRENT).resolve()
    inside = target.parent == (root / VERSIONS).resolve() and VERSION_NAME.match(target.name)
    if not inside or not target.is_dir():
        raise CollectionError(
            f"{root / CURRENT} points at {target}, not at a version in {root / VERSIONS}: the "
            "collection was tampered with; point it back (ln -sfn versions/vNNNNNN "
            f"{root / CURRENT}) or rebuild the collection"
        )
    return target


def version_number(folder: Path) -> int:
    """N of a version folder vNNNNNN."""
    match = VERSION_NAME.match(folder.name)
    if match is None:
        raise CollectionError(f"{folder} is not a collection version (vNNNNNN)")
    return int(match.group(1))


def check_build_dir(root: Path) -> None:
    """--out must be new, empty, a collection, or an unfinished build (not someone's folder)."""
    if root.exists() and not root.is_dir():
        raise InputError(f"--out {root} is a file: choose a directory")
    if not root.is_dir() or is_collection(root):
        return  # a collection may hold files of its owner's (a dedup result): they stay
    strangers = [p.name for p in root.iterdir() if not _is_ours(p)]
    if strangers:
        raise InputError(
            f"--out {root} is not empty and is not a collection (it holds {strangers[0]!r}): "
            "choose an empty or new directory"
        )


def _is_our_version(entry: Path) -> bool:
    """A folder a build of ours made inside versions/ (a user's notes there are not)."""
    if entry.is_symlink() or not entry.is_dir():
        return False
    if entry.name.startswith((BUILDING_PREFIX, SALVAGE)):
        return True
    return bool(VERSION_NAME.match(entry.name)) and (entry / MANIFEST).is_file()


def is_collection(root: Path) -> bool:
    """Whether root already holds a collection (published, or versions under way)."""
    return (root / CURRENT).is_symlink() and (root / VERSIONS).is_dir()


def _is_ours(path: Path) -> bool:
    """What an unfinished build of ours leaves: each layout name of its own kind (a user's
    manifest.json file or index/ folder is not ours)."""
    name = path.name
    if name.startswith(f".{CURRENT}.tmp-") or name in (CURRENT, MANIFEST, SHARDS, INDEX, ERRORS):
        return path.is_symlink()
    if name == PARTS:
        return path.is_dir() and not path.is_symlink()
    if name == VERSIONS:  # what unfinished builds leave: building folders, salvage, versions
        return (
            path.is_dir()
            and not path.is_symlink()
            and all(_is_our_version(entry) for entry in path.iterdir())
        )
    if name == LOCK:
        return path.is_file() and not path.is_symlink()
    if name == RUNS:  # ours: written after the lock was taken there, or holding our records
        if not path.is_file() or path.is_symlink():
            return False
        return (path.parent / LOCK).is_file() or _holds_run_records(path)
    return False


def _holds_run_records(path: Path) -> bool:
    """Whether the file's first line is a run record of ours (a run locked out of a folder
    that a refused first run then left: its history line stays, the lock file does not)."""
    from indexer.safeio import open_regular

    try:
        fd = open_regular(path, os.O_RDONLY)  # a FIFO swapped in is refused, never waited on
        try:
            first = json.loads(os.read(fd, 4096).split(b"\n", 1)[0])
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and {"command", "status", "started"} <= first.keys()


RANDOM_WEIGHTS = (
    "random weights: neighbours reflect colour and texture, not content (build with pretrained "
    "weights, or --checkpoint FILE, to search by content)"
)


def weights_kind(manifest: dict[str, Any]) -> str | None:
    """How the model's weights were made ('pretrained', 'checkpoint', 'random'); None for a
    collection without a model (vectors indexed from Parquet)."""
    weights = (manifest.get("model") or {}).get("weights")
    kind = weights.get("kind") if isinstance(weights, dict) else weights
    return str(kind) if kind is not None else None


def random_weights(manifest: dict[str, Any]) -> bool:
    """Whether the collection's vectors come from a model with random (seeded) weights."""
    return weights_kind(manifest) == "random"
