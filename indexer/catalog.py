"""The collection directory on disk: its paths, the manifest, and preparing a build directory."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
PARTS = "parts"  # parts/IIIII-of-NNNNN/: collections of one partition each (indexer.parts)
LAYOUT = frozenset({MANIFEST, SHARDS, ERRORS, INDEX, LOCK, RUNS, VERSIONS, CURRENT, PARTS})


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
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of the collection at root, every shard it names present; CollectionError
    when it is missing or broken."""
    manifest = parse_manifest(root)
    paths = CollectionPaths(root)
    missing = [p.name for p in paths.shard_paths(manifest) if not p.is_file()]
    if missing:
        raise CollectionError(
            f"{root} is missing {len(missing)} shard file(s) named in its manifest "
            f"(e.g. {missing[0]}): rebuild the collection with `indexer build ... --rebuild`"
        )
    return manifest


def parse_manifest(root: Path) -> dict[str, Any]:
    """The manifest's JSON, checked (fields, schema version, plain shard names), without
    looking at the shards (verify and repair read a damaged collection's manifest too)."""
    paths = CollectionPaths(root)
    if not root.is_dir():
        raise CollectionError(
            f"no collection at {root}: build one with `indexer build SOURCE --out {root}`"
        )
    if not paths.manifest.is_file():
        raise CollectionError(
            f"{root} is not a finished collection (no {MANIFEST}): "
            f"run `indexer build SOURCE --out {root}` to (re)build it"
        )
    try:
        manifest = json.loads(paths.manifest.read_text(encoding="utf-8"))
        version = manifest["schema_version"]
        for field in ("model", "shards", "counts", "metric", "embedding_dim"):
            manifest[field]
    except (ValueError, KeyError, TypeError) as exc:
        raise CollectionError(
            f"{paths.manifest} is corrupt ({type(exc).__name__}: {exc}): rebuild the collection "
            "with `indexer build ... --rebuild`"
        ) from exc
    unsafe = [s["name"] for s in manifest["shards"] if not SHARD_NAME.match(str(s.get("name")))]
    if unsafe:
        raise CollectionError(
            f"{paths.manifest} names a shard {unsafe[0]!r} that is not a plain file in shards/: "
            "refusing to read it; rebuild the collection with `indexer build ... --rebuild`"
        )
    if version != SCHEMA_VERSION:
        raise CollectionError(
            f"{root} has collection schema version {version}, this indexer reads version "
            f"{SCHEMA_VERSION}: use a matching indexer release or rebuild the collection"
        )
    return manifest


def open_version(root: Path) -> Path:
    """The folder of the collection's published version, resolved once (CollectionError if none).

    Readers take everything from this folder, so a build publishing meanwhile never mixes in.
    """
    if not root.is_dir():
        raise CollectionError(
            f"no collection at {root}: build one with `indexer build SOURCE --out {root}`"
        )
    current = root / CURRENT
    if not current.exists() or not (current / MANIFEST).is_file():
        raise CollectionError(
            f"{root} is not a finished collection (no published version): "
            f"run `indexer build SOURCE --out {root}` to build it"
        )
    return current.resolve()


def check_build_dir(root: Path) -> None:
    """--out must be new, empty, a collection, or an unfinished build (not someone's folder)."""
    if root.exists() and not root.is_dir():
        raise InputError(f"--out {root} is a file: choose a directory")
    if not root.is_dir():
        return
    strangers = [p.name for p in root.iterdir() if not _is_ours(p.name)]
    if strangers:
        raise InputError(
            f"--out {root} is not empty and is not a collection (it holds {strangers[0]!r}): "
            "choose an empty or new directory"
        )


def _is_ours(name: str) -> bool:
    return name in LAYOUT or name.startswith(f".{CURRENT}.tmp-")
