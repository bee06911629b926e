"""Name the reason of each failed item (truncated, not an image, too large, ...) and count them."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

# (reason, any of these in the error text), first match wins; the texts are Pillow's, the
# OS's and our own (images.py, loader.py, sources/folder.py).
REASONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("empty file", ("empty file",)),
    ("truncated", ("truncated", "broken data stream")),
    ("too large", ("over the limit of", "DecompressionBomb", "image too large")),
    ("not an image", ("cannot identify image file",)),
    ("decoder crashed", ("decoder crashed",)),
    ("timed out", ("--decode-timeout", "timed out", "TimeoutError")),
    ("outside the source folder", ("outside the source folder",)),
    ("symlink loop", ("Too many levels of symbolic links",)),
    ("not found", ("FileNotFoundError", "No such file")),
    ("permission denied", ("Permission denied",)),
    ("is a folder", ("IsADirectoryError", "(a folder)")),
    ("not a regular file", ("is not a regular file",)),
    ("connection refused", ("Connection refused", "ConnectionRefusedError")),
    ("host not found", ("Name or service not known", "nodename nor servname")),
)
HTTP_STATUS = re.compile(r"\bHTTP(?: Error)? (\d{3})\b")  # ours, urllib's (img2dataset's)
HTTP_NAMES = {400: "bad request", 401: "unauthorized", 403: "forbidden", 404: "not found",
              410: "gone", 429: "too many requests", 500: "server error",
              502: "bad gateway", 503: "unavailable", 504: "gateway timeout"}  # fmt: skip


def reason_of(stage: str, error: str) -> str:
    """A short, stable name for why an item failed; 'other <stage> error' when none fits."""
    status = HTTP_STATUS.search(error)
    if status is not None:  # a URL's answer: its status, named (404 not found, 403 forbidden)
        code = int(status.group(1))
        return f"HTTP {code} {HTTP_NAMES.get(code, 'error')}"
    for reason, needles in REASONS:
        if any(needle in error for needle in needles):
            return reason
    return f"other {stage} error"


def count_reasons(errors: list[dict[str, Any]]) -> dict[str, int]:
    """Failures per reason, most frequent first."""
    counts = Counter(reason_of(e.get("stage") or "", e.get("error") or "") for e in errors)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def describe_reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.items())


def count_stages(errors: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Failures per stage (fetch, read, decode, ...), each stage's reasons most frequent first."""
    stages: dict[str, list[dict[str, Any]]] = {}
    for error in errors:
        stages.setdefault(error.get("stage") or "other", []).append(error)
    ordered = sorted(stages.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return {stage: count_reasons(errs) for stage, errs in ordered}


def describe_stages(stages: dict[str, dict[str, int]], most: int = 3) -> str:
    """'fetch 5 (4 HTTP 404 not found, 1 timed out), decode 1 (1 truncated)': per stage, how
    many failed and why, the most common reasons first."""
    parts = []
    for stage, reasons in stages.items():
        shown = [f"{n} {reason}" for reason, n in list(reasons.items())[:most]]
        rest = sum(list(reasons.values())[most:])
        shown += [f"{rest} other"] if rest else []
        parts.append(f"{stage} {sum(reasons.values())} ({', '.join(shown)})")
    return ", ".join(parts)
