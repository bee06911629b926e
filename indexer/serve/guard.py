"""Connection limits uvicorn lacks: a header deadline and idle connections evicted first."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take to send a request's headers (on a new or a kept-alive
    connection), and how many connections stay open before the idle ones are closed."""

    header_seconds: float = 10.0
    max_connections: int = 1024


def guarded_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, with a deadline for each request's headers and, past
    `max_connections`, the connections idle longest (no request in progress: silent, half a
    header, or kept alive) closed to make room. A flood of idle connections then costs its
    sender its oldest ones, never a working client its turn; requests in progress are never
    closed (their number is the app's to bound)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class Guarded(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _idle_since = 0.0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._idle_since = time.monotonic()
            self._arm()
            if len(self.connections) > limits.max_connections:
                self._evict(len(self.connections) - limits.max_connections)

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self._idle():  # a kept-alive connection's next request
                self._arm()
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            self._idle_since = time.monotonic()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(limits.header_seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self._idle() and not self.transport.is_closing():
                self.transport.close()

        def _evict(self, count: int) -> None:
            idle = [c for c in self.connections if isinstance(c, Guarded) and c is not self
                    and c._idle()]  # fmt: skip
            idle.sort(key=lambda c: c._idle_since)
            for connection in idle[:count]:
                connection.transport.close()

    return Guarded


def server_config(app: Any, host: str, port: int, limits: ConnectionLimits) -> Any:
    """The uvicorn configuration `indexer serve` runs with: the guarded protocol, kept-alive
    connections closed after 5 s idle, no access log (the metrics count requests)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                          http=guarded_protocol(limits), timeout_keep_alive=5)  # fmt: skip
