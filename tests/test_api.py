"""The Python API takes query images in every form a caller holds them, and says what it is."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.errors import InputError
from indexer.query.collection import Collection


def test_search_images_takes_paths_bytes_pil_images_and_arrays(
    collection: Path, corpus: Path
) -> None:
    c = Collection.open(collection)
    path = next(p for p in sorted(corpus.rglob("*.png")))
    image = Image.open(path).convert("RGB")
    forms = [str(path), path, path.read_bytes(), image, np.asarray(image)]
    want = c.embed_images([path])
    for form in forms:
        got = c.embed_images(form)  # one image alone
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-5, type(form)
    assert c.embed_images(forms).shape == (len(forms), c.dim)
    _, keys = c.search_images(str(path), k=3)  # a string is one path, not its characters
    assert keys.shape == (1, 3) and keys[0][0] == path.relative_to(corpus).as_posix()
    with pytest.raises(InputError, match="#0"):
        c.embed_images([np.zeros((4, 4), np.float32)])
    with pytest.raises(InputError, match="an array, not object"):
        c.embed_images([object()])


def test_len_repr_and_search_params_on_an_exact_index(collection: Path) -> None:
    c = Collection.open(collection)
    assert len(c) == c.index.ntotal > 0
    assert f"{len(c)} items" in repr(c) and "64-d" in repr(c) and "flat" in repr(c)
    with pytest.warns(UserWarning, match="has no nprobe"):
        c.set_search_params({"nprobe": 32})  # the README's example on a small collection
    assert c.search_params == {}
    with pytest.raises(InputError, match="unknown search parameter"):
        c.set_search_params({"probes": 3})


def test_a_jpeg_in_memory_equals_its_file(collection: Path, corpus: Path, tmp_path: Path) -> None:
    c = Collection.open(collection)
    buffer = io.BytesIO()
    Image.new("RGB", (50, 40), (200, 30, 30)).save(buffer, "JPEG")
    (tmp_path / "q.jpg").write_bytes(buffer.getvalue())
    assert np.array_equal(c.embed_images(buffer.getvalue()), c.embed_images(tmp_path / "q.jpg"))


def test_rows_kept_in_memory_answer_as_the_shards_do(collection: Path) -> None:
    """cache_rows (the service's Collection): the same rows, vectors and errors, from memory."""
    plain, cached = Collection(collection), Collection(collection, cache_rows=True)
    keys = [k for k in plain.keys_of(np.arange(len(plain))) if k is not None]
    for key in keys[:6]:
        a = plain.query(ids=[key], k=5, where=["width>0"])[0]
        b = cached.query(ids=[key], k=5, where=["width>0"])[0]
        assert [h.to_dict() for h in a.hits] == [h.to_dict() for h in b.hits]
    assert np.array_equal(plain.vectors_of(keys[:3]), cached.vectors_of(keys[:3]))
    assert plain.row_of(2) == cached.row_of(2) and cached.row_of(10**9) is None
    with pytest.raises(InputError, match="holds no item"):
        cached.vectors_of(["nope"])
