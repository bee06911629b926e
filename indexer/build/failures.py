"""Name the reason of each failed item (truncated, not an image, too large, ...) and count them."""

from __future__ import annotations

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
    ("timed out", ("--decode-timeout",)),
    ("outside the source folder", ("outside the source folder",)),
    ("symlink loop", ("Too many levels of symbolic links",)),
    ("not found", ("FileNotFoundError", "No such file")),
    ("permission denied", ("Permission denied",)),
    ("is a folder", ("IsADirectoryError", "(a folder)")),
    ("not a regular file", ("is not a regular file",)),
)


def reason_of(stage: str, error: str) -> str:
    """A short, stable name for why an item failed; 'other <stage> error' when none fits."""
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
