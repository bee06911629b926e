"""Producer threads a bounded distance ahead, and generators closed on the way out."""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

log = logging.getLogger(__name__)


# The GIL's switch interval while the decode threads run (Python's default is 5 ms). Each of
# their many short torch calls lets the GIL go and must take it back, waiting up to the
# interval for a thread running Python (the main thread writing rows, the DataLoader's).
SWITCH_INTERVAL: float | None = 0.0005
JOIN_SECONDS = 10.0  # how long a stopped producer thread is waited for


def produce_ahead(items: Iterator[Any], name: str, depth: int,
          waiting: Any = nullcontext) -> Generator[Any, None, None]:  # fmt: skip
    """items, produced by a thread of their own up to `depth` ahead of the consumer; an
    error raised producing them is raised here, in order. The producer stops (and closes
    items) when the consumer does. `waiting()` times the producer's waits for room."""
    import queue
    import threading

    ready: queue.Queue[Any] = queue.Queue(depth)
    end, stop = object(), threading.Event()

    def hand_over(item: Any) -> None:
        with waiting():
            while not stop.is_set():  # the consumer gone (an error, Ctrl-C): the thread ends
                try:
                    ready.put(item, timeout=0.5)
                    return
                except queue.Full:
                    continue

    def work() -> None:
        try:
            for item in items:
                hand_over(item)
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            hand_over(exc)
        finally:
            hand_over(end)
            close(items)

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # a producer still inside torch when the interpreter exits aborts the process: it
        # sees `stop` within one item (or half a second of waiting for room)
        thread.join(JOIN_SECONDS)


def process_age() -> float:
    """Seconds since this process started (from /proc; 0 where there is none)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


@contextmanager
def closing_iterator(items: Iterator[Any]) -> Iterator[None]:
    """Closes a generator on the way out, an error included: its threads and workers stop
    now, not when the error's traceback lets it go (an interpreter exiting while a decode
    thread is inside torch aborts)."""
    try:
        yield
    finally:
        close(items)


def close(items: Iterator[Any]) -> None:
    """A generator closed (its finally blocks run now); other iterators need nothing."""
    method = getattr(items, "close", None)
    if method is not None:
        method()
