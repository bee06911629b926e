"""Querying as people want it: many inputs, --id, thresholds, JSON/JSONL/paths, grids, dedup."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from indexer.query.collection import Collection
from tests.helpers import run_cli

DUPLICATES = {  # the corpus's planted near-duplicates and their originals
    frozenset({"group0/scene0000.png", "near-duplicates/scene0000-crop.jpg"}),
    frozenset({"group1/scene0001.jpg", "near-duplicates/scene0001-resize.jpg"}),
    frozenset({"group2/scene0002.jpg", "near-duplicates/scene0002-reencode.jpg"}),
    frozenset({"group3/scene0003.jpg", "near-duplicates/scene0003-blur.jpg"}),
}


def query(collection: Path, *args: object) -> str:
    result = run_cli("query", *args, "--index", collection)
    assert result.exit_code == 0, result.output
    return result.output


def test_folders_globs_and_files_as_queries(collection: Path, corpus: Path) -> None:
    one = json.loads(query(collection, corpus / "group0" / "scene0004.jpg", "--json", "-k", "2"))
    assert [q["results"][0]["key"] for q in one] == ["group0/scene0004.jpg"]
    folder = query(collection, corpus / "group1", "--jsonl", "-k", "1").splitlines()
    assert len(folder) == 6 and all(json.loads(line)["results"] for line in folder)
    globbed = query(collection, str(corpus / "group*" / "*.png"), "--jsonl", "-k", "1")
    names = [json.loads(line)["query"] for line in globbed.splitlines()]
    assert names == sorted(str(p) for p in corpus.glob("group*/*.png")) and len(names) == 5
    for line in globbed.splitlines():  # each image finds itself, with the shard's columns
        doc = json.loads(line)
        top = doc["results"][0]
        assert doc["query"].endswith(top["key"].split("/")[-1])
        assert {"rank", "key", "score", "id", "width", "height", "source"} <= top.keys()
    missing = run_cli("query", str(corpus / "nope*.jpg"), "--index", collection)
    assert missing.exit_code == 2 and "no file matches" in missing.output


def test_id_queries_match_re_embedded_ones(collection: Path, corpus: Path) -> None:
    key = "group2/scene0002.jpg"
    by_id = json.loads(query(collection, "--id", key, "--json", "-k", "3"))[0]
    by_image = json.loads(query(collection, corpus / key, "--json", "-k", "3"))[0]
    assert by_id["results"][0]["key"] == by_image["results"][0]["key"] == key
    assert by_id["results"][1]["key"] == by_image["results"][1]["key"]
    unknown = run_cli("query", "--id", "no/such.jpg", "--index", collection)
    assert unknown.exit_code == 2 and "holds no item" in unknown.output


def test_threshold_and_paths_only(collection: Path, corpus: Path) -> None:
    key = "group3/scene0003.jpg"
    close = query(collection, "--id", key, "--threshold", "0.995", "--paths-only", "-k", "10")
    paths = close.splitlines()
    assert paths == [str(corpus.resolve() / key), str(corpus.resolve() /
                     "near-duplicates/scene0003-blur.jpg")]  # fmt: skip
    assert all(Path(p).is_file() for p in paths)
    none = query(collection, "--id", key, "--threshold", "1.5", "--json")
    assert json.loads(none)[0]["results"] == []
    both = run_cli("query", "--id", key, "--json", "--jsonl", "--index", collection)
    assert both.exit_code == 2


def test_grid_is_a_png_of_the_expected_size(collection: Path, corpus: Path, tmp_path: Path) -> None:
    from indexer.query.contact_sheet import CELL, LABEL, PAD

    out = tmp_path / "grid.png"
    query(collection, corpus / "group0" / "scene0004.jpg", "--id", "group1/scene0001.jpg",
          "-k", "4", "--grid", out)  # fmt: skip
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (5 * (CELL + PAD) + PAD, 2 * (CELL + LABEL + PAD) + PAD)
        image.load()


def test_missing_result_images_are_placeholders(
    collection: Path, corpus: Path, tmp_path: Path
) -> None:
    from indexer.query.contact_sheet import CELL, PAD, PLACEHOLDER, Cell, draw_sheet

    real = corpus / "group0" / "scene0004.jpg"
    cells = [Cell(real, ("#1", "real")), Cell(tmp_path / "gone.jpg", ("#2", "gone")),
             Cell(None, ("x",))]  # fmt: skip
    size = draw_sheet([cells], tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as image:
        assert image.size == size
        pixels = np.asarray(image.convert("RGB"))
    tiles = [pixels[PAD : PAD + CELL, PAD + n * (CELL + PAD) : PAD + n * (CELL + PAD) + CELL]
             for n in range(3)]  # fmt: skip
    grey = [float((t == PLACEHOLDER).all(axis=2).mean()) for t in tiles]
    assert grey[1] > 0.95 and grey[2] > 0.95  # placeholders (with their "missing" label)
    assert grey[1] < 1.0  # the label is drawn on it
    assert grey[0] < 0.5  # the real image is shown


def test_dedup_finds_the_planted_near_duplicates(collection: Path, tmp_path: Path) -> None:
    out = tmp_path / "dups.parquet"
    grid = tmp_path / "dups.png"
    result = run_cli("dedup", collection, "--threshold", "0.993", "--out", out, "--grid", grid)
    assert result.exit_code == 0, result.output
    assert "4 group(s) of near-duplicates, 8 items" in result.output
    table = pq.read_table(out)
    assert table.schema.names == ["group", "key", "score"]
    groups: dict[int, set[str]] = {}
    for row in table.to_pylist():
        groups.setdefault(row["group"], set()).add(row["key"])
        assert row["score"] >= 0.993
    assert {frozenset(g) for g in groups.values()} == DUPLICATES  # and no false groups
    with Image.open(grid) as image:
        assert image.format == "PNG"


def test_python_api_query(collection: Path, corpus: Path) -> None:
    c = Collection.open(collection)
    [result] = c.query([corpus / "group0" / "scene0004.jpg"], k=3)
    assert result.hits[0].key == "group0/scene0004.jpg" and len(result.hits) == 3
    frame = c.query_frame(ids=["group0/scene0004.jpg"], k=2)
    assert frame["key"].tolist()[0] == "group0/scene0004.jpg" and len(frame) == 2
    with pytest.raises(Exception, match="nothing to query"):
        c.query()
