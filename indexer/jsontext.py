"""JSON that strict UTF-8 readers accept: what the CLI prints and the service answers."""

from __future__ import annotations

import json
import math
from typing import Any


def json_text(doc: Any, indent: int | None = None) -> str:
    """JSON that strict UTF-8 readers accept: undecodable bytes of file names as \\xNN text,
    NaN and infinities as null."""
    try:  # the common case, in C: nothing to replace (no NaN, no surrogate escapes)
        text = json.dumps(doc, indent=indent, default=str, allow_nan=False)
        if "\\ud" not in text:
            return text
    except ValueError:
        pass
    return json.dumps(_printable(doc), indent=indent, default=str, allow_nan=False)


def _printable(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN or Infinity
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_printable(v) for v in value]
    return value
