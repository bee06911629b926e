"""Hostile webdataset tars and Parquet files in a bucket (moto's S3 behind the counting,
fault-injecting proxy of tests/s3server.py): bad input is a one-line error (exit 2, nothing
published), a bad sample is an error row, wrong bytes never become a vector, the member
indexes kept in indexer's cache are checked rather than trusted, and a re-run of an
unchanged prefix reads no object."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from indexer.errors import InputError
from tests.helpers import BUILD_FLAGS, read_embeddings_by_key, run_cli
from tests.shapes import jpeg, write_i2d_parquet, write_webdataset

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from tests.s3server import S3, SECRET, Faults

PARTIAL = (*BUILD_FLAGS, "--batch-size", "8", "--max-failures", "20")


def put(s3: S3, key: str, data: bytes, bucket: str = "photos") -> None:
    client = s3.client()
    if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key=key, Body=data)


def upload(s3: S3, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            put(s3, prefix + path.relative_to(folder).as_posix(), path.read_bytes())


def tar_bytes(members: list[tuple[str, bytes]], links: dict[str, tuple[bytes, str]] | None = None,
              base: bytes = b"") -> bytes:  # fmt: skip
    """A tar of the members in order (appended to `base`, a tar, as ``tar -r`` does), then
    link members NAME -> (type, target)."""
    buffer = io.BytesIO(base)
    with tarfile.open(fileobj=buffer, mode="a" if base else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    return buffer.getvalue()


def record(i: int, caption: str | None = None) -> bytes:
    return json.dumps({"caption": caption or f"scene number {i}", "width": 96,
                       "url": f"http://127.0.0.1:9/img/{i}.jpg"}).encode()  # fmt: skip


def sample(i: int, meta: bytes | None = None) -> list[tuple[str, bytes]]:
    key = f"{i:09d}"
    return [(f"{key}.jpg", jpeg(i)), (f"{key}.json", meta or record(i)),
            (f"{key}.txt", f"scene number {i}".encode())]  # fmt: skip


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rows(out: Path) -> dict[str, dict]:
    table = pq.read_table(out / "shards").drop(["embedding"]).to_pylist()
    return {r["key"]: r for r in table}


def errors(out: Path) -> dict[str, dict]:
    path = out / "errors.parquet"
    return {r["key"]: r for r in pq.read_table(path).to_pylist()} if path.exists() else {}


def refused(result, out: Path, *needles: str) -> None:  # type: ignore[no-untyped-def]
    """Exit 2, one line naming each needle, no traceback, nothing published."""
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output
    assert not (out / "current").exists() and not (out / "versions").exists()


def source_of(url: str):  # type: ignore[no-untyped-def]
    from indexer.config import SourceSpec
    from indexer.sources import open_source

    return open_source(SourceSpec(url))


def index_files(cache: Path, what: str = "members.json") -> list[Path]:
    return sorted((cache / "tars").rglob(f"*.{what}"))


def no_secret_under(*folders: Path) -> None:
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert SECRET.encode() not in path.read_bytes(), path


# -- hostile members -----------------------------------------------------------------------

HUGE = json.dumps({"caption": "x" * ((1 << 20) + 10)}).encode()
DEEP = ('{"caption": "deep", "x": ' + "[" * 5000 + "1" + "]" * 5000 + "}").encode()


def hostile_tar() -> bytes:
    """Good samples 0, 2, 4, 6 around: 1 an image twice (tar -r), 3 a jpg and a png, 5 a
    hard link, 7 a symbolic link to /etc/passwd, 8 a JSON over 1 MiB, 9 JSON 5,000 deep."""
    first = tar_bytes(
        sample(0) + sample(1) + sample(2)
        + [("000000003.jpg", jpeg(3)), ("000000003.png", jpeg(33))]
        + sample(4) + sample(6) + sample(8, meta=HUGE) + sample(9, meta=DEEP),
        links={"000000005.jpg": (tarfile.LNKTYPE, "000000000.jpg"),
               "000000007.jpg": (tarfile.SYMTYPE, "/etc/passwd")},
    )  # fmt: skip
    return tar_bytes([("000000001.jpg", jpeg(11))], base=first)


@pytest.mark.usefixtures("fresh_cache")
def test_hostile_members_in_a_bucket_tar_are_error_rows_never_vectors(
    s3: S3, tmp_path: Path
) -> None:
    put(s3, "wds/00000.tar", hostile_tar())
    out = tmp_path / "c"
    result = run_cli("build", "s3://photos/wds/", "--out", out, *PARTIAL)
    assert result.exit_code == 5, result.output  # partial: the bad samples failed
    assert "Traceback" not in result.output
    got, failed = rows(out), errors(out)
    good = ["000000000", "000000002", "000000004", "000000006"]
    assert sorted(got) == good
    for key in good:
        assert got[key]["content_hash"] == sha(jpeg(int(key))), key
        assert got[key]["caption"] == f"scene number {int(key)}"
    assert sorted(failed) == [f"{i:09d}" for i in (1, 3, 5, 7, 8, 9)]
    assert "2 image members" in failed["000000001"]["error"]
    assert "000000003.png" in failed["000000003"]["error"]
    assert "a link" in failed["000000005"]["error"] and "a link" in failed["000000007"]["error"]
    assert "over the limit" in failed["000000008"]["error"]
    assert "nests 5001 levels deep" in failed["000000009"]["error"]
    # the link member's target was never read as the sample
    assert all(r["content_hash"] != sha(jpeg(0)) for k, r in got.items() if k != "000000000")


@pytest.mark.usefixtures("fresh_cache")
def test_a_truncated_tar_in_a_bucket_is_refused_or_its_cut_sample_fails(
    s3: S3, tmp_path: Path
) -> None:
    """Cut inside the second sample's image: either the whole build is refused in a line
    (the tar is damaged), or the samples before the cut are indexed and the cut one is an
    error row; never a vector of the cut image's first bytes."""
    whole = tar_bytes(sample(0) + sample(1) + sample(2))
    cut = whole.index(jpeg(1)) + len(jpeg(1)) // 2
    put(s3, "cut/00000.tar", whole[:cut])
    out = tmp_path / "c"
    result = run_cli("build", "s3://photos/cut/", "--out", out, *PARTIAL)
    if result.exit_code == 2:
        refused(result, out, "s3://photos/cut/00000.tar")
        return
    assert result.exit_code == 5, result.output
    assert sorted(rows(out)) == ["000000000"] and "000000001" in errors(out)


@pytest.mark.usefixtures("fresh_cache")
def test_a_key_in_two_tars_of_a_prefix_is_refused_in_a_line(s3: S3, tmp_path: Path) -> None:
    put(s3, "two/00000.tar", tar_bytes(sample(0) + sample(1)))
    put(s3, "two/00001.tar", tar_bytes(sample(1) + sample(2)))
    out = tmp_path / "c"
    refused(run_cli("build", "s3://photos/two/", "--out", out, *BUILD_FLAGS), out,
            "000000001", "00000.tar", "00001.tar")  # fmt: skip


# -- the member index cache ----------------------------------------------------------------

DAMAGED = {
    "garbage": b"\x00\xffnot json at all",
    "empty": b"",
    "truncated": b'{"format": 1, "samples": {"000000000": ["S", [512, 10',
    "null": b"null",
    # fixed: AttributeError escapes _samples_from (not in BucketTars.samples' except list)
    "samples a list": b'{"format": 1, "samples": []}',
    # fixed: `assert image is not None` in _samples_from: AssertionError (and under -O, a
    # Sample with image None)
    "image null": b'{"format": 1, "samples": {"000000000": ["S", null, null, null]}}',
    "short member": b'{"format": 1, "samples": {"000000000": ["S", [512], null, null]}}',
    "other format": b'{"format": 99, "samples": {}}',
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_member_index_is_made_again_not_trusted(
    s3: S3, fresh_cache: Path, case: str
) -> None:
    images = {f"{i:09d}": jpeg(i) for i in range(3)}
    put(s3, "wds/00000.tar", tar_bytes(sample(0) + sample(1) + sample(2)))
    first = source_of("s3://photos/wds/")
    want = [(k, loc) for k, loc, _ in first.keys_and_locators()]
    [cached] = index_files(fresh_cache)
    cached.write_bytes(DAMAGED[case])
    s3.faults.gets.clear()
    again = source_of("s3://photos/wds/")
    listed = again.keys_and_locators()  # (no traceback: the entry is read as absent)
    assert [(k, loc) for k, loc, _ in listed] == want
    assert s3.faults.gets.get("/photos/wds/00000.tar", 0) >= 1  # the tar was indexed again
    assert json.loads(cached.read_bytes())["format"] == 1  # and its entry written anew
    got = again.read_many([loc for _, loc, _ in listed])
    assert [g[0] for g in got] == [images[k] for k, _, _ in listed]


@pytest.mark.usefixtures("fresh_cache")
def test_damaged_learned_columns_are_learned_again(s3: S3, fresh_cache: Path) -> None:
    put(s3, "wds/00000.tar", tar_bytes(sample(0) + sample(1)))
    first = source_of("s3://photos/wds/")
    want = first.metadata_schema()
    [fields] = index_files(fresh_cache, "fields.json")
    for damage in (b"[1, 2]", b'{"width": "no-such-type"}', b'{"width": 5}', b"\xff"):
        fields.write_bytes(damage)
        assert source_of("s3://photos/wds/").metadata_schema() == want, damage


def forge(cached: Path, change) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(cached.read_bytes())
    change(doc["samples"])
    cached.write_text(json.dumps(doc))


def test_a_member_index_without_a_crc_never_gives_another_samples_vector(
    s3: S3, fresh_cache: Path, tmp_path: Path
) -> None:
    """The cached index forged: sample 1 points at sample 2's image with CRC -1 (as a link
    member's is: never checked). A bucket tar's index always holds CRCs, so an image member
    without one is a damaged entry: it must not be read as sample 1."""
    put(s3, "wds/00000.tar", tar_bytes(sample(0) + sample(1) + sample(2)))
    source_of("s3://photos/wds/").keys_and_locators()  # (the index, made and cached)
    [cached] = index_files(fresh_cache)
    forge(cached, lambda samples: samples["000000001"].__setitem__(
        1, [*samples["000000002"][1][:2], -1]))  # fmt: skip
    out = tmp_path / "c"
    result = run_cli("build", "s3://photos/wds/", "--out", out, *PARTIAL)
    assert result.exit_code in (0, 5), result.output
    got = rows(out)
    # fixed: Pieces.member skips the check when `member.crc < 0` and _samples_from accepts
    # crc -1 for a sized member: key 000000001 is indexed with sample 2's image
    for key, row in got.items():
        assert row["content_hash"] == sha(jpeg(int(key))), key


def test_a_member_index_proved_wrong_is_made_again_on_the_next_run(
    s3: S3, fresh_cache: Path, tmp_path: Path
) -> None:
    """The cached index damaged: sample 1 points at sample 2's bytes, keeping its own CRC.
    The CRC catches it (an error row, no vector); its message says to run the build again,
    and a run retrying the failed samples (the tar's fingerprint is unchanged) must then
    index sample 1 with its own image (the entry made again)."""
    put(s3, "wds/00000.tar", tar_bytes(sample(0) + sample(1) + sample(2)))
    source_of("s3://photos/wds/").keys_and_locators()
    [cached] = index_files(fresh_cache)
    forge(cached, lambda samples: samples["000000001"][1].__setitem__(
        slice(0, 2), samples["000000002"][1][:2]))  # fmt: skip
    out = tmp_path / "c"
    result = run_cli("build", "s3://photos/wds/", "--out", out, *PARTIAL)
    assert result.exit_code == 5, result.output
    assert sorted(rows(out)) == ["000000000", "000000002"]
    assert "changed" in errors(out)["000000001"]["error"]
    again = run_cli("build", "s3://photos/wds/", "--out", out, *PARTIAL, "--retry-failed")
    # fixed: the entry TarChanged proved wrong stays in the cache (the tar's size and ETag
    # did not change), so "run the build again" fails the same way forever; BucketTars
    # should drop (or remake) a member index whose CRC check failed
    assert again.exit_code == 0, again.output
    got = rows(out)
    assert sorted(got) == ["000000000", "000000001", "000000002"]
    assert all(r["content_hash"] == sha(jpeg(int(k))) for k, r in got.items())


@pytest.mark.usefixtures("fresh_cache")
def test_old_member_indexes_of_a_rewritten_tar_are_not_kept_forever(
    s3: S3, fresh_cache: Path
) -> None:
    """As staged Parquet copies are (one a URL, the newest), a tar rewritten N times leaves
    one member index, not N."""
    for n in range(3):
        put(s3, "wds/00000.tar", tar_bytes(sample(0) + sample(n + 1)))
        assert len(source_of("s3://photos/wds/").keys_and_locators()) == 2
    # fixed: BucketTars._cache never removes an older version's entries (stage() does)
    assert len(index_files(fresh_cache)) == 1, index_files(fresh_cache)


@pytest.mark.parametrize("sidecar", [False, True])
def test_a_cache_folder_that_cannot_be_written_fails_in_a_line_naming_it(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sidecar: bool
) -> None:
    """INDEXER_CACHE_DIR is a file (as a read-only or full disk would, even for root): one
    line naming indexer's cache and how to choose another (the member index, or the
    sidecar's copy, cannot be kept), never a traceback or a line blaming --out."""
    import pyarrow as pa

    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("INDEXER_CACHE_DIR", str(blocker))
    put(s3, "wds/00000.tar", tar_bytes(sample(0) + sample(1)))
    if sidecar:
        buffer = io.BytesIO()
        pq.write_table(pa.table({"key": ["000000000"], "status": ["success"]}), buffer)
        put(s3, "wds/00000.parquet", buffer.getvalue())
    out = tmp_path / "c"
    result = run_cli("build", "s3://photos/wds/", "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 2, result.output
    refused(result, out)
    assert "indexer's cache" in result.output and "INDEXER_CACHE_DIR" in result.output


# -- the store misbehaving -----------------------------------------------------------------


@pytest.mark.usefixtures("fresh_cache")
def test_a_tar_deleted_after_listing_is_a_line_then_error_rows(s3: S3, tmp_path: Path) -> None:
    put(s3, "wds/00000.tar", tar_bytes(sample(0) + sample(1)))
    put(s3, "wds/00001.tar", tar_bytes(sample(2)))
    early = source_of("s3://photos/wds/")  # listed (and the first tar's columns learned)
    s3.client().delete_object(Bucket="photos", Key="wds/00001.tar")
    with pytest.raises(InputError, match=re.escape("s3://photos/wds/00001.tar")):
        early.keys_and_locators()  # the tar to index is gone: a line, no traceback
    late = source_of("s3://photos/wds/")
    listed = late.keys_and_locators()
    s3.client().delete_object(Bucket="photos", Key="wds/00000.tar")
    got = late.read_many([loc for _, loc, _ in listed])
    assert all(isinstance(g, Exception) for g in got), got  # error rows, never bytes


def test_throttling_during_the_scan_and_the_range_reads_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_cache: Path
) -> None:
    """30% of object GETs answered 503 SlowDown, the whole-tar scans and the ranges alike:
    the build completes with every sample its own image; a re-run reads nothing; no secret
    lands in the collection or the cache."""
    server = S3(Faults(throttle=0.3, seed=7))
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        images = write_webdataset(tmp_path / "wds", 0, 6, failed=(3,))
        images |= write_webdataset(tmp_path / "wds", 1, 4, sidecar=False)
        upload(server, tmp_path / "wds", "wds/")
        out = tmp_path / "c"
        secret = ("--storage-option", f"secret={SECRET}", "--storage-option",
                  "key=testing-key-id")  # fmt: skip
        result = run_cli("build", "s3://photos/wds/", "--out", out, *PARTIAL, *secret)
        assert result.exit_code == 0, result.output  # (a sample failed upstream: not partial)
        assert server.faults.throttled > 0
        got = rows(out)
        assert sorted(got) == sorted(images)
        assert all(r["content_hash"] == sha(images[k]) for k, r in got.items())
        assert list(errors(out)) == ["000000003"]
        assert SECRET not in result.output
        no_secret_under(out, fresh_cache)
        reads = server.faults.object_gets()
        again = run_cli("build", "s3://photos/wds/", "--out", out, *PARTIAL, *secret)
        assert again.exit_code in (0, 5) and "9 items unchanged" in again.output, again.output
        assert server.faults.object_gets() == reads  # nothing read: the indexes are kept
    finally:
        server.stop()


# -- prefixes of odd shapes ----------------------------------------------------------------


@pytest.mark.usefixtures("fresh_cache")
def test_a_garbage_sidecar_is_refused_naming_the_object(s3: S3, tmp_path: Path) -> None:
    put(s3, "wds/00000.tar", tar_bytes(sample(0)))
    put(s3, "wds/00000.parquet", b"PAR1 this is not parquet PAR1")
    out = tmp_path / "c"
    result = run_cli("build", "s3://photos/wds/", "--out", out, *BUILD_FLAGS)
    # fixed: the message names the staged copy in indexer's cache (and says to remove it),
    # not s3://photos/wds/00000.parquet (wds._bad_sidecar gets the local path)
    refused(result, out, "s3://photos/wds/00000.parquet")


@pytest.mark.usefixtures("fresh_cache")
def test_hf_on_a_tar_prefix_is_refused_in_a_line(s3: S3, tmp_path: Path) -> None:
    put(s3, "wds/00000.tar", tar_bytes(sample(0)))
    out = tmp_path / "c"
    refused(run_cli("build", "hf:s3://photos/wds/", "--out", out, *BUILD_FLAGS), out,
            "hf:s3://photos/wds/")  # fmt: skip


@pytest.mark.usefixtures("fresh_cache")
def test_hidden_objects_beside_tars_leave_them_a_webdataset(s3: S3, tmp_path: Path) -> None:
    """As in a folder (is_webdataset skips hidden entries, files and folders alike): a
    hidden tar is not a shard, and a hidden sub-prefix does not make the tars images."""
    put(s3, "wds/00000.tar", tar_bytes(sample(0) + sample(1)))
    put(s3, "wds/.00009.tar", tar_bytes(sample(9)))
    put(s3, "wds/.DS_Store", b"\x00\x00")
    source = source_of("s3://photos/wds/")
    assert source.describe()["kind"] == "webdataset" and source.describe()["tars"] == 1
    assert [k for k, _, _ in source.keys_and_locators()] == ["000000000", "000000001"]
    put(s3, "wds/.meta/notes.txt", b"written by a tool")
    # fixed: BucketSource.holds counts a hidden sub-prefix as a sub-prefix ("images"): the
    # build says "the sources hold no images"; a folder with a .meta/ stays a webdataset
    assert source_of("s3://photos/wds/").describe()["kind"] == "webdataset"


@pytest.mark.usefixtures("fresh_cache")
def test_tars_beside_a_non_sidecar_parquet_read_as_the_same_folder(s3: S3, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    write_webdataset(folder, 0, 4)
    write_i2d_parquet(folder, 7, 3)  # 00007.parquet has no 00007.tar
    upload(s3, folder, "mixed/")
    here, there = source_of(str(folder)), source_of("s3://photos/mixed/")
    assert there.describe()["kind"] == here.describe()["kind"] == "webdataset"
    assert [k for k, _, _ in there.keys_and_locators()] == [
        k for k, _, _ in here.keys_and_locators()
    ]


@pytest.mark.usefixtures("fresh_cache")
def test_a_parquet_prefix_with_a_file_that_is_not_parquet_is_refused(
    s3: S3, tmp_path: Path
) -> None:
    write_i2d_parquet(tmp_path / "i2d", 0, 3)
    upload(s3, tmp_path / "i2d", "i2d/")
    put(s3, "i2d/00001.parquet", b"PAR1" + b"\x00" * 64 + b"PAR1")
    out = tmp_path / "c"
    result = run_cli("build", "s3://photos/i2d/", "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "cannot open the Parquet files under s3://photos/i2d/" in result.output
    assert not (out / "current").exists() and not (out / "versions").exists()
    # fixed: --no-progress does not silence datasets' "Generating train split" bars
    # (hf._load_files): the one-line error comes after progress lines
    refused(result, out)


def test_a_parquet_object_overwritten_with_the_same_size_is_read_anew(
    s3: S3, tmp_path: Path, fresh_cache: Path
) -> None:
    """Other image bytes, the same object size: the ETag differs, so the staged copy and the
    row's vector must be the new ones; an unchanged re-run reads no object."""
    import pyarrow as pa

    records = [{"key": f"{i:09d}", "caption": f"scene {i}"} for i in range(3)]

    def table(images: list[bytes]) -> bytes:  # fmt: skip
        buffer = io.BytesIO()
        t = pa.table({"key": [r["key"] for r in records],
                      "caption": [r["caption"] for r in records],
                      "jpg": pa.array(images, pa.binary())})  # fmt: skip
        pq.write_table(t, buffer, compression="none", write_statistics=False)
        return buffer.getvalue()

    old = [jpeg(i) for i in range(3)]
    new = list(old)
    from PIL import Image

    shifted = io.BytesIO()  # another picture of exactly the same byte length
    for quality in range(95, 5, -1):
        shifted = io.BytesIO()
        Image.open(io.BytesIO(jpeg(40))).resize(Image.open(io.BytesIO(old[1])).size).save(
            shifted, format="JPEG", quality=quality)  # fmt: skip
        if len(shifted.getvalue()) <= len(old[1]):
            break
    data = shifted.getvalue()
    new[1] = data[:-2] + b"\x00" * (len(old[1]) - len(data)) + data[-2:]  # padded before EOI
    assert len(new[1]) == len(old[1]) and new[1] != old[1]
    first, second = table(old), table(new)
    assert len(first) == len(second)
    put(s3, "pq/00000.parquet", first)
    out = tmp_path / "c"
    assert run_cli("build", "s3://photos/pq/", "--out", out, *BUILD_FLAGS).exit_code == 0
    before = read_embeddings_by_key(out)
    reads = s3.faults.object_gets()
    same = run_cli("build", "s3://photos/pq/", "--out", out, *BUILD_FLAGS)
    assert same.exit_code == 0 and "3 items unchanged" in same.output, same.output
    assert s3.faults.object_gets() == reads
    put(s3, "pq/00000.parquet", second)
    changed = run_cli("build", "s3://photos/pq/", "--out", out, *BUILD_FLAGS)
    assert changed.exit_code == 0, changed.output
    got = rows(out)
    assert got["000000001"]["content_hash"] == sha(new[1]), changed.output
    assert got["000000000"]["content_hash"] == sha(old[0])
    after = read_embeddings_by_key(out)
    assert not (after["000000001"] == before["000000001"]).all()


# -- a clean bucket webdataset, read back ---------------------------------------------------


def test_a_bucket_webdataset_reruns_verifies_and_answers_queries(
    s3: S3, tmp_path: Path, fresh_cache: Path
) -> None:
    images = write_webdataset(tmp_path / "wds", 0, 6)
    images |= write_webdataset(tmp_path / "wds", 1, 4)
    upload(s3, tmp_path / "wds", "wds/")
    out = tmp_path / "c"
    result = run_cli("build", "s3://photos/wds/", "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    reads = s3.faults.object_gets()
    again = run_cli("build", "s3://photos/wds/", "--out", out, *BUILD_FLAGS)
    assert again.exit_code == 0 and "10 items unchanged" in again.output, again.output
    assert s3.faults.object_gets() == reads  # nothing read
    verified = run_cli("verify", out)
    assert verified.exit_code == 0 and "reproduces the stored vectors" in verified.output, \
        verified.output  # fmt: skip
    grid = tmp_path / "grid.png"
    shown = run_cli("query", "--id", "000010002", "--index", out, "-k", "3", "--grid", grid)
    assert shown.exit_code == 0 and "000010002" in shown.output, shown.output
    assert grid.stat().st_size > 0
    from indexer.query.collection import Collection

    assert Collection(out).image_of("000010002") == images["000010002"]
    missing = run_cli("query", "--id", "no-such-key", "--index", out, "-k", "3")
    assert missing.exit_code != 0 and "Traceback" not in missing.output
    assert len(missing.output.strip().splitlines()) == 1, missing.output
    no_secret_under(out, fresh_cache)
