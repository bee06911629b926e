"""Model-only throughput of each runtime on the same decoded batches (torch eager, the exported
model on onnxruntime and on OpenVINO), their fidelity to torch fp32, and their import times in
fresh processes; ratios to torch fp32. What --runtime auto chooses among (decide.py), timing
them itself on a build's first batch; this prints the whole table for one machine."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import MODEL, REPO, imagenet_corpus

from indexer.config import ModelConfig
from indexer.decode.preprocess import Preprocessor
from indexer.model.export import export_portable
from indexer.model.portable import MODEL_FILE, PortableEmbedder
from indexer.model.runtime_choice import cpu_has_native_bf16
from indexer.model.timm_model import load_embedder

IMPORTS = {
    "torch": "import torch",
    "torch + timm": "import torch, timm",
    "onnxruntime": "import onnxruntime",
    "openvino": "import openvino",
}


def import_seconds(statement: str, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", statement], capture_output=True)
        if done.returncode:
            return float("nan")
        best = min(best, time.perf_counter() - start)
    return best


def rate(embed, batches: list[np.ndarray], rounds: int) -> float:
    embed(batches[0])  # warm-up: first-call allocations and graph compilation
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for batch in batches:
            embed(batch)
        best = min(best, time.perf_counter() - start)
    return sum(len(b) for b in batches) / best


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    embedder = load_embedder(ModelConfig(name=MODEL, pretrained=False, precision="fp32"))
    prep = Preprocessor(embedder.data_config, "fast")
    files = sorted(p for p in imagenet_corpus(args.work).rglob("*") if p.is_file())
    pixels = np.stack([prep(f.read_bytes()).pixels for f in files[: args.images]])
    batches = [pixels[i : i + args.batch] for i in range(0, len(pixels), args.batch)]
    folder = Path(tempfile.mkdtemp(prefix="runtimes-"))
    exported = export_portable(embedder, pixels[:64], folder)
    if exported.record is None:
        raise SystemExit(f"export failed: {exported.reason}")
    model = (folder / MODEL_FILE).read_bytes()
    reference = embedder.embed(torch.from_numpy(pixels))
    runtimes = {"torch eager fp32": lambda b: embedder.embed(torch.from_numpy(b))}
    if cpu_has_native_bf16():
        bf16 = load_embedder(ModelConfig(name=MODEL, pretrained=False, precision="bf16"))
        runtimes["torch eager bf16"] = lambda b: bf16.embed(torch.from_numpy(b))
    for backend in ("onnxruntime", "openvino"):
        try:
            portable = PortableEmbedder(model, embedder.recipe, exported.record, backend)
        except Exception as exc:
            print(f"{backend}: not available ({exc})")
            continue
        runtimes[f"{backend} fp32"] = portable.embed
    if cpu_has_native_bf16():  # OpenVINO's bf16 inference precision hint
        ov_bf16 = PortableEmbedder(model, embedder.recipe, exported.record, "openvino", None,
                                   "bf16")  # fmt: skip
        runtimes["openvino bf16"] = ov_bf16.embed
    print(f"# model only: {len(pixels)} ImageNet photos at {pixels.shape[1]}px, batch "
          f"{args.batch}, {torch.get_num_threads()} threads, best of {args.rounds}")  # fmt: skip
    base = None
    for name, embed in runtimes.items():
        images_s = rate(embed, batches, args.rounds)
        base = base or images_s
        vectors = np.concatenate([embed(b) for b in batches])
        print(f"{name:>22}: {images_s:7.0f} images/s  {images_s / base:5.2f}x  "
              f"min cosine to torch fp32 {min_cosine(reference, vectors):.7f}")  # fmt: skip
    print("# import, best of 3 fresh processes")
    for name, statement in IMPORTS.items():
        print(f"{name:>22}: {import_seconds(statement):6.2f} s")


if __name__ == "__main__":
    main()
