"""A batch of decoded pixels tied to its items, with raw JPEGs routed to the GPU and error rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.decode.gpu_share import CpuShare, WorkerTime

if TYPE_CHECKING:  # torch-heavy: imported only when a build has something to embed
    import torch


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawItem:
    """A JPEG a worker read and routed to the GPU, not decoded: decoded with its batch. Its
    bytes are [start, end) of the batch's raw_blob."""

    position: int
    start: int
    end: int
    route: Any  # jpegroute.Route
    hash: str
    meta: dict[str, Any]


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
    reused: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)  # pos, hash, meta
    vectors: np.ndarray | None = None  # already embedded (the Ray engine); else embed pixels
    labels: list[dict[str, Any]] = field(default_factory=list)  # with vectors, when asked for
    raw: list[RawItem] = field(default_factory=list)  # to decode on the GPU (--decode gpu)
    # the raw items' bytes, one after another: one tensor reaches the main process through
    # shared memory (a list of bytes would be pickled through the workers' pipe)
    raw_blob: torch.Tensor | None = None
    spent: WorkerTime = field(default_factory=WorkerTime)  # what the batch cost its worker
    share: CpuShare | None = None  # set in the main process: the GPU side reports to it

    def raw_bytes(self, item: RawItem) -> torch.Tensor:
        """A raw item's JPEG bytes: a uint8 view of raw_blob."""
        assert self.raw_blob is not None
        return self.raw_blob[item.start : item.end]

    def raw_views(self) -> list[torch.Tensor]:
        """Every raw item's bytes, in order: one split of raw_blob when the items lie end to
        end in it (as collate packs them), else a view each."""
        assert self.raw_blob is not None
        starts = [item.start for item in self.raw]
        ends = [item.end for item in self.raw]
        if starts and starts[0] == 0 and starts[1:] == ends[:-1] and ends[-1] == len(self.raw_blob):
            return list(self.raw_blob.split([e - s for s, e in zip(starts, ends, strict=True)]))
        return [self.raw_bytes(item) for item in self.raw]
