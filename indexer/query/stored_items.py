"""A stored item's image, read where it lives: a folder file, a dataset row, a tar member."""

from __future__ import annotations

import logging
from typing import Any

from indexer.config import StorageOptions
from indexer.errors import IndexerError
from indexer.sources import Item, Source

log = logging.getLogger(__name__)


class ItemReader:
    """Reads items of a collection by key from its sources, as the build listed them. The
    sources are opened and listed on first use (once), so pictures of a few results cost a
    listing, not a pass over the data."""

    def __init__(self, manifest: dict[str, Any], storage_options: StorageOptions = ()) -> None:
        self._manifest = manifest
        self._options = storage_options  # buckets: --storage-option, as the build had them
        self._sources: list[Source] | None = None
        self._items: dict[str, Item] = {}
        self._folders = False  # every source a folder: items found from their keys

    @classmethod
    def listed(cls, sources: list[Source], items: list[Item], keys: set[str]) -> ItemReader:
        """A reader over the sources a run opened and the items it listed, for these keys
        only: no second listing, and nothing held for the other items."""
        reader = cls({"sources": []})
        reader._sources = sources
        reader._items = {item.key: item for item in items if item.key in keys}
        return reader

    def read(self, key: str) -> bytes | None:
        """The item's encoded bytes, or None when its source no longer has it (logged).
        Read as the build read it: a folder's file only inside its folder (links out refused
        unless the build followed them), never a key naming a parent folder."""
        if self._sources is None:  # (again after a failure: the sources may be back)
            self._open()
        item = self._folder_item(key) if self._folders else self._items.get(key)
        if self._sources is None or item is None:
            return None
        try:
            data, _ = self._sources[item.source].read(item.locator)
        except Exception as exc:  # gone or unreadable now: the picture says "missing"
            log.info("cannot read %s from its source: %s", key, exc)
            return None
        return data

    def _folder_item(self, key: str) -> Item | None:
        """A folder source's item straight from its key (no listing of the folders)."""
        from indexer.sources.folder import key_to_relpath

        assert self._sources is not None
        if any(part in ("..", "") for part in key.split("/")) or "\0" in key:
            return None  # not a key a folder build makes (a tampered row): refused
        several = len(self._sources) > 1
        label, rel = key.split("/", 1) if several and "/" in key else (None, key)
        for n, source in enumerate(self._sources):
            if label is None or source.label == label:
                return Item(key, n, key_to_relpath(rel))
        return None

    def _open(self) -> None:
        from indexer.sources import list_items, open_sources, source_spec

        try:
            specs = tuple(source_spec(s, self._options) for s in self._manifest["sources"])
            sources = open_sources(specs)
            kinds = {s.get("kind") for s in self._manifest["sources"]}
            self._folders = kinds == {"folder"}
            if not self._folders:
                self._items = {item.key: item for item in list_items(sources)}
            self._sources = sources
        except (IndexerError, OSError, KeyError, ValueError) as exc:
            log.warning("cannot open the collection's sources for pictures: %s", exc)
