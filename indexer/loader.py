"""Dataset + collate + DataLoader: uint8 image batches tied to their items, plus error rows."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from indexer.config import LoaderConfig
from indexer.images import DataConfig, DecodeError, decode_image, make_preprocess
from indexer.sources import Item, Source


@dataclass
class Prepared:
    """One image ready for the model: uint8 CHW pixels and the decoded (oriented) size."""

    pixels: torch.Tensor
    width: int
    height: int


def prepare(data: bytes, preprocess: Callable[[Any], torch.Tensor]) -> Prepared:
    """Decode and preprocess one image; raises DecodeError. Build and query both use this."""
    img = decode_image(data)
    pixels = preprocess(img)
    return Prepared(pixels, img.width, img.height)


@dataclass
class Batch:
    """What the DataLoader yields: good rows (aligned by position) and failed rows."""

    positions: list[int] = field(default_factory=list)
    pixels: torch.Tensor | None = None
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # position, stage, reason


class ItemDataset(Dataset):
    """Reads and prepares items by position; never substitutes one item for another."""

    def __init__(self, items: list[Item], sources: list[Source], data_config: DataConfig) -> None:
        self.items = items
        self.sources = sources
        self.data_config = data_config
        self._preprocess: Callable[[Any], torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict[str, Any]:
        if self._preprocess is None:  # built lazily, once per worker process
            self._preprocess = make_preprocess(self.data_config)
        item = self.items[position]
        try:
            data, meta = self.sources[item.source].read(item.locator)
        except Exception as exc:  # a read failure is this item's error row, not the run's end
            return {"position": position, "error": ("read", _reason(exc))}
        try:
            prepared = prepare(data, self._preprocess)
        except DecodeError as exc:
            return {"position": position, "error": ("decode", str(exc))}
        except Exception as exc:
            return {"position": position, "error": ("preprocess", _reason(exc))}
        return {
            "position": position,
            "pixels": prepared.pixels,
            "width": prepared.width,
            "height": prepared.height,
            "hash": hashlib.sha256(data).hexdigest(),
            "meta": meta,
        }


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def collate(samples: list[dict[str, Any]]) -> Batch:
    batch = Batch()
    good = []
    for s in samples:
        if "error" in s:
            stage, reason = s["error"]
            batch.errors.append((s["position"], stage, reason))
            continue
        batch.positions.append(s["position"])
        batch.widths.append(s["width"])
        batch.heights.append(s["height"])
        batch.hashes.append(s["hash"])
        batch.metadata.append(s["meta"])
        good.append(s["pixels"])
    if good:
        batch.pixels = torch.stack(good)
    return batch


def iter_batches(
    items: list[Item], sources: list[Source], data_config: DataConfig, cfg: LoaderConfig
) -> Iterator[Batch]:
    """Batches in item order (DataLoader keeps order across workers)."""
    loader = DataLoader(
        ItemDataset(items, sources, data_config),
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if cfg.workers > 0 else None,
        persistent_workers=False,
    )
    yield from loader
