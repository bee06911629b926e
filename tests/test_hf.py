"""Hugging Face dataset sources: the same bytes as a folder give the same embeddings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest

from indexer.config import SourceSpec
from indexer.errors import InputError
from indexer.sources import open_source
from tests.helpers import BUILD_FLAGS, read_embeddings_by_key, run_cli

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=["a", "b", "c"]),
        "caption": datasets.Value("string"),
        "id": datasets.Value("int64"),
    }
)


def _files(corpus: Path) -> list[Path]:
    return sorted(p for p in corpus.rglob("*") if p.is_file())[:12]


def _dataset(corpus: Path) -> datasets.Dataset:
    files = _files(corpus)
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": p.read_bytes(), "path": None} for p in files],
            "label": [i % 3 for i in range(len(files))],
            "caption": [f"picture {p.stem}" for p in files],
            "id": [1000 + i for i in range(len(files))],
        },
        features=FEATURES,
    )


@pytest.fixture(scope="module")
def saved(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "pics"
    _dataset(corpus).save_to_disk(str(path))
    return path


def test_dataset_and_folder_give_same_embeddings(
    saved: Path, corpus: Path, collection: Path, tmp_path: Path
) -> None:
    out = tmp_path / "hf"
    result = run_cli("build", f"hf:{saved}", "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    from_hf = read_embeddings_by_key(out)
    from_folder = read_embeddings_by_key(collection)
    files = _files(corpus)
    assert sorted(from_hf) == sorted(f"train/{i}" for i in range(len(files)))
    for i, path in enumerate(files):
        np.testing.assert_allclose(
            from_hf[f"train/{i}"], from_folder[path.relative_to(corpus).as_posix()], atol=1e-6
        )


def test_dataset_columns_are_kept(saved: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    assert run_cli("build", f"hf:{saved}", "--out", out, *BUILD_FLAGS).exit_code == 0
    table = pq.read_table(out / "shards").sort_by("id")
    assert table.column("label").to_pylist() == [i % 3 for i in range(12)]
    assert table.column("caption").to_pylist()[0].startswith("picture ")
    assert table.column("source_id").to_pylist() == [1000 + i for i in range(12)]
    assert table.column("id").to_pylist() == list(range(12))
    source = json.loads((out / "manifest.json").read_text())["sources"][0]
    assert source["kind"] == "hf" and source["split"] == "train" and source["rows"] == 12


def test_splits_and_parquet_folder(corpus: Path, tmp_path: Path) -> None:
    ds = _dataset(corpus)
    dd = datasets.DatasetDict({"train": ds.select(range(8)), "test": ds.select(range(8, 12))})
    dd.save_to_disk(str(tmp_path / "dd"))
    test_out = tmp_path / "test-split"
    result = run_cli(
        "build", f"hf:{tmp_path / 'dd'}", "--split", "test", "--out", test_out, *BUILD_FLAGS
    )
    assert result.exit_code == 0, result.output
    assert sorted(read_embeddings_by_key(test_out)) == [f"test/{i}" for i in range(4)]
    missing = run_cli(
        "build", f"hf:{tmp_path / 'dd'}", "--split", "val", "--out", tmp_path / "x", *BUILD_FLAGS
    )
    assert missing.exit_code == 2 and "no split 'val'" in missing.output

    folder = tmp_path / "parquet-files"
    folder.mkdir()
    ds.to_parquet(str(folder / "data.parquet"))
    pq_out = tmp_path / "pq"
    result = run_cli("build", f"hf:{folder}", "--out", pq_out, *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    assert len(read_embeddings_by_key(pq_out)) == 12


def test_image_column_choice(corpus: Path, tmp_path: Path) -> None:
    ds = _dataset(corpus).select(range(3))
    raw = ds.cast_column("image", datasets.Image(decode=False))
    two = raw.add_column("thumb", raw["image"], feature=datasets.Image())
    two.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(InputError, match="several Image columns"):
        open_source(SourceSpec(f"hf:{tmp_path / 'two'}"))
    src = open_source(SourceSpec(f"hf:{tmp_path / 'two'}", image_column="thumb"))
    assert src.describe()["image_column"] == "thumb"
    ds.remove_columns("image").save_to_disk(str(tmp_path / "none"))
    with pytest.raises(InputError, match="no Image column"):
        open_source(SourceSpec(f"hf:{tmp_path / 'none'}"))
    with pytest.raises(InputError, match="hub is unreachable"):
        open_source(SourceSpec("hf:someone/some-dataset"))


def test_folder_and_dataset_together(saved: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "both"
    result = run_cli("build", corpus, f"hf:{saved}", "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out / "shards")
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 28 + 12
    assert f"{corpus.name}/group0/scene0000.png" in keys and "pics/train/0" in keys
    assert set(table.column("source").to_pylist()) == {corpus.name, "pics"}
    assert table.column("label").null_count == 28  # folder rows have no dataset columns


def test_an_unchanged_dataset_is_skipped_and_a_changed_one_rehashed(
    corpus: Path, tmp_path: Path
) -> None:
    path = tmp_path / "ds"
    ds = _dataset(corpus)
    ds.save_to_disk(str(path))
    out = tmp_path / "c"
    assert run_cli("build", f"hf:{path}", "--out", out, *BUILD_FLAGS).exit_code == 0
    again = run_cli("build", f"hf:{path}", "--out", out, *BUILD_FLAGS)
    assert again.exit_code == 0 and again.output.startswith("Nothing changed"), again.output
    before = read_embeddings_by_key(out)
    changed = tmp_path / "ds2"
    ds.select(range(10)).save_to_disk(str(changed))  # two rows fewer: a new fingerprint
    shutil.rmtree(path)
    changed.rename(path)
    result = run_cli("build", f"hf:{path}", "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    assert "2 deleted" in result.output and "0 new" in result.output
    after = read_embeddings_by_key(out)
    assert sorted(after) == sorted(f"train/{i}" for i in range(10))
    assert all(np.array_equal(after[k], before[k]) for k in after)
