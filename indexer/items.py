"""A stored item's image, read where it lives: a folder file, a dataset row, a tar member."""

from __future__ import annotations

import logging
from typing import Any

from indexer.errors import IndexerError
from indexer.sources import Item, Source

log = logging.getLogger(__name__)


class ItemReader:
    """Reads items of a collection by key from its sources, as the build listed them. The
    sources are opened and listed on first use (once), so pictures of a few results cost a
    listing, not a pass over the data."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        self._manifest = manifest
        self._sources: list[Source] | None = None
        self._items: dict[str, Item] = {}
        self._failed: str | None = None

    def read(self, key: str) -> bytes | None:
        """The item's encoded bytes, or None when its source no longer has it (logged)."""
        if self._sources is None and self._failed is None:
            self._open()
        item = self._items.get(key)
        if self._sources is None or item is None:
            return None
        try:
            data, _ = self._sources[item.source].read(item.locator)
        except Exception as exc:  # gone or unreadable now: the picture says "missing"
            log.info("cannot read %s from its source: %s", key, exc)
            return None
        return data

    def _open(self) -> None:
        from indexer.sources import list_items, open_sources
        from indexer.verify import source_spec

        try:
            specs = tuple(source_spec(s) for s in self._manifest["sources"])
            sources = open_sources(specs)
            self._items = {item.key: item for item in list_items(sources)}
            self._sources = sources
        except (IndexerError, OSError, KeyError, ValueError) as exc:
            self._failed = str(exc)
            log.warning("cannot open the collection's sources for pictures: %s", exc)
