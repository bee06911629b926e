"""Where indexer keeps its caches on this machine: one folder, chosen by the environment."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$INDEXER_CACHE_DIR, else $XDG_CACHE_HOME/indexer, else ~/.cache/indexer."""
    explicit = os.environ.get("INDEXER_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "indexer"
