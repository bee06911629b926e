"""webdataset tar shards (img2dataset's webdataset output): samples under their own keys."""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from indexer.collection.shards import metadata_names
from indexer.config import DEFAULT_MAX_PIXELS
from indexer.errors import InputError
from indexer.safeio import byte_limit
from indexer.sources.base import SampleFailed
from indexer.sources.folder import IMAGE_EXTENSIONS, is_image_name, printable_key

log = logging.getLogger(__name__)
MAX_JSON_BYTES = 1 << 20  # a sample's JSON or text member
MAX_JSON_DEPTH = 64  # arrays and objects nested in a JSON member (img2dataset's: 1 or 2)
SCHEMA_SAMPLES = 200  # JSON members read to learn the columns when no sidecar names them
SUCCESS = "success"
ETAG = "etag"  # a bucket's tars: the tar's ETag, a column (the fingerprint holds it)
ROLES = ("image", "JSON", "text")  # what a member is to its sample (one of each at most)


@dataclass(frozen=True)
class Member:
    offset: int
    size: int
    crc: int = -1  # CRC-32 of its bytes, where the index was made reading them (a bucket's)


@dataclass(frozen=True)
class Sample:
    """Where one sample's members are in its tar (locator of a listed item)."""

    tar: str
    image: Member
    json: Member | None = None
    text: Member | None = None


@dataclass(frozen=True)
class Conflict:
    """A key with two members in one role (locator of an error item): two images (KEY.jpg
    beside KEY.png), two JSON or two text members, or one name twice (``tar -r`` appends a
    second KEY.jpg; ./KEY.jpg beside KEY.jpg is the same key). Which is the sample cannot be
    told, so none is indexed: the key's error row names the members."""

    tar: str
    role: str  # "image", "JSON" or "text"
    members: tuple[str, ...]  # "NAME (byte OFFSET)", in the tar's order


@dataclass(frozen=True)
class Failed:
    """A sample the sidecar lists as not fetched (locator of an error item)."""

    status: str
    message: str
    url: str | None


class BadSample(ValueError):
    """A sample the tar holds that is not indexed as it stands (members in conflict, a JSON
    or text member over the size or depth bound): its error row (stage "read"), the build
    goes on."""


def is_webdataset(root: Path) -> bool:
    """A folder of .tar files (and their sidecars, stats): no subfolders and no image files at
    its top level (hidden files aside). A photo folder holding a backup.tar stays a folder."""
    if not root.is_dir():
        return False
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    plain = not any(p.is_dir() or is_image_name(p.name) for p in entries)
    return plain and any(_is_tar(p) for p in entries)


class WebDatasetSource:
    """Every sample with an image member in the folder's .tar files (sorted by name).

    A sample is the members sharing a key (the member's path up to the first dot of its file
    name, webdataset's ``__key__``, a leading ./ dropped): one image (jpg, png, webp, ...), and
    optionally JSON (flattened into columns) and text (the caption when the JSON has none).
    A key with two members in one role (two images, two JSON, two text members: see
    Conflict) is one error row naming them, never a guess; so is a sample whose JSON or text
    member is over MAX_JSON_BYTES or whose JSON nests deeper than MAX_JSON_DEPTH. A JSON
    member that is not JSON leaves the sample's columns null (logged). A sidecar
    ``NAME.parquet`` beside ``NAME.tar`` (img2dataset) names the columns and the samples that
    could not be fetched (status other than success): those become error rows with their url.
    """

    def __init__(
        self, root: Path | TarStore, label: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:  # fmt: skip
        self.store = LocalTars(root) if isinstance(root, Path) else root
        self.tars = self.store.names()
        self.label = label or printable_key(self.store.name) or "root"
        self.max_bytes = byte_limit(max_pixels)
        fields = self._fields()
        self.types = {f.name: f.type for f in fields}
        self.columns = metadata_names(list(self.types))

    def describe(self) -> dict[str, Any]:
        return {"kind": "webdataset", "path": self.store.location, "label": self.label,
                "tars": len(self.tars)}  # fmt: skip

    def keys_and_locators(self) -> list[tuple[str, Any, Any]]:
        """Every sample of every tar (a key in two tars is refused), then the sidecars' failed
        samples that no tar holds; fingerprinted by their tar's (size, mtime[, ETag])."""
        listed: dict[str, tuple[str, Any, Any]] = {}
        where: dict[str, str] = {}
        stats = {tar: self.store.fingerprint(tar) for tar in self.tars}
        for tar, print_ in stats.items():
            for key, sample in self.store.samples(tar).items():
                if key in listed:
                    raise InputError(
                        f"sample key {key!r} is in both {where[key]} and {tar}: keys must be "
                        "unique; put the tars in separate folders and build them as two sources"
                    )
                listed[key], where[key] = (key, sample, print_), tar
        for tar, print_ in stats.items():
            for key, failed in self._failures(tar).items():
                listed.setdefault(key, (key, failed, print_))
        return [listed[k] for k in sorted(listed)]

    def metadata_schema(self) -> pa.Schema:
        return pa.schema(
            [pa.field(self.columns[n], t, nullable=True) for n, t in self.types.items()]
        )

    def read(self, locator: Any) -> tuple[bytes, dict[str, Any]]:
        self._check(locator)
        [pieces] = self.store.read([locator])
        if isinstance(pieces, Exception):
            raise pieces
        return self.sample_of(locator, pieces)

    def _check(self, locator: Any) -> None:
        """Raise what a sample that is not read is: failed upstream, in conflict, too big."""
        if isinstance(locator, Failed):
            raise SampleFailed(f"not fetched by its downloader ({locator.status}: "
                               f"{locator.message})")  # fmt: skip
        if isinstance(locator, Conflict):
            raise BadSample(_conflict_message(locator))
        if locator.image.size > self.max_bytes:
            raise ValueError(f"the image member is {locator.image.size} bytes, over the limit "
                             f"of {self.max_bytes} bytes")  # fmt: skip

    def sample_of(self, sample: Sample, pieces: Pieces) -> tuple[bytes, dict[str, Any]]:
        """The image's bytes and the columns, from the pieces of the tar read for it."""
        return pieces.member(sample.image), self._metadata(pieces, sample)

    def url(self, locator: Any) -> str | None:
        """The sample's url (for its error row), where its record gives one."""
        if isinstance(locator, Failed):
            return locator.url
        if isinstance(locator, Conflict):
            return None  # whose url: the members disagree on what the sample is
        [pieces] = self.store.read([locator])
        try:
            if isinstance(pieces, Exception):
                raise pieces
            url = self._metadata(pieces, locator).get(self.columns.get("url", "url"))
        except (OSError, ValueError):
            return None
        return url if isinstance(url, str) else None

    def _metadata(self, pieces: Pieces, sample: Sample) -> dict[str, Any]:
        """The sample's columns; a JSON or text member that cannot be read leaves them null
        (logged): the image is still the sample. One over the size or depth bound raises
        BadSample: the sample is an error row."""
        record: dict[str, Any] = {}
        try:
            if sample.json is not None:
                record = _flatten(parse_json(_bounded(pieces, sample.json, "JSON")))
            if sample.text is not None and record.get("caption") is None:
                text = _bounded(pieces, sample.text, "text")
                record["caption"] = text.decode("utf-8", "replace")
        except BadSample:
            raise
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            log.info("%s: a metadata member of %s cannot be read (%s)", sample.tar,
                     sample.image, exc)  # fmt: skip
        return {self.columns[n]: _coerce(record.get(n), t) for n, t in self.types.items()}

    def _fields(self) -> list[pa.Field]:
        """The metadata columns: the sidecars' (image bytes left out), else those of the
        first tar's JSON members; a caption column whenever samples carry text."""
        fields: dict[str, pa.Field] = {}
        for tar in self.tars:
            sidecar = self.store.sidecar(tar)
            if sidecar is not None:
                for f in _sidecar_schema(sidecar):
                    if not pa.types.is_binary(f.type) and not pa.types.is_large_binary(f.type):
                        fields.setdefault(f.name, pa.field(f.name, _scalar(f.type)))
        if not fields and self.tars:
            fields = self.store.json_fields(self.tars[0])
        fields.setdefault("caption", pa.field("caption", pa.string()))
        return list(fields.values())

    def _failures(self, tar: str) -> dict[str, Failed]:
        sidecar = self.store.sidecar(tar)
        if sidecar is None:
            return {}
        import pyarrow.parquet as pq

        names = _sidecar_schema(sidecar).names
        if "key" not in names or "status" not in names:
            return {}
        wanted = [c for c in ("key", "status", "error_message", "url") if c in names]
        try:
            rows = pq.ParquetFile(sidecar).read(columns=wanted).to_pylist()
        except (OSError, pa.ArrowException) as exc:
            raise _bad_sidecar(sidecar, exc) from exc
        return {
            str(r["key"]): Failed(str(r["status"]), str(r.get("error_message") or "no message"),
                                  r.get("url"))
            for r in rows if r["status"] not in (SUCCESS, None) and r["key"] is not None
        }  # fmt: skip


class TarStore(Protocol):
    """Where a webdataset's tars are, and how their members are read."""

    name: str  # the folder's or the prefix's last part (the source's label)
    location: str  # for the manifest: the folder's path, the prefix's URL

    def names(self) -> list[str]:
        """The tars, sorted."""
        ...

    def fingerprint(self, tar: str) -> tuple[Any, ...]:
        """What changes when the tar does: (size, mtime_ns), with the ETag in a bucket."""
        ...

    def samples(self, tar: str) -> dict[str, Sample | Conflict]:
        """The tar's samples by key (see _samples)."""
        ...

    def sidecar(self, tar: str) -> Path | None:
        """The local path of the tar's img2dataset sidecar (NAME.parquet), if it has one."""
        ...

    def json_fields(self, tar: str) -> dict[str, pa.Field]:
        """The columns the tar's first JSON members hold (see _json_fields)."""
        ...

    def read(self, samples: list[Sample]) -> list[Pieces | Exception]:
        """Each sample's members (within the bounds), or the exception reading them raised."""
        ...


class Pieces:
    """The parts of one tar read for a sample: (offset, bytes) runs covering its members."""

    def __init__(self, runs: list[tuple[int, bytes]]) -> None:
        self.runs = runs

    def member(self, member: Member) -> bytes:
        """The member's bytes; ValueError if the tar ends inside it, TarChanged (a
        ValueError) if they are not the bytes indexed (their CRC-32 differs)."""
        for start, data in self.runs:
            at = member.offset - start
            if at >= 0 and at + member.size <= len(data):  # (an empty member: b"")
                found = data[at : at + member.size]
                if member.crc >= 0 and zlib.crc32(found) != member.crc:
                    raise TarChanged(
                        "the tar's bytes are not the ones its member index recorded (it "
                        "changed, or the cached index is damaged): the next build indexes it "
                        "again (give --retry-failed if the tar itself did not change)"
                    )
                return found
        raise ValueError("the tar ends inside this member (truncated)")


class TarChanged(ValueError):
    """A tar read by range holds other bytes than the ones its member index was made from."""


def ranges(sample: Sample, gap: int = 1 << 16) -> list[tuple[int, int]]:
    """(offset, size) runs to read for a sample: its members within the bounds (a JSON or
    text member over MAX_JSON_BYTES is never read), neighbours within `gap` bytes joined."""
    members = [sample.image] + [m for m in (sample.json, sample.text)
                                if m is not None and 0 <= m.size <= MAX_JSON_BYTES]  # fmt: skip
    runs: list[tuple[int, int]] = []
    for m in sorted(members, key=lambda m: m.offset):
        if runs and m.offset - (runs[-1][0] + runs[-1][1]) <= gap:
            start, size = runs[-1]
            runs[-1] = (start, max(size, m.offset + m.size - start))
        else:
            runs.append((m.offset, m.size))
    return runs


class LocalTars:
    """A folder's .tar files (and their sidecars), read with pread."""

    def __init__(self, root: Path) -> None:
        if not is_webdataset(root):
            raise InputError(f"{root} holds no .tar files: pass the folder of webdataset shards")
        self.root = root.resolve()
        self.name = self.root.name
        self.location = str(self.root)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if _is_tar(p))

    def fingerprint(self, tar: str) -> tuple[Any, ...]:
        st = os.stat(self.root / tar)
        return (st.st_size, st.st_mtime_ns)

    def samples(self, tar: str) -> dict[str, Sample | Conflict]:
        return _samples(self.root / tar, tar)

    def sidecar(self, tar: str) -> Path | None:
        path = self.root / Path(tar).with_suffix(".parquet")
        return path if path.is_file() else None

    def json_fields(self, tar: str) -> dict[str, pa.Field]:
        return _json_fields(self.root / tar, tar)

    def read(self, samples: list[Sample]) -> list[Pieces | Exception]:
        out: list[Pieces | Exception] = []
        for sample in samples:
            try:
                with open(self.root / sample.tar, "rb") as f:
                    out.append(_local_pieces(f, sample))
            except OSError as exc:
                out.append(exc)
        return out


def _local_pieces(f: Any, sample: Sample) -> Pieces:
    return Pieces([(at, os.pread(f.fileno(), size, at)) for at, size in ranges(sample)])


def _is_tar(path: Path) -> bool:
    """A regular .tar file (a FIFO or device would block the listing), not hidden."""
    return path.suffix == ".tar" and path.is_file() and not path.name.startswith(".")


def _sidecar_schema(sidecar: Path) -> pa.Schema:
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(sidecar)
    except (OSError, pa.ArrowException) as exc:
        raise _bad_sidecar(sidecar, exc) from exc


def _bad_sidecar(sidecar: Path, exc: Exception) -> InputError:
    return InputError(f"the sidecar {sidecar} is not a readable Parquet file ({exc}): "
                      "replace it, or remove it to index its tar without it")  # fmt: skip


def _samples(path: Path, name: str) -> dict[str, Sample | Conflict]:
    """The tar's keys with an image member (members read as headers only): a Sample, or a
    Conflict where the key has two members in one role. Keys without an image are not
    samples (their JSON and text members are left out, as before)."""
    try:
        with tarfile.open(path, "r:") as tar:
            return samples_in(tar, name)
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"cannot read the tar {path} ({exc}): replace or remove it") from exc


def samples_in(tar: tarfile.TarFile, name: str, crc: bool = False) -> dict[str, Sample | Conflict]:
    """_samples of an open tar (a file, or a stream read once from start to end); with
    `crc`, each member's bytes are read too and their CRC-32 kept (a tar read later by
    range is then checked to be the one indexed)."""
    found: dict[str, dict[str, list[tuple[str, Member]]]] = {}
    for info in tar:
        key, ext = _split(info.name)
        role = _role(ext) if info.isfile() or info.islnk() or info.issym() else None
        if role is not None:  # a link member counts too: an error row, not a drop
            roles = found.setdefault(key, {r: [] for r in ROLES})
            size = info.size if info.isfile() else -1  # -1: a link, never read
            digest = _crc(tar, info) if crc and size >= 0 else -1
            roles[role].append((info.name, Member(info.offset_data, size, digest)))
    return {k: _sample(name, roles) for k, roles in found.items() if roles["image"]}


def _crc(tar: tarfile.TarFile, info: tarfile.TarInfo) -> int:
    f = tar.extractfile(info)
    assert f is not None  # (a regular file member)
    digest = 0
    while block := f.read(1 << 20):
        digest = zlib.crc32(block, digest)
    return digest


def _role(ext: str) -> str | None:
    """What a file member is to its sample, by extension: image, JSON, text, or None."""
    if f".{ext}" in IMAGE_EXTENSIONS:
        return "image"
    if ext == "json":
        return "JSON"
    return "text" if ext in ("txt", "text", "caption") else None


def _sample(tar: str, roles: dict[str, list[tuple[str, Member]]]) -> Sample | Conflict:
    """One key's members as its Sample, or the first role holding two of them (or a link:
    a hard or symbolic link member, whose bytes are another member's or outside the tar) as
    a Conflict."""
    for role in ROLES:
        links = [n for n, m in roles[role] if m.size < 0]
        if links:
            return Conflict(tar, role, tuple(f"{n} (a link, not a file)" for n in links))
        if len(roles[role]) > 1:
            members = tuple(f"{n} (byte {m.offset})" for n, m in roles[role])
            return Conflict(tar, role, members)
    first = {role: members[0][1] if members else None for role, members in roles.items()}
    image = first["image"]
    assert image is not None  # (only keys with an image are samples)
    return Sample(tar, image, first["JSON"], first["text"])


def _conflict_message(conflict: Conflict) -> str:
    if all(m.endswith("(a link, not a file)") for m in conflict.members):
        return (f"{conflict.tar} holds {', '.join(conflict.members)} for this sample: "
                "a link's bytes are not its own, so it is not indexed: store the file "
                "itself")  # fmt: skip
    return (f"{conflict.tar} holds {len(conflict.members)} {conflict.role} members for this "
            f"sample: {', '.join(conflict.members)}; which one is the sample cannot be told, "
            "so none is indexed: keep one of them (or give each its own key)")  # fmt: skip


def _split(member: str) -> tuple[str, str]:
    """webdataset's key and extension: the path up to the first dot of the file name."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return printable_key(key.removeprefix("./")), ext.lower()


def _bounded(pieces: Pieces, member: Member, what: str) -> bytes:
    """A JSON or text member's bytes; BadSample when it is over MAX_JSON_BYTES (not read)."""
    if member.size > MAX_JSON_BYTES:
        raise BadSample(f"the sample's {what} member of {member.size} bytes is over the limit "
                        f"of {MAX_JSON_BYTES} bytes")  # fmt: skip
    return pieces.member(member)


def parse_json(data: bytes) -> Any:
    """json.loads with bounded nesting: BadSample when arrays and objects nest deeper than
    MAX_JSON_DEPTH (counted by a scan before parsing, so the outcome never depends on the
    stack), ValueError when the bytes are not JSON."""
    text = data.decode(json.detect_encoding(data), "surrogatepass")
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise BadSample(f"the sample's JSON member nests {depth} levels deep, over the limit "
                        f"of {MAX_JSON_DEPTH}")  # fmt: skip
    try:
        return json.loads(text)
    except RecursionError as exc:  # (cannot happen under the bound; typed all the same)
        raise BadSample("the sample's JSON member nests too deep to parse") from exc


_JSON_SPECIAL = re.compile(r'[\[\]{}"\\]')  # what json_depth looks at, found in one pass


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON text: brackets counted outside strings, by a
    loop, never by recursion (text that is not JSON gets a number all the same)."""
    depth = deepest = 0
    in_string, skip = False, -1
    for match in _JSON_SPECIAL.finditer(text):  # one pass, no backtracking
        at, ch = match.start(), match.group()
        if at == skip:  # the character a backslash escapes
            continue
        if in_string:
            if ch == "\\":
                skip = at + 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _flatten(record: Any, prefix: str = "") -> dict[str, Any]:
    """Nested objects as name_sub columns; lists as JSON text."""
    if not isinstance(record, dict):
        return {}
    flat: dict[str, Any] = {}
    for name, value in record.items():
        column = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{column}_"))
        elif isinstance(value, list):
            flat[column] = json.dumps(value)
        else:
            flat[column] = value
    return flat


def _json_fields(path: Path, name: str) -> dict[str, pa.Field]:
    """Columns of the first SCHEMA_SAMPLES JSON members: numbers, booleans, else text."""
    with open(path, "rb") as f:
        return learn_fields(_samples(path, name), lambda s: [_local_pieces(f, s) for s in s])


def learn_fields(
    samples: dict[str, Sample | Conflict],
    read: Callable[[list[Sample]], list[Pieces | Exception]],
) -> dict[str, pa.Field]:
    """The columns of the first SCHEMA_SAMPLES samples' JSON members, read with `read`."""
    first = [
        s
        for s in list(samples.values())[:SCHEMA_SAMPLES]
        if isinstance(s, Sample) and s.json is not None
    ]  # (a Conflict's JSON members
    found: dict[str, pa.DataType] = {}  # disagree: none teaches a column)
    for sample, pieces in zip(first, read(first), strict=True):
        try:
            if isinstance(pieces, Exception):
                raise pieces
            record = _flatten(parse_json(_bounded(pieces, sample.json, "JSON")))  # type: ignore[arg-type]
        except (ValueError, OSError):  # (BadSample too: over the bounds, the sample's error)
            continue
        for column, value in record.items():
            found[column] = _widen(found.get(column), _type_of(value))
    return {n: pa.field(n, t or pa.string()) for n, t in found.items()}


def _type_of(value: Any) -> pa.DataType | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    return pa.string()


def _widen(a: pa.DataType | None, b: pa.DataType | None) -> pa.DataType | None:
    if a is None or b is None or a == b:
        return a or b
    numbers = (pa.int64(), pa.float64())
    return pa.float64() if a in numbers and b in numbers else pa.string()


def _scalar(t: pa.DataType) -> pa.DataType:
    """A sidecar column's type as a shard column: scalars kept, anything else as text."""
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return t
    return pa.string()


def _coerce(value: Any, t: pa.DataType) -> Any:
    """The value in the column's type; None where it does not fit."""
    if value is None:
        return None
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return value if isinstance(value, str) else json.dumps(value)
    if pa.types.is_boolean(t):
        return value if isinstance(value, bool) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if pa.types.is_integer(t):
        if not float(value).is_integer():
            return None
        bits = t.bit_width - (0 if pa.types.is_unsigned_integer(t) else 1)
        low = 0 if pa.types.is_unsigned_integer(t) else -(1 << bits)
        return int(value) if low <= int(value) < (1 << bits) else None  # else: does not fit
    return float(value)
