"""`indexer serve`: a real uvicorn server on 127.0.0.1, spoken to over real HTTP."""

from __future__ import annotations

import http.client
import io
import json
import re
import shutil
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from PIL import Image

from indexer.serve.app import MAX_K, ServeConfig, create_app
from indexer.serve.listing import MAX_LIMIT
from indexer.serve.registry import Registry
from tests.helpers import BUILD_FLAGS, run_cli
from tests.shapes import write_webdataset


class Server:
    """The app on an ephemeral loopback port, in a thread."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30  # a guard against a hung start, not a timing test
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: Any = None
    ) -> tuple[int, bytes, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, data, dict(response.getheaders())

    def json(self, method: str, path: str, doc: Any = None, **headers: str) -> tuple[int, Any]:
        body = None if doc is None else json.dumps(doc).encode()
        status, data, _ = self.request(method, path, body,
                                       {"Content-Type": "application/json", **headers})  # fmt: skip
        if data.startswith((b"{", b"[")):
            return status, json.loads(data)
        return status, {"error": data.decode("utf-8", "replace")} if data else None

    def upload(self, name: str, data: bytes, **fields: str) -> tuple[int, Any]:
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                 .encode() for k, v in fields.items()]  # fmt: skip
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                     f'filename="q.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode() + data
                     + b"\r\n")  # fmt: skip
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        status, out, _ = self.request("POST", f"/api/collections/{name}/search", body, headers)
        return status, json.loads(out) if out.startswith(b"{") else out

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextmanager
def serving(roots: dict[str, Path], cfg: ServeConfig | None = None) -> Iterator[Server]:
    """A real server over these collections (loaded once), stopped afterwards."""
    registry = Registry(roots)
    registry.refresh()
    server = Server(create_app(registry, cfg or ServeConfig()))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def served(collection: Path, tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    copy = tmp_path / "photos"
    shutil.copytree(collection, copy, symlinks=True)
    registry = Registry({"photos": copy})
    registry.refresh()
    server = Server(create_app(registry, ServeConfig(max_upload_bytes=1 << 20)))
    yield server, copy
    server.stop()


def build_captioned(folder: Path) -> Path:
    """A webdataset (img2dataset's shape: KEY.jpg, KEY.txt, KEY.json) built: a caption column."""
    write_webdataset(folder / "wds", 0, 12, failed=(3,))
    out = folder / "c"
    result = run_cli("build", folder / "wds", "--out", out, *BUILD_FLAGS, "--batch-size", "8")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_captioned(tmp_path_factory.mktemp("captioned"))


def cli_json(*args: Any) -> list[dict]:
    result = run_cli("query", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)[0]["results"]  # stderr may hold notes


def test_search_answers_what_indexer_query_answers(
    served: tuple[Server, Path], corpus: Path
) -> None:
    server, root = served
    image = sorted(corpus.rglob("*.jpg"))[3]
    status, doc = server.upload("photos", image.read_bytes(), k="5")
    assert status == 200 and doc["collection"] == "photos" and doc["version"] == "v000001"
    want = cli_json(image, "--index", root, "-k", "5")
    assert [r["key"] for r in doc["results"]] == [r["key"] for r in want]
    assert all(
        abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(doc["results"], want, strict=True)
    )
    key = want[0]["key"]
    status, by_key = server.json("POST", "/api/collections/photos/search", {"key": key, "k": 3})
    assert status == 200 and by_key["results"][0]["key"] == key  # rank 1 is itself
    assert by_key["results"] == cli_json("--id", key, "--index", root, "-k", "3")
    item_id = by_key["results"][0]["id"]
    status, by_id = server.json("POST", "/api/collections/photos/search", {"id": item_id, "k": 3})
    assert status == 200 and by_id["results"] == by_key["results"]
    status, row = server.json("GET", f"/api/collections/photos/items/{item_id}")
    assert status == 200 and row["key"] == key and "embedding" not in row
    status, data, headers = server.request(
        "GET", f"/api/collections/photos/items/{item_id}/thumbnail?size=64"
    )
    assert status == 200 and headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(data)).size) == 64
    status, listing = server.json("GET", "/api/collections")
    assert listing[0]["name"] == "photos" and listing[0]["count"] == row["id"] * 0 + len(
        cli_json("--id", key, "--index", root, "-k", "1000")
    )
    assert server.json("GET", "/readyz") == (200, {"photos": "v000001"})
    status, metrics, _ = server.request("GET", "/metrics")
    assert b'indexer_requests_total{endpoint="search",status="200"} 3' in metrics


@pytest.mark.parametrize(
    ("method", "path", "doc", "status"),
    [
        ("POST", "/api/collections/nope/search", {"id": 0}, 404),
        ("POST", "/api/collections/photos/search", {"id": 10**9}, 404),
        ("POST", "/api/collections/photos/search", {"key": "../../etc/passwd"}, 404),
        ("POST", "/api/collections/photos/search", {"id": 0, "k": 0}, 422),
        ("POST", "/api/collections/photos/search", {"id": 0, "k": MAX_K + 1}, 422),
        ("POST", "/api/collections/photos/search", {"id": 0, "k": "3; drop"}, 422),
        ("POST", "/api/collections/photos/search", {"nothing": 1}, 422),
        ("POST", "/api/collections/photos/search", [1, 2], 422),
        ("GET", "/api/collections/photos/items/..%2F..%2Fetc%2Fpasswd", None, 404),
        ("GET", "/api/collections/photos/items/%2Fetc%2Fpasswd/thumbnail", None, 404),
        ("GET", "/api/collections/photos/items/-1", None, 422),
        ("GET", "/api/collections/photos/items/999999/thumbnail", None, 404),
        ("GET", "/api/collections/photos/items/0/thumbnail?size=99999", None, 422),
        ("GET", "/api/collections/nope/items", None, 404),
        ("GET", "/api/collections/photos/items?limit=0", None, 422),
        ("GET", f"/api/collections/photos/items?limit={MAX_LIMIT + 1}", None, 422),
        ("GET", "/api/collections/photos/items?limit=ten", None, 422),
        ("GET", "/api/collections/photos/items?limit=", None, 422),
        ("GET", "/api/collections/photos/items?offset=-1", None, 422),
        ("GET", "/api/collections/photos/items?offset=1.5", None, 422),
        ("GET", "/api/collections/photos/items?offset=99999999999999999999", None, 422),
        ("GET", "/api/collections/photos/items?where=nosuchcolumn%3D1", None, 422),
        ("GET", "/api/collections/photos/items?where=width", None, 422),
        ("GET", "/api/collections/photos/items?where=embedding%3D1", None, 422),
        ("POST", "/api/collections/photos/items", {}, 405),
    ],
)
def test_bad_requests_are_4xx_with_a_reason(
    served: tuple[Server, Path], method: str, path: str, doc: Any, status: int
) -> None:
    server, root = served
    got, body = server.json(method, path, doc)
    assert got == status and body["error"], body
    assert "\n" not in body["error"] and str(root) not in body["error"]  # a line, no path


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_bad_uploads_are_refused_with_the_reason(served: tuple[Server, Path], corpus: Path) -> None:
    server, _ = served
    jpeg = sorted(corpus.rglob("*.jpg"))[0].read_bytes()
    for data, status in (
        (b"", 422),
        (jpeg[: len(jpeg) // 3], 422),
        (b"just some text, named .jpg", 422),
        (_png_claiming(100_000, 100_000), 422),
    ):
        got, doc = server.upload("photos", data)
        assert got == status and doc["error"], (data[:20], doc)
    huge = b"\xff" * (2 << 20)
    got, doc = server.upload("photos", huge)
    assert got == 413
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.putrequest("POST", "/api/collections/photos/search")
    conn.putheader("Content-Type", "multipart/form-data; boundary=x")
    conn.putheader("Transfer-Encoding", "chunked")  # no Content-Length: counted as it comes
    conn.endheaders()
    for _ in range(3):
        block = b"a" * (1 << 20)
        conn.send(f"{len(block):x}\r\n".encode() + block + b"\r\n")
    conn.send(b"0\r\n\r\n")
    assert conn.getresponse().status == 413
    conn.close()
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("CMYK").save(cmyk, "JPEG")
    assert server.upload("photos", cmyk.getvalue())[0] == 200


def test_a_token_is_required_when_set(collection: Path) -> None:
    with serving({"photos": collection}, ServeConfig(token="s3cret")) as server:
        assert server.json("GET", "/api/collections")[0] == 401
        assert server.json("GET", "/api/collections", Authorization="Bearer nope")[0] == 401
        assert server.json("GET", "/api/collections", Authorization="Bearer s3cret")[0] == 200
        assert server.json("GET", "/healthz")[0] == 200  # probes need no token


def test_a_public_host_needs_a_token_or_insecure(collection: Path) -> None:
    result = run_cli("serve", collection, "--host", "0.0.0.0")
    assert result.exit_code == 2 and "--token" in result.output
    result = run_cli("serve", collection, collection)
    assert result.exit_code != 0 and "repeat" in result.output


@pytest.mark.slow
def test_new_versions_are_served_without_a_failed_request(corpus: Path, tmp_path: Path) -> None:
    """Clients search while builds publish: no 5xx, versions never go backwards, new items
    are found after their publish, and a damaged version is never served."""
    src = tmp_path / "src"
    shutil.copytree(corpus, src)
    root = tmp_path / "c"
    assert run_cli("build", src, "--out", root, *BUILD_FLAGS).exit_code == 0
    registry = Registry({"c": root})
    registry.refresh()
    registry.watch(every=0.2)
    server = Server(create_app(registry, ServeConfig()))
    first_key = json.loads((root / "manifest.json").read_text())["shards"] and "group0"
    statuses: list[int] = []
    seen: list[list[int]] = [[] for _ in range(3)]
    stop = threading.Event()

    def client(n: int) -> None:
        while not stop.is_set():
            status, doc = server.json("POST", "/api/collections/c/search", {"id": 0, "k": 3})
            statuses.append(status)
            if status == 200:
                seen[n].append(int(doc["version"].lstrip("v")))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    try:
        for n in range(2):
            Image.new("RGB", (64, 64), (40 * n, 200, 90)).save(src / f"new{n}.png")
            assert run_cli("build", src, "--out", root, *BUILD_FLAGS).exit_code == 0
            deadline = time.monotonic() + 30
            while registry.get("c").version != f"v{n + 2:06d}" and time.monotonic() < deadline:
                time.sleep(0.05)
            status, doc = server.json("POST", "/api/collections/c/search", {"key": f"new{n}.png"})
            assert status == 200 and doc["results"][0]["key"] == f"new{n}.png"
        (root / "index" / "index.faiss").write_bytes(b"damaged")  # v3's index, in place
        Image.new("RGB", (64, 64), (1, 2, 3)).save(src / "late.png")
        damaged = registry.failures
        assert run_cli("build", src, "--out", root, *BUILD_FLAGS).exit_code == 0  # v4 is whole
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        server.stop()
        registry.stop()
    assert first_key and statuses and all(s == 200 for s in statuses), set(statuses)
    for versions in seen:
        assert versions == sorted(versions)  # never backwards
    assert registry.get("c").version == "v000004" and registry.failures >= damaged


def test_concurrent_uploads_are_embedded_together_and_answer_the_same(
    collection: Path, corpus: Path
) -> None:
    registry = Registry({"photos": collection})
    registry.refresh()
    images = [p.read_bytes() for p in sorted(corpus.rglob("*.jpg"))[:8]]
    answers: dict[float, list[Any]] = {}
    for window in (0.0, 0.2):  # alone, then batched (a wide window: every request joins)
        server = Server(create_app(registry, ServeConfig(batch_window=window)))
        got: list[Any] = [None] * len(images)

        def ask(n: int, server: Server = server, got: list[Any] = got) -> None:
            got[n] = server.upload("photos", images[n], k="4")

        threads = [threading.Thread(target=ask, args=(n,)) for n in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        _, metrics, _ = server.request("GET", "/metrics")
        server.stop()
        assert all(status == 200 for status, _ in got)
        answers[window] = [doc["results"] for _, doc in got]
        batches = int(re.search(rb"indexer_embed_batch_size_count (\d+)", metrics).group(1))
        assert (batches == len(images)) if window == 0 else (batches < len(images))
    for alone, batched in zip(answers[0.0], answers[0.2], strict=True):
        assert [r["key"] for r in alone] == [r["key"] for r in batched]
        assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(alone, batched, strict=True))


def _variants(source: Path, folder: Path) -> list[Path]:
    """The same picture as CMYK JPEG, 16-bit PNG, palette PNG and EXIF-rotated JPEG."""
    folder.mkdir()
    base = Image.open(source).convert("RGB")
    cmyk, deep, palette, rotated = (folder / n for n in ("cmyk.jpg", "deep.png", "pal.png",
                                                          "rot.jpg"))  # fmt: skip
    base.convert("CMYK").save(cmyk, "JPEG")
    Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257).save(deep)
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(palette)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    base.transpose(Image.Transpose.ROTATE_90).save(rotated, "JPEG", exif=exif)
    return [cmyk, deep, palette, rotated]


def test_uploads_in_every_mode_answer_like_the_cli(
    served: tuple[Server, Path], corpus: Path, tmp_path: Path
) -> None:
    server, root = served
    for path in _variants(sorted(corpus.rglob("*.jpg"))[5], tmp_path / "variants"):
        status, doc = server.upload("photos", path.read_bytes(), k="4")
        assert status == 200, (path.name, doc)
        want = cli_json(path, "--index", root, "-k", "4")
        assert [r["key"] for r in doc["results"]] == [r["key"] for r in want], path.name
        pairs = zip(doc["results"], want, strict=True)
        assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in pairs), path.name


def test_a_thumbnail_never_reads_outside_the_source(corpus: Path, tmp_path: Path) -> None:
    """An image replaced by a link to a file outside its source folder after the build is
    not served (the build's rule: links out are not followed without --follow-symlinks)."""
    src = tmp_path / "src"
    shutil.copytree(corpus, src)
    root = tmp_path / "c"
    assert run_cli("build", src, "--out", root, *BUILD_FLAGS).exit_code == 0
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (50, 50), (255, 0, 0)).save(secret)
    victim = sorted(src.rglob("*.jpg"))[0]
    victim.unlink()
    victim.symlink_to(secret)
    with serving({"c": root}, ServeConfig()) as server:
        key = victim.relative_to(src).as_posix()
        _, doc = server.json("POST", "/api/collections/c/search", {"key": key, "k": 1})
        item_id = doc["results"][0]["id"]
        status, data, _ = server.request("GET", f"/api/collections/c/items/{item_id}/thumbnail")
        assert status == 404 and b"can no longer be read" in data


def test_a_search_that_takes_too_long_is_a_503(collection: Path, corpus: Path) -> None:
    big = io.BytesIO()
    Image.new("RGB", (6000, 4000), (10, 200, 30)).save(big, "PNG")  # slow to decode
    cfg = ServeConfig(search_timeout=0.01, max_upload_bytes=1 << 26)
    with serving({"photos": collection}, cfg) as server:
        status, doc = server.upload("photos", big.getvalue())
        assert status == 503 and "took over" in doc["error"]
        assert server.json("GET", "/healthz")[0] == 200  # still serving


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b'{"image": "/etc/passwd"}', 422, "multipart upload"),
        (b'{"id": 1, "k": 1e999}', 422, "whole number"),
        (b'{"id": 1, "where": 5}', 422, "where must be"),
        (b'{"id": 1, "where": [["width>1"]]}', 422, "where must be"),
        (b'{"id": 1, "threshold": true}', 422, "threshold"),
        (b"[" * 100000 + b"]" * 100000, 413, "over the limit"),
        (b"[" * 30000 + b"]" * 30000, 400, "neither JSON"),
    ],
)
def test_hostile_json_is_refused_in_a_line(
    served: tuple[Server, Path], body: bytes, status: int, reason: str
) -> None:
    server, _ = served
    got, data, _ = server.request("POST", "/api/collections/photos/search", body,
                                  {"Content-Type": "application/json"})  # fmt: skip
    assert got == status and reason in json.loads(data)["error"]


def test_bad_multipart_is_a_json_400(served: tuple[Server, Path]) -> None:
    server, _ = served
    got, data, _ = server.request("POST", "/api/collections/photos/search", b"x",
                                  {"Content-Type": "multipart/form-data"})  # fmt: skip
    assert got == 400 and "multipart" in json.loads(data)["error"]
    _, metrics, _ = server.request("GET", "/metrics")
    assert b'endpoint="search",status="400"' in metrics


def test_versions_that_cannot_serve_are_refused_and_a_rebuild_is_loaded(
    corpus: Path, tmp_path: Path
) -> None:
    root = tmp_path / "c"
    assert run_cli("build", corpus, "--out", root, *BUILD_FLAGS).exit_code == 0
    registry = Registry({"c": root})
    registry.refresh()
    good = registry.get("c").version
    for damage in ("shard", "model"):  # a copy of the version, damaged, published by hand
        bad = root / "versions" / f"v00000{2 if damage == 'shard' else 3}"
        shutil.copytree(root / "versions" / good, bad)
        target = next((bad / "shards").glob("*.parquet")) if damage == "shard" else (
            bad / "model.onnx")  # fmt: skip
        data = bytearray(target.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = b"\\0" * 64
        target.unlink()
        target.write_bytes(bytes(data))
        (root / "current").unlink()
        (root / "current").symlink_to(Path("versions") / bad.name)
        failures = registry.failures
        registry.refresh()
        assert registry.get("c").version == good and registry.failures == failures + 1, damage
    shutil.rmtree(root)  # built again from scratch: a v000001 of its own
    small = tmp_path / "small"
    shutil.copytree(corpus / "group0", small)
    assert run_cli("build", small, "--out", root, *BUILD_FLAGS).exit_code == 0
    registry.refresh()
    assert len(registry.get("c").collection) == len(list(small.iterdir()))


def test_a_deleted_collection_answers_503_and_is_not_ready(corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "c"
    assert run_cli("build", corpus, "--out", root, *BUILD_FLAGS).exit_code == 0
    with serving({"c": root}, ServeConfig(token="T")) as server:
        assert server.json("GET", "/readyz", Authorization="Bearer T")[0] == 200
        assert server.json("GET", "/api/collections", Authorization="bearer  T")[0] == 200
        shutil.rmtree(root)
        status, doc = server.json("POST", "/api/collections/c/search", {"key": "x"},
                                  Authorization="Bearer T")  # fmt: skip
        assert status in (404, 503) and doc["error"]
        status, doc = server.json("GET", "/api/collections/c/items/1", Authorization="Bearer T")
        assert status in (200, 503) and doc  # from memory, or a JSON 503: never a 500

        assert server.json("GET", "/readyz", Authorization="Bearer T")[0] == 503


def test_metrics_labels_are_escaped() -> None:
    from indexer.serve.metrics import _label

    assert _label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_an_empty_token_is_refused(collection: Path) -> None:
    result = run_cli("serve", collection, "--token", " ")
    assert result.exit_code == 2 and "--token is empty" in result.output


def test_a_refused_version_is_counted_once(collection: Path, tmp_path: Path) -> None:
    copy = tmp_path / "c"
    shutil.copytree(collection, copy, symlinks=True)
    registry = Registry({"c": copy})
    registry.refresh()
    version = copy / "versions" / registry.get("c").version
    bad = copy / "versions" / "v000009"
    shutil.copytree(version, bad)
    (bad / "index" / "index.faiss").write_bytes(b"damaged")
    (copy / "current").unlink()
    (copy / "current").symlink_to(Path("versions") / bad.name)
    for _ in range(3):
        registry.refresh()
    assert registry.failures == 1 and registry.get("c").version == version.name


def test_items_are_listed_in_pages(served: tuple[Server, Path]) -> None:
    """The browsing route: every stored row once, in id order, a bounded page at a time."""
    server, _ = served
    status, everything = server.json("GET", "/api/collections/photos/items?limit=200")
    assert status == 200 and everything["total"] == 28 == len(everything["items"])
    assert (everything["collection"], everything["version"]) == ("photos", "v000001")
    ids = [row["id"] for row in everything["items"]]
    assert ids == sorted(ids) and len(set(ids)) == 28
    status, first = server.json("GET", "/api/collections/photos/items")  # 60 by default
    assert status == 200 and first["offset"] == 0 and first["limit"] == 60
    paged = []
    for offset in range(0, 30, 10):
        status, doc = server.json("GET", f"/api/collections/photos/items?offset={offset}&limit=10")
        assert status == 200 and doc["total"] == 28 and doc["offset"] == offset
        paged += doc["items"]
    assert paged == everything["items"]  # three pages: each row once, in order
    _, row = server.json("GET", f"/api/collections/photos/items/{ids[7]}")
    assert everything["items"][7] == row and "embedding" not in row  # the stored row
    _, past = server.json("GET", "/api/collections/photos/items?offset=1000")
    assert past["total"] == 28 and past["items"] == []
    _, narrow = server.json("GET", "/api/collections/photos/items?where=width%3C320&where=height>0")
    assert narrow["total"] == 2 and all(r["width"] < 320 for r in narrow["items"])
    assert narrow["items"] == [r for r in everything["items"] if r["width"] < 320]


def test_collections_say_weights_text_column_and_a_version_being_loaded(
    served: tuple[Server, Path], captioned: Path
) -> None:
    server, root = served
    status, (photos,) = server.json("GET", "/api/collections")
    assert status == 200 and photos["weights"] == "random" and photos["text_column"] is None
    assert photos["loading"] is None and photos["version"] == "v000001" and photos["count"] == 28
    shutil.copytree(root / "versions" / "v000001", root / "versions" / "v000002")
    (root / "current").unlink()  # published; the registry has not looked yet (no watcher)
    (root / "current").symlink_to(Path("versions") / "v000002")
    _, (photos,) = server.json("GET", "/api/collections")
    assert photos["loading"] == "v000002" and photos["version"] == "v000001"
    assert server.json("GET", "/readyz")[0] == 200  # the old version still answers
    with serving({"captions": captioned}) as other:
        _, (captions,) = other.json("GET", "/api/collections")
        assert captions["text_column"] == "caption" and captions["loading"] is None
        _, page = other.json("GET", "/api/collections/captions/items?limit=3")
        assert [r["caption"] for r in page["items"]] == [f"scene number {n}" for n in range(3)]


def test_a_version_loaded_or_refused_is_no_longer_loading(collection: Path, tmp_path: Path) -> None:
    copy = tmp_path / "c"
    shutil.copytree(collection, copy, symlinks=True)
    registry = Registry({"c": copy})
    registry.refresh()
    for name, damaged in (("v000002", False), ("v000003", True)):
        shutil.copytree(copy / "versions" / "v000001", copy / "versions" / name)
        if damaged:
            (copy / "versions" / name / "index" / "index.faiss").write_bytes(b"damaged")
        (copy / "current").unlink()
        (copy / "current").symlink_to(Path("versions") / name)
        assert registry.pending("c") == name
        registry.refresh()
        assert registry.pending("c") is None  # served, or refused (and said in the log)
    assert registry.get("c").version == "v000002" and registry.pending("nope") is None


def test_an_unknown_key_is_named_without_the_collections_folder(
    served: tuple[Server, Path],
) -> None:
    server, root = served
    status, doc = server.json("POST", "/api/collections/photos/search", {"key": "x", "k": 3})
    assert status == 404 and doc["error"] == "no item with key 'x' in collection 'photos'"
    status, doc = server.json("POST", "/api/collections/photos/search", {"key": "a" * 500})
    assert status == 404 and len(doc["error"]) < 120  # a client's long key, cut short
    from indexer.serve.app import Api
    from indexer.serve.metrics import Metrics

    registry = Registry({"photos": root})
    api = Api(registry, ServeConfig(), Metrics(registry))
    for path in (root, root.resolve(), root.absolute()):
        message = api._public(f"cannot read {path}/versions/v000001/shards/x.parquet: gone")
        assert message == "cannot read collection 'photos'/versions/v000001/shards/x.parquet: gone"
