"""Hostile webdataset tars (issue 28, rows 6 and 7): a JSON member nested thousands deep, and
one key with two members in one role. Each is its sample's error row naming the cause; the
build goes on, and every indexed row holds its own image and its own caption."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq
import pytest

from indexer.sources.wds import (
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    BadSample,
    Conflict,
    Sample,
    _json_fields,
    _samples,
    json_depth,
    parse_json,
)
from indexer.synthetic import scene
from tests.helpers import BUILD_FLAGS, run_cli
from tests.shapes import jpeg

DEEP = ("[" * 5000 + "]" * 5000).encode()  # ~10 KB, far past any stack json.loads has
DEEP_RECORD = ('{"caption": "deep", "x": ' + "[" * 5000 + "1" + "]" * 5000 + "}").encode()


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    scene(seed, (88, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


def record(i: int, caption: str | None = None) -> bytes:
    """A sample's JSON as img2dataset writes it (the fields the tests look at)."""
    url = f"http://127.0.0.1:9/img/{i}.jpg"
    return json.dumps({"caption": caption or f"scene number {i}", "key": f"{i:09d}",
                       "width": 96, "url": url, "status": "success"}).encode()  # fmt: skip


def write_tar(path: Path, members: list[tuple[str, bytes]], mode: Literal["w", "a"] = "w") -> None:
    """The members in this order; mode "a" appends to the tar as ``tar -r`` does."""
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def sample(i: int, meta: bytes | None = None) -> list[tuple[str, bytes]]:
    """A plain img2dataset sample: KEY.jpg, KEY.json (meta in place of its record), KEY.txt."""
    key = f"{i:09d}"
    return [(f"{key}.jpg", jpeg(i)), (f"{key}.json", meta or record(i)),
            (f"{key}.txt", f"scene number {i}".encode())]  # fmt: skip


def build(source: Path, out: Path) -> None:
    """A build that finishes with some samples failed: exit 5 (partial), no traceback."""
    flags = (*BUILD_FLAGS, "--batch-size", "8", "--max-failures", "10")
    result = run_cli("build", str(source), "--out", str(out), *flags)
    assert result.exit_code == 5 and result.exception is not None, result.output
    assert isinstance(result.exception, SystemExit), result.exception


def rows(out: Path) -> dict[str, dict]:
    table = pq.read_table(out / "shards").drop(["embedding"]).to_pylist()
    keys = [r["key"] for r in table]
    assert len(keys) == len(set(keys))  # the collection's keys are unique
    return {r["key"]: r for r in table}


def errors(out: Path) -> dict[str, dict]:
    table = pq.read_table(out / "errors.parquet").to_pylist()
    assert len(table) == len({r["key"] for r in table})
    return {r["key"]: r for r in table}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- row 6: JSON nested 5,000 deep --------------------------------------------------------


def test_json_depth_counts_brackets_outside_strings() -> None:
    assert json_depth('{"a": [1, {"b": []}]}') == 4
    assert json_depth('{"a": "[[[[{{{{ \\" [[[["}') == 1  # in strings (and escapes): not nesting
    assert json_depth(DEEP.decode()) == 5000
    assert json_depth("") == 0


def test_deep_json_is_refused_the_same_whatever_the_stack() -> None:
    limit = sys.getrecursionlimit()
    try:
        for stack in (200, 100_000):  # json.loads alone: RecursionError, or not, by the stack
            sys.setrecursionlimit(stack)
            for data in (DEEP, DEEP_RECORD):
                with pytest.raises(BadSample, match=r"nests 500[01] levels"):
                    parse_json(data)
    finally:
        sys.setrecursionlimit(limit)
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert parse_json(nested.encode()) is not None  # at the bound: parsed
    with pytest.raises(BadSample):
        parse_json(("[" + nested + "]").encode())
    with pytest.raises(ValueError, match="Expecting"):
        parse_json(b"{not json")  # invalid, not refused: the caller keeps the image


def test_schema_learning_skips_a_deep_json_member(tmp_path: Path) -> None:
    tar = tmp_path / "00000.tar"
    write_tar(tar, sample(1, meta=DEEP_RECORD) + sample(2))
    fields = _json_fields(tar, tar.name)
    assert {"caption", "url", "width", "key"} <= set(fields)
    assert str(fields["width"].type) == "int64"


def test_a_deep_or_huge_json_member_is_its_samples_error_row(tmp_path: Path) -> None:
    """No sidecar: the columns are learned from the JSON members, the deep one first."""
    wds = tmp_path / "wds"
    wds.mkdir()
    huge = json.dumps({"caption": "x" * (MAX_JSON_BYTES + 10)}).encode()
    bracketed = "[[[[{{{{ " * 40 + "scene number 3"  # brackets in a string are not nesting
    write_tar(wds / "00000.tar", sample(1, meta=DEEP_RECORD) + sample(0) + sample(2, meta=huge)
              + sample(3, meta=record(3, bracketed)) + sample(4))  # fmt: skip
    build(wds, tmp_path / "c")
    got, failed = rows(tmp_path / "c"), errors(tmp_path / "c")
    assert sorted(got) == ["000000000", "000000003", "000000004"]
    assert sorted(failed) == ["000000001", "000000002"]
    assert "nests 5001 levels deep" in failed["000000001"]["error"]
    assert "over the limit of" in failed["000000002"]["error"]
    assert {r["stage"] for r in failed.values()} == {"read"}
    assert got["000000003"]["caption"] == bracketed
    for i in (0, 4):
        row = got[f"{i:09d}"]
        assert row["caption"] == f"scene number {i}" and row["content_hash"] == sha(jpeg(i))
        assert row["url"] == f"http://127.0.0.1:9/img/{i}.jpg" and row["source_width"] == 96


# -- row 7: two members in one role --------------------------------------------------------

DUPLICATES = {  # case: (members written, then members appended with tar -r)
    "repeated jpg": ([("000000001.jpg", jpeg(1)), ("000000001.json", record(1))],
                     [("000000001.jpg", jpeg(11))]),
    "repeated json": ([("000000001.jpg", jpeg(1)), ("000000001.json", record(1))],
                      [("000000001.json", record(1, "another caption"))]),
    "dot slash": ([("./000000001.jpg", jpeg(1)), ("000000001.jpg", jpeg(11)),
                   ("000000001.json", record(1))], []),
    "jpg and png": ([("000000001.jpg", jpeg(1)), ("000000001.png", png(11)),
                     ("000000001.json", record(1))], []),
    "two captions": ([("000000001.jpg", jpeg(1)), ("000000001.txt", b"one"),
                      ("000000001.caption", b"two")], []),
}  # fmt: skip
BOTH = {
    "repeated jpg": ("image", "000000001.jpg", "000000001.jpg"),
    "repeated json": ("JSON", "000000001.json", "000000001.json"),
    "dot slash": ("image", "./000000001.jpg", "000000001.jpg"),
    "jpg and png": ("image", "000000001.jpg", "000000001.png"),
    "two captions": ("text", "000000001.txt", "000000001.caption"),
}


def write_case(path: Path, case: str) -> None:
    """The duplicate case between two plain samples (000000000 and 000000002)."""
    first, appended = DUPLICATES[case]
    write_tar(path, sample(0) + first + sample(2))
    if appended:
        write_tar(path, appended, mode="a")


@pytest.mark.parametrize("case", list(DUPLICATES))
def test_the_listing_names_both_members_of_a_duplicate(tmp_path: Path, case: str) -> None:
    tar = tmp_path / "00000.tar"
    write_case(tar, case)
    listed = _samples(tar, tar.name)
    assert sorted(listed) == ["000000000", "000000001", "000000002"]
    conflict = listed["000000001"]
    role, a, b = BOTH[case]
    assert isinstance(conflict, Conflict) and conflict.role == role
    assert [m.split(" (byte ")[0] for m in conflict.members] == [a, b]
    assert len(set(conflict.members)) == 2  # a repeated name told apart by its offset
    assert all(isinstance(listed[k], Sample) for k in ("000000000", "000000002"))


@pytest.mark.parametrize("case", list(DUPLICATES))
def test_a_duplicate_is_one_error_row_and_the_rest_is_indexed(tmp_path: Path, case: str) -> None:
    wds = tmp_path / "wds"
    wds.mkdir()
    write_case(wds / "00000.tar", case)
    build(wds, tmp_path / "c")
    got, failed = rows(tmp_path / "c"), errors(tmp_path / "c")
    assert sorted(got) == ["000000000", "000000002"]  # nothing of the conflicted key indexed
    assert list(failed) == ["000000001"] and failed["000000001"]["stage"] == "read"
    role, a, b = BOTH[case]
    error = failed["000000001"]["error"]
    assert f"2 {role} members" in error and f"{a} (byte " in error and f", {b} (byte " in error
    for i in (0, 2):  # its neighbours: their own picture with their own caption
        row = got[f"{i:09d}"]
        assert row["caption"] == f"scene number {i}" and row["content_hash"] == sha(jpeg(i))


def test_link_members_are_error_rows_not_drops(tmp_path: Path) -> None:
    """A hard link (how tar stores a file twice) and a symbolic link named like an image are
    each their sample's error row; the regular samples are indexed."""
    import io as _io
    import tarfile as _tarfile

    from PIL import Image as _Image

    src = tmp_path / "tars"
    src.mkdir()
    buf = _io.BytesIO()
    _Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "JPEG")
    data = buf.getvalue()
    with _tarfile.open(src / "00000.tar", "w") as tar:
        info = _tarfile.TarInfo("000001.jpg")
        info.size = len(data)
        tar.addfile(info, _io.BytesIO(data))
        for name, kind in (("000002.jpg", _tarfile.LNKTYPE), ("000003.jpg", _tarfile.SYMTYPE)):
            link = _tarfile.TarInfo(name)
            link.type, link.linkname = (
                kind,
                "000001.jpg" if kind == _tarfile.LNKTYPE else "/etc/passwd",
            )
            tar.addfile(link)
    out = tmp_path / "c"
    result = run_cli("build", src, "--out", out, *BUILD_FLAGS, "--max-failures", "0.9")
    assert result.exit_code == 5, result.output
    from indexer.query.collection import Collection

    c = Collection(out)
    assert [c.row_of(i)["key"] for i in range(3) if c.row_of(i)] == ["000001"]
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert sorted(e["key"] for e in errors) == ["000002", "000003"]
    assert all("a link" in e["error"] for e in errors)
