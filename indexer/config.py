"""Frozen configuration dataclasses: what the CLI (or a job file) hands to the library."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "test_convnext.r160_in1k"
METRICS = ("ip", "l2")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class SourceSpec:
    """One SOURCE argument: a folder path or ``hf:PATH_OR_NAME``, plus dataset options."""

    location: str
    split: str | None = None
    image_column: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Which timm model, which weights, and how embeddings are produced."""

    name: str = DEFAULT_MODEL
    pretrained: bool = True
    checkpoint: Path | None = None
    seed: int = 0
    normalize: bool = True
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on CUDA and on CPUs with native bf16, else fp32


@dataclass(frozen=True)
class LoaderConfig:
    """How images are read and batched."""

    batch_size: int = 64
    workers: int = 2
    preprocessing: str = "fast"  # fast (JPEG draft, reduce) or exact (timm's transform)
    progress: bool | None = None  # None: show a bar only on a terminal


@dataclass(frozen=True)
class IndexConfig:
    """How the FAISS index is built over the shards."""

    metric: str = "ip"
    recall_queries: int = 200
    recall_k: int = 10
    seed: int = 0


@dataclass(frozen=True)
class BuildConfig:
    """Everything ``indexer build`` needs."""

    sources: tuple[SourceSpec, ...]
    out: Path
    model: ModelConfig = field(default_factory=ModelConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    shard_size: int = 50_000
    overwrite: bool = False
    max_failures: float = 0.05  # >= 1: a count of items; below 1: a fraction of the items
    metrics_file: Path | None = None
