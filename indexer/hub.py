"""A quick check that the Hugging Face hub answers, so offline runs fail fast, not after retries."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from indexer.errors import WeightsUnavailableError

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


WEIGHTS_HINT = "pass --checkpoint FILE for local weights, or --no-pretrained for random weights"


def check_pretrained_early(name: str) -> None:
    """Fail at once, before torch or timm is imported and before anything is written, when
    the pretrained weights of a tagged timm model (name.tag, published as timm/name.tag)
    can be neither fetched nor found in the local Hugging Face cache. Anything else (an
    untagged name, a cache holding the model under any repository, a reachable hub) is left
    to timm's normal path, which says the same if it fails."""
    if "." not in name or _cached_anywhere(name):
        return
    reason = hub_unreachable_reason()
    if reason:
        raise WeightsUnavailableError(
            f"pretrained weights for '{name}' cannot be fetched ({reason}): {WEIGHTS_HINT}"
        )


def _cached_anywhere(name: str) -> bool:
    """Whether the Hugging Face cache holds a model repository named after this model."""
    home = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface"), "hub"
    )
    try:
        return any(p.name.endswith(f"--{name}") for p in Path(home).iterdir())
    except OSError:
        return False
