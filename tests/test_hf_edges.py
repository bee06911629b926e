"""hf: source edges (#14): column types across sources, reserved names, image paths, splits."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from indexer.collection.shards import merge_metadata_schemas, metadata_names
from indexer.config import SourceSpec
from indexer.errors import InputError
from indexer.sources import open_source
from indexer.sources.hf import HFSource
from tests.helpers import BUILD_FLAGS, run_cli


def pictures(corpus: Path, n: int = 3) -> list[Path]:
    return sorted(corpus.rglob("*.png"))[:n]


def save(path: Path, columns: dict[str, list[Any]]) -> Path:
    datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image()).save_to_disk(
        str(path)
    )
    return path


def images(corpus: Path, n: int = 3) -> list[dict[str, Any]]:
    return [{"bytes": p.read_bytes(), "path": None} for p in pictures(corpus, n)]


def one_line_error(result: Any, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


# --- metadata columns across sources ---


def test_a_column_that_is_text_in_one_dataset_and_a_number_in_another_is_refused(
    corpus: Path, tmp_path: Path
) -> None:
    a = save(tmp_path / "a", {"image": images(corpus), "label": ["x", "y", "z"]})
    b = save(tmp_path / "b", {"image": images(corpus), "label": [1, 2, 3]})
    result = run_cli("build", f"hf:{a}", f"hf:{b}", "--out", tmp_path / "o", *BUILD_FLAGS)
    one_line_error(result, "'label'", "string", "int64")


def test_merge_widens_losslessly_and_refuses_the_rest() -> None:
    def merged(*types: pa.DataType) -> pa.DataType:
        return merge_metadata_schemas([pa.schema([("c", t)]) for t in types]).field("c").type

    assert merged(pa.int32(), pa.int64()) == pa.int64()
    assert merged(pa.uint8(), pa.int8()) == pa.int16()
    assert merged(pa.float32(), pa.float64()) == pa.float64()
    assert merged(pa.string(), pa.large_string()) == pa.large_string()
    assert merged(pa.null(), pa.string()) == pa.string()
    assert merge_metadata_schemas([]) == pa.schema([])
    for a, b in [(pa.string(), pa.int64()), (pa.int64(), pa.float64()),
                 (pa.uint64(), pa.int64()), (pa.bool_(), pa.int8())]:  # fmt: skip
        with pytest.raises(InputError, match=f"column 'c' is {a} in one source and {b}"):
            merged(a, b)


def test_reserved_names_are_renamed_without_collisions() -> None:
    assert metadata_names(["id", "caption"]) == {"id": "source_id", "caption": "caption"}
    assert metadata_names(["id", "source_id"]) == {"id": "source_id_2", "source_id": "source_id"}
    assert metadata_names(["source_id_2", "id", "source_id"]) == {
        "source_id_2": "source_id_2", "id": "source_id_3", "source_id": "source_id",
    }  # fmt: skip


def test_a_dataset_with_id_and_source_id_columns_builds(corpus: Path, tmp_path: Path) -> None:
    path = save(tmp_path / "ds", {"image": images(corpus), "id": [7, 8, 9],
                                  "source_id": ["x", "y", "z"]})  # fmt: skip
    out = tmp_path / "o"
    result = run_cli("build", f"hf:{path}", "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out / "shards").sort_by("id")
    assert table.column("source_id").to_pylist() == ["x", "y", "z"]
    assert table.column("source_id_2").to_pylist() == [7, 8, 9]


# --- image paths: regular files only, and bounded ---


def with_paths(folder: Path, paths: list[str]) -> Path:
    """A folder holding a Parquet data file whose Image rows are paths only (save_to_disk
    would embed the files' bytes; other tools write such rows)."""
    features = datasets.Features({"image": datasets.Image()})
    rows = pa.array([{"bytes": None, "path": p} for p in paths],
                    features.arrow_schema.field("image").type)  # fmt: skip
    info = json.dumps({"info": {"features": features.to_dict()}})
    folder.mkdir()
    pq.write_table(pa.table({"image": rows}).replace_schema_metadata({"huggingface": info}),
                   folder / "data.parquet")  # fmt: skip
    return folder


def by_path(tmp_path: Path, *paths: str) -> HFSource:
    return HFSource(str(with_paths(tmp_path / "paths", list(paths))))


def never_opening(monkeypatch: pytest.MonkeyPatch, *paths: str) -> None:
    """Opening one of these paths fails the test at once (instead of reading /dev/zero forever)."""
    import builtins

    def guard(real: Any) -> Any:
        def opener(path: Any, *args: Any, **kwargs: Any) -> Any:
            assert os.fspath(path) not in paths, f"{path} was opened"
            return real(path, *args, **kwargs)

        return opener

    monkeypatch.setattr(builtins, "open", guard(builtins.open))
    monkeypatch.setattr(os, "open", guard(os.open))


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    def expire(*_: Any) -> None:
        raise TimeoutError("still blocked")

    before = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def test_a_device_path_is_refused_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = by_path(tmp_path, "/dev/zero", "/dev/null")
    never_opening(monkeypatch, "/dev/zero", "/dev/null")
    for row in (0, 1):
        with pytest.raises(OSError, match="not a regular file"):
            source.read(row)


def test_a_fifo_path_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    source = by_path(tmp_path, str(fifo))
    with deadline(5), pytest.raises(OSError, match="not a regular file"):
        source.read(0)


def test_a_file_over_the_byte_limit_is_refused(corpus: Path, tmp_path: Path) -> None:
    picture, link = pictures(corpus, 1)[0], tmp_path / "link.png"
    link.symlink_to(picture)
    source = by_path(tmp_path, str(picture), str(link))
    assert source.read(1)[0] == picture.read_bytes()  # a link to a regular file is read
    source.max_bytes = picture.stat().st_size - 1
    with pytest.raises(OSError, match="over the limit of"):
        source.read(0)


def test_the_byte_limit_follows_max_pixels(tmp_path: Path) -> None:
    small = HFSource(str(with_paths(tmp_path / "p", ["/nowhere.png"])), max_pixels=1000)
    assert 1000 * 4 < small.max_bytes <= 1000 * 8 + (1 << 20)


def test_a_bad_path_fails_that_item_only(corpus: Path, tmp_path: Path) -> None:
    path = with_paths(tmp_path / "ds", [*map(str, pictures(corpus)), "/dev/null"])
    out = tmp_path / "o"
    result = run_cli("build", f"hf:{path}", "--out", out, "--max-failures", "5", *BUILD_FLAGS)
    assert result.exit_code == 5, result.output  # partial: one item failed
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert [(e["key"], e["stage"]) for e in errors] == [("train/3", "read")]
    assert "not a regular file" in errors[0]["error"]
    assert pq.read_table(out / "shards").num_rows == 3


# --- splits ---


def test_an_unknown_split_of_an_unnamed_dataset_is_refused(corpus: Path, tmp_path: Path) -> None:
    path = save(tmp_path / "ds", {"image": images(corpus)})
    result = run_cli("build", f"hf:{path}", "--split", "nope", "--out", tmp_path / "o",
                     *BUILD_FLAGS)  # fmt: skip
    one_line_error(result, "no split 'nope'", "'train'")
    assert not (tmp_path / "o").exists() or not (tmp_path / "o" / "current").exists()
    assert open_source(SourceSpec(f"hf:{path}", split="train")).describe()["split"] == "train"
