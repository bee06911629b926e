"""webdataset tars under a bucket prefix: member indexes kept by ETag, samples read by range."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa

from indexer.config import DEFAULT_MAX_PIXELS
from indexer.errors import InputError
from indexer.safeio import write_bytes_atomic
from indexer.sources.bucket import BucketSource, fetch_all
from indexer.sources.wds import (
    ETAG,
    MAX_JSON_BYTES,
    BadSample,
    Conflict,
    Member,
    Pieces,
    Sample,
    WebDatasetSource,
    learn_fields,
    ranges,
    samples_in,
)

INDEX_FORMAT = 1  # of a member index in the cache; another is read as absent
SCAN_BLOCK = 8 << 20  # bytes a GET of a tar being indexed reads (one request a block)


class BucketTars:
    """The .tar objects under a prefix (with their NAME.parquet sidecars). A tar's member
    index (where each sample's members are) is made once by reading the tar from start to
    end, and kept in indexer's cache under the tar's URL, size and ETag: a tar that did not
    change is not read again. Samples are read by byte range, a batch's ranges at once."""

    def __init__(self, bucket: BucketSource, paths: list[str]) -> None:
        self.bucket = bucket
        self.paths = {p[len(bucket.root) + 1 :]: p for p in paths}
        self.name = bucket.root.rsplit("/", 1)[-1]
        self.location = bucket.written
        self.prints = {tar: bucket.entry(path) for tar, path in self.paths.items()}
        sidecars = {tar: path[: -len(".tar")] + ".parquet" for tar, path in self.paths.items()}
        self.sidecars = {t: p for t, p in sidecars.items() if bucket.entry(p) is not None}

    def names(self) -> list[str]:
        return sorted(self.paths)

    def fingerprint(self, tar: str) -> tuple[Any, ...]:
        entry = self.prints[tar]
        assert entry is not None  # (listed: that is how the tar was found)
        return entry

    def etag(self, tar: str) -> str:
        return str(self.fingerprint(tar)[2])

    def samples(self, tar: str) -> dict[str, Sample | Conflict]:
        cached = self._cache(tar, "members.json")
        if cached.is_file():
            try:
                return _samples_from(json.loads(cached.read_bytes()), tar)
            except (ValueError, KeyError, TypeError, IndexError):
                pass  # (a damaged cache entry: the tar is indexed again)
        found = self._scan(tar)
        write_bytes_atomic(cached, json.dumps(_samples_to(found)).encode(), sync=False)
        return found

    def _scan(self, tar: str) -> dict[str, Sample | Conflict]:
        url = f"{self.bucket.protocol}://{self.paths[tar]}"
        try:
            with (
                self.bucket.fs().open(self.paths[tar], "rb", block_size=SCAN_BLOCK) as f,
                tarfile.open(fileobj=f, mode="r|") as stream,
            ):
                return samples_in(stream, tar, crc=True)
        except tarfile.TarError as exc:
            raise InputError(f"cannot read the tar {url} ({exc}): replace or remove it") from None
        except Exception as exc:  # the store's error
            raise InputError(f"cannot read the tar {url}: {type(exc).__name__}: {exc}: check "
                             "the credentials and the network") from None  # fmt: skip

    def sidecar(self, tar: str) -> Path | None:
        path = self.sidecars.get(tar)
        return None if path is None else self.bucket.stage([path])[0]

    def json_fields(self, tar: str) -> dict[str, pa.Field]:
        cached = self._cache(tar, "fields.json")
        if cached.is_file():
            try:
                return {n: pa.field(n, pa.type_for_alias(t))
                        for n, t in json.loads(cached.read_bytes()).items()}  # fmt: skip
            except (ValueError, KeyError, TypeError, AttributeError):
                pass

        def json_only(samples: list[Sample]) -> list[Pieces | Exception]:
            """The samples' JSON members alone (one over the bound is not read)."""
            small = [s for s in samples if s.json and s.json.size <= MAX_JSON_BYTES]
            got = iter(self.read([Sample(s.tar, s.json, s.json) for s in small]))  # type: ignore[arg-type]
            return [next(got) if s in small else BadSample("over the bound") for s in samples]

        fields = learn_fields(self.samples(tar), json_only)
        types = {n: str(f.type) for n, f in fields.items()}
        write_bytes_atomic(cached, json.dumps(types).encode(), sync=False)
        return fields

    def read(self, samples: list[Sample]) -> list[Pieces | Exception]:
        """Each sample's members, its ranges fetched with the whole batch's at once."""
        wanted = [(s, ranges(s)) for s in samples]
        requests = [(self.paths[s.tar], at, size) for s, runs in wanted for at, size in runs]
        got = iter(fetch_all(self.bucket.fs(), list(requests), self.bucket.concurrency,
                             self.bucket.retries))  # fmt: skip
        out: list[Pieces | Exception] = []
        for _, runs in wanted:
            parts = [next(got) for _ in runs]
            failed = next((p for p in parts if isinstance(p, Exception)), None)
            if failed is not None:
                out.append(failed)
                continue
            out.append(Pieces([(at, bytes(data)) for (at, _), data
                               in zip(runs, parts, strict=True)]))  # fmt: skip
        return out

    def _cache(self, tar: str, what: str) -> Path:
        from indexer.configcache import cache_dir

        size, _, etag = self.fingerprint(tar)
        url = f"{self.bucket.protocol}://{self.paths[tar]}"
        folder = cache_dir() / "tars" / hashlib.sha256(url.encode()).hexdigest()[:32]
        version = hashlib.sha256(f"{INDEX_FORMAT}:{size}:{etag}".encode()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{version}.{what}"


class BucketWebDatasetSource(WebDatasetSource):
    """A webdataset in a bucket: read a batch at a time (each sample's ranges at once), each
    row carrying its tar's ETag (the fingerprint's, so a re-run compares it)."""

    store: BucketTars
    etags = True  # the fingerprint holds the tar's ETag (the error rows keep it too)

    def __init__(
        self, store: BucketTars, label: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        super().__init__(store, label, max_pixels)
        self.types[ETAG] = pa.string()
        self.columns[ETAG] = ETAG

    def sample_of(self, sample: Sample, pieces: Pieces) -> tuple[bytes, dict[str, Any]]:
        data, meta = super().sample_of(sample, pieces)
        return data, {**meta, ETAG: self.store.etag(sample.tar)}

    def read_many(self, locators: list[Any]) -> list[tuple[bytes, dict[str, Any]] | Exception]:
        out: list[Any] = [None] * len(locators)
        todo = []
        for n, locator in enumerate(locators):
            try:
                self._check(locator)
                todo.append(n)
            except Exception as exc:  # failed upstream, in conflict, too big: its error row
                out[n] = exc
        for n, pieces in zip(todo, self.store.read([locators[n] for n in todo]), strict=True):
            try:
                if isinstance(pieces, Exception):
                    raise pieces
                out[n] = self.sample_of(locators[n], pieces)
            except Exception as exc:  # a member that cannot be read: this sample's error row
                out[n] = exc
        return out


def _samples_to(samples: dict[str, Sample | Conflict]) -> dict[str, Any]:
    def member(m: Member | None) -> list[int] | None:
        return None if m is None else [m.offset, m.size, m.crc]

    rows = {k: (["S", member(s.image), member(s.json), member(s.text)] if isinstance(s, Sample)
                else ["C", s.role, list(s.members)]) for k, s in samples.items()}  # fmt: skip
    return {"format": INDEX_FORMAT, "samples": rows}


def _samples_from(doc: dict[str, Any], tar: str) -> dict[str, Sample | Conflict]:
    if doc["format"] != INDEX_FORMAT:
        raise ValueError("another format")

    def member(m: list[int] | None) -> Member | None:
        return None if m is None else Member(int(m[0]), int(m[1]), int(m[2]))

    out: dict[str, Sample | Conflict] = {}
    for key, row in doc["samples"].items():
        if row[0] == "S":
            image = member(row[1])
            assert image is not None
            out[str(key)] = Sample(tar, image, member(row[2]), member(row[3]))
        else:
            out[str(key)] = Conflict(tar, str(row[1]), tuple(str(m) for m in row[2]))
    return out
