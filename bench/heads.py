"""The cost of --labels 5 and of each --pooling: embedding throughput of the same decoded
batches through each recipe, in one process (decoding excluded), best of 3, ratios to head."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import MODEL, REPO, imagenet_corpus

from indexer.config import ModelConfig
from indexer.decode.preprocess import Preprocessor
from indexer.model.timm_model import load_embedder

VARIANTS = {
    "head (default)": {},
    "--labels 5": {"labels": 5},
    "--pooling avg": {"pooling": "avg"},
    "--pooling max": {"pooling": "max"},
    "--pooling gem": {"pooling": "gem"},
    "--pooling gem --feature-stage 2": {"pooling": "gem", "feature_stage": 2},
}


def rate(embedder: object, batches: list[torch.Tensor], labeled: bool) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for batch in batches:
            embedder.embed_with_labels(batch, labels=labeled)  # type: ignore[attr-defined]
        best = min(best, time.perf_counter() - start)
    return sum(len(b) for b in batches) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench")
    args = parser.parse_args()
    images = sorted(p for p in imagenet_corpus(args.work).rglob("*") if p.is_file())
    base = load_embedder(ModelConfig(MODEL, pretrained=False))
    prep = Preprocessor(base.data_config, "fast")
    pixels = np.stack([prep(p.read_bytes()).pixels for p in images])
    batches = [torch.from_numpy(pixels[i : i + 64]) for i in range(0, len(pixels), 64)]
    precision = base.recipe["precision"]
    print(f"# embedding throughput, {len(pixels)} decoded images, batch 64, {precision}")
    head = None
    for name, options in VARIANTS.items():
        embedder = load_embedder(ModelConfig(MODEL, pretrained=False, **options))
        r = rate(embedder, batches, labeled="labels" in options)
        head = head or r
        print(
            f"{name:>34}: {r:8.1f} images/s = {r / head:5.3f}x head "
            f"(cost {1 - r / head:+.1%}; goal < 5%)"
        )


if __name__ == "__main__":
    main()
