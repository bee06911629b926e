"""The run history (one JSON line per run in DIR/runs.jsonl) and Prometheus textfile metrics."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from indexer.collection.layout import RUNS
from indexer.errors import InputError
from indexer.safeio import open_regular

log = logging.getLogger(__name__)

STATUSES = ("success", "partial", "failed", "locked", "interrupted")


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
    runtime: str | None = None  # what embedded images: torch, onnxruntime, openvino
    # the collection's runtime and precision, how they were decided (timed, cached, forced,
    # recorded, engine) and why: decide.Decision.record()
    choice: dict[str, Any] | None = None

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
    """Append one line with a single O_APPEND write; a failure is logged, never raised.

    Callers record a run in a ``finally:`` block, where raising would mask the run's own error.
    """
    path = root / RUNS
    line = json.dumps(record.to_json(), sort_keys=True) + "\n"
    try:
        if not root.is_dir():
            return  # nothing was started there: no collection to keep a history for
        fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, own=True)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
    except OSError as exc:  # after a failed run its error is the one line to show
        level = logging.INFO if record.error else logging.WARNING
        log.log(level, "run not recorded in %s: %s", path, exc.strerror or exc)


def read_runs(root: Path, last: int = 5) -> list[dict[str, Any]]:
    """The last runs, oldest first; lines that are not run records are skipped with a warning."""
    path = root / RUNS
    try:
        with os.fdopen(open_regular(path, os.O_RDONLY), encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("run history %s not read: %s", path, exc.strerror or exc)
        return []
    runs: list[dict[str, Any]] = []
    for number in range(len(lines), 0, -1):
        if len(runs) == last:
            break
        run = _parse_run(lines[number - 1])
        if run is None:
            log.warning("%s line %d is not a run record: skipped", path, number)
        else:
            runs.append(run)
    return runs[::-1]


def _parse_run(line: str) -> dict[str, Any] | None:
    """The run a history line records, or None if it is not JSON of a run's shape."""
    try:
        run = json.loads(line)
    except ValueError:
        return None
    if not isinstance(run, dict):
        return None
    fields_ok = (
        all(isinstance(run.get(name), str) for name in ("command", "status", "started"))
        and _is_number(run.get("seconds"))
        and isinstance(run.get("counts"), (dict, type(None)))
        and isinstance(run.get("error"), (str, type(None)))
        and (run.get("images_per_second") is None or _is_number(run["images_per_second"]))
    )
    return run if fields_ok else None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    try:
        _replace_text(path, "\n".join(lines) + "\n")
    except OSError as exc:
        raise InputError(
            f"cannot write metrics file {path} ({exc.strerror or exc}): "
            "choose a --metrics-file in a folder you may write to"
        ) from None


def _replace_text(path: Path, text: str) -> None:
    """Write a fresh temporary file (never through a link) and rename it over path."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.unlink(missing_ok=True)  # a stale one of ours, or a planted link: never written through
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
