"""What every source provides: a deterministic item listing and a way to read one item."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

HF_PREFIX = "hf:"  # a SOURCE that is a Hugging Face dataset (a hub name, or its files)


def read_one(source: Any, locator: Any) -> tuple[bytes, dict[str, Any]]:
    """Source.read for a source whose read_many fetches a batch: one item the same way."""
    [result] = source.read_many([locator])
    if isinstance(result, BaseException):
        raise result
    return result


def read_together(items: list[Item], sources: list[Any], positions: list[int]) -> dict[int, Any]:
    """The bytes and metadata (or the exception) of those items whose source reads many at
    once (object stores, URL lists: concurrently, one request's latency for all); the other
    items are left to Source.read."""
    by_source: dict[int, list[int]] = {}
    for position in positions:
        by_source.setdefault(items[position].source, []).append(position)
    fetched: dict[int, Any] = {}
    for index, chunk in by_source.items():
        read_many = getattr(sources[index], "read_many", None)
        if read_many is None:
            continue
        try:
            results = read_many([items[p].locator for p in chunk])
        except Exception as exc:  # the whole request failed: each item's error row
            results = [exc] * len(chunk)
        fetched.update(zip(chunk, results, strict=True))
    return fetched


class SampleFailed(Exception):
    """An item its downloader could not fetch (img2dataset's failed rows): an error row of
    stage "fetch", never embedded, and not counted against the build's failure budget."""


@dataclass(frozen=True)
class Item:
    """One thing to embed: its key in the collection, its source and where to find it."""

    key: str
    source: int  # position of its source in the build's source list
    locator: Any  # a path for folders, a row number for datasets, a member for tars
    # (size, mtime_ns) of a file, (size, mtime_ns, etag) of a stored object; None: neither
    fingerprint: tuple[int, int] | tuple[int, int, str] | None = None


class Source(Protocol):
    """A collection of images; picklable so DataLoader workers can read from it."""

    label: str

    def describe(self) -> dict[str, Any]:
        """JSON-able description for the manifest."""
        ...

    def keys_and_locators(self) -> list[tuple[str, Any, Any]]:
        """Every item as (key, locator, fingerprint), in a deterministic order."""
        ...

    def metadata_schema(self) -> pa.Schema:
        """The extra columns this source contributes to the shards."""
        ...

    def read(self, locator: Any) -> tuple[bytes, dict[str, Any]]:
        """The item's encoded image bytes and its metadata column values."""
        ...

    def url(self, locator: Any) -> str | None:
        """Where the item was fetched from, for its error row (None: not known)."""
        ...
