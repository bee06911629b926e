"""The service under hostile clients, against a real `indexer serve` process on 127.0.0.1
(500 photos): /healthz and a search by id unloaded; then, while another process at once
sends long filters ("a" + 60,000 spaces) 20 a second, holds 520 connections that send nothing
or half a header, and trickles in 16 uploads; the same with the long filters sent as fast as
they are answered (a flood, reported apart); then the server's memory through 16 concurrent
uploads of a 9400x9400 PNG, twice (peak growth and growth after, from /proc). Prints each
figure, its target and the ratios."""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import request, start, upload_body
from throughput import REPO, imagenet_corpus, indexer_cmd, prepared, run_timed

IDLE = 520
SLOW = 16
PAUSE = 0.05  # seconds between long filters (20/s; and 0: a flood, reported apart)
BIG = 9400


def timings(port: int, method: str, path: str, body: bytes | None, tries: int = 20) -> list[float]:
    """Seconds of `tries` requests, each on a new connection; inf for one that is not 200."""
    times = []
    for _ in range(tries):
        t0 = time.perf_counter()
        status, _ = request(port, method, path, body, {"Content-Type": "application/json"})
        times.append(time.perf_counter() - t0 if status == 200 else float("inf"))
    return times


def latency(port: int, method: str, path: str, body: bytes | None) -> float:
    """The median of 20 requests' seconds; each must be answered 200."""
    times = timings(port, method, path, body)
    if max(times) == float("inf"):
        raise SystemExit(f"{path}: a request was not answered 200")
    return statistics.median(times)


def worst(port: int, method: str, path: str, body: bytes | None) -> float:
    return max(timings(port, method, path, body))


def idle_connections(port: int, n: int) -> list[socket.socket]:
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if i % 2:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0")  # half a header
        socks.append(s)
    return socks


def long_filters(port: int, name: str, stop: threading.Event, pause: float) -> None:
    """Long filters, one after another, `pause` seconds apart (0: a closed-loop flood)."""
    body = json.dumps({"id": 1, "where": "a" + " " * 60_000}).encode()
    while not stop.wait(pause):
        request(port, "POST", f"/api/collections/{name}/search", body,
                {"Content-Type": "application/json"})  # fmt: skip


def slow_upload(port: int, name: str, image: bytes, stop: threading.Event) -> None:
    body, headers = upload_body(image)
    s = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST /api/collections/{name}/search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: {headers['Content-Type']}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    s.sendall(head.encode())
    for start_at in range(0, len(body), 256):
        if stop.is_set():
            break
        try:
            s.sendall(body[start_at : start_at + 256])
        except OSError:  # the server gave up on it (its read timeout)
            break
        time.sleep(0.05)
    s.close()


def attack_until(port: int, name: str, image: bytes, stop: Any, pause: float) -> None:
    """All three at once until `stop`: idle connections, a client sending long filters
    `pause` seconds apart, and slow uploads."""
    socks = idle_connections(port, IDLE)
    done = threading.Event()
    threads = [threading.Thread(target=long_filters, args=(port, name, done, pause))]
    threads += [threading.Thread(target=slow_upload, args=(port, name, image, done))
                for _ in range(SLOW)]  # fmt: skip
    for t in threads:
        t.start()
    stop.wait()
    done.set()
    for s in socks:
        s.close()
    for t in threads:
        t.join()


def under_attack(port: int, name: str, image: bytes, path: str, search: bytes,
                 pause: float) -> tuple[float, float]:  # fmt: skip
    """/healthz's worst and a search's median latency while attacked from another process
    (its GIL is not the measuring client's)."""
    stop = multiprocessing.Event()
    attack = multiprocessing.Process(target=attack_until, args=(port, name, image, stop, pause))
    attack.start()
    time.sleep(2.0)
    try:
        return worst(port, "GET", "/healthz", None), latency(port, "POST", path, search)
    finally:
        stop.set()
        attack.join()


def rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines)
    return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)


def big_png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (BIG, BIG), (40, 120, 200)).save(out, "PNG")
    return out.getvalue()


def burst(port: int, name: str, image: bytes) -> list[int]:
    statuses: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        body, headers = upload_body(image)
        status, _ = request(port, "POST", f"/api/collections/{name}/search", body, headers)
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench")
    args = parser.parse_args()
    ck = prepared(args.work)
    photos = imagenet_corpus(args.work)
    collection = args.work / "out" / "serve-photos"
    run_timed(indexer_cmd(photos, collection, ck))
    name = collection.name
    image = next(p for p in sorted(photos.rglob("*")) if p.is_file()).read_bytes()
    search = json.dumps({"id": 3, "k": 10}).encode()
    path = f"/api/collections/{name}/search"
    proc, port = start(collection, 3.0)
    lines = [f"# indexer serve under hostile clients: {name} (500 photos)"]
    try:
        for _ in range(3):  # warm: the model, the rows, the page cache
            latency(port, "POST", path, search)
            latency(port, "GET", "/healthz", None)
        health0 = latency(port, "GET", "/healthz", None)
        search0 = latency(port, "POST", path, search)
        lines += [
            f"{'/healthz unloaded':>34}: {health0 * 1000:7.1f} ms (median of 20)",
            f"{'search by id unloaded':>34}: {search0 * 1000:7.1f} ms (median of 20)",
        ]
        for pause, label in ((PAUSE, f"long filters {1 / PAUSE:.0f}/s"), (0.0, "flooding")):
            health1, search1 = under_attack(port, name, image, path, search, pause)
            lines += [
                f"{'/healthz, ' + label:>34}: {health1 * 1000:7.1f} ms (worst of 20; "
                "target < 1000)",
                f"{'search by id, ' + label:>34}: {search1 * 1000:7.1f} ms (median of 20): "
                f"{search1 / search0:.2f}x" + (" (target < 2x)" if pause else " (no target)"),
            ]
        png = big_png()
        before, _ = rss(proc.pid)
        statuses = burst(port, name, png) + burst(port, name, png)
        time.sleep(2.0)
        after, peak = rss(proc.pid)
        lines += [
            f"{'16 x 9400x9400 PNG uploads, twice':>34}: statuses {sorted(set(statuses))}",
            f"{'server RSS before':>34}: {before / 2**20:7.0f} MiB",
            f"{'peak growth':>34}: {(peak - before) / 2**20:7.0f} MiB (target <= 1536)",
            f"{'growth after':>34}: {(after - before) / 2**20:7.0f} MiB (target <= 512)",
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
