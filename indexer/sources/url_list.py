"""A list of image URLs or paths (Parquet, CSV, JSONL or TXT), each row fetched and embedded."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa

from indexer.config import DEFAULT_MAX_PIXELS
from indexer.errors import InputError
from indexer.safeio import byte_limit, read_bounded
from indexer.sources.base import SampleFailed, read_one
from indexer.sources.folder import printable_key

SUFFIXES = (".parquet", ".csv", ".jsonl", ".txt")
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image")  # bytes: images, not a list of URLs


def is_url_list(location: str) -> bool:
    path = Path(location).expanduser()
    return path.suffix.lower() in SUFFIXES and path.is_file()


def redacted(url: str) -> str:
    """A URL without what may be a secret: its user and password, query and fragment (a
    signed URL's signature lives in its query)."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url.split("?", 1)[0]
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class UrlListSource:
    """One item per row of a list file: its URL (http, https, s3, gs, az, or a local path)
    in ``url_column``, its key from ``key_column`` (default: a `key` column, else the URL's
    host and path), the other columns carried into the shards. A row is fingerprinted by its
    URL (HTTP has no cheap fingerprint): a re-run fetches only rows whose URL changed. A
    fetch that fails (404, refused, timeout) is the row's error row, of stage `fetch`."""

    def __init__(
        self,
        path: Path,
        label: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        url_column: str = "url",
        key_column: str | None = None,
        options: dict[str, Any] | None = None,
        concurrency: int = 64,
        refetch: bool = False,
        retries: int = 3,
    ) -> None:
        self.retries = retries
        self.path = path.resolve()
        self.refetch = refetch  # every row fetched again; unchanged bytes keep their vector
        self.label = label or printable_key(self.path.stem) or "list"
        self.url_column, self.key_column = url_column, key_column
        self.options = dict(options or {})
        self.concurrency = max(1, concurrency)
        self.max_bytes = byte_limit(max_pixels)
        table = read_list(self.path)
        if url_column not in table.column_names:
            raise InputError(f"{self.path} has no column {url_column!r} (its columns: "
                             f"{', '.join(table.column_names)}): give --url-column")  # fmt: skip
        images = [f.name for f in table.schema if f.name in IMAGE_COLUMNS and
                  (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))]  # fmt: skip
        if images:  # img2dataset's Parquet output holds the images themselves
            raise InputError(f"{self.path} holds images in column {images[0]!r}: pass "
                             "its folder to index them, not the file (a URL list is "
                             "fetched)")  # fmt: skip
        self.urls = [str(u) if u is not None else "" for u in table.column(url_column).to_pylist()]
        self.keys = self._keys(table)
        extra = [n for n in table.column_names if n not in (url_column, self._key_name(table))]
        self.meta = table.select(extra)
        self._fs: dict[str, Any] = {}
        self._inherited: dict[str, Any] = {}
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": {}, "_pid": -1, "_inherited": {}}  # each process
        # makes its own

    def _key_name(self, table: pa.Table) -> str | None:
        if self.key_column is not None:
            return self.key_column
        return "key" if "key" in table.column_names else None

    def _keys(self, table: pa.Table) -> list[str]:
        name = self._key_name(table)
        if name is not None and name not in table.column_names:
            raise InputError(f"{self.path} has no column {name!r}: give --key-column")
        if name is not None:
            keys = [printable_key(str(k)) for k in table.column(name).to_pylist()]
        else:
            keys = [_key_of(u) for u in self.urls]
        seen: set[str] = set()
        for n, key in enumerate(keys):
            if not key or key in seen:
                what = "an empty" if not key else "a repeated"
                raise InputError(f"{self.path}: row {n} has {what} key {key!r}: give each row "
                                 "a key of its own (--key-column)")  # fmt: skip
            seen.add(key)
        return keys

    def describe(self) -> dict[str, Any]:
        return {"kind": "urllist", "path": str(self.path), "label": self.label,
                "url_column": self.url_column, "key_column": self.key_column}  # fmt: skip

    def keys_and_locators(self) -> list[tuple[str, Any, Any]]:
        if self.refetch:  # no fingerprint: each row is read and compared by its bytes
            return [(key, n, None) for n, key in enumerate(self.keys)]
        return [(key, n, (0, 0, _url_print(self.urls[n]))) for n, key in enumerate(self.keys)]

    def metadata_schema(self) -> pa.Schema:
        return pa.schema([*self.meta.schema, pa.field("etag", pa.string())])

    def row_metadata_schema(self) -> pa.Schema:
        """The list's other columns: an item's error row carries them too."""
        return self.meta.schema

    def row_metadata(self, locator: Any) -> dict[str, Any]:
        return {name: self.meta.column(name)[locator].as_py() for name in self.meta.column_names}

    def read(self, locator: Any) -> tuple[bytes, dict[str, Any]]:
        return read_one(self, locator)

    def read_many(self, locators: list[Any]) -> list[tuple[bytes, dict[str, Any]] | Exception]:
        """Each row's bytes and columns, fetched `concurrency` at a time per kind of URL."""
        out: dict[int, Any] = {}
        by_kind: dict[str, list[int]] = {}
        for n in locators:
            by_kind.setdefault(_kind(self.urls[n]), []).append(n)
        for kind, rows in by_kind.items():
            for n, got in zip(rows, self._fetch(kind, [self.urls[n] for n in rows]), strict=True):
                out[n] = self._row(n, got)
        return [out[n] for n in locators]

    def _fetch(self, kind: str, urls: list[str]) -> list[Any]:
        if kind == "file":
            return [_read_local(u, self.max_bytes) for u in urls]
        from indexer.sources.bucket import fetch_all, open_filesystem

        if self._pid != os.getpid():  # the parent's are kept, never closed (BucketSource)
            self._inherited, self._fs, self._pid = self._fs, {}, os.getpid()
        if kind not in self._fs:
            options = self.options if kind != "http" else {}
            self._fs[kind] = open_filesystem(kind, options)
        return fetch_all(self._fs[kind], urls, self.concurrency, self.retries)

    def _row(self, n: int, got: Any) -> tuple[bytes, dict[str, Any]] | Exception:
        if isinstance(got, BaseException):
            return SampleFailed(safe_reason(got, self.urls[n]))
        if len(got) > self.max_bytes:
            return SampleFailed(f"{len(got)} bytes, over the {self.max_bytes} an image within "
                                "the pixel limit can need")  # fmt: skip
        return bytes(got), {**self.row_metadata(n), "etag": _url_print(self.urls[n])}

    def url(self, locator: Any) -> str | None:
        return redacted(self.urls[locator])


def safe_reason(exc: BaseException, url: str) -> str:
    """Why a fetch failed, without the URL's secrets: an HTTP status as such; otherwise the
    exception's text with the URL, its query, fragment and password taken out, however the
    client library spelled them."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return f"HTTP {status} {getattr(exc, 'message', '')}".strip()
    if isinstance(exc, FileNotFoundError):
        return "FileNotFoundError: not found (HTTP 404, or no such object)"
    text = str(exc).replace(url, redacted(url))
    parts = urlsplit(url)
    for secret in (parts.query, parts.fragment, parts.password or ""):
        if secret:
            text = text.replace(secret, "[redacted]")
    return f"{type(exc).__name__}: {text}"[:500]


def read_list(path: Path) -> pa.Table:
    """The list file as a table: Parquet, CSV or JSONL by suffix; TXT one URL a line."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path)
        if suffix == ".jsonl":
            import pyarrow.json as pjson

            return pjson.read_json(path)
        lines = [ln.strip() for ln in path.read_text("utf-8").splitlines()]
        return pa.table({"url": [ln for ln in lines if ln and not ln.startswith("#")]})
    except (OSError, UnicodeDecodeError, pa.ArrowException) as exc:
        raise InputError(f"cannot read the list {path}: {exc}") from exc


def _url_print(url: str) -> str:
    """A row's fingerprint: its URL's digest (kept in the etag column)."""
    return "url:" + hashlib.sha256(url.encode()).hexdigest()[:32]


def _kind(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return "http"
    if scheme in ("s3", "gs", "gcs", "az", "abfs", "abfss"):
        return scheme
    return "file"


def _key_of(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme and parts.netloc:
        return printable_key(f"{parts.netloc}{parts.path}".strip("/"))
    return printable_key(url.split("?", 1)[0].lstrip("/"))


def _read_local(url: str, limit: int) -> Any:
    path = urlsplit(url).path if url.startswith("file://") else url
    try:
        return read_bounded(Path(path).expanduser(), limit, "an image within the pixel limit")
    except Exception as exc:  # this row's error
        return exc
