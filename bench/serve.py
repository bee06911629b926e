"""The search service: one-image latency (p50/p99) at concurrency 1 and requests/s at
concurrency 1, 8, 16 and 32, by upload and by id, with micro-batching on and off, each
against a real `indexer serve` process on 127.0.0.1; then the ratios. Each client keeps its
connection open between requests, as browsers and HTTP client libraries do."""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import BIN, REPO, imagenet_corpus, indexer_cmd, prepared, run_timed

CONCURRENCY = (1, 8, 16, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(collection: Path, window_ms: float) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([str(BIN / "indexer"), "serve", str(collection), "--port", str(port),
                             "--batch-window-ms", str(window_ms)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if request(port, "GET", "/readyz", None, {})[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the service did not become ready")


def request(port: int, method: str, path: str, body: bytes | None,
            headers: dict[str, str]) -> tuple[int, bytes]:  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def upload_body(image: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n10\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n")  # fmt: skip
    body = head.encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def run_load(port: int, name: str, kind: str, images: list[bytes], clients: int,
             seconds: float) -> tuple[float, list[float]]:  # fmt: skip
    """requests/s over `seconds` with `clients` threads; every latency."""
    latencies: list[float] = []
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client(n: int) -> None:
        i = n
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < stop:
            if kind == "upload":
                body, headers = upload_body(images[i % len(images)])
            else:
                body = json.dumps({"id": i % 500, "k": 10}).encode()
                headers = {"Content-Type": "application/json"}
            t0 = time.perf_counter()
            conn.request("POST", f"/api/collections/{name}/search", body=body, headers=headers)
            response = conn.getresponse()
            status, _ = response.status, response.read()
            elapsed = time.perf_counter() - t0
            if status != 200:
                raise SystemExit(f"status {status}")
            with lock:
                latencies.append(elapsed)
            i += clients
        conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) / (time.perf_counter() - t0), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved; the best is kept")
    args = parser.parse_args()
    ck = prepared(args.work)
    photos = imagenet_corpus(args.work)
    collection = args.work / "out" / "serve-photos"
    run_timed(indexer_cmd(photos, collection, ck))
    images = [p.read_bytes() for p in sorted(photos.rglob("*"))[:64] if p.is_file()]
    lines = [f"# indexer serve: {collection.name} (500 photos), {args.seconds:g} s per load, "
             f"best of {args.rounds} interleaved rounds"]  # fmt: skip
    rates: dict[tuple[float, str, int], float] = {}
    latencies: dict[tuple[float, str, int], list[float]] = {}
    for _ in range(args.rounds):  # interleaved rounds; each cell keeps its best
        for window in (3.0, 0.0):
            proc, port = start(collection, window)
            try:
                for kind in ("upload", "id"):
                    run_load(port, collection.name, kind, images, 1, 1.0)  # warm
                    for clients in CONCURRENCY:
                        rate, lat = run_load(port, collection.name, kind, images, clients,
                                             args.seconds)  # fmt: skip
                        cell = (window, kind, clients)
                        if rate > rates.get(cell, 0.0):
                            rates[cell], latencies[cell] = rate, lat
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    order = sorted(rates, key=lambda cell: (-cell[0], cell[1], cell[2]))
    for window, kind, clients in order:
        rate = rates[(window, kind, clients)]
        label = f"batching {'on (3 ms)' if window else 'off'}"
        p50, p99 = np.percentile(np.array(latencies[(window, kind, clients)]) * 1000, [50, 99])
        lines.append(f"{label:>18} {kind:>6} c={clients:<3} {rate:7.1f} req/s  "
                     f"p50 {p50:6.1f} ms  p99 {p99:6.1f} ms")  # fmt: skip
    for kind in ("upload", "id"):
        on = rates[(3.0, kind, 16)] / rates[(3.0, kind, 1)]
        off = rates[(0.0, kind, 16)] / rates[(0.0, kind, 1)]
        gain = rates[(3.0, kind, 32)] / rates[(0.0, kind, 32)]
        lines.append(f"{kind}: c=16 / c=1 requests/s: {on:.2f}x batching on, {off:.2f}x off "
                     f"(target >= 2x); at c=32 batching on / off: {gain:.2f}x")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
