"""Collections a service serves: each published version loaded once, checked, then swapped in."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indexer.config import StorageOptions
from indexer.errors import IndexerError, InputError
from indexer.query.collection import Collection

log = logging.getLogger(__name__)
POLL_SECONDS = 2.0  # how often `current` is looked at for a new version


@dataclass(frozen=True)
class Loaded:
    """One collection's version as served: requests keep the one they started with."""

    name: str
    root: Path
    collection: Collection
    version: str
    target: str  # where `current` pointed when it was loaded
    identity: str = ""  # the version's content (its manifest's digest): caches key by it

    def describe(self) -> dict[str, Any]:
        c = self.collection
        return {
            "name": self.name,
            "version": self.version,
            "count": len(c),
            "dim": c.dim,
            "model": (c.manifest.get("model") or {}).get("name"),
            "metric": c.manifest["metric"],
            "index": c.index_meta.get("type"),
            "portable_model": "portable_model" in c.manifest,
        }


class Registry:
    """Name -> the loaded version. refresh() loads a newly published version beside the old
    one, checks it (manifest, index, the model that embeds queries), and replaces the one
    reference; a version that fails to load is logged and counted, the old one keeps serving."""

    def __init__(
        self, roots: dict[str, Path], runtime: str = "auto", storage_options: StorageOptions = ()
    ) -> None:
        self.roots = roots
        self.runtime = runtime
        self.storage_options = storage_options  # buckets: items read back (never stored)
        self._loaded: dict[str, Loaded] = {}
        self._lock = threading.Lock()
        self.reloads = 0
        self.failures = 0
        self._stop = threading.Event()
        self._refused: dict[str, str] = {}  # the version each collection last failed to load

    def get(self, name: str) -> Loaded:
        loaded = self._loaded.get(name)
        if loaded is None:
            raise KeyError(name)
        return loaded

    def all(self) -> list[Loaded]:
        return [self._loaded[n] for n in self.roots if n in self._loaded]

    def ready(self) -> bool:
        """Every collection loaded, and its version still on disk or a newer one published
        (a build with --keep 1 deletes the served version: what it answers from is in
        memory, and the watcher loads the new one)."""
        return all(
            name in self._loaded
            and (self._loaded[name].collection.version.is_dir() or _published(self.roots[name]))
            for name in self.roots
        )

    def pending(self, name: str) -> str | None:
        """The version published for this collection and not served yet (being loaded and
        checked), or None: served already, refused, or nothing published."""
        root = self.roots.get(name)
        target = None if root is None else _current_target(root)
        loaded = self._loaded.get(name)
        if target is None or (loaded is not None and loaded.target == target):
            return None
        if self._refused.get(name) == target:
            return None
        return target.partition("@")[0].rstrip("/").rpartition("/")[2] or None

    def refresh(self) -> None:
        """Load every collection whose published version changed (or was never loaded)."""
        for name, root in self.roots.items():
            with self._lock:
                self._refresh_one(name, root)

    def _refresh_one(self, name: str, root: Path) -> None:
        target = _current_target(root)
        old = self._loaded.get(name)
        if target is None or (old is not None and old.target == target):
            return
        if self._refused.get(name) == target:  # counted and logged once, not every poll
            return
        try:
            collection = Collection(root, runtime=self.runtime, cache_rows=True,
                                    storage_options=self.storage_options)  # fmt: skip
            check_loadable(collection)
        except (IndexerError, OSError, ValueError) as exc:
            self.failures += 1
            self._refused[name] = target
            log.error("collection %s: version %s cannot be served (%s); keeping %s", name,
                      target, exc, old.version if old else "none")  # fmt: skip
            return
        self._loaded[name] = Loaded(name, root, collection, collection.version.name, target,
                                    manifest_digest(collection.manifest))  # fmt: skip
        if old is not None:
            self.reloads += 1
            log.info("collection %s: now serving %s (was %s)", name, collection.version.name,
                     old.version)  # fmt: skip

    def watch(self, every: float = POLL_SECONDS) -> threading.Thread:
        """Refresh in a background thread until stop()."""

        def loop() -> None:
            while not self._stop.wait(every):
                try:
                    self.refresh()
                except Exception:  # a watcher that dies would freeze the service's versions
                    log.exception("refreshing the collections failed; trying again")

        thread = threading.Thread(target=loop, name="collection-watcher", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


def check_loadable(collection: Collection) -> None:
    """What a version must pass before it serves: its model file (a damaged one is refused,
    never replaced by torch in the service), the model itself, and every shard read whole
    (rows and vectors are kept in memory from here on)."""
    manifest = collection.manifest
    if "portable_model" in manifest and collection.runtime == "auto":
        from indexer.model.portable import read_model

        read_model(collection.version, manifest["portable_model"])
    if manifest.get("model") is not None:
        _ = collection.embedder  # the model that embeds uploads: loaded before serving
        from indexer.query.model_check import check_collection

        found = check_collection(collection)  # a model that is not the vectors': refused
        if found.note:
            log.info("collection %s: %s", collection.root, found.note)
    collection.warm()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """A version's identity from its manifest (ids, shards' sha256, times): two builds'
    v000001 differ."""
    text = json.dumps(manifest, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _published(root: Path) -> bool:
    try:
        return (root / "current").resolve(strict=True).is_dir()
    except (OSError, RuntimeError):
        return False


def _current_target(root: Path) -> str | None:
    """Where `current` points, with that folder's identity: a collection built again from
    scratch has a v000001 of its own, which must be loaded too."""
    try:
        target = os.readlink(root / "current")
        st = os.stat(root / "current")
    except OSError:
        return None
    return f"{target}@{st.st_dev}:{st.st_ino}:{st.st_ctime_ns}"


def collection_names(dirs: list[Path], names: list[str]) -> dict[str, Path]:
    """Each DIR by its folder name, or by --name given in the same order; names unique."""
    if names and len(names) != len(dirs):
        raise InputError(f"--name was given {len(names)} time(s) for {len(dirs)} collection(s): "
                         "give one per DIR, in order, or none")  # fmt: skip
    for folder in dirs:
        if not folder.is_dir():
            raise InputError(f"{folder} does not exist or is not a folder: give a collection "
                             "built by `indexer build` or `indexer index`")  # fmt: skip
    chosen = names or [d.resolve().name for d in dirs]
    for name in chosen:
        if not name or "/" in name or name in (".", ".."):
            raise InputError(f"collection name {name!r} cannot be part of a URL: use --name")
    if len(set(chosen)) != len(chosen):
        raise InputError(f"collection names {chosen} repeat: give each a --name of its own")
    return dict(zip(chosen, dirs, strict=True))
