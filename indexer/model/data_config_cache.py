"""Remembered data configs of timm models, so decoding can start while the model is loading."""

from __future__ import annotations

import json
import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from indexer.cache_dir import cache_dir
from indexer.config import DataConfig
from indexer.safeio import write_bytes_atomic

log = logging.getLogger(__name__)
FILENAME = "data-configs.json"


def _key(model_name: str) -> str:
    try:
        timm_version = version("timm")
    except PackageNotFoundError:
        timm_version = "unknown"
    return f"timm-{timm_version}/{model_name}"


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def lookup(model_name: str) -> DataConfig | None:
    """The data config last resolved for this model and timm version, if any (a hint only)."""
    entry = _read(cache_dir() / FILENAME).get(_key(model_name))
    try:
        return DataConfig.from_dict(entry) if entry else None
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def store(model_name: str, cfg: DataConfig) -> None:
    """Remember cfg. A cache that cannot be written costs only speed: logged, not raised."""
    path = cache_dir() / FILENAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data[_key(model_name)] = cfg.to_dict()
        text = json.dumps(data, indent=1, sort_keys=True)
        write_bytes_atomic(path, text.encode("utf-8"), sync=False)
    except OSError as exc:
        log.info("cannot write the data config cache %s: %s", path, exc)
