"""An object-store prefix (s3://, gs://, az://) through fsspec: its kind, images and objects."""

from __future__ import annotations

import hashlib
import os
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from indexer.config import DEFAULT_MAX_PIXELS, SourceSpec
from indexer.errors import InputError
from indexer.safeio import byte_limit
from indexer.sources.base import HF_PREFIX, read_one
from indexer.sources.folder import is_image_name, printable_key

SCHEMES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
           "abfss": "adlfs"}  # fmt: skip
EXTRA = {"s3fs": "s3", "gcsfs": "gcs", "adlfs": "azure"}
LIST_CONCURRENCY = 16  # sub-prefixes listed at once (each one paged, a request at a time)
SPLIT_DEPTH = 4  # levels of single sub-prefixes a listing descends through before splitting
PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")  # an ETag that is the object's MD5 (no multipart)


def is_bucket_url(location: str) -> bool:
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def parse_options(pairs: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """--storage-option KEY=VALUE pairs as fsspec keyword arguments: true/false as booleans,
    whole numbers as ints, the rest as text; TABLE.KEY=VALUE sets a key of a table option
    (s3fs's config_kwargs, client_kwargs)."""
    options: dict[str, Any] = {}
    for key, value in pairs:
        text = value.strip()
        if text.lower() in ("true", "false"):
            parsed: Any = text.lower() == "true"
        elif re.fullmatch(r"-?\d+", text):
            parsed = int(text)
        else:
            parsed = value
        table, dot, inner = key.partition(".")
        if not dot:
            options[key] = parsed
        elif isinstance(options.setdefault(table, {}), dict) and inner:
            options[table][inner] = parsed
        else:
            raise InputError(f"--storage-option {key}=...: {table} is given as text and as a "
                             f"table: give {table}.KEY=VALUE pairs alone")  # fmt: skip
    return options


def bucket_of(
    spec: SourceSpec,
    max_pixels: int,
    label: str | None = None,
    listed: dict[str, Any] | None = None,
) -> BucketSource:
    """The prefix a SOURCE names (hf: or not), with its listing where it was made already."""
    options = parse_options(spec.storage_options)
    return BucketSource(spec.location.removeprefix(HF_PREFIX), label, max_pixels, options,
                        spec.read_concurrency, spec.read_retries, listed)  # fmt: skip


class ObjectChanged(Exception):
    """The object's bytes are not the ones its listing described (overwritten meanwhile)."""


class BucketSource:
    """Every image object under ``url`` (a prefix): keys relative to it, `/`-separated, as
    for folders. Each object's fingerprint is the listing's size and ETag (carried in the
    `etag` column), so a re-run reads nothing that did not change. The filesystem is made in
    each process that reads (fsspec's are not fork-safe); credentials come from the store's
    standard places or ``options``, which are never described (the manifest keeps the URL)."""

    etags = True  # an item's fingerprint holds its ETag (its error row keeps it too)

    def __init__(
        self,
        url: str,
        label: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        options: dict[str, Any] | None = None,
        concurrency: int = 64,
        retries: int = 3,
        listed: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        scheme, _, rest = url.partition("://")
        self.retries = retries
        self.protocol = scheme.lower()
        self.root = rest.strip("/")
        if not self.root:
            raise InputError(f"{url}: name a bucket (and a prefix), e.g. s3://photos/2024/")
        if any(ch in self.root for ch in "?#") or "//" in self.root:
            raise InputError(f"{self.protocol}://{self.root.split('?')[0].split('#')[0]}...: a "
                             "prefix is a bucket and a path, without ? or # (a query string "
                             "is never stored): give the prefix alone")  # fmt: skip
        self.written = f"{self.protocol}://{self.root}/"
        self.label = label or printable_key(self.root.rsplit("/", 1)[-1]) or "bucket"
        self.options = dict(options or {})
        self.concurrency = max(1, concurrency)
        self.max_bytes = byte_limit(max_pixels)
        self._fs: Any = None
        self._inherited: Any = None
        self._listed = listed  # made already (the early start's), else listed when asked
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        # Each process makes its own filesystem. One inherited by fork is kept referenced:
        # closing it (when it is collected) would run on the parent's event loop, which
        # does not run here. The listing is not pickled: it may be large.
        dropped = {"_fs": None, "_pid": -1, "_inherited": None, "_listed": None}
        return {**self.__dict__, **dropped}

    def fs(self) -> Any:
        if self._fs is None or self._pid != os.getpid():
            options = dict(self.options)
            if SCHEMES[self.protocol] == "s3fs":  # botocore pools 10 connections by default:
                config = _table(options, "config_kwargs")  # a batch's GETs would
                config.setdefault("max_pool_connections", self.concurrency)  # wait in line
                options["config_kwargs"] = config
            self._inherited = self._fs  # a parent's, inherited by fork: kept, never closed
            self._fs, self._pid = open_filesystem(self.protocol, options), os.getpid()
        return self._fs

    def describe(self) -> dict[str, Any]:
        return {"kind": "bucket", "path": self.written, "label": self.label}

    def holds(self) -> tuple[str, list[str]]:
        """What the prefix holds, as a folder's kinds are told, when no sub-prefix and no
        image is at its top: ("tars", its .tar objects) where it has any (webdataset
        shards, with their sidecars), else ("parquet", its .parquet objects); otherwise
        ("images", [])."""
        names = {p: p[len(self.root) + 1 :] for p in self._listing()}
        visible = {p: n for p, n in names.items() if not _hidden(n)}  # as in a folder:
        if any("/" in n or is_image_name(n) for n in visible.values()):  # hidden ignored,
            return "images", []  # .tar exactly, .parquet in any case
        tars = sorted(p for p, n in visible.items() if n.endswith(".tar"))
        parquet = sorted(p for p, n in visible.items() if n.lower().endswith(".parquet"))
        return ("tars", tars) if tars else ("parquet", parquet) if parquet else ("images", [])

    def entry(self, path: str) -> tuple[int, int, str] | None:
        """An object's (size, mtime_ns, ETag) from the listing; None when it is not listed."""
        info = self._listing().get(path)
        if info is None:
            return None
        return int(info.get("size") or 0), _mtime_ns(info), _etag(info)

    def stage(self, paths: list[str]) -> list[Path]:
        """Local copies of whole objects (a dataset's Parquet files) in indexer's cache, each
        named by its URL, size and ETag: fetched (streamed to disk) only when new or changed,
        so a re-run of the same objects reads nothing; older copies of a URL are removed."""
        from indexer.cache_dir import cache_dir

        entries, copies = self._listing(), []
        for path in paths:
            size, etag = int(entries[path].get("size") or 0), _etag(entries[path])
            url = f"{self.protocol}://{path}"
            folder = cache_dir() / "objects" / hashlib.sha256(url.encode()).hexdigest()[:32]
            version = hashlib.sha256(f"{size}:{etag}".encode()).hexdigest()[:16]
            target = folder / f"{version}-{printable_key(path.rsplit('/', 1)[-1])}"
            if not (target.is_file() and target.stat().st_size == size):
                self._download(path, size, etag, target)
            copies.append(target)
        return copies

    def _download(self, path: str, size: int, etag: str, target: Path) -> None:
        url = f"{self.protocol}://{path}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"indexer's cache cannot keep a copy of {url} at {target.parent} "
                             f"({exc.strerror or exc}): set INDEXER_CACHE_DIR to a folder you "
                             "may write to") from None  # fmt: skip
        partial = target.with_name(f".{target.name}.{os.getpid()}.part")
        remove_orphaned_parts(target.parent)
        try:
            self.fs().get_file(path, str(partial))
            if _changed(partial, size, etag):
                raise InputError(f"{url} changed while it was read: run the build again")
            os.replace(partial, target)
        except InputError:
            raise
        except Exception as exc:  # the store's error, or the disk's
            raise InputError(f"cannot read {url}: {_short(exc)}: check the credentials "
                             "and the space in indexer's cache") from None  # fmt: skip
        finally:
            partial.unlink(missing_ok=True)
        for older in target.parent.iterdir():  # (another run's partial copy: left to it)
            if older != target and not older.name.startswith("."):
                older.unlink(missing_ok=True)

    def keys_and_locators(self) -> list[tuple[str, Any, Any]]:
        entries = self._listing()
        listed: list[tuple[str, Any, Any]] = []
        for path in sorted(entries):
            info = entries[path]
            rel = path[len(self.root) + 1 :]
            if info.get("type") == "directory" or not is_image_name(rel) or _hidden(rel):
                continue
            size, etag = int(info.get("size") or 0), _etag(info)
            listed.append((printable_key(rel), (path, size, etag),
                           (size, _mtime_ns(info), etag)))  # fmt: skip
        return listed

    def listing(self) -> dict[str, dict[str, Any]]:
        """Every object under the prefix, by path, as the store lists it (once)."""
        return self._listing()

    def _listing(self) -> dict[str, dict[str, Any]]:
        """Every object under the prefix (listed once: open_bucket tells the kind from it,
        the build then lists its items; not pickled, it may be large)."""
        if self._listed is None:
            self._listed = self._list()
        return self._listed

    def _list(self) -> dict[str, dict[str, Any]]:
        from fsspec.asyn import AsyncFileSystem, sync

        fs = self.fs()
        try:
            if isinstance(fs, AsyncFileSystem):
                found = sync(fs.loop, split_find, fs, self.root, LIST_CONCURRENCY)
            else:
                found = fs.find(self.root, detail=True)
        except FileNotFoundError:
            found = {}
        except InputError:
            raise
        except Exception as exc:  # botocore's, aiohttp's, gcsfs's own: the store said no
            raise _unreachable(self.written, exc) from None
        if not found:  # (before the build writes anything: a wrong bucket or prefix)
            raise InputError(f"{self.written} does not exist or holds nothing: check the "
                             "bucket and the prefix")  # fmt: skip
        return {p.strip("/"): info for p, info in dict(found).items()}

    def metadata_schema(self) -> pa.Schema:
        return pa.schema([pa.field("etag", pa.string())])

    def read(self, locator: Any) -> tuple[bytes, dict[str, Any]]:
        return read_one(self, locator)

    def read_many(self, locators: list[Any]) -> list[tuple[bytes, dict[str, Any]] | Exception]:
        """Each object's bytes and metadata (or the exception reading it raised), fetched
        `concurrency` at a time: a batch waits about one request's latency, not one each."""
        too_big = {i for i, (_, size, _) in enumerate(locators) if size > self.max_bytes}
        paths = [path for i, (path, _, _) in enumerate(locators) if i not in too_big]
        fetched = fetch_all(self.fs(), paths, self.concurrency, self.retries)
        got = dict(zip(paths, fetched, strict=True))
        out: list[tuple[bytes, dict[str, Any]] | Exception] = []
        for i, (path, size, etag) in enumerate(locators):
            if i in too_big:
                out.append(ValueError(f"object is {size} bytes, over the {self.max_bytes} an "
                                      "image within the pixel limit can need"))  # fmt: skip
                continue
            data = got.get(path, FileNotFoundError(f"{path} was not returned"))
            out.append(data if isinstance(data, Exception) else _checked(data, size, etag))
        return out

    def url(self, locator: Any) -> str | None:
        return f"{self.protocol}://{locator[0]}"


async def split_find(fs: Any, root: str, concurrency: int) -> dict[str, dict[str, Any]]:
    """Every object under root, as fs.find gives them, the prefix split by the store's
    delimiter: the objects directly under it from one delimited listing, then each
    sub-prefix listed whole, `concurrency` at once (a listing is paged, 1,000 keys a page:
    one prefix is one request after another). A level holding a single sub-prefix and
    nothing else is split below it instead (up to SPLIT_DEPTH levels)."""
    from fsspec.asyn import _run_coros_in_chunks

    found: dict[str, dict[str, Any]] = {}
    parts = [root]
    for _ in range(SPLIT_DEPTH):
        if len(parts) != 1:
            break
        top = await fs._ls(parts[0], detail=True)
        subs = [i["name"] for i in top if i.get("type") == "directory"]
        found.update({i["name"]: i for i in top if i.get("type") != "directory"})
        parts = subs
    listings = [fs._find(part, detail=True) for part in parts]
    for result in await _run_coros_in_chunks(listings, batch_size=concurrency,
                                             return_exceptions=True):  # fmt: skip
        if isinstance(result, BaseException):
            raise result
        found.update(result)
    return found


def _checked(data: bytes, size: int, etag: str) -> tuple[bytes, dict[str, Any]] | Exception:
    """The bytes, if they are the listed object's: its size, and its MD5 where the ETag is one."""
    if len(data) != size or (PLAIN_MD5.match(etag) and hashlib.md5(data).hexdigest() != etag):
        return ObjectChanged("the object changed after it was listed (its size or ETag no "
                             "longer match): run the build again to embed the new one")  # fmt: skip
    return data, {"etag": etag}


Request = str | tuple[str, int, int]  # an object's path, or (path, offset, size): a range


def fetch_all(fs: Any, paths: Sequence[Request], concurrency: int, retries: int = 3) -> list[Any]:
    """Each object's bytes (or the exception), one GET each, `concurrency` in flight; the
    ones that failed for a passing reason (throttled, reset, timed out, 5xx) tried again up
    to `retries` times, after 0.2, 0.4, 0.8 s... with jitter. A missing or forbidden object
    is not retried."""
    results = _fetch_once(fs, paths, concurrency)
    for attempt in range(retries):
        again = [n for n, r in enumerate(results) if _passing(r)]
        if not again:
            break
        time.sleep(0.2 * 2**attempt * (0.5 + random.random()))
        for n, got in zip(again, _fetch_once(fs, [paths[n] for n in again], concurrency),
                          strict=True):  # fmt: skip
            results[n] = got
    return results


def _passing(result: Any) -> bool:
    """A failure worth another try: not a missing, forbidden or invalid object."""
    if not isinstance(result, Exception):
        return False
    if isinstance(result, FileNotFoundError | PermissionError | IsADirectoryError | ValueError):
        return False
    status = getattr(result, "status", None) or getattr(result, "code", None)
    return not (isinstance(status, int) and 400 <= status < 500 and status != 429)


def _fetch_once(fs: Any, paths: Sequence[Request], concurrency: int) -> list[Any]:
    from fsspec.asyn import AsyncFileSystem, _run_coros_in_chunks, sync

    if not isinstance(fs, AsyncFileSystem):
        out: list[Any] = []
        for path in paths:
            try:
                out.append(fs.cat_file(path) if isinstance(path, str) else
                           fs.cat_file(path[0], start=path[1], end=path[1] + path[2]))  # fmt: skip
            except Exception as exc:  # this object's error row
                out.append(exc)
        return out
    # s3fs asks for an object's size (a HEAD, a second round trip) before a GET whose
    # max_concurrency may split it into ranges; one GET whole is what an image needs
    whole = {"max_concurrency": 1} if "max_concurrency" in _parameters(fs._cat_file) else {}
    coros = [fs._cat_file(path, **whole) if isinstance(path, str) else
             fs._cat_file(path[0], start=path[1], end=path[1] + path[2])
             for path in paths]  # fmt: skip
    return list(sync(fs.loop, _run_coros_in_chunks, coros, batch_size=concurrency,
                     return_exceptions=True))  # fmt: skip


def _parameters(function: Any) -> Any:
    import inspect

    return inspect.signature(function).parameters


def open_filesystem(protocol: str, options: dict[str, Any]) -> Any:
    """fsspec's filesystem for the protocol, a new instance (not a cached one another process
    made), or a one-line error naming the extra to install. Its own retries are off where
    it has them: indexer's (--read-retries) and the SDK's (botocore's) are the ones."""
    import fsspec

    package = SCHEMES.get(protocol, "aiohttp")
    try:
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
    except ImportError:
        extra = EXTRA.get(package)
        how = f"pip install 'indexer[{extra}]'" if extra else f"pip install {package}"
        raise InputError(f"{protocol}:// needs {package}: {how}") from None
    except TypeError as exc:
        raise InputError(f"--storage-option: {exc}") from None
    if package == "s3fs":  # s3fs tries a throttled or failed request 5 times by itself,
        fs.retries = 1  # before fetch_all's --read-retries and inside botocore's own
    return fs


def _unreachable(url: str, exc: BaseException) -> InputError:
    if isinstance(exc, PermissionError):
        return InputError(f"{url} cannot be listed ({_short(exc)}): check the credentials "
                          "(docs/buckets.md)")  # fmt: skip
    return InputError(f"{url} cannot be listed: {_short(exc)}: check the endpoint, the "
                      "network and the credentials")  # fmt: skip


def _table(options: dict[str, Any], name: str) -> dict[str, Any]:
    """A storage option that s3fs takes as a table (config_kwargs, client_kwargs)."""
    value = options.get(name) or {}
    if not isinstance(value, dict):
        raise InputError(f"--storage-option {name}=...: s3fs takes a table there, not text: "
                         f"give its keys one by one, {name}.KEY=VALUE")  # fmt: skip
    return dict(value)


def remove_orphaned_parts(folder: Path) -> None:
    """Partial copies (.NAME.PID.part) whose process is gone: a download killed (SIGKILL, a
    lost machine) before it finished, left in the cache. A live process's are its own."""
    for part in folder.glob(".*.part"):
        pid = part.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            part.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _etag(info: dict[str, Any]) -> str:
    """The listing's ETag (S3, Azure) or MD5 (GCS) of an object, unquoted."""
    return str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or "").strip('"')


def _changed(copy: Path, size: int, etag: str) -> bool:
    """A downloaded copy whose size (or MD5, where the ETag is one) is not the listed one's."""
    if copy.stat().st_size != size:
        return True
    if not PLAIN_MD5.match(etag):
        return False
    digest = hashlib.md5()
    with open(copy, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() != etag


def _mtime_ns(info: dict[str, Any]) -> int:
    stamp: Any = info.get("LastModified") or info.get("mtime") or info.get("updated")
    try:
        return int(stamp.timestamp() * 1e9) if hasattr(stamp, "timestamp") else 0
    except (OverflowError, ValueError, OSError):
        return 0


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."
