"""Prometheus text metrics of the service: requests, latency histogram, versions, reloads."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Counters and a latency histogram per endpoint, kept in memory, rendered as text."""

    def __init__(self, registry: Any) -> None:
        self._registry = registry
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, int], int] = defaultdict(int)
        self._buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)
        self._batches: dict[int, int] = defaultdict(int)  # images embedded together -> times

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(endpoint, status)] += 1
            self._sums[endpoint] += seconds
            self._counts[endpoint] += 1
            for n, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    self._buckets[endpoint][n] += 1

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self._batches[size] += 1

    def render(self) -> str:
        lines = ["# TYPE indexer_requests_total counter"]
        with self._lock:
            for (endpoint, status), count in sorted(self._requests.items()):
                lines.append(
                    f'indexer_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}'
                )
            lines.append("# TYPE indexer_request_seconds histogram")
            for endpoint in sorted(self._counts):
                for bound, count in zip(BUCKETS, self._buckets[endpoint], strict=True):
                    lines.append(f'indexer_request_seconds_bucket{{endpoint="{endpoint}",'
                                 f'le="{bound}"}} {count}')  # fmt: skip
                total = self._counts[endpoint]
                lines.append(f'indexer_request_seconds_bucket{{endpoint="{endpoint}",le="+Inf"}} '
                             f"{total}")  # fmt: skip
                lines.append(f'indexer_request_seconds_sum{{endpoint="{endpoint}"}} '
                             f"{self._sums[endpoint]:.6f}")  # fmt: skip
                lines.append(f'indexer_request_seconds_count{{endpoint="{endpoint}"}} {total}')
        lines.append("# TYPE indexer_embed_batch_size histogram")
        with self._lock:
            batches = dict(self._batches)
        for bound in (1, 2, 4, 8, 16, 32):
            count = sum(n for size, n in batches.items() if size <= bound)
            lines.append(f'indexer_embed_batch_size_bucket{{le="{bound}"}} {count}')
        total = sum(batches.values())
        lines.append(f'indexer_embed_batch_size_bucket{{le="+Inf"}} {total}')
        lines.append(f"indexer_embed_batch_size_sum {sum(s * n for s, n in batches.items())}")
        lines.append(f"indexer_embed_batch_size_count {total}")
        lines.append("# TYPE indexer_loaded_version gauge")
        for loaded in self._registry.all():
            number = int(loaded.version.lstrip("v") or 0)
            lines.append(f'indexer_loaded_version{{collection="{_label(loaded.name)}"}} {number}')
        lines.append("# TYPE indexer_reloads_total counter")
        lines.append(f"indexer_reloads_total {self._registry.reloads}")
        lines.append("# TYPE indexer_reload_failures_total counter")
        lines.append(f"indexer_reload_failures_total {self._registry.failures}")
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """A Prometheus label value: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
