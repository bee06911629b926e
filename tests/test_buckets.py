"""Bucket sources (s3://) against moto's S3 server on 127.0.0.1, behind a proxy that counts
object GETs and injects latency and 503 SlowDown: through the CLI, as a user runs them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from indexer.errors import InputError
from indexer.sources.bucket import BucketSource, is_bucket_url, parse_options
from tests.helpers import BUILD_FLAGS, read_embeddings_by_key, run_cli

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from tests.s3server import S3, SECRET, Faults


def upload(s3: S3, folder: Path, bucket: str = "photos", prefix: str = "pics/") -> None:
    client = s3.client()
    if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=bucket)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, prefix + path.relative_to(folder).as_posix())


def built_from_bucket(s3: S3, corpus: Path, tmp_path: Path) -> Path:
    """The corpus uploaded to s3://photos/pics/ and built from there, at tmp_path/c."""
    upload(s3, corpus)
    out = tmp_path / "c"
    result = run_cli("build", "s3://photos/pics/", "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    return out


def built_alike(s3: S3, folder: Path, prefix: str, tmp_path: Path, count: int) -> tuple[Path, Path]:
    """folder uploaded to s3://photos/PREFIX, built from both: the same keys (count) and
    vectors. The two collections, local then remote."""
    upload(s3, folder, prefix=prefix)
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert run_cli("build", folder, "--out", local, *BUILD_FLAGS).exit_code == 0
    result = run_cli("build", f"s3://photos/{prefix}", "--out", remote, *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    want, got = read_embeddings_by_key(local), read_embeddings_by_key(remote)
    assert sorted(got) == sorted(want) and len(got) == count
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6)
    return local, remote


def test_a_bucket_build_equals_the_folder_build(s3: S3, corpus: Path, tmp_path: Path) -> None:
    upload(s3, corpus)
    folder, bucket = tmp_path / "folder", tmp_path / "bucket"
    assert run_cli("build", corpus, "--out", folder, *BUILD_FLAGS).exit_code == 0
    result = run_cli("build", "s3://photos/pics/", "--out", bucket, *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    want, got = read_embeddings_by_key(folder), read_embeddings_by_key(bucket)
    assert sorted(got) == sorted(want) and len(got) == 28
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6)
    assert s3.faults.object_gets() == 28  # each object read once, no HEAD before it
    assert max(s3.faults.gets.values()) == 1


def test_a_rerun_reads_nothing_and_finds_overwrites_deletes_and_additions(
    s3: S3, corpus: Path, tmp_path: Path
) -> None:
    out = built_from_bucket(s3, corpus, tmp_path)
    before = s3.faults.object_gets()
    result = run_cli("build", "s3://photos/pics/", "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 0 and "Nothing changed" in result.output, result.output
    assert s3.faults.object_gets() == before  # the listing alone: zero object GETs
    client = s3.client()
    original = corpus / "group0" / "scene0004.jpg"
    replaced = tmp_path / "same-size.jpg"
    data = bytearray(original.read_bytes())
    assert data[6:10] == b"JFIF"
    data[15] ^= 0x01  # same size, other bytes: the JFIF header's pixel density
    replaced.write_bytes(bytes(data))
    client.upload_file(str(replaced), "photos", "pics/group0/scene0004.jpg")
    client.delete_object(Bucket="photos", Key="pics/group1/scene0005.png")
    Image.new("RGB", (50, 40), (1, 2, 3)).save(tmp_path / "new.png")
    client.upload_file(str(tmp_path / "new.png"), "photos", "pics/new.png")
    s3.faults.gets.clear()
    result = run_cli("build", "s3://photos/pics/", "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    assert "26 unchanged, 1 deleted" in result.output, result.output
    assert "(1 new, 1 changed)" in result.output, result.output
    changed = {"/photos/pics/group0/scene0004.jpg", "/photos/pics/new.png"}
    assert changed <= set(s3.faults.gets)  # read: the changed and the new object, and 8
    assert len(s3.faults.gets) <= len(changed) + 8  # stored ones that check the model
    assert max(s3.faults.gets.values()) == 1  # none twice (the pre-check's bytes are kept)
    keys = set(read_embeddings_by_key(out))
    assert "new.png" in keys and "group1/scene0005.png" not in keys and len(keys) == 28


def test_throttled_reads_are_retried_and_the_build_completes(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = S3(Faults(throttle=0.1, seed=1))
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        upload(server, corpus)
        out = tmp_path / "c"
        result = run_cli("build", "s3://photos/pics/", "--out", out, *BUILD_FLAGS)
        assert result.exit_code == 0, result.output
        assert server.faults.throttled > 0 and len(read_embeddings_by_key(out)) == 28
    finally:
        server.stop()


def test_no_secret_reaches_anything_the_run_writes(s3: S3, corpus: Path, tmp_path: Path) -> None:
    upload(s3, corpus)
    out = tmp_path / "c"
    result = run_cli("build", "s3://photos/pics/", "--out", out, *BUILD_FLAGS,
                     "--storage-option", f"secret={SECRET}", "--storage-option",
                     "key=testing-key-id")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    ("url", "env", "message"),
    [
        ("s3://missing-bucket/pics/", {}, "does not exist"),
        ("s3://photos/pics/", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "cannot be listed"),
        ("s3://", {}, "name a bucket"),
    ],
)
def test_a_store_that_cannot_be_listed_fails_at_once_in_a_line(
    s3: S3, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str,
    env: dict[str, str], message: str,
) -> None:  # fmt: skip
    upload(s3, corpus)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    out = tmp_path / "c"
    result = run_cli("build", url, "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (out / "current").exists() and not (out / "versions").exists()  # no version


def test_an_object_changed_after_listing_is_an_error_row_never_a_vector(
    s3: S3, tmp_path: Path
) -> None:
    folder = tmp_path / "src"
    folder.mkdir()
    for n in range(3):
        Image.new("RGB", (40, 30), (80 * n, 9, 9)).save(folder / f"{n}.png")
    upload(s3, folder)
    source = BucketSource("s3://photos/pics/")
    listed = source.keys_and_locators()
    Image.new("RGB", (41, 30), (255, 255, 255)).save(tmp_path / "other.png")
    s3.client().upload_file(str(tmp_path / "other.png"), "photos", "pics/1.png")
    results = source.read_many([locator for _, locator, _ in listed])
    assert [isinstance(r, Exception) for r in results] == [False, True, False]
    assert "changed after it was listed" in str(results[1])


def test_urls_and_options_are_recognised() -> None:
    assert all(map(is_bucket_url, ["s3://b/p", "gs://b", "az://c/p", "abfs://c", "S3://b"]))
    assert not any(map(is_bucket_url, ["/data/s3://x", "hf:x", "photos", "http://x/y"]))
    assert parse_options((("anon", "true"), ("max_pool", "32"), ("endpoint_url", "http://h"))) == {
        "anon": True, "max_pool": 32, "endpoint_url": "http://h"}  # fmt: skip


def bucket_job(folder: Path, out: str, options: str) -> Path:
    """A job file in folder building s3://photos/pics/ into folder/out, with `options` (its
    storage options' TOML)."""
    job = folder / "job.toml"
    job.write_text(
        f'sources = ["s3://photos/pics/"]\nout = "{out}"\npretrained = false\nworkers = 0\n'
        f'progress = false\nprecision = "fp32"\n\n{options}\n'
    )
    return job


def test_table_options_are_given_key_by_key() -> None:
    """s3fs takes config_kwargs and client_kwargs as tables: TABLE.KEY=VALUE pairs make
    them; text where a table goes, or a table given both ways, is one line naming it."""
    pairs = (("config_kwargs.read_timeout", "30"), ("client_kwargs.region_name", "eu-west-1"),
             ("config_kwargs.max_pool_connections", "8"), ("anon", "false"))  # fmt: skip
    assert parse_options(pairs) == {
        "config_kwargs": {"read_timeout": 30, "max_pool_connections": 8},
        "client_kwargs": {"region_name": "eu-west-1"}, "anon": False}  # fmt: skip
    for bad in ((("config_kwargs", "x"), ("config_kwargs.a", "1")), (("config_kwargs.", "1"),)):
        with pytest.raises(InputError, match="config_kwargs is given as text and as a table"):
            parse_options(bad)
    with pytest.raises(InputError, match=r"config_kwargs.KEY=VALUE"):
        BucketSource("s3://b/p", options=parse_options((("config_kwargs", "x"),))).fs()


def test_table_options_reach_s3fs_from_the_cli_and_a_job_file(
    s3: S3, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload(s3, corpus)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    result = run_cli("build", "s3://photos/pics/", "--out", tmp_path / "cli", *BUILD_FLAGS,
                     "--storage-option", f"client_kwargs.endpoint_url={s3.endpoint}",
                     "--storage-option", "config_kwargs.read_timeout=20")  # fmt: skip
    assert result.exit_code == 0, result.output
    job = bucket_job(
        tmp_path, "job", f'[storage_options.client_kwargs]\nendpoint_url = "{s3.endpoint}"'
    )
    result = run_cli("run", job)
    assert result.exit_code == 0, result.output
    assert (
        read_embeddings_by_key(tmp_path / "job").keys()
        == read_embeddings_by_key(tmp_path / "cli").keys()
        and len(read_embeddings_by_key(tmp_path / "job")) == 28
    )
    result = run_cli("build", "s3://photos/pics/", "--out", tmp_path / "bad", *BUILD_FLAGS,
                     "--storage-option", "config_kwargs=x")  # fmt: skip
    assert result.exit_code == 2 and "config_kwargs.KEY=VALUE" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_manifest_keeps_the_url_and_verify_reads_the_objects(
    s3: S3, corpus: Path, tmp_path: Path
) -> None:
    out = built_from_bucket(s3, corpus, tmp_path)
    import json

    manifest = json.loads(((out / "current").resolve() / "manifest.json").read_text())
    assert manifest["sources"][0]["kind"] == "bucket"
    assert manifest["sources"][0]["path"] == "s3://photos/pics/"
    result = run_cli("verify", out)
    assert result.exit_code == 0 and "reproduces the stored vectors" in result.output, result.output
    shard = next(((out / "current").resolve() / "shards").glob("*.parquet"))
    etags = pq.read_table(shard, columns=["etag"]).column("etag").to_pylist()
    assert all(isinstance(e, str) and len(e) == 32 for e in etags)
    shutil.rmtree(out)


def test_a_job_file_builds_from_a_bucket_with_its_storage_options(
    s3: S3, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload(s3, corpus)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the job file names the endpoint instead
    job = bucket_job(tmp_path, "c", f'[storage_options]\nendpoint_url = "{s3.endpoint}"')
    result = run_cli("run", job)
    assert result.exit_code == 0, result.output
    assert len(read_embeddings_by_key(tmp_path / "c")) == 28


@pytest.mark.parametrize("shipped", ["kubernetes/cronjob-bucket.yaml", "cron/bucket.toml"])
def test_the_shipped_bucket_jobs_run_against_a_store(
    s3: S3, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shipped: str
) -> None:
    """The example job, its bucket, output and endpoint pointed at the test's store; the
    Kubernetes one takes its credentials from a Secret, never from the job file."""
    yaml = pytest.importorskip("yaml")
    path = Path(__file__).parents[1] / "jobs" / shipped
    if path.suffix == ".yaml":
        config_map, cron_job = yaml.safe_load_all(path.read_text())
        text = config_map["data"]["photos.toml"]
        [container] = cron_job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        secrets = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        assert secrets == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    else:
        text = path.read_text()
    import tomllib

    options = tomllib.loads(text)["storage_options"]
    assert not {"key", "secret", "token", "password"} & set(options)  # no credential in it
    upload(s3, corpus, bucket="photos-bucket", prefix="photos/")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    job = tmp_path / "job.toml"
    job.write_text(_job_for_test(text, tmp_path / "c", s3.endpoint))
    result = run_cli("run", job)
    assert result.exit_code == 0, result.output
    assert len(read_embeddings_by_key(tmp_path / "c")) == 28


def _job_for_test(text: str, out: Path, endpoint: str) -> str:
    """The shipped job with the test's output and endpoint, and the test settings (seeded
    weights, no worker processes) placed before its [storage_options] table."""
    head, table, rest = text.partition("[storage_options]")
    head = head.replace("/data/photos.idx", str(out))
    head += 'pretrained = false\nworkers = 0\nprecision = "fp32"\n\n'
    return head + table + rest.replace("https://s3.eu-west-1.amazonaws.com", endpoint)


def test_the_service_loads_a_bucket_collection_and_reads_its_thumbnails(
    s3: S3, corpus: Path, tmp_path: Path
) -> None:
    """Loading checks the model on objects read back from the bucket; thumbnails come from
    the objects, and one deleted since is a 404, not a traceback."""
    from tests.test_serve_hostile import served

    out = built_from_bucket(s3, corpus, tmp_path)
    with served(out) as server:
        status, data = server.request("GET", "/api/collections/c/items/0/thumbnail?size=64")
        assert status == 200 and data[:2] == b"\xff\xd8"
        key = server.registry.get("c").collection.row_of(1)["key"]
        s3.client().delete_object(Bucket="photos", Key=f"pics/{key}")
        status, data = server.request("GET", "/api/collections/c/items/1/thumbnail")
        assert status == 404 and b"can no longer be read" in data


@pytest.mark.parametrize(
    "url", ["s3://photos/pics/?versionId=1", "s3://photos/pics#x", "s3://a//b"]
)
def test_a_prefix_with_a_query_is_refused_and_never_stored(url: str) -> None:
    with pytest.raises(InputError, match=r"without \? or #") as caught:
        BucketSource(url)
    assert "versionId" not in str(caught.value)


def test_items_are_read_back_with_the_storage_options_given_now(
    s3: S3, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No endpoint in the environment: build, verify, query, the API and the service each take
    --storage-option (never stored) and read the objects back through it."""
    from indexer.query.collection import Collection
    from tests.test_serve_hostile import served

    upload(s3, corpus)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    option = ("--storage-option", f"endpoint_url={s3.endpoint}")
    out = tmp_path / "c"
    result = run_cli("build", "s3://photos/pics/", "--out", out, *BUILD_FLAGS, *option)
    assert result.exit_code == 0, result.output
    result = run_cli("verify", out, *option)
    assert result.exit_code == 0 and "reproduces the stored vectors" in result.output, result.output
    options = (("endpoint_url", s3.endpoint),)
    collection = Collection(out, storage_options=options)
    key = collection.row_of(0)["key"]
    stored = s3.client().get_object(Bucket="photos", Key=f"pics/{key}")["Body"].read()
    assert collection.image_of(key) == stored
    grid = tmp_path / "grid.png"
    result = run_cli("query", "--id", key, "--index", out, "-k", "3", "--grid", grid, *option)
    assert result.exit_code == 0 and grid.stat().st_size > 0, result.output
    with served(out, storage_options=options) as server:
        status, data = server.request("GET", "/api/collections/c/items/0/thumbnail?size=64")
        assert status == 200 and data[:2] == b"\xff\xd8"
    for path in out.rglob("*"):  # the endpoint was given, never written
        if path.is_file():
            assert s3.endpoint.encode() not in path.read_bytes(), path


def test_a_prefix_is_listed_in_parts_at_once_as_one_listing_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Objects at the top, a chain of single sub-prefixes, then many sub-prefixes: the split
    listing finds exactly what one flat listing finds, and lists the parts concurrently."""
    from indexer.sources.bucket import BucketSource

    server = S3(Faults(latency=0.05))
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        client = server.client()
        client.create_bucket(Bucket="deep")
        keys = ["top.jpg", "notes.txt", "only/.hidden.jpg"]
        keys += [f"only/one/d{d}/e{e}/img{n}.png" for d in range(6) for e in range(2)
                 for n in range(3)]  # fmt: skip
        for key in keys:
            client.put_object(Bucket="deep", Key=key, Body=b"\x89PNG" + key.encode())
        source = BucketSource("s3://deep/")
        listed = source.keys_and_locators()
        flat = source.fs().find("deep", detail=True)
        want = sorted(p.split("/", 1)[1] for p in flat
                      if p.endswith((".jpg", ".png")) and "/." not in p)  # fmt: skip
        assert [key for key, _, _ in listed] == want and len(want) == 37
        assert all(fp[2] == loc[2] and len(fp[2]) == 32 for _, loc, fp in listed)  # ETags
        assert server.faults.most_listing >= 2  # the six d* parts were listed at once
    finally:
        server.stop()


def test_renamed_objects_are_read_together_once_and_keep_their_vectors(
    s3: S3, corpus: Path, tmp_path: Path
) -> None:
    """Objects moved to other keys: the run reads each once, several at a time (not one
    request after another), finds every one's bytes stored, and embeds nothing."""
    out = built_from_bucket(s3, corpus, tmp_path)
    before = read_embeddings_by_key(out)
    client = s3.client()
    moved = sorted(k for k in before if k.startswith("group2/"))
    for key in moved:
        client.copy_object(Bucket="photos", Key=f"pics/moved/{key}",
                           CopySource={"Bucket": "photos", "Key": f"pics/{key}"})  # fmt: skip
        client.delete_object(Bucket="photos", Key=f"pics/{key}")
    s3.faults.gets.clear()
    s3.faults.most_getting = 0
    result = run_cli("build", "s3://photos/pics/", "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    assert s3.faults.lists and set(s3.faults.gets) == {f"/photos/pics/moved/{k}" for k in moved}
    assert all(n == 1 for n in s3.faults.gets.values()), s3.faults.gets
    assert s3.faults.most_getting >= 2  # read together
    after = read_embeddings_by_key(out)
    assert set(after) == {k for k in before if k not in moved} | {f"moved/{k}" for k in moved}
    runs = (out / "runs.jsonl").read_text().splitlines()
    assert '"reused": 6' in runs[-1] and len(moved) == 6, runs[-1]  # no vector made again
    for key in moved:
        assert np.array_equal(after[f"moved/{key}"], before[key])


@pytest.mark.usefixtures("fresh_cache")  # (the staged files are kept there by ETag)
def test_img2dataset_parquet_in_a_bucket_builds_as_its_local_copy(s3: S3, tmp_path: Path) -> None:
    """img2dataset's parquet output under a prefix is a dataset, as the same files in a
    folder are: the same keys, vectors, columns and error rows; a re-run reads no object
    (datasets keeps each file by its ETag); an overwritten file's rows are found."""
    import json

    from tests.shapes import write_i2d_parquet

    folder = tmp_path / "i2d"
    write_i2d_parquet(folder, 0, 10, failed=(4,))
    write_i2d_parquet(folder, 1, 5)
    _, remote = built_alike(s3, folder, "i2d/", tmp_path, 14)
    rows = {r["key"]: r for r in pq.read_table(remote / "shards").to_pylist()}
    assert rows["000000001"]["caption"] == "scene number 1"
    failed = pq.read_table(remote / "errors.parquet").to_pylist()
    assert [(r["key"], r["url"]) for r in failed] == [("000000004",
                                                       "http://127.0.0.1:9/img/4.jpg")]  # fmt: skip
    source = json.loads((remote / "manifest.json").read_text())["sources"][0]
    assert source["kind"] == "hf" and source["name"] == "s3://photos/i2d/"
    assert s3.faults.gets == {"/photos/i2d/00000.parquet": 1, "/photos/i2d/00001.parquet": 1}

    again = run_cli("build", "s3://photos/i2d/", "--out", remote, *BUILD_FLAGS)
    assert again.exit_code == 0 and "14 items unchanged" in again.output, again.output
    assert s3.faults.object_gets() == 2  # nothing read again
    write_i2d_parquet(folder, 1, 6)  # a sixth row in the second file
    s3.client().upload_file(str(folder / "00001.parquet"), "photos", "i2d/00001.parquet")
    changed = run_cli("build", "s3://photos/i2d/", "--out", remote, *BUILD_FLAGS)
    assert changed.exit_code == 0, changed.output
    assert len(read_embeddings_by_key(remote)) == 15, changed.output
    shown = run_cli("query", "--id", "000010005", "--index", remote, "-k", "1", "--json")
    assert shown.exit_code == 0 and "000010005" in shown.output, shown.output
    from indexer.cache_dir import cache_dir

    copies = sorted(p.name[17:] for p in (cache_dir() / "objects").rglob("*.parquet"))
    assert copies == ["00000.parquet", "00001.parquet"]  # one copy a file: the newest


def test_a_bucket_of_parquet_files_under_hf_or_not_is_the_same_source(
    s3: S3, tmp_path: Path
) -> None:
    from indexer.config import SourceSpec
    from indexer.sources import open_source
    from tests.shapes import write_i2d_parquet

    write_i2d_parquet(tmp_path / "i2d", 0, 3)
    upload(s3, tmp_path / "i2d", prefix="i2d/")
    upload(s3, tmp_path / "i2d", prefix="mixed/")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    upload(s3, tmp_path, prefix="mixed/")  # (i2d/ beside x.png: images, not a dataset)
    plain, named = (open_source(SourceSpec(u)) for u in ("s3://photos/i2d/",
                                                          "hf:s3://photos/i2d/"))  # fmt: skip
    assert plain.describe() == named.describe() and plain.describe()["kind"] == "hf"
    assert open_source(SourceSpec("s3://photos/mixed/")).describe()["kind"] == "bucket"
    with pytest.raises(InputError, match="holds no Parquet files alone"):
        open_source(SourceSpec("hf:s3://photos/mixed/"))


@pytest.mark.usefixtures("fresh_cache")  # (member indexes are kept there by ETag)
@pytest.mark.parametrize("sidecar", [True, False])
def test_webdataset_tars_in_a_bucket_build_as_their_local_copy(
    s3: S3, tmp_path: Path, sidecar: bool
) -> None:
    """webdataset shards under a prefix are samples, as the same tars in a folder are (the
    same keys, vectors, columns, error rows); a tar's member index is kept by its ETag, so
    a re-run reads no object, and an overwritten tar's samples are found and read again."""
    from tests.shapes import write_webdataset

    folder = tmp_path / "wds"
    write_webdataset(folder, 0, 12, failed=(3,), sidecar=sidecar)
    write_webdataset(folder, 1, 8, sidecar=sidecar)
    local, remote = built_alike(s3, folder, "wds/", tmp_path, 19)
    local_rows = {r["key"]: r for r in pq.read_table(local / "shards").to_pylist()}
    rows = {r["key"]: r for r in pq.read_table(remote / "shards").to_pylist()}
    drop = ("embedding", "etag", "mtime_ns", "file_size", "id")
    assert {k: {c: v for c, v in r.items() if c not in drop} for k, r in rows.items()} == {
        k: {c: v for c, v in r.items() if c not in drop} for k, r in local_rows.items()
    }
    assert rows["000000001"]["caption"] == "scene number 1"
    if sidecar:
        failed = pq.read_table(remote / "errors.parquet").to_pylist()
        want_failed = [("000000003", "http://127.0.0.1:9/img/3.jpg")]
        assert [(r["key"], r["url"]) for r in failed] == want_failed
    tars = {p: n for p, n in s3.faults.gets.items() if p.endswith(".tar")}
    assert set(tars) == {"/photos/wds/00000.tar", "/photos/wds/00001.tar"}
    # each tar read whole once for its index, then each sample's members as one range (and,
    # without sidecars naming the columns, the first tar's JSON members to learn them)
    assert tars["/photos/wds/00000.tar"] == 1 + 11 + (0 if sidecar else 11)
    assert tars["/photos/wds/00001.tar"] == 1 + 8

    reads = s3.faults.object_gets()
    again = run_cli("build", "s3://photos/wds/", "--out", remote, *BUILD_FLAGS)
    assert again.exit_code == 0 and "19 items unchanged" in again.output, again.output
    assert s3.faults.object_gets() == reads  # nothing read: the index is kept by ETag
    write_webdataset(folder, 1, 9, sidecar=sidecar)  # the second tar rewritten, one more
    s3.client().upload_file(str(folder / "00001.tar"), "photos", "wds/00001.tar")
    if sidecar:
        s3.client().upload_file(str(folder / "00001.parquet"), "photos", "wds/00001.parquet")
    changed = run_cli("build", "s3://photos/wds/", "--out", remote, *BUILD_FLAGS)
    assert changed.exit_code == 0, changed.output
    assert len(read_embeddings_by_key(remote)) == 20, changed.output
    assert "1 new" in changed.output, changed.output
    after = {p: n for p, n in s3.faults.gets.items() if p.endswith(".tar")}
    # the first tar: only the model check's stored samples (8 at most, one range each)
    assert after["/photos/wds/00000.tar"] - tars["/photos/wds/00000.tar"] <= 8
    assert after["/photos/wds/00001.tar"] - tars["/photos/wds/00001.tar"] >= 1 + 9
    shown = run_cli("query", "--id", "000010008", "--index", remote, "-k", "1", "--json")
    assert shown.exit_code == 0 and "000010008" in shown.output, shown.output


def test_a_bucket_tar_that_is_not_a_tar_is_refused_in_a_line(s3: S3, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "00000.tar").write_bytes(b"not a tar at all" * 100)
    upload(s3, folder, prefix="bad/")
    out = tmp_path / "c"
    result = run_cli("build", "s3://photos/bad/", "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 2 and "cannot read the tar s3://photos/bad/00000.tar" in \
        result.output, result.output  # fmt: skip
    assert len(result.output.strip().splitlines()) == 1
    assert not (out / "current").exists()


@pytest.mark.usefixtures("fresh_cache")
def test_a_tar_rewritten_after_indexing_is_never_read_as_the_indexed_one(
    s3: S3, tmp_path: Path
) -> None:
    """A tar overwritten between its indexing and the reading of its samples (other bytes
    under the same keys): each sample read is an error (its header differs) or the very
    bytes indexed, never another image under the key."""
    import io
    import tarfile

    from indexer.config import SourceSpec
    from indexer.sources import open_source
    from indexer.sources.wds import TarChanged
    from tests.shapes import jpeg, write_webdataset

    images = write_webdataset(tmp_path / "wds", 0, 10, sidecar=False)
    upload(s3, tmp_path / "wds", prefix="wds/")
    source = open_source(SourceSpec("s3://photos/wds/"))
    listed = source.keys_and_locators()
    other = io.BytesIO()
    with tarfile.open(fileobj=other, mode="w") as tar:
        for key in sorted(images, reverse=True):  # the same keys, other images, other order
            data = jpeg(int(key) + 500)
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    s3.client().put_object(Bucket="photos", Key="wds/00000.tar", Body=other.getvalue())
    results = source.read_many([locator for _, locator, _ in listed])  # type: ignore[attr-defined]
    assert len(results) == 10
    for (key, _, _), got in zip(listed, results, strict=True):
        assert isinstance(got, ValueError | OSError) or got[0] == images[key], (key, got)
    assert sum(isinstance(got, Exception) for got in results) >= 9  # (past its end: OSError)
    assert any(isinstance(got, TarChanged) for got in results)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_cache")
def test_a_killed_bucket_webdataset_build_resumes_item_exactly(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL mid-build from tars in a bucket, embedding with the known export the local
    build left (confirmed on the first batch): the next run reuses the killed run's finished
    shards and ends with exactly the local tars' collection."""
    import json

    from tests.shapes import write_webdataset
    from tests.test_resume import FLAGS, check_same_as_clean, kill_when_confirmed, start_build

    folder = tmp_path / "wds"
    write_webdataset(folder, 0, 14, failed=(5,))
    write_webdataset(folder, 1, 10)
    upload(s3, folder, prefix="wds/")
    clean = tmp_path / "clean"
    assert run_cli("build", folder, "--out", clean, *FLAGS).exit_code == 0  # (the export)
    out = tmp_path / "killed"
    slow = start_build("s3://photos/wds/", out, hook="tests.hooks:slow")  # type: ignore[arg-type]
    kill_when_confirmed(slow, out)  # (still running)
    result = run_cli("build", "s3://photos/wds/", "--out", out, *FLAGS)
    assert result.exit_code == 0, result.output
    counts = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["counts"]
    assert counts["listed"] == 24, counts  # (one failed upstream)
    assert 4 <= counts["reused"] < counts["new"], counts  # killed mid-way, its work kept
    check_same_as_clean(out, read_embeddings_by_key(clean))


def test_partial_copies_left_by_killed_downloads_are_removed(
    s3: S3, tmp_path: Path, fresh_cache: Path
) -> None:
    """A download killed before it finished (SIGKILL) leaves its partial copy in indexer's
    cache; the next download into that folder removes it. A live process's copy stays."""
    import hashlib
    import os
    import subprocess

    from indexer.cache_dir import cache_dir
    from tests.shapes import write_i2d_parquet

    folder = tmp_path / "i2d"
    write_i2d_parquet(folder, 0, 3)
    upload(s3, folder, prefix="i2d/")
    url = "s3://photos/i2d/00000.parquet"
    copies = cache_dir() / "objects" / hashlib.sha256(url.encode()).hexdigest()[:32]
    copies.mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    (copies / f".old-00000.parquet.{gone.pid}.part").write_bytes(b"half a file")
    (copies / f".old-00000.parquet.{os.getppid()}.part").write_bytes(b"still downloading")
    result = run_cli("build", "s3://photos/i2d/", "--out", tmp_path / "c", *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    left = sorted(p.name for p in copies.iterdir())
    assert left[0] == f".old-00000.parquet.{os.getppid()}.part" and len(left) == 2, left
