"""A quick check that the Hugging Face hub answers, so offline runs fail fast, not after retries."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def hub_unreachable_reason(url: str | None = None) -> str | None:
    """None when the hub (or ``url``'s host) answers a TCP connect; else a short reason."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if url is None:
        url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return f"bad endpoint {url!r}"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"{host}: {exc.strerror or exc}"
