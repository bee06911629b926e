"""The Ray Data engine: items decoded as CPU tasks, embedded by an actor pool, streamed back."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from indexer.config import BuildConfig, ModelConfig
from indexer.embed import Batch
from indexer.errors import ModelError
from indexer.loader import ItemDataset
from indexer.preprocess import Preprocessor
from indexer.sources import Item, Source

if TYPE_CHECKING:
    from indexer.model import Embedder

log = logging.getLogger(__name__)
OK, FAILED, REUSE = 0, 1, 2  # what a decoded row is


def start_ray(address: str | None) -> None:
    """Join the cluster at address, or start a local Ray (unless this process already has one)."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True)  # fmt: skip


def ray_batches(
    items: list[Item],
    sources: list[Source],
    cfg: BuildConfig,
    known: frozenset[str],
    positions: list[int],
    embedder: Embedder,
) -> Iterator[Batch]:
    """Batches with their vectors computed by Ray: the same rows the local engine makes."""
    import ray

    start_ray(cfg.engine.address)
    loader = cfg.loader
    preprocess = Preprocessor(embedder.data_config, loader.preprocessing, loader.max_pixels,
                              loader.allow_truncated)  # fmt: skip
    dataset = ItemDataset(items, sources, preprocess, known, 0.0, loader.decode_hook)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    rows = ray.data.from_items([{"position": p} for p in positions])
    decode = functools.partial(decode_rows, dataset=dataset)  # shipped with each task
    decoded = rows.map_batches(decode, batch_size=loader.batch_size, batch_format="numpy")
    embedded = decoded.map_batches(
        EmbedActor,
        fn_constructor_kwargs={"model": cfg.model, "state_sha256": embedder.recipe["state_sha256"]},
        batch_size=loader.batch_size,
        batch_format="numpy",
        concurrency=cfg.engine.concurrency or 1,
        num_gpus=gpus,
    )
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        yield to_batch(batch)


def decode_rows(batch: dict[str, np.ndarray], dataset: ItemDataset) -> dict[str, np.ndarray]:
    """Read and decode a block's items; a failure is that item's row, never the block's."""
    h, w = dataset.preprocess.cfg.input_size[1:]
    out = []
    for position in batch["position"].tolist():
        try:
            out.append(dataset[int(position)])
        except Exception as exc:  # anything the dataset did not already turn into an error
            out.append({"position": position, "error": ("decode", f"{type(exc).__name__}: {exc}")})
    return {
        "position": np.array([s["position"] for s in out], np.int64),
        "status": np.array([_status(s) for s in out], np.int8),
        "pixels": np.stack([s.get("pixels", np.zeros((h, w, 3), np.uint8)) for s in out]),
        "width": np.array([s.get("width", 0) for s in out], np.int32),
        "height": np.array([s.get("height", 0) for s in out], np.int32),
        "hash": np.array([s.get("hash") or s.get("reuse") or "" for s in out], object),
        "meta": np.array([json.dumps(s.get("meta", {}), default=str) for s in out], object),
        "stage": np.array([s["error"][0] if "error" in s else "" for s in out], object),
        "reason": np.array([s["error"][1] if "error" in s else "" for s in out], object),
    }


def _status(sample: dict[str, object]) -> int:
    return OK if "pixels" in sample else FAILED if "error" in sample else REUSE


class EmbedActor:
    """One model per actor; refuses to run weights that differ from the driver's."""

    def __init__(self, model: ModelConfig, state_sha256: str) -> None:
        from indexer.model import load_embedder

        self.embedder = load_embedder(model)
        if self.embedder.recipe["state_sha256"] != state_sha256:
            raise ModelError(
                "a Ray worker made other weights than the driver (different timm or torch, "
                "or a checkpoint that differs there): install the same versions everywhere"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        good = batch["status"] == OK
        vectors = np.zeros((len(good), self.embedder.dim), np.float32)
        labels = np.array([""] * len(good), object)
        if good.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][good]))
            vectors[good], rows = self.embedder.embed_with_labels(pixels)
            if rows:
                labels[good] = [json.dumps(r) for r in rows]
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["vector"] = vectors
        out["labels"] = labels
        return out


def to_batch(batch: dict[str, np.ndarray]) -> Batch:
    """A Ray result block as the loader's Batch, vectors included."""
    result = Batch()
    good = []
    for n, status in enumerate(batch["status"].tolist()):
        position = int(batch["position"][n])
        meta = json.loads(batch["meta"][n])
        if status == FAILED:
            result.errors.append((position, str(batch["stage"][n]), str(batch["reason"][n])))
        elif status == REUSE:
            result.reused.append((position, str(batch["hash"][n]), meta))
        else:
            result.positions.append(position)
            result.widths.append(int(batch["width"][n]))
            result.heights.append(int(batch["height"][n]))
            result.hashes.append(str(batch["hash"][n]))
            result.metadata.append(meta)
            if batch["labels"][n]:
                result.labels.append(json.loads(batch["labels"][n]))
            good.append(n)
    if good:
        result.vectors = np.asarray(batch["vector"][good], np.float32)
    return result
