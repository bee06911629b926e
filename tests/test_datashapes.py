"""Data as it arrives: img2dataset's webdataset and parquet outputs, datasets' own keys and
class names, indexed as they are (no conversion step)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from indexer.sources import is_parquet_dataset
from indexer.sources.wds import _coerce, _flatten, _split
from tests.helpers import BUILD_FLAGS, read_embeddings_by_key, run_cli
from tests.shapes import jpeg, write_folder, write_i2d_parquet, write_webdataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "img2dataset-sample"


def build(source: str | Path, out: Path, *flags: str) -> None:
    result = run_cli("build", source, "--out", out, *BUILD_FLAGS, "--batch-size", "8", *flags)
    assert result.exit_code == 0, result.output


def rows(out: Path) -> dict[str, dict]:
    table = pq.read_table(out / "shards")
    return {r["key"]: r for r in table.drop(["embedding"]).to_pylist()}


def errors(out: Path) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(out / "errors.parquet").to_pylist()}


def last_counts(out: Path) -> dict:
    return json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["counts"]


def assert_same_vectors(a: Path, b: Path) -> None:
    va, vb = read_embeddings_by_key(a), read_embeddings_by_key(b)
    vb = {k.removesuffix(".jpg"): v for k, v in vb.items()}  # the folder's files: KEY.jpg
    assert va.keys() == vb.keys()
    cosines = [float(np.dot(va[k], vb[k])) for k in va]
    assert min(cosines) >= 0.9999


def test_webdataset_shards_index_under_their_samples_keys(tmp_path: Path) -> None:
    wds = tmp_path / "wds"
    images = write_webdataset(wds, 0, 12, failed=(3, 7))
    images |= write_webdataset(wds, 1, 6, failed=(5,))
    build(wds, tmp_path / "c")
    got = rows(tmp_path / "c")
    assert sorted(got) == sorted(images)  # every fetched sample, under its own key
    assert len({r["id"] for r in got.values()}) == len(got) == 15
    row = got["000010002"]
    assert row["caption"] == "scene number 1002" and row["url"].endswith("/1002.jpg")
    assert row["original_width"] == 1502 and row["source_key"] == "000010002"
    failed = errors(tmp_path / "c")
    assert sorted(failed) == ["000000003", "000000007", "000010005"]  # never embedded
    assert failed["000000003"]["url"] == "http://127.0.0.1:9/img/3.jpg"
    assert "HTTP Error 404" in failed["000000003"]["error"]
    build(write_folder(tmp_path / "files", images), tmp_path / "folder")
    assert_same_vectors(tmp_path / "c", tmp_path / "folder")  # the same bytes, the same vectors


def test_webdataset_reruns_do_only_the_new_shards(tmp_path: Path) -> None:
    wds = tmp_path / "wds"
    write_webdataset(wds, 0, 10, failed=(2,))
    build(wds, tmp_path / "c")
    build(wds, tmp_path / "c")
    counts = last_counts(tmp_path / "c")
    assert counts["unchanged"] == 9 and counts["new"] == 0 and counts["failed"] == 1
    write_webdataset(wds, 1, 5)  # a new tar: new work; the old one is skipped
    build(wds, tmp_path / "c")
    counts = last_counts(tmp_path / "c")
    assert (counts["new"], counts["unchanged"], counts["failed"]) == (5, 9, 1)
    assert len(rows(tmp_path / "c")) == 14


def test_webdataset_without_sidecar_takes_columns_from_the_json(tmp_path: Path) -> None:
    wds = tmp_path / "wds"
    images = write_webdataset(wds, 0, 6, sidecar=False)
    build(wds, tmp_path / "c")
    got = rows(tmp_path / "c")
    assert sorted(got) == sorted(images)
    assert got["000000004"]["caption"] == "scene number 4"
    assert got["000000004"]["original_width"] == 504


@pytest.mark.parametrize("form", ["folder", "hf"])
def test_img2dataset_parquet_indexes_directly(tmp_path: Path, form: str) -> None:
    folder = tmp_path / "i2d"
    images = write_i2d_parquet(folder, 0, 10, failed=(4,))
    source = folder if form == "folder" else f"hf:{folder}"
    build(source, tmp_path / "c")
    got = rows(tmp_path / "c")
    assert sorted(got) == sorted(images)
    assert got["000000001"]["url"] == "http://127.0.0.1:9/img/1.jpg"
    failed = errors(tmp_path / "c")
    assert list(failed) == ["000000004"] and failed["000000004"]["url"].endswith("/4.jpg")
    build(write_folder(tmp_path / "files", images), tmp_path / "folder")
    assert_same_vectors(tmp_path / "c", tmp_path / "folder")
    build(source, tmp_path / "c")
    assert last_counts(tmp_path / "c")["unchanged"] == 9  # a re-run does nothing
    assert (tmp_path / "c" / "current").resolve().name == "v000001"  # (its failure not retried)


def test_image_and_key_columns_can_be_named(tmp_path: Path) -> None:
    folder = tmp_path / "i2d"
    write_i2d_parquet(folder, 0, 6)
    build(f"hf:{folder}", tmp_path / "c", "--image-column", "jpg", "--key-column", "url")
    assert "http://127.0.0.1:9/img/5.jpg" in rows(tmp_path / "c")
    for flags, message in (
        (("--image-column", "caption"), "neither images nor image bytes"),
        (("--key-column", "nope"), "has no such column"),
        (("--key-column", "status"), "appears twice"),
    ):
        result = run_cli("build", f"hf:{folder}", "--out", tmp_path / "bad", *BUILD_FLAGS, *flags)
        assert result.exit_code != 0 and message in result.output, result.output


def test_class_label_names_and_file_names_are_kept(tmp_path: Path) -> None:
    from PIL import Image

    from indexer.synthetic import scene

    root = tmp_path / "imagefolder"
    for i in range(6):
        cls = ("cats", "dogs")[i % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        scene(i, (80, 60)).save(root / cls / f"p{i}.jpg")
    import datasets

    datasets.load_dataset("imagefolder", data_dir=str(root)).save_to_disk(str(tmp_path / "ds"))
    build(f"hf:{tmp_path / 'ds'}", tmp_path / "c")
    got = rows(tmp_path / "c")
    assert sorted(got) == [f"p{i}.jpg" for i in range(6)]  # the files' names, not train/N
    assert all(r["label_class"] == ("cats", "dogs")[int(k[1]) % 2] for k, r in got.items())
    assert Image.open(root / "cats" / "p0.jpg").size == (80, 60)


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/img2dataset-sample")
@pytest.mark.parametrize("layout", ["webdataset", "parquet"])
def test_real_img2dataset_output(tmp_path: Path, layout: str) -> None:
    build(SHARED / layout, tmp_path / "c")
    got = rows(tmp_path / "c")
    assert len(got) == 26 and "000000000" in got
    assert got["000000000"]["caption"] == "a photo of a tench"
    failed = errors(tmp_path / "c")
    assert list(failed) == ["000000026"]
    assert failed["000000026"]["url"] == "http://127.0.0.1:8765/missing.jpg"


@pytest.mark.parametrize(
    ("member", "key", "ext"),
    [
        ("000000001.jpg", "000000001", "jpg"),
        ("a/b/x.seg.png", "a/b/x", "seg.png"),
        ("./k.json", "k", "json"),
    ],
)
def test_webdataset_member_names(member: str, key: str, ext: str) -> None:
    assert _split(member) == (key, ext)


def test_json_records_flatten_and_coerce() -> None:
    import pyarrow as pa

    assert _flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {
        "a_b": 1,
        "a_c": "[1, 2]",
        "d": None,
    }
    assert _coerce(3.0, pa.int32()) == 3 and _coerce(3.5, pa.int32()) is None
    assert _coerce("x", pa.int64()) is None and _coerce(True, pa.int64()) is None
    assert _coerce(2**70, pa.int64()) is None and _coerce(3_000_000_000, pa.int32()) is None
    assert _coerce(-(2**31), pa.int32()) == -(2**31) and _coerce(-1, pa.uint8()) is None
    assert _coerce({"x": 1}, pa.string()) == '{"x": 1}'


@pytest.mark.parametrize(
    ("files", "dataset"),
    [
        (["00000.parquet", "00000_stats.json"], True),
        (["a.parquet"], True),
        (["a.parquet", "photo.jpg"], False),
        (["a.parquet", "sub/"], False),
        ([".DS_Store", "LICENSE", "a.parquet", "a_stats.json"], True),
        (["photo.jpg"], False),
    ],
)
def test_parquet_dataset_folders_are_recognised(
    tmp_path: Path, files: list[str], dataset: bool
) -> None:
    for name in files:
        if name.endswith("/"):
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(b"")
    assert is_parquet_dataset(tmp_path) == dataset


@pytest.mark.parametrize("layout", ["webdataset", "parquet"])
def test_grids_show_the_pictures_of_tar_and_dataset_items(tmp_path: Path, layout: str) -> None:
    from PIL import Image

    from indexer.query.contact_sheet import CELL, PAD, thumbnail

    folder = tmp_path / "src"
    write = write_webdataset if layout == "webdataset" else write_i2d_parquet
    images = write(folder, 0, 8)
    build(folder, tmp_path / "c")
    key = "000000005"
    sheet = tmp_path / "grid.png"
    result = run_cli("query", "--id", key, "--index", tmp_path / "c", "-k", "3", "--grid", sheet)
    assert result.exit_code == 0, result.output
    picture = np.asarray(Image.open(sheet).convert("RGB"))
    want = np.asarray(thumbnail(images[key]))
    for column in (0, 1):  # the query tile, and its first result (itself)
        left = PAD + column * (CELL + PAD)
        assert np.array_equal(picture[PAD : PAD + CELL, left : left + CELL], want)
    paths = run_cli("query", "--id", key, "--index", tmp_path / "c", "-k", "1", "--paths-only")
    assert paths.output.split() == [key]  # no file of its own: the key


WHERE_CASES = [
    (["original_width>505"], lambda r: r["original_width"] > 505),
    (["caption=scene number 3"], lambda r: r["caption"] == "scene number 3"),
    (["source_width<=104", "original_width!=500"],
     lambda r: r["source_width"] <= 104 and r["original_width"] != 500),
    (["status!=success"], lambda r: False),
]  # fmt: skip


def test_where_on_metadata_keeps_exactly_the_matching_rows(tmp_path: Path) -> None:
    write_webdataset(tmp_path / "wds", 0, 12, failed=(11,))
    out = tmp_path / "c"
    build(tmp_path / "wds", out)
    stored = rows(out)
    from indexer.query.collection import Collection

    collection = Collection.open(out)
    for where, keep in WHERE_CASES:
        args = [a for w in where for a in ("--where", w)]
        result = run_cli("query", "--id", "000000000", "--index", out, "-k", "20", *args, "--json")
        assert result.exit_code == 0, result.output
        got = {r["key"] for r in json.loads(result.output)[0]["results"]}
        assert got == {k for k, r in stored.items() if keep(r)}, where
        api = collection.query(ids=["000000000"], k=20, where=where)[0]
        assert {h.key for h in api.hits} == got
    for where, message in (
        ("colour=red", "no column 'colour'"),
        ("caption>3", "compares numbers"),
        ("original_width=wide", "is not one"),
        ("=x", "write COLUMN=VALUE"),
    ):
        bad = run_cli("query", "--id", "000000000", "--index", out, "--where", where)
        assert bad.exit_code == 2 and message in bad.output, (where, bad.output)


def test_a_tar_in_a_photo_folder_keeps_it_a_folder(tmp_path: Path) -> None:
    """A backup.tar dropped among the photos must not turn the folder into tar shards."""
    photos = write_folder(tmp_path / "photos", {f"p{i}": jpeg(i) for i in range(5)})
    build(photos, tmp_path / "c")
    write_webdataset(tmp_path / "photos", 0, 3)  # 00000.tar and its sidecar among the photos
    build(photos, tmp_path / "c")
    counts = last_counts(tmp_path / "c")
    assert counts["deleted"] == 0 and counts["unchanged"] == 5
    assert sorted(rows(tmp_path / "c")) == [f"p{i}.jpg" for i in range(5)]


def test_webdataset_edges_fail_in_a_line_or_keep_the_image(tmp_path: Path) -> None:
    import io
    import tarfile

    wds = tmp_path / "wds"
    write_webdataset(wds, 0, 4, failed=(1,))
    with tarfile.open(wds / "00001.tar", "w") as tar:  # key 000000001 fetched here after all
        for name, data in (("000000001.jpg", jpeg(1)), ("000000009.jpg", jpeg(9)),
                           ("000000009.json", b"{not json")):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    build(wds, tmp_path / "c")
    got = rows(tmp_path / "c")
    assert sorted(got) == ["000000000", "000000001", "000000002", "000000003", "000000009"]
    assert got["000000009"]["url"] is None  # bad JSON: the image still indexed, columns null
    assert not (tmp_path / "c" / "errors.parquet").exists() or not errors(tmp_path / "c")
    (wds / "00000.parquet").write_bytes(b"garbage")
    result = run_cli("build", wds, "--out", tmp_path / "c", *BUILD_FLAGS)
    assert result.exit_code == 2 and "sidecar" in result.output
    assert result.output.count("\n") == 1
