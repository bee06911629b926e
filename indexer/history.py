"""The run history (one JSON line per run in DIR/runs.jsonl) and Prometheus textfile metrics."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from indexer.catalog import RUNS

STATUSES = ("success", "partial", "failed", "locked")


@dataclass
class RunRecord:
    """What one run did; ``status`` is one of STATUSES."""

    command: str
    started: float
    ended: float
    status: str
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    failures: dict[str, int] = field(default_factory=dict)  # failed items per reason

    def to_json(self) -> dict[str, Any]:
        seconds = max(self.ended - self.started, 0.0)
        done = self.counts.get("new", 0) + self.counts.get("changed", 0)
        return {
            **asdict(self),
            "started": _iso(self.started),
            "ended": _iso(self.ended),
            "seconds": round(seconds, 3),
            "images_per_second": round(done / seconds, 1) if seconds > 0 else None,
        }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def append_run(root: Path, record: RunRecord) -> None:
    """Append one line with a single O_APPEND write, so concurrent writers never interleave."""
    if not root.is_dir():
        return  # nothing was started there: no collection to keep a history for
    line = json.dumps(record.to_json(), sort_keys=True) + "\n"
    fd = os.open(root / RUNS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def read_runs(root: Path, last: int = 5) -> list[dict[str, Any]]:
    """The last runs, oldest first; unreadable lines (a torn write) are skipped."""
    path = root / RUNS
    if not path.is_file():
        return []
    runs = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[-last:]:
        try:
            runs.append(json.loads(line))
        except ValueError:
            continue
    return runs


def write_metrics(path: Path, root: Path, record: RunRecord) -> None:
    """node_exporter textfile metrics of the last run, replaced atomically."""
    data = record.to_json()
    labels = f'collection="{root}"'
    lines = [
        "# HELP indexer_last_run_timestamp_seconds End of the last indexer run.",
        "# TYPE indexer_last_run_timestamp_seconds gauge",
        f"indexer_last_run_timestamp_seconds{{{labels}}} {record.ended:.0f}",
        "# HELP indexer_last_run_success 1 if the last run succeeded (fully or partially).",
        "# TYPE indexer_last_run_success gauge",
        f"indexer_last_run_success{{{labels}}} {int(record.status in ('success', 'partial'))}",
        "# HELP indexer_last_run_duration_seconds Duration of the last run.",
        "# TYPE indexer_last_run_duration_seconds gauge",
        f"indexer_last_run_duration_seconds{{{labels}}} {data['seconds']}",
        "# HELP indexer_last_run_items Items of the last run, by state.",
        "# TYPE indexer_last_run_items gauge",
    ]
    lines += [
        f'indexer_last_run_items{{{labels},state="{state}"}} {count}'
        for state, count in sorted(record.counts.items())
    ]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
