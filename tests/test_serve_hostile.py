"""`indexer serve` under hostile and careless clients (issue 28's table), each through a real
uvicorn server on 127.0.0.1 configured as the CLI configures it."""

from __future__ import annotations

import http.client
import io
import json
import logging
import resource
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from PIL import Image

from indexer.serve.app import ServeConfig, create_app, host_allowed
from indexer.serve.budget import (
    BudgetTimeout,
    OverBudget,
    PixelBudget,
    header_pixels,
)
from indexer.serve.guard import ConnectionLimits, server_config
from indexer.serve.registry import Registry
from tests.helpers import BUILD_FLAGS, run_cli

GUARD_SECONDS = 60  # a bound against a hung test, never a timing assertion


class Served:
    """The app behind the CLI's uvicorn configuration, on an ephemeral loopback port."""

    def __init__(self, registry: Registry, cfg: ServeConfig, limits: ConnectionLimits) -> None:
        self.registry = registry
        self.app = create_app(registry, cfg)
        self.server = uvicorn.Server(server_config(self.app, "127.0.0.1", 0, limits))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + GUARD_SECONDS
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=GUARD_SECONDS)
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, data

    def search(self, doc: dict[str, Any], **headers: str) -> tuple[int, Any]:
        status, data = self.request("POST", "/api/collections/c/search", json.dumps(doc).encode(),
                                    {"Content-Type": "application/json", **headers})  # fmt: skip
        return status, json.loads(data) if data.startswith(b"{") else data

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=GUARD_SECONDS)


@contextmanager
def served(root: Path, cfg: ServeConfig | None = None, limits: ConnectionLimits | None = None,
           storage_options: tuple[tuple[str, str], ...] = ()) -> Iterator[Served]:  # fmt: skip
    registry = Registry({"c": root}, storage_options=storage_options)
    registry.refresh()
    server = Served(registry, cfg or ServeConfig(), limits or ConnectionLimits())
    try:
        yield server
    finally:
        server.stop()


def upload_body(data: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


def more_files(count: int) -> None:
    """Room for this test's sockets (both ends live in this process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count:
        if hard != resource.RLIM_INFINITY and hard < count:
            pytest.skip(f"needs {count} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))


def closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


# 1: a long filter neither stalls the server nor takes long to refuse
def test_a_long_filter_is_refused_and_the_server_answers_meanwhile(collection: Path) -> None:
    with served(collection) as server:
        got: list[tuple[int, Any]] = []
        attack = threading.Thread(target=lambda: got.append(
            server.search({"id": 1, "where": "a" + " " * 60_000})))  # fmt: skip
        attack.start()
        assert server.request("GET", "/healthz")[0] == 200
        attack.join(GUARD_SECONDS)
        status, doc = got[0]
        assert status == 422 and "characters" in doc["error"], doc


# 2: idle and half-header connections can neither exhaust the cap nor stay forever
def test_520_idle_connections_leave_requests_answered(collection: Path) -> None:
    more_files(4096)
    with served(collection) as server:
        socks = []
        for i in range(520):
            s = socket.create_connection(("127.0.0.1", server.port))
            if i % 2:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0")
            socks.append(s)
        try:
            assert server.request("GET", "/healthz")[0] == 200
            status, doc = server.search({"id": 1, "k": 3})
            assert status == 200 and len(doc["results"]) == 3
        finally:
            for s in socks:
                s.close()


def test_a_half_sent_header_is_closed_at_its_deadline(collection: Path) -> None:
    with served(collection, limits=ConnectionLimits(header_seconds=0.5)) as server:
        silent = socket.create_connection(("127.0.0.1", server.port))
        half = socket.create_connection(("127.0.0.1", server.port))
        half.sendall(b"GET /healthz HTTP/1.1\r\nHost: local")
        assert closed_by_server(silent, GUARD_SECONDS)
        assert closed_by_server(half, GUARD_SECONDS)
        kept = socket.create_connection(("127.0.0.1", server.port))  # a kept-alive connection's
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # next request too
        answer = b""
        while b'"alive"}' not in answer:  # the whole response, however it was split
            answer += kept.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        assert closed_by_server(kept, GUARD_SECONDS)


def test_past_the_cap_the_longest_idle_connections_are_closed(collection: Path) -> None:
    with served(collection, limits=ConnectionLimits(max_connections=20)) as server:
        old = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
        time.sleep(0.1)  # later connections are younger by the server's clock
        new = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
        assert server.request("GET", "/healthz")[0] == 200
        assert sum(closed_by_server(s, 5) for s in old[:6]) == 6  # the oldest made room
        assert not any(closed_by_server(s, 0.2) for s in new)


# 3: decoding takes its share of a pixel budget; freed memory goes back
def test_concurrent_large_uploads_wait_for_the_pixel_budget(
    collection: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    peaks: list[int] = []
    reserve = PixelBudget.reserve

    @contextmanager
    def watched(self: PixelBudget, pixels: int, deadline: float) -> Iterator[None]:
        with reserve(self, pixels, deadline):
            peaks.append(self.held)
            time.sleep(0.05)  # decoding overlaps if the budget lets it
            yield

    monkeypatch.setattr(PixelBudget, "reserve", watched)
    image = png(1200, 1000, (200, 30, 30))
    body, headers = upload_body(image)
    cfg = ServeConfig(max_decode_pixels=1_500_000, max_upload_bytes=1 << 24)
    with served(collection, cfg) as server:
        results: list[tuple[int, bytes]] = []

        def one() -> None:
            results.append(server.request("POST", "/api/collections/c/search", body, headers))

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(GUARD_SECONDS)
    assert [status for status, _ in results] == [200] * 6
    assert len({json.dumps(json.loads(d)["results"]) for _, d in results}) == 1
    assert len(peaks) == 6 and max(peaks) == 1_200_000  # one 1.2 Mpx image at a time


def test_the_pixel_budget_is_never_exceeded_and_a_wait_ends() -> None:
    budget = PixelBudget(100)
    held: list[int] = []
    lock = threading.Lock()

    def take(pixels: int) -> None:
        with budget.reserve(pixels, time.monotonic() + GUARD_SECONDS):
            with lock:
                held.append(budget.held)
            time.sleep(0.01)

    threads = [threading.Thread(target=take, args=(p,)) for p in (60, 50, 40, 30, 100, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GUARD_SECONDS)
    assert len(held) == 6 and max(held) <= 100 and budget.held == 0
    with pytest.raises(OverBudget, match="max-decode-pixels"), budget.reserve(101, 0.0):
        pass  # more than the whole budget: refused, never waited for
    with (  # the whole budget held: another waits, then gives up
        budget.reserve(100, time.monotonic() + 1),
        pytest.raises(BudgetTimeout, match="try again"),
        budget.reserve(1, time.monotonic() + 0.05),
    ):
        pass
    assert budget.held == 0


def test_header_pixels_reads_only_the_header_and_weighs_wide_modes() -> None:
    assert header_pixels(png(300, 200, (1, 2, 3))) == 60_000
    assert header_pixels(b"not an image") == 1
    for mode, weight in (("I;16", 8), ("LA", 4), ("RGBA", 4), ("L", 1)):
        out = io.BytesIO()
        Image.new(mode, (30, 20)).save(out, "PNG")
        assert header_pixels(out.getvalue()) == 600 * weight, mode


def test_an_upload_needing_more_than_the_budget_is_a_422(collection: Path) -> None:
    out = io.BytesIO()
    Image.new("I;16", (1000, 1000)).save(out, "PNG")  # 1 Mpx, 8 units each
    body, headers = upload_body(out.getvalue())
    cfg = ServeConfig(max_decode_pixels=4_000_000, max_upload_bytes=1 << 24)
    with served(collection, cfg) as server:
        status, data = server.request("POST", "/api/collections/c/search", body, headers)
        assert status == 422 and b"max-decode-pixels" in data
        status, _ = server.request("POST", "/api/collections/c/search",
                                   *upload_body(png(1000, 1000, (9, 9, 9))))  # fmt: skip
        assert status == 200


FREED = """
import io, resource, sys, threading
from pathlib import Path
from PIL import Image
from indexer.decode.images import decode_image
from indexer.serve.budget import return_large_buffers

if not return_large_buffers():
    print("not glibc"); sys.exit(0)
out = io.BytesIO()
Image.new("RGB", (4000, 4000), (10, 20, 30)).save(out, "PNG")  # 64 MB decoded (RGBX)
data = out.getvalue()

def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()

def decode():
    assert decode_image(data).image.size == (4000, 4000)

before = rss()
for _ in range(3):  # a new thread each time: glibc's per-thread arenas
    t = threading.Thread(target=decode)
    t.start()
    t.join()
print(rss() - before)
"""


def test_freed_image_memory_goes_back_to_the_system() -> None:
    """In a process of its own (this one's other threads allocate meanwhile): decoded
    images' memory is given back with return_large_buffers."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", FREED], capture_output=True, text=True,
                         timeout=GUARD_SECONDS, check=True)  # fmt: skip
    held = run.stdout.strip()
    if held == "not glibc":
        pytest.skip("not glibc")
    assert int(held) < 32 << 20  # without the call: 45-60 MiB held (glibc's default arenas)


# 4: a collection rebuilt from scratch never serves the old one's pictures
def test_a_rebuilt_collection_serves_its_own_thumbnails(tmp_path: Path) -> None:
    def folder(name: str, colour: tuple[int, int, int]) -> Path:
        root = tmp_path / name
        root.mkdir()
        for n in range(6):
            Image.new("RGB", (64, 48), tuple(min(255, c + 8 * n) for c in colour)).save(
                root / f"{n:02d}.png")  # fmt: skip
        return root

    red, blue = folder("red", (200, 20, 20)), folder("blue", (20, 20, 200))
    out = tmp_path / "c"
    assert run_cli("build", red, "--out", out, *BUILD_FLAGS).exit_code == 0
    with served(out) as server:
        status, data = server.request("GET", "/api/collections/c/items/3/thumbnail")
        assert status == 200 and _mean(data)[0] > 150
        shutil.rmtree(out)
        assert run_cli("build", blue, "--out", out, *BUILD_FLAGS).exit_code == 0
        server.registry.refresh()
        for item in (3, 4):
            status, data = server.request("GET", f"/api/collections/c/items/{item}/thumbnail")
            assert status == 200 and _mean(data)[2] > 150, (item, _mean(data))


def _mean(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).reshape(-1, 3).mean(0)


# 9: DNS rebinding and cross-site JSON
@pytest.mark.parametrize(
    ("host", "allowed", "ok"),
    [
        ("127.0.0.1:8000", (), True),
        ("localhost:8000", (), True),
        ("LOCALHOST.", (), True),
        ("[::1]:8000", (), True),
        ("10.1.2.3", (), True),
        (None, (), True),
        ("attacker.example", (), False),
        ("attacker.example:8000", (), False),
        ("127.0.0.1.attacker.example", (), False),
        ("localhost.attacker.example", (), False),
        ("photos.lan:8000", ("photos.lan",), True),
        ("Photos.LAN", ("photos.lan",), True),
        ("other.lan", ("photos.lan",), False),
        ("127.0.0.1:80@evil.com", (), False),
        ("localhost:evil", (), False),
        ("127.0.0.1:8000:evil", (), False),
        ("[::1]evil.com", (), False),
        ("[::1", (), False),
        ("evil.com#@127.0.0.1", (), False),
    ],
)
def test_host_allowed(host: str | None, allowed: tuple[str, ...], ok: bool) -> None:
    assert host_allowed(host, allowed) is ok


def test_a_rebinding_host_and_a_cross_site_json_body_are_refused(collection: Path) -> None:
    with served(collection) as server:
        for path in ("/api/collections", "/api/collections/c/items/1", "/readyz", "/metrics",
                     "/api/collections/c/items/1/thumbnail", "/"):  # fmt: skip
            status, data = server.request("GET", path, headers={"Host": "attacker.example"})
            assert status == 403 and b"--allowed-host" in data, path
        assert server.request("GET", "/healthz", headers={"Host": "attacker.example"})[0] == 200
        assert server.request("GET", "/api/collections", headers={"Host": "localhost"})[0] == 200
        body = json.dumps({"id": 1}).encode()
        status, data = server.request("POST", "/api/collections/c/search", body,
                                      {"Content-Type": "text/plain"})  # fmt: skip
        assert status == 415 and b"application/json" in data
        status, _ = server.request("POST", "/api/collections/c/search", body)  # no type at all
        assert status == 415
    with served(collection, ServeConfig(allowed_hosts=("photos.lan",))) as server:
        assert server.request("GET", "/api/collections", headers={"Host": "photos.lan"})[0] == 200


# 10: a client that leaves mid-upload is not a server error
def test_a_disconnect_mid_upload_is_counted_apart_and_logged_in_a_line(
    collection: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="indexer")
    with served(collection) as server:
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /api/collections/c/search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: multipart/form-data; boundary=x\r\n"
                  b"Content-Length: 100000\r\n\r\n--x\r\n" + b"a" * 1000)  # fmt: skip
        time.sleep(0.2)
        s.close()
        deadline = time.monotonic() + GUARD_SECONDS
        metrics = ""
        while 'status="499"' not in metrics and time.monotonic() < deadline:
            metrics = server.request("GET", "/metrics")[1].decode()
            time.sleep(0.05)
    assert 'endpoint="search",status="499"} 1' in metrics
    assert 'status="500"' not in metrics
    mine = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(mine) == 1 and mine[0].levelno == logging.INFO and mine[0].exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_body_that_never_finishes_is_a_408(collection: Path) -> None:
    with served(collection, ServeConfig(read_timeout=0.3)) as server:
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /api/collections/c/search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")  # fmt: skip
        s.settimeout(GUARD_SECONDS)
        assert s.recv(4096).startswith(b"HTTP/1.1 408")
        s.close()


# 11: --keep 1 deletes the served version; the service stays ready
def test_readyz_stays_ready_when_a_build_prunes_the_served_version(
    corpus: Path, tmp_path: Path
) -> None:
    root = tmp_path / "c"
    shutil.copytree(corpus, tmp_path / "src")
    assert run_cli("build", tmp_path / "src", "--out", root, *BUILD_FLAGS).exit_code == 0
    with served(root) as server:
        assert server.request("GET", "/readyz")[0] == 200
        Image.new("RGB", (64, 64), (9, 99, 199)).save(tmp_path / "src" / "new.png")
        result = run_cli("build", tmp_path / "src", "--out", root, "--keep", "1", *BUILD_FLAGS)
        assert result.exit_code == 0, result.output
        assert not server.registry.get("c").collection.version.is_dir()  # pruned
        assert server.request("GET", "/readyz")[0] == 200  # before the watcher reloads
        status, doc = server.search({"id": 1, "k": 2})
        assert status == 200 and len(doc["results"]) == 2  # answered from memory
        status, doc = server.search({"id": 1, "k": 2, "where": "width>0"})
        assert status == 200 and len(doc["results"]) == 2 and doc["version"] == "v000001"
        served_now = server.registry.get("c").collection
        assert served_now.version.name == "v000001"  # never reopened under its requests
        server.registry.refresh()
        status, data = server.request("GET", "/readyz")
        assert status == 200 and json.loads(data)["c"] == "v000002"


# 12: with a token, nothing but /healthz (and the page's static HTML) answers without it
def test_readyz_and_metrics_need_the_token_or_the_metrics_token(collection: Path) -> None:
    cfg = ServeConfig(token="secret", metrics_token="probe")
    with served(collection, cfg) as server:
        for path in ("/readyz", "/metrics"):
            status, data = server.request("GET", path)
            assert status == 401 and b"v000001" not in data and b"indexer_" not in data
            for token in ("secret", "probe"):
                got = server.request("GET", path, headers={"Authorization": f"Bearer {token}"})
                assert got[0] == 200, (path, token)
        status, _ = server.request("GET", "/api/collections",
                                   headers={"Authorization": "Bearer probe"})  # fmt: skip
        assert status == 401  # the metrics token opens nothing else
        assert server.request("GET", "/healthz")[0] == 200


def test_the_kubernetes_manifest_probes_readyz_with_its_metrics_token(
    collection: Path, tmp_path: Path
) -> None:
    """serve.yaml's readiness probe, sent to `indexer serve` run with the manifest's token
    variables (on 127.0.0.1: tests bind nothing else)."""
    import os
    import subprocess
    import sys

    yaml = pytest.importorskip("yaml")
    manifest = Path(__file__).parents[1] / "jobs" / "kubernetes" / "serve.yaml"
    deployment = next(
        d for d in yaml.safe_load_all(manifest.read_text()) if d["kind"] == "Deployment"
    )
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", "secret-from-the-secret") for e in container["env"]}
    probe = container["readinessProbe"]["httpGet"]
    headers = {h["name"]: h["value"] for h in probe["httpHeaders"]}
    assert headers["Authorization"] == f"Bearer {env['INDEXER_METRICS_TOKEN']}"
    assert container["resources"]["limits"]["memory"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = [sys.executable, "-c", "from indexer.cli.main import entry; entry()"]
    proc = subprocess.Popen([*cli, "serve", str(collection), "--port", str(port)],
                            env={**os.environ, **env}, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + GUARD_SECONDS
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD_SECONDS)
                conn.request("GET", probe["path"], headers=headers)
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD_SECONDS)
        conn.request("GET", probe["path"])
        assert conn.getresponse().status == 401  # without the probe's header
    finally:
        proc.terminate()
        proc.wait(GUARD_SECONDS)


def test_a_non_ascii_token_is_compared_as_the_client_sent_it(collection: Path) -> None:
    with served(collection, ServeConfig(token="pässwörd")) as server:
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(
            "GET /api/collections HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Authorization: Bearer pässwörd\r\nConnection: close\r\n\r\n".encode()
        )
        assert s.recv(4096).startswith(b"HTTP/1.1 200")  # UTF-8 on the wire, as curl sends
        s.close()
        status, _ = server.request("GET", "/api/collections",
                                   headers={"Authorization": "Bearer p\u00e4ssw"})  # fmt: skip
        assert status == 401


def test_thumbnails_are_private_revalidated_and_of_the_indexed_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for n in range(3):
        Image.new("RGB", (64, 48), (40 * n, 200, 30)).save(src / f"{n}.png")
    out = tmp_path / "c"
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS).exit_code == 0
    with served(out) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=GUARD_SECONDS)
        conn.request("GET", "/api/collections/c/items/1/thumbnail")
        response = conn.getresponse()
        response.read()
        assert response.status == 200 and response.getheader("Cache-Control") == "private, no-cache"
        tag = response.getheader("ETag")
        status, _ = server.request("GET", "/api/collections/c/items/1/thumbnail",
                                   headers={"If-None-Match": tag})  # fmt: skip
        assert status == 304
        key = server.registry.get("c").collection.row_of(2)["key"]
        Image.new("RGB", (300, 200), (255, 0, 0)).save(src / key)  # not built again
        status, data = server.request("GET", "/api/collections/c/items/2/thumbnail")
        assert status == 404 and b"changed in its source" in data


def test_slow_bodies_cannot_hold_more_than_the_body_budget_nor_block_probes(
    collection: Path,
) -> None:
    with served(collection, ServeConfig(max_body_bytes=100)) as server:
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /api/collections/c/search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                  + b" " * 90)  # fmt: skip
        time.sleep(0.3)  # read by the server: 90 of its 100 bytes held
        status, data = server.request("POST", "/api/collections/c/search",
                                      json.dumps({"id": 1, "k": 3, "x": "y" * 20}).encode(),
                                      {"Content-Type": "application/json"})  # fmt: skip
        assert status == 503 and b"too many request bodies" in data
        assert server.request("GET", "/readyz")[0] == 200
        assert server.request("GET", "/metrics")[0] == 200
        s.close()
        time.sleep(0.3)  # its bytes given back
        status, _ = server.search({"id": 1, "k": 3})
        assert status == 200


def test_unknown_routes_and_methods_answer_json(collection: Path) -> None:
    with served(collection) as server:
        for method, path, status in (
            ("GET", "/nowhere", 404),
            ("DELETE", "/api/collections/c/search", 405),
        ):
            got, data = server.request(method, path)
            assert got == status and "error" in json.loads(data), (method, path)
