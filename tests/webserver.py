"""A folder served over HTTP on 127.0.0.1 for URL-list tests: GETs counted by path, and a
hook that may answer a request with an error status instead of the file."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

Refusal = Callable[[str, int], int | None]  # (the request's path and query, the count of
# its path so far) -> an error status to answer with, or None


@contextmanager
def served(folder: Path, refuse: Refusal | None = None) -> Iterator[tuple[str, dict[str, int]]]:
    """The folder's base URL and the counts of GETs by path (query strings dropped)."""
    counts: dict[str, int] = {}
    lock = threading.Lock()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            with lock:
                counts[path] = counts.get(path, 0) + 1
                count = counts[path]
            status = refuse(self.path, count) if refuse is not None else None
            if status is not None:
                self.send_error(status)
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", counts
    finally:
        server.shutdown()
        server.server_close()
