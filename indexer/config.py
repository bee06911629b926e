"""Frozen configuration dataclasses: what the CLI (or a job file) hands to the library."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "test_convnext.r160_in1k"
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own limit (it only warns); enforced as an error
METRICS = ("ip", "l2")
PRECISIONS = ("auto", "fp32", "bf16")
RUNTIMES = ("auto", "torch", "onnx", "openvino")  # what embeds (indexer.model.runtime)
POOLINGS = ("head", "avg", "max", "gem")


StorageOptions = tuple[tuple[str, str], ...]  # --storage-option KEY=VALUE pairs, in order


@dataclass(frozen=True)
class SourceSpec:
    """One SOURCE argument: a folder path or ``hf:PATH_OR_NAME``, plus dataset options."""

    location: str
    split: str | None = None
    image_column: str | None = None
    follow_symlinks: bool = False  # folders: also follow links that point outside the folder
    key_column: str | None = None  # datasets: the column whose values are the keys
    storage_options: StorageOptions = ()  # buckets: fsspec options (never stored)
    read_concurrency: int = 64  # buckets: objects fetched at once by each reading worker
    url_column: str = "url"  # URL lists: the column holding each row's URL or path
    refetch: bool = False  # URL lists: fetch every row again (HTTP has no cheap fingerprint)
    read_retries: int = 3  # buckets and lists: tries after a passing failure (503, reset)


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
    pooling: str = "head"  # head: the model's own pre-logits; avg, max, gem: over a feature map
    feature_stage: int | None = None  # pool this stage's map (timm feature extraction) instead
    labels: int = 0  # store the classifier's top-K classes per item (0: none)
    runtime: str = "auto"  # what embeds: auto, torch, onnx, openvino (indexer.model.runtime)


DECODES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class LoaderConfig:
    """How images are read and batched."""

    batch_size: int = 64
    workers: int = 2
    preprocessing: str = "fast"  # fast (JPEG draft, reduce) or exact (timm's transform)
    progress: bool | None = None  # None: show a bar only on a terminal
    decode_timeout: float = 60.0  # seconds one item may take in a worker; 0: no limit
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_truncated: bool = False  # decode truncated files (missing part grey) instead of failing
    decode_hook: str | None = None  # "module:function" called with each key first (tests)
    decode: str = "auto"  # where JPEGs are decoded: cpu, gpu, auto (gpu where measured faster)


DEFAULT_INDEX_MEMORY = 16 * 1024**3  # generous: the budget only steers collections past ~50M


@dataclass(frozen=True)
class IndexConfig:
    """How the FAISS index is chosen, built over the shards and tuned."""

    metric: str = "ip"
    index_type: str = "auto"  # auto, flat, ivf, ivfsq, hnsw, or a FAISS factory string
    max_memory: int = DEFAULT_INDEX_MEMORY  # bytes the index may hold in memory
    target_recall: float = 0.95  # recall@k the search parameter is tuned to reach
    recall_queries: int = 1000  # stored vectors used as queries to measure and tune
    recall_k: int = 10
    seed: int = 0
    rebuild: bool = False  # build the index from scratch, never update the previous one
    max_update_share: float = 0.2  # more changed vectors than this share: rebuilt, not updated


ENGINES = ("local", "ray")


@dataclass(frozen=True)
class EngineConfig:
    """Where decoding and embedding run: this machine's DataLoader, or Ray Data."""

    kind: str = "local"
    address: str | None = None  # ray: a cluster to join; None starts a local Ray
    concurrency: int | None = None  # ray: embedding actors (one model each); None: 1


@dataclass(frozen=True)
class IndexOverrides:
    """Index settings given for `indexer index DIR`; None keeps what the collection recorded."""

    index_type: str | None = None
    max_memory: int | None = None
    target_recall: float | None = None
    rebuild: bool = False  # --rebuild-index

    def resolve(self, metric: str, recorded: dict[str, Any] | None) -> IndexConfig:
        before = recorded or {}
        base = IndexConfig(metric=metric)
        return IndexConfig(
            metric=metric,
            index_type=_first(self.index_type, before.get("requested"), base.index_type),
            max_memory=_first(self.max_memory, before.get("max_memory"), base.max_memory),
            target_recall=_first(
                self.target_recall, before.get("target_recall"), base.target_recall
            ),
            rebuild=self.rebuild,
        )


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


@dataclass(frozen=True)
class BuildConfig:
    """Everything ``indexer build`` needs."""

    sources: tuple[SourceSpec, ...]
    out: Path
    model: ModelConfig = field(default_factory=ModelConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    shard_size: int = 50_000
    rebuild: bool = False  # re-embed everything instead of updating incrementally
    retry_failed: bool = False  # read again files that failed and have not changed since
    max_failures: float = 0.05  # >= 1: a count of items; below 1: a fraction of the items
    keep: int = 2  # published versions kept (older ones are deleted)
    metrics_file: Path | None = None
    partition: tuple[int, int] | None = None  # (I, N): only part I of N; `out` is that part's
    engine: EngineConfig = field(default_factory=EngineConfig)
    # repair: damaged shards of the published version; their items are embedded again
    drop_shards: frozenset[str] = frozenset()


def file_sha256(path: Path) -> str:
    """The sha256 of a file (weights identity), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class DataConfig:
    """The model's resolved preprocessing (timm's data config), as recorded in the manifest."""

    input_size: tuple[int, int, int]
    interpolation: str
    crop_pct: float
    crop_mode: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        return cls(
            input_size=(int(d["input_size"][0]), int(d["input_size"][1]), int(d["input_size"][2])),
            interpolation=str(d["interpolation"]),
            crop_pct=float(d["crop_pct"]),
            crop_mode=str(d.get("crop_mode") or "center"),
            mean=(float(d["mean"][0]), float(d["mean"][1]), float(d["mean"][2])),
            std=(float(d["std"][0]), float(d["std"][1]), float(d["std"][2])),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @property
    def geometry_supported(self) -> bool:
        """Whether our one-step resize reproduces timm's eval transform for this config.

        Other configs ("border", non-square centre crops, crop_pct > 1) run timm's transform.
        """
        _, h, w = self.input_size
        square_center = self.crop_mode == "center" and h == w
        return (square_center or self.crop_mode == "squash") and self.crop_pct <= 1.0
