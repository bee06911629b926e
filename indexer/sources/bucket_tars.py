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
    TarChanged,
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
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                pass  # (a damaged cache entry: the tar is indexed again)
        found = self._scan(tar)
        self._keep(cached, json.dumps(_samples_to(found)).encode())
        return found

    def forget(self, tar: str) -> None:
        """Drop the tar's member index (its bytes were not the ones it recorded): the next
        run reads the tar again to index it."""
        self._cache(tar, "members.json").unlink(missing_ok=True)

    def _keep(self, path: Path, data: bytes) -> None:
        """Write a cache entry; the tar's entries for other versions (size, ETag) go."""
        try:
            write_bytes_atomic(path, data, sync=False)
            for older in path.parent.iterdir():
                if not older.name.startswith((path.name.split(".")[0], ".")):
                    older.unlink(missing_ok=True)
        except OSError as exc:
            raise _cache_error(path, exc) from None

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
        """The sidecar's local copy, if the tar has one: a copy that is not Parquet is
        refused in a line naming the object."""
        import pyarrow.parquet as pq

        path = self.sidecars.get(tar)
        if path is None:
            return None
        copy = self.bucket.stage([path])[0]
        try:
            pq.read_schema(copy)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"the sidecar {self.bucket.protocol}://{path} is not a readable "
                             f"Parquet file ({exc}): replace it, or remove it to index its "
                             "tar without it") from None  # fmt: skip
        return copy

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
        self._keep(cached, json.dumps(types).encode())
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
        from indexer.cache_dir import cache_dir

        size, _, etag = self.fingerprint(tar)
        url = f"{self.bucket.protocol}://{self.paths[tar]}"
        folder = cache_dir() / "tars" / hashlib.sha256(url.encode()).hexdigest()[:32]
        version = hashlib.sha256(f"{INDEX_FORMAT}:{size}:{etag}".encode()).hexdigest()[:16]
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _cache_error(folder, exc) from None
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
            except TarChanged as exc:  # the index does not describe the tar: made again
                self.store.forget(locators[n].tar)  # next time
                out[n] = exc
            except Exception as exc:  # a member that cannot be read: this sample's error row
                out[n] = exc
        return out


def _samples_to(samples: dict[str, Sample | Conflict]) -> dict[str, Any]:
    def member(m: Member | None) -> list[int] | None:
        return None if m is None else [m.offset, m.size, m.crc]

    rows = {k: (["S", member(s.image), member(s.json), member(s.text)] if isinstance(s, Sample)
                else ["C", s.role, list(s.members)]) for k, s in samples.items()}  # fmt: skip
    return {"format": INDEX_FORMAT, "samples": rows}


def _samples_from(doc: Any, tar: str) -> dict[str, Sample | Conflict]:
    """A cached member index, checked whole (ValueError if it is not one this version
    writes): every member of a tar indexed from a bucket has its CRC-32."""
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        raise ValueError("not a member index of this format")
    rows = doc["samples"]
    if not isinstance(rows, dict):
        raise ValueError("no samples")

    def member(m: Any, required: bool = False) -> Member | None:
        if m is None and not required:
            return None
        offset, size, crc = (int(v) for v in m)
        if offset < 0 or (size >= 0 and not 0 <= crc <= 0xFFFFFFFF) or size < -1:
            raise ValueError("a member without its place, size or CRC")
        return Member(offset, size, crc)

    out: dict[str, Sample | Conflict] = {}
    for key, row in rows.items():
        if row[0] == "S":
            image = member(row[1], required=True)
            assert image is not None  # (required)
            out[str(key)] = Sample(tar, image, member(row[2]), member(row[3]))
        elif row[0] == "C":
            out[str(key)] = Conflict(tar, str(row[1]), tuple(str(m) for m in row[2]))
        else:
            raise ValueError("neither a sample nor a conflict")
    return out


def _cache_error(path: Path, exc: OSError) -> InputError:
    return InputError(f"indexer's cache cannot keep a tar's member index at {path} "
                      f"({exc.strerror or exc}): set INDEXER_CACHE_DIR to a folder you may "
                      "write to")  # fmt: skip
