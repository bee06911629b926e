"""URL and path lists as SOURCE: each row fetched (here from an HTTP server of generated
images on 127.0.0.1) and embedded with its columns; a failed fetch is its row's error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from indexer.errors import InputError
from indexer.sources.url_list import UrlListSource, redacted
from tests.helpers import BUILD_FLAGS, read_embeddings_by_key, run_cli
from tests.webserver import served

pytest.importorskip("aiohttp")


@pytest.fixture
def images(tmp_path: Path) -> Iterator[tuple[str, Path, dict[str, int]]]:
    """A folder of 12 images served over HTTP on 127.0.0.1 (requests counted by path)."""
    folder = tmp_path / "www"
    folder.mkdir()
    for n in range(12):
        Image.new("RGB", (48, 40), (20 * n, 100, 255 - 20 * n)).save(folder / f"{n:02d}.png")

    def flaky_once(path: str, count: int) -> int | None:  # the first try: overloaded
        return 503 if "flaky" in path and count == 1 else None

    with served(folder, flaky_once) as (base, counts):
        yield base, folder, counts


def write_list(path: Path, base: str, missing: int = 3) -> None:
    urls = [f"{base}/{n:02d}.png?X-Amz-Signature=s3cr3tsig{n}" for n in range(12)]
    urls += [f"{base}/missing-{n}.png?X-Amz-Signature=s3cr3tsig" for n in range(missing)]
    captions = [f"caption {n}" for n in range(len(urls))]
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)


def test_a_url_list_is_fetched_and_embedded_with_its_columns(
    images: tuple[str, Path, dict[str, int]], tmp_path: Path
) -> None:
    base, folder, counts = images
    listing = tmp_path / "list.parquet"
    write_list(listing, base)
    out = tmp_path / "c"
    result = run_cli("build", listing, "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 6 and "3 of 15 items failed" in result.output, result.output
    # a list's failed fetches are this build's failures (img2dataset's are its downloader's):
    # over the budget, the run fails, the collection is still written; within it, partial
    result = run_cli("build", listing, "--out", out, *BUILD_FLAGS, "--max-failures", "3")
    assert result.exit_code == 5 and "fetch 3 (3 HTTP 404 not found)" in result.output
    got = read_embeddings_by_key(out)
    assert len(got) == 12
    local = tmp_path / "local"
    assert run_cli("build", folder, "--out", local, *BUILD_FLAGS).exit_code == 0
    want = read_embeddings_by_key(local)
    for n in range(12):
        key = next(k for k in got if k.endswith(f"/{n:02d}.png"))
        np.testing.assert_allclose(got[key], want[f"{n:02d}.png"], atol=1e-6)
    shard = next(((out / "current").resolve() / "shards").glob("*.parquet"))
    rows = pq.read_table(shard, columns=["key", "caption"]).to_pylist()
    assert all(r["caption"] == f"caption {int(r['key'][-6:-4])}" for r in rows)
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert len(errors) == 3 and {e["stage"] for e in errors} == {"fetch"}
    assert all(e["url"].startswith(base + "/missing-") and "?" not in e["url"] for e in errors)
    listed = {r["url"].split("?")[0]: r for r in pq.read_table(listing).to_pylist()}
    for e in errors:  # the list's other columns ride along, as in the shards
        assert e["caption"] == listed[e["url"]]["caption"], e
    for path in out.rglob("*"):  # a signed URL's signature is written nowhere
        if path.is_file():
            assert b"s3cr3tsig" not in path.read_bytes(), path
    assert "s3cr3tsig" not in result.output
    whole = tmp_path / "whole.parquet"  # the same rows without the missing ones
    write_list(whole, base, missing=0)
    out2 = tmp_path / "c2"
    assert run_cli("build", whole, "--out", out2, *BUILD_FLAGS).exit_code == 0
    before = dict(counts)
    result = run_cli("build", whole, "--out", out2, *BUILD_FLAGS)
    assert result.exit_code == 0 and "Nothing changed" in result.output, result.output
    assert counts == before  # unchanged URLs are not fetched again
    result = run_cli("build", whole, "--out", out2, *BUILD_FLAGS, "--refetch")
    assert result.exit_code == 0, result.output
    assert all(counts[f"/{n:02d}.png"] == before[f"/{n:02d}.png"] + 1 for n in range(12))
    assert "0 embedded, 0 reused (renamed or copied), 12 unchanged" in result.output  # same bytes


def test_a_txt_list_of_paths_and_keys_by_column(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for n in range(3):
        Image.new("RGB", (32, 32), (n * 80, 9, 9)).save(folder / f"{n}.png")
    listing = tmp_path / "paths.txt"
    listing.write_text("# my images\n" + "\n".join(str(folder / f"{n}.png") for n in range(3)))
    out = tmp_path / "c"
    assert run_cli("build", listing, "--out", out, *BUILD_FLAGS).exit_code == 0
    assert len(read_embeddings_by_key(out)) == 3
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps({"path": str(folder / f"{n}.png"), "id": f"img{n}"})
                               for n in range(3)))  # fmt: skip
    out2 = tmp_path / "c2"
    result = run_cli("build", jsonl, "--out", out2, *BUILD_FLAGS, "--url-column", "path",
                     "--key-column", "id")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(read_embeddings_by_key(out2)) == ["img0", "img1", "img2"]


def test_bad_lists_are_refused_in_a_line(tmp_path: Path) -> None:
    listing = tmp_path / "l.csv"
    listing.write_text("link,key\nhttp://x/a.png,a\n")
    with pytest.raises(InputError, match="no column 'url'"):
        UrlListSource(listing)
    listing.write_text("url,key\nhttp://x/a.png,a\nhttp://x/b.png,a\n")
    with pytest.raises(InputError, match="repeated key"):
        UrlListSource(listing)
    result = run_cli("build", listing, "--out", tmp_path / "c", *BUILD_FLAGS)
    assert result.exit_code == 2 and "repeated key" in result.output


@pytest.mark.parametrize(
    ("url", "want"),
    [("https://u:p@h.example:8443/a/b.jpg?sig=1#f", "https://h.example:8443/a/b.jpg"),
     ("s3://bucket/k.jpg?versionId=3", "s3://bucket/k.jpg"), ("/data/a.png", "/data/a.png")],
)  # fmt: skip
def test_urls_are_redacted(url: str, want: str) -> None:
    assert redacted(url) == want


@pytest.mark.parametrize(("retries", "embedded"), [(3, 4), (0, 0)])
def test_passing_failures_are_retried_then_error_rows(
    images: tuple[str, Path, dict[str, int]], tmp_path: Path, retries: int, embedded: int
) -> None:
    base, _, _ = images
    listing = tmp_path / "flaky.csv"
    listing.write_text("url\n" + "".join(f"{base}/{n:02d}.png?flaky={retries}\n" for n in range(4)))
    out = tmp_path / "c"
    result = run_cli("build", listing, "--out", out, *BUILD_FLAGS, "--read-retries", str(retries))
    if embedded:
        assert result.exit_code == 0, result.output
        assert len(read_embeddings_by_key(out)) == embedded  # each after one 503
    else:  # every row failed: the run says so (exit 6), and each row is an error row
        assert result.exit_code == 6 and "4 of 4 items failed" in result.output, result.output
        errors = pq.read_table(out / "errors.parquet").to_pylist()
        assert len(errors) == 4 and all(e["stage"] == "fetch" for e in errors)


def test_fetch_errors_never_carry_a_url_secret() -> None:
    from indexer.sources.url_list import safe_reason

    url = "https://user:hunter2@h.example/a.png?X-Amz-Signature=abc123#frag"
    for exc in (
        OSError(f"cannot connect to {url}"),
        TimeoutError(url.replace("https", "HTTPS")),
        ValueError("bad host: user:hunter2@h.example?X-Amz-Signature=abc123"),
    ):
        reason = safe_reason(exc, url)
        assert "hunter2" not in reason and "abc123" not in reason, reason


def test_an_img2dataset_parquet_file_is_not_taken_for_a_url_list(tmp_path: Path) -> None:
    listing = tmp_path / "00000.parquet"
    pq.write_table(pa.table({"url": ["http://x/a.jpg"], "jpg": pa.array([b"\xff\xd8"])}), listing)
    result = run_cli("build", listing, "--out", tmp_path / "c", *BUILD_FLAGS)
    assert result.exit_code == 2 and "holds images in column 'jpg'" in result.output


def test_error_rows_keep_the_lists_columns_through_a_merge_of_parts(
    images: tuple[str, Path, dict[str, int]], tmp_path: Path
) -> None:
    base, _, _ = images
    listing = tmp_path / "list.parquet"
    write_list(listing, base)
    out = tmp_path / "c"
    for part in ("0/2", "1/2"):
        result = run_cli("build", listing, "--out", out, *BUILD_FLAGS, "--partition", part,
                         "--max-failures", "3")  # fmt: skip
        assert result.exit_code in (0, 5), result.output
    result = run_cli("index", out)
    assert result.exit_code == 0, result.output
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert sorted(e["caption"] for e in errors) == ["caption 12", "caption 13", "caption 14"]
    assert len(read_embeddings_by_key(out)) == 12
