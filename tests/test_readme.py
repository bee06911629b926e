"""Every Python example of README.md and of the docs/ pages runs as written.

The examples are found by scanning every ```python block (no list of sections to keep up to
date), and run from a folder holding the collection photos.idx (30 images, among them
holidays/IMG_0042.jpg) and the images a.jpg and b.png. A block that cannot run there (one
that needs a bucket, say) is marked in the markdown by an HTML comment right before it,
<!-- not run: the reason -->, and reported as skipped with its reason.
"""

from __future__ import annotations

import re
import shutil
import textwrap
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest

from indexer.synthetic import scene
from tests.helpers import BUILD_FLAGS, run_cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# a fenced block of Python (```python, ```py, ```python3), at any indentation, optionally
# preceded by <!-- not run: REASON --> (blank lines between allowed)
BLOCK = re.compile(
    r"(?:<!--[ \t]*not run:[ \t]*(?P<reason>[^\n]*?)[ \t]*-->\s*\n)?"
    r"^(?P<indent>[ \t]*)```(?:python3?|py)[ \t]*\n(?P<code>.*?)^(?P=indent)```",
    flags=re.S | re.M,
)
MAX_NOT_RUN = 3  # keep them rare: an example that is not run can rot unseen


class Example(NamedTuple):
    label: str  # path:line
    code: str
    not_run: str | None  # the reason given in <!-- not run: ... -->, or None


def markdown_pages() -> list[Path]:
    """README.md and every page under docs/."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def python_examples(pages: list[Path] | None = None) -> list[Example]:
    """Every ```python block of the pages, in order."""
    examples = []
    for page in pages if pages is not None else markdown_pages():
        text = page.read_text(encoding="utf-8")
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start("code"))  # the fence's line, 1-based
            code = textwrap.dedent(match.group("code"))
            label = f"{page.relative_to(ROOT).as_posix()}:{line}"
            examples.append(Example(label, code, match.group("reason")))
    return examples


EXAMPLES = python_examples()


def test_the_readme_and_the_docs_have_python_examples() -> None:
    assert python_examples([README]), "README.md lost its Python one-liner"
    assert len(EXAMPLES) >= 8, [e.label for e in EXAMPLES]
    pages = {e.label.split(":")[0] for e in EXAMPLES}
    assert {"docs/python-api.md", "docs/collection-format.md"} <= pages, pages


def test_examples_not_run_are_rare_and_say_why() -> None:
    not_run = [e for e in EXAMPLES if e.not_run is not None]
    for example in not_run:
        print(f"not run: {example.label}: {example.not_run}")  # shown with -s or on failure
        assert example.not_run, f"{example.label}: say why it is not run"
    assert len(not_run) <= MAX_NOT_RUN, [e.label for e in not_run]


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.label for e in EXAMPLES])
def test_python_example_runs(
    example: Example, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    if example.not_run is not None:
        pytest.skip(f"not run ({example.label}): {example.not_run}")
    work = _photos(tmp_path_factory)
    monkeypatch.chdir(work)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # set_search_params on a flat index warns, as documented
        names: dict = {}
        exec(compile(example.code, example.label, "exec"), names)
    if "top" in names:  # DuckDB's cosine top-k: the item itself first
        assert names["top"][0][0] == "holidays/IMG_0042.jpg" and names["top"][0][1] > 0.9999
    if "df" in names and "vectors" in names:  # pandas: every item once
        assert len(names["df"]) == 30 == len(set(names["df"]["key"]))
        assert names["vectors"].shape == (30, 64)
    if "ds" in names:
        assert names["ds"].num_rows == 30
    if "index" in names and "keys" in names:  # faiss: the first row's nearest is itself
        assert names["keys"][names["ids"][0][0]] == names["table"]["key"][0].as_py()
    if "scores" in names and "keys" in names and "index" not in names:  # Collection searches
        assert names["keys"].shape == names["scores"].shape and names["keys"][0][0] is not None


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
    inference writes them) joined by the docs' recipe, then indexed by --from-parquet."""
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
    recipes = [e for e in EXAMPLES if "clip-output/img_emb" in e.code]
    assert len(recipes) == 1, [e.label for e in recipes]
    exec(compile(recipes[0].code, recipes[0].label, "exec"), {})
    result = run_cli("index", "--from-parquet", "clip-embeddings", "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "c" / "shards")
    assert table.num_rows == 12
    for key, caption, emb in zip(table["key"].to_pylist(), table["caption"].to_pylist(),
                                 table["embedding"].to_pylist(), strict=True):  # fmt: skip
        assert np.allclose(emb, vectors[key], atol=1e-3)
        assert caption.startswith("caption ")
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["counts"]["embedded"] == 12
