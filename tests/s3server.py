"""An S3 server on loopback for tests and benchmarks: moto's, behind a small proxy that counts
object GETs, adds latency and answers 503 SlowDown to a share of them."""

from __future__ import annotations

import http.client
import http.server
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Faults:
    """What the proxy does to requests: seconds added to each, a share of object GETs
    answered 503 SlowDown (seeded), and the object GETs it passed on, by path."""

    latency: float = 0.0
    throttle: float = 0.0
    seed: int = 0
    gets: dict[str, int] = field(default_factory=dict)
    cached: dict[str, tuple[int, bytes, dict[str, str]]] = field(default_factory=dict)
    throttled: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    getting: int = 0  # object GETs in flight now
    most_getting: int = 0  # the most that were ever in flight at once
    listing: int = 0  # listing requests in flight now
    most_listing: int = 0  # the most that were ever in flight at once
    lists: int = 0  # listing requests passed on

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def object_gets(self) -> int:
        with self.lock:
            return sum(self.gets.values())

    def throttle_now(self) -> bool:
        with self.lock:
            hit = self.throttle > 0 and self._random.random() < self.throttle
            self.throttled += hit
            return hit


class S3:
    """moto's server on 127.0.0.1 and the proxy in front of it; `endpoint` is the proxy's."""

    def __init__(self, faults: Faults | None = None) -> None:
        from moto.server import ThreadedMotoServer

        self.faults = faults or Faults()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        host, port = self.moto.get_host_and_port()
        self.proxy = _proxy(host, port, self.faults)
        self.thread = threading.Thread(target=self.proxy.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.proxy.server_address[1]}"
        self.direct = f"http://{host}:{port}"
        conn = http.client.HTTPConnection(host, port, timeout=60)  # moto's state is per
        conn.request("POST", "/moto-api/reset")  # process: start from no buckets
        conn.getresponse().read()
        conn.close()

    def env(self) -> dict[str, str]:
        """What a process needs to reach it as S3 (moto takes any credentials)."""
        return {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.direct, aws_access_key_id="testing-key-id",
                            aws_secret_access_key=SECRET, region_name="us-east-1")  # fmt: skip

    def preload(self, bucket: str) -> None:
        """Keep every object of the bucket in the proxy: GETs are then answered without moto
        (a benchmark's store should cost its machine little CPU; counts and faults hold)."""
        client = self.client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for page in pages:
            for obj in page.get("Contents", []):
                got = client.get_object(Bucket=bucket, Key=obj["Key"])
                headers = {
                    "ETag": got["ETag"],
                    "Content-Type": got.get("ContentType", ""),
                    "Last-Modified": got["ResponseMetadata"]["HTTPHeaders"]["last-modified"],
                }
                path = f"/{bucket}/{obj['Key']}"
                self.faults.cached[path] = (200, got["Body"].read(), headers)

    def stop(self) -> None:
        self.proxy.shutdown()
        self.proxy.server_close()
        self.moto.stop()


SECRET = "s3cr3t-never-written-Zq81"  # grepped for in everything a run writes


def _proxy(host: str, port: int, faults: Faults) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _forward(self) -> None:
            is_list = self.command == "GET" and "list-type=" in self.path
            is_get = self.command == "GET" and "?" not in self.path and self.path.count("/") >= 2
            with faults.lock:
                if is_list:
                    faults.listing += 1
                    faults.lists += 1
                    faults.most_listing = max(faults.most_listing, faults.listing)
                if is_get:
                    faults.getting += 1
                    faults.most_getting = max(faults.most_getting, faults.getting)
            try:
                self._pass_on()
            finally:
                with faults.lock:
                    faults.listing -= is_list
                    faults.getting -= is_get

        def _pass_on(self) -> None:
            time.sleep(faults.latency)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            is_object_get = (
                self.command == "GET" and "?" not in self.path and self.path.count("/") >= 2
            )
            if is_object_get and faults.throttle_now():
                self._send(
                    503,
                    b"<Error><Code>SlowDown</Code><Message>Reduce your request "
                    b"rate.</Message></Error>",
                    {"Content-Type": "application/xml"},
                )
                return
            if is_object_get:
                with faults.lock:
                    faults.gets[self.path] = faults.gets.get(self.path, 0) + 1
                    hit = faults.cached.get(self.path)
                if hit is not None and "range" not in {k.lower() for k in self.headers}:
                    self._send(*hit)  # a preloaded object: served without moto (cheaper)
                    return
            if self.command in ("PUT", "POST", "DELETE"):
                with faults.lock:
                    faults.cached.clear()  # the store changed: nothing preloaded holds
            conn = http.client.HTTPConnection(host, port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            headers["Host"] = f"{host}:{port}"
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            passed = {
                k: v
                for k, v in response.getheaders()
                if k.lower() not in ("transfer-encoding", "connection", "content-length")
            }
            length_of = response.getheader("Content-Length") if self.command == "HEAD" else None
            self._send(response.status, data, passed, length_of)
            conn.close()

        def _send(self, status: int, data: bytes, headers: dict[str, str],
                  length: str | None = None) -> None:  # fmt: skip
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", length or str(len(data)))  # HEAD: the object's
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 1024  # clients open many connections at once (5 by default)

        def handle_error(self, request: Any, client_address: Any) -> None:
            if not isinstance(sys.exc_info()[1], ConnectionError):  # a client killed mid-
                super().handle_error(request, client_address)  # request: not the server's

    server = Server(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    return server
