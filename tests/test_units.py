"""Unit tests of the pieces: folder walk, model weights, shard writer, exact search, hub probe."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from indexer.collection.shards import ShardWriter, embedding_array, shard_schema
from indexer.config import ModelConfig, SourceSpec
from indexer.errors import InputError, WeightsUnavailableError
from indexer.hub import hub_unreachable_reason
from indexer.model.timm_model import (
    classifier_prefix,
    create_model,
    create_pretrained,
    read_state_dict,
    resolve_device,
    state_sha256,
)
from indexer.sources import list_items, open_sources
from indexer.sources.folder import walk_images
from tests.helpers import seeded_model


def test_folder_walk_is_sorted_recursive_and_skips_hidden(tmp_path: Path) -> None:
    for rel in [
        "b/2.PNG",
        "b/10.jpg",
        "a.JpEg",
        "c/d/e.webp",
        ".hid/x.jpg",
        "b/.x.jpg",
        "notes.txt",
        "z.tiff",
        "y.gif",
        "x.bmp",
        "w.tif",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert walk_images(tmp_path) == [
        "a.JpEg",
        "b/10.jpg",
        "b/2.PNG",
        "c/d/e.webp",
        "w.tif",
        "x.bmp",
        "y.gif",
        "z.tiff",
    ]


def test_several_sources_get_unique_labels_and_prefixed_keys(tmp_path: Path) -> None:
    for parent in ("one", "two"):
        (tmp_path / parent / "pics").mkdir(parents=True)
        (tmp_path / parent / "pics" / "a.jpg").write_bytes(b"x")
    specs = (SourceSpec(str(tmp_path / "one" / "pics")), SourceSpec(str(tmp_path / "two" / "pics")))
    sources = open_sources(specs)
    assert [s.label for s in sources] == ["pics", "pics-2"]
    assert [i.key for i in list_items(sources)] == ["pics/a.jpg", "pics-2/a.jpg"]
    assert [i.key for i in list_items(sources[:1])] == ["a.jpg"]


def test_classifier_prefix_and_fingerprint_ignore_the_head() -> None:
    a, b = seeded_model(0), seeded_model(0)
    assert classifier_prefix(a) == "head.fc"
    assert state_sha256(a) == state_sha256(b)
    with torch.no_grad():
        b.head.fc.weight.add_(1.0)
    assert state_sha256(a) == state_sha256(b)
    with torch.no_grad():
        b.stem[0].weight.add_(1.0)
    assert state_sha256(a) != state_sha256(b)


def test_read_state_dict_unwraps_and_strips_prefix(tmp_path: Path) -> None:
    path = tmp_path / "ck.pth"
    torch.save({"model": {"module.w": torch.ones(2)}, "epoch": 3}, path)
    assert list(read_state_dict(path)) == ["w"]
    with pytest.raises(InputError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pth")


def test_random_weights_are_reproducible() -> None:
    m1, w1 = create_model(ModelConfig(pretrained=False, seed=3))
    m2, _ = create_model(ModelConfig(pretrained=False, seed=3))
    assert w1 == {"kind": "random", "seed": 3}
    assert state_sha256(m1) == state_sha256(m2)


def test_pretrained_offline_fails_fast_with_advice() -> None:
    with pytest.raises(WeightsUnavailableError, match=r"--checkpoint FILE.*--no-pretrained"):
        create_pretrained("test_convnext.r160_in1k")


def test_hub_probe_reports_a_closed_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert hub_unreachable_reason(f"http://127.0.0.1:{port}") is not None
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert hub_unreachable_reason(f"http://127.0.0.1:{server.getsockname()[1]}") is None


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device("cuda")


def _table(ids: range, dim: int) -> pa.Table:
    rng = np.random.default_rng(ids.start)
    return pa.table(
        {
            "id": pa.array(list(ids), pa.int64()),
            "key": [f"k{i}" for i in ids],
            "source": ["s"] * len(ids),
            "embedding": embedding_array(rng.normal(size=(len(ids), dim)).astype(np.float32)),
            "width": pa.array([1] * len(ids), pa.int32()),
            "height": pa.array([1] * len(ids), pa.int32()),
            "content_hash": ["h"] * len(ids),
            "file_size": pa.array([None] * len(ids), pa.int64()),
            "mtime_ns": pa.array([None] * len(ids), pa.int64()),
        }
    )


def test_shard_writer_rotates_and_renames(tmp_path: Path) -> None:
    schema = shard_schema(4, pa.schema([]))
    with ShardWriter(tmp_path, schema, shard_size=10) as writer:
        writer.write(_table(range(0, 7), 4))
        writer.write(_table(range(7, 23), 4))
        # two full shards are final; the last 3 rows are still buffered, not visible
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "part-00000.parquet",
            "part-00001.parquet",
        ]
        done = writer.close()
    assert [(s.name, s.rows) for s in done] == [
        ("part-00000.parquet", 10),
        ("part-00001.parquet", 10),
        ("part-00002.parquet", 3),
    ]
    ids = pq.read_table(tmp_path).column("id").to_pylist()
    assert sorted(ids) == list(range(23))


def test_aborted_writer_leaves_no_temporary_file(tmp_path: Path) -> None:
    schema = shard_schema(4, pa.schema([]))
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, schema, shard_size=10**6) as writer:
        writer.write(_table(range(0, 9000), 4))  # one row group flushed to the .tmp file
        assert [p.name for p in tmp_path.iterdir()] == ["part-00000.parquet.tmp"]
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_non_utf8_file_name_gets_a_printable_key(tmp_path: Path) -> None:
    import os

    from indexer.sources.folder import FolderSource

    os.mkdir(tmp_path / "src")
    name = b"caf\xe9.jpg"  # Latin-1 bytes, invalid UTF-8
    with open(os.path.join(os.fsencode(tmp_path / "src"), name), "wb") as f:
        f.write(b"data")
    source = FolderSource(tmp_path / "src")
    [(key, locator, fingerprint)] = source.keys_and_locators()
    assert fingerprint is not None and fingerprint[0] == 4
    assert key == "caf\\xe9.jpg"
    key.encode("utf-8")
    assert source.read(locator)[0] == b"data"


def test_plan_table() -> None:
    from indexer.build.plan import PrevRow, make_plan
    from indexer.sources.base import Item

    class Src:
        def __init__(self, label: str) -> None:
            self.label = label

    prev = {
        "same": PrevRow(0, "s", (1, 1), "h0"),
        "touched": PrevRow(1, "s", (1, 1), "h1"),
        "moved": PrevRow(2, "other", (1, 1), "h2"),
        "gone": PrevRow(3, "s", (1, 1), "h3"),
    }
    items = [
        Item("same", 0, "same", (1, 1)),
        Item("touched", 0, "touched", (1, 2)),
        Item("moved", 0, "moved", (1, 1)),
        Item("new", 0, "new", (5, 5)),
        Item("failed", 0, "failed", (7, 7)),
    ]
    errors = {"failed": {"key": "failed", "source": "s", "file_size": 7, "mtime_ns": 7}}
    plan = make_plan(items, [Src("s")], prev, set(), next_id=10, prev_errors=errors)  # type: ignore[list-item]
    assert plan.keep == {0: 0}
    assert plan.check == [1, 2, 3]
    assert plan.ids == {0: 0, 1: 1, 2: 10, 3: 11} and plan.next_id == 12
    assert plan.known == {0, 1}
    assert plan.deleted == 2  # "gone", and "moved" now comes from another source
    assert [e["key"] for e in plan.kept_errors] == ["failed"]
    retry = make_plan(items, [Src("s")], prev, set(), next_id=10, prev_errors=None)  # type: ignore[list-item]
    assert retry.check == [1, 2, 3, 4] and not retry.kept_errors


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"key": "a.jpg", "score": 0.5}, '{"key": "a.jpg", "score": 0.5}'),
        ({"score": float("nan"), "x": [float("inf")]}, '{"score": null, "x": [null]}'),
        ({"key": "caf\udce9.jpg"}, '{"key": "caf\\\\xe9.jpg"}'),  # a non-UTF-8 file name byte
        ({"key": "\ud800"}, '{"key": "\\\\ud800"}'),  # a lone surrogate that is no byte
        ({"key": "\U0001f600"}, '{"key": "\\ud83d\\ude00"}'),  # a real emoji stays one
        ({"key": "back\\udce9"}, '{"key": "back\\\\udce9"}'),  # text that only looks escaped
        ({"n": np.int64(3)}, '{"n": "3"}'),
    ],
)
def test_json_text_is_strict_utf8_json(doc: object, expected: str) -> None:
    import json

    from indexer.jsontext import json_text

    text = json_text(doc)
    assert text == expected
    text.encode("utf-8")  # strict: no lone surrogate survives
    json.loads(text)


COLUMNS = [  # values, Arrow type: what a source's metadata column may hold
    (["a", None, "ü", ""], pa.string()),
    ([None, None], pa.string()),
    ([], pa.string()),
    ([True, None, False] * 5, pa.bool_()),
    ([None] * 9 + [True], pa.bool_()),
    ([1, None, -3, 2**40], pa.int64()),
    ([0, None, 255], pa.uint8()),
    ([-(2**31), None], pa.int32()),
    ([1.5, None, 2], pa.float64()),
    ([0.25, None], pa.float32()),
    ([None], pa.float64()),
]


@pytest.mark.parametrize(("values", "kind"), COLUMNS)
def test_column_array_equals_pyarrows(values: list, kind: pa.DataType) -> None:
    """Metadata columns are built without pa.array (whose first call imports pandas, 0.45 s
    of a build): the same array, nulls where the values are None."""
    from indexer.collection.shards import column_array

    got = column_array(values, kind)
    got.validate(full=True)
    assert got.type == kind and got.equals(pa.array(values, kind)), (got, values)


@pytest.mark.parametrize(("values", "kind"), [([300], pa.uint8()), (["x"], pa.int64()),
                                              ([1, "x"], pa.string())])  # fmt: skip
def test_column_array_refuses_what_pyarrow_refuses(values: list, kind: pa.DataType) -> None:
    from indexer.collection.shards import column_array

    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)) as want:
        pa.array(values, kind)
    with pytest.raises(type(want.value)):
        column_array(values, kind)


def test_a_build_with_metadata_columns_never_imports_pandas(tmp_path: Path) -> None:
    """The shard rows of a source with metadata columns (a URL list's, a bucket's etag) are
    made without loading pandas."""
    import subprocess
    import sys

    from indexer.synthetic import scene

    pics = tmp_path / "pics"
    pics.mkdir()
    for n in range(3):
        scene(n).save(pics / f"{n}.png")
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\n" + "".join(f"{pics / f'{n}.png'},c{n}\n" for n in range(3)))
    script = (
        "import sys\nfrom indexer.cli.main import main\n"
        f"main(['build', {str(urls)!r}, '--out', {str(tmp_path / 'out')!r}, '--no-pretrained',"
        " '--no-progress', '--workers', '0'], standalone_mode=False)\n"
        "print('pandas' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "False", done.stdout
    table = pq.read_table(next((tmp_path / "out").rglob("shards/*.parquet")))
    assert sorted(table.column("caption").to_pylist()) == ["c0", "c1", "c2"]


def test_tar_pieces_give_each_member_its_bytes_or_say_why_not() -> None:
    """A sample's members from the runs read for it: an empty member is b"", one past the
    end is truncated, one whose CRC-32 differs from the indexed one is TarChanged."""
    import zlib

    from indexer.sources.wds import Member, Pieces, Sample, TarChanged, ranges

    data = bytes(range(256)) * 8
    image, text = Member(512, 100, zlib.crc32(data[512:612])), Member(1024, 0)
    sample = Sample("t.tar", image, None, text)
    assert ranges(sample) == [(512, 512)]  # neighbours within the gap: one run
    pieces = Pieces([(512, data[512:1024])])
    assert pieces.member(image) == data[512:612] and pieces.member(text) == b""
    with pytest.raises(ValueError, match="truncated"):
        pieces.member(Member(1000, 100))
    with pytest.raises(TarChanged):
        Pieces([(512, data[513:1025])]).member(image)
    far = Sample("t.tar", image, Member(1 << 20, 10))
    assert ranges(far, gap=1000) == [(512, 100), (1 << 20, 10)]
