"""Every Python example of the README's "Python API" section runs as written."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import pytest

from indexer.synthetic import scene
from tests.helpers import BUILD_FLAGS, run_cli

README = Path(__file__).resolve().parents[1] / "README.md"


SECTIONS = ("### Python API", "### Reading a collection elsewhere")


def python_api_examples() -> list[str]:
    """The Python blocks of the sections whose examples run on photos.idx."""
    text = README.read_text(encoding="utf-8")
    blocks = []
    for title in SECTIONS:
        section = re.split(r"\n##+ ", text.split(title, 1)[1], maxsplit=1)[0]
        blocks += re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return blocks


def test_the_readme_has_python_examples() -> None:
    assert len(python_api_examples()) >= 6


@pytest.mark.parametrize("number", range(len(python_api_examples())))
def test_readme_python_example_runs(
    number: int, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = _photos(tmp_path_factory)
    monkeypatch.chdir(work)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # set_search_params on a flat index warns, as documented
        names: dict = {}
        exec(compile(python_api_examples()[number], f"README example {number}", "exec"), names)
    if "top" in names:  # DuckDB's cosine top-k: the item itself first
        assert names["top"][0][0] == "holidays/IMG_0042.jpg" and names["top"][0][1] > 0.9999
    if "df" in names and "vectors" in names:  # pandas: every item once
        assert len(names["df"]) == 30 == len(set(names["df"]["key"]))
        assert names["vectors"].shape == (30, 64)
    if "ds" in names:
        assert names["ds"].num_rows == 30
    if "index" in names and "keys" in names:  # faiss: the first row's nearest is itself
        assert names["keys"][names["ids"][0][0]] == names["table"]["key"][0].as_py()


def _photos(factory: pytest.TempPathFactory) -> Path:
    """photos.idx built from 30 images (holidays/IMG_0042.jpg among them), a.jpg and b.png."""
    work = factory.getbasetemp() / "readme-work"
    if (work / "photos.idx").is_dir():
        return work
    src = work / "photos"
    (src / "holidays").mkdir(parents=True)
    for i in range(30):
        folder = src / ("home" if i % 2 else "holidays")
        folder.mkdir(exist_ok=True)
        scene(i, (120, 90)).save(folder / f"IMG_{i + 28:04d}.jpg")
    shutil.copy(src / "home" / "IMG_0029.jpg", work / "a.jpg")
    scene(99, (100, 100)).save(work / "b.png")
    result = run_cli("build", src, "--out", work / "photos.idx", *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    return work


def test_the_clip_retrieval_recipe_runs_and_indexes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """clip-retrieval's layout (img_emb/img_emb_N.npy + metadata/metadata_N.parquet, as its
    inference writes them) joined by the README's recipe, then indexed by --from-parquet."""
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    (tmp_path / "clip-output" / "img_emb").mkdir(parents=True)
    (tmp_path / "clip-output" / "metadata").mkdir()
    vectors = {}
    for n, count in enumerate((7, 5)):
        block = rng.standard_normal((count, 16)).astype(np.float16)  # clip-retrieval's dtype
        block /= np.linalg.norm(block.astype(np.float32), axis=1, keepdims=True).astype(np.float16)
        np.save(tmp_path / "clip-output" / "img_emb" / f"img_emb_{n}.npy", block)
        paths = [f"/data/img/{n}_{i}.jpg" for i in range(count)]
        captions = [f"caption {n} {i}" for i in range(count)]
        pq.write_table(pa.table({"image_path": paths, "caption": captions}),
                       tmp_path / "clip-output" / "metadata" / f"metadata_{n}.parquet")  # fmt: skip
        vectors.update(zip(paths, block.astype(np.float32), strict=True))
    section = README.read_text(encoding="utf-8").split("clip-retrieval's `inference`", 1)[1]
    recipe = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    exec(compile(recipe, "README clip-retrieval recipe", "exec"), {})
    result = run_cli("index", "--from-parquet", "clip-embeddings", "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "c" / "shards")
    assert table.num_rows == 12
    for key, caption, emb in zip(table["key"].to_pylist(), table["caption"].to_pylist(),
                                 table["embedding"].to_pylist(), strict=True):  # fmt: skip
        assert np.allclose(emb, vectors[key], atol=1e-3)
        assert caption.startswith("caption ")
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["counts"]["embedded"] == 12
