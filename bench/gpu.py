"""The CUDA path (run on a GPU machine): embeddings, pooling and labels on CUDA against the CPU,
and images/s of the loader feeding one GPU. Needs torch, timm, pyarrow, Pillow (not FAISS)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from indexer.config import DEFAULT_MODEL, LoaderConfig, ModelConfig, SourceSpec
from indexer.decode.loader import iter_batches
from indexer.decode.preprocess import Preprocessor
from indexer.model.timm_model import load_embedder
from indexer.sources import list_items, open_sources
from indexer.synthetic import write_corpus


def pixels_of(files: list[Path], embedder: object) -> torch.Tensor:
    prep = Preprocessor(embedder.data_config, "fast")  # type: ignore[attr-defined]
    return torch.from_numpy(np.stack([prep(p.read_bytes()).pixels for p in files]))


def compare(name: str, files: list[Path], **options: object) -> None:
    """The same images on CPU (fp32) and CUDA (fp32, bf16): cosine and labels."""
    cpu = load_embedder(
        ModelConfig(DEFAULT_MODEL, pretrained=False, device="cpu", precision="fp32", **options)
    )  # type: ignore[arg-type]
    batch = pixels_of(files, cpu)
    ref, ref_labels = cpu.embed_with_labels(batch)
    for precision in ("fp32", "bf16"):
        gpu = load_embedder(
            ModelConfig(
                DEFAULT_MODEL, pretrained=False, device="cuda", precision=precision, **options
            )
        )  # type: ignore[arg-type]
        out, labels = gpu.embed_with_labels(batch)
        cos = np.sum(ref * out, axis=1)
        pairs = zip(ref_labels, labels, strict=True)
        same = sum(a["label_index"][0] == b["label_index"][0] for a, b in pairs)
        extra = f", top-1 labels equal {same}/{len(labels)}" if labels else ""
        print(
            f"{name:>22} cuda {precision}: cosine to cpu fp32 min {cos.min():.5f} "
            f"mean {cos.mean():.6f}{extra}"
        )


def throughput(root: Path, workers: int, batch_size: int) -> None:
    embedder = load_embedder(ModelConfig(DEFAULT_MODEL, pretrained=False, device="cuda"))
    sources = open_sources((SourceSpec(str(root)),))
    items = list_items(sources)
    prep = Preprocessor(embedder.data_config, "fast")
    cfg = LoaderConfig(batch_size=batch_size, workers=workers)
    for label in ("warm-up", "timed"):
        start, count = time.perf_counter(), 0
        for batch in iter_batches(items, sources, prep, cfg):
            if batch.pixels is not None:
                embedder.embed(batch.pixels)
                count += len(batch.positions)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(
            f"{label}: {count} images in {seconds:.2f} s = {count / seconds:.0f} images/s "
            f"({workers} decoding workers, batch {batch_size}, {embedder.recipe['precision']})"
        )
    model_only = pixels_of([root / items[0].locator] * batch_size, embedder)
    start = time.perf_counter()
    for _ in range(20):
        embedder.embed(model_only)
    torch.cuda.synchronize()
    print(f"model alone: {20 * batch_size / (time.perf_counter() - start):.0f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "scenes"
        files = write_corpus(root, args.images)
        sample = files[:64]
        compare("head", sample)
        compare("head + labels 5", sample, labels=5)
        compare("gem, feature stage 2", sample, pooling="gem", feature_stage=2)
        throughput(root, args.workers, args.batch_size)


if __name__ == "__main__":
    main()
