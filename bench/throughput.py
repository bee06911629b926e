"""Throughput: naive vs a DataLoader script vs `indexer build`, on the same images and weights.

Prints images/s (process start and imports included for all three), the ratios, the fidelity of
indexer's embeddings to the script's (cosine, self-retrieval), and the build's peak RSS at two
corpus sizes. Run with `make bench`; `--quick` runs a smaller version for a smoke check.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"
MODEL = "test_convnext.r160_in1k"
BIN = Path(sys.executable).parent


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float


def run_timed(cmd: list[str], memory: bool = False) -> Run:
    """Run cmd; wall seconds and, if asked, the peak memory of its process tree.

    Memory sampling reads /proc every 50 ms, which costs CPU: timed runs go without it.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_kb(proc.pid))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    if memory:
        sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    if memory:
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return Run(seconds, peak[0] / 1024)


def tree_rss_kb(root: int) -> int:
    """Memory of a process and its descendants, from /proc: the sum of their PSS.

    PSS splits pages shared between forked workers among them, so the sum is the tree's real
    footprint; summing plain RSS would count the parent's torch pages once per worker.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += pss_kb(pid)
        stack.extend(children.get(pid, []))
    return total


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def count(text: str) -> int:
    """argparse type: a whole number of at least 1 (a count of images, rounds, copies)."""
    import argparse

    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def write_checkpoint(path: Path) -> None:
    if path.exists():
        return
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(timm.create_model(MODEL, pretrained=False).state_dict(), str(path))


def prepared(work: Path) -> Path:
    """The benchmarks' work folder, made, and the seeded checkpoint in it (its path)."""
    work.mkdir(parents=True, exist_ok=True)
    ck = work / "seed0.safetensors"
    write_checkpoint(ck)
    return ck


def imagenet_corpus(work: Path) -> Path:
    if SAMPLE.is_dir():
        return SAMPLE
    from indexer.synthetic import scene

    out = work / "imagenet-synthetic"
    if not out.is_dir():
        out.mkdir(parents=True)
        for i in range(500):
            scene(i, (500, 375)).save(out / f"{i:04d}.jpg", quality=90)
    return out


def imagenet_1000(work: Path, photos: Path) -> Path:
    """1,000 ImageNet-size JPEGs: the 500 photos and their mirror images (other bytes, the
    same sizes), made once."""
    from PIL import Image, ImageOps

    out = work / "imagenet-1000"
    if out.is_dir() and len(list(out.rglob("*.jpg"))) == 1000:
        return out
    shutil.rmtree(out, ignore_errors=True)
    (out / "mirrored").mkdir(parents=True)
    for i, photo in enumerate(sorted(p for p in photos.rglob("*") if p.is_file())[:500]):
        shutil.copy(photo, out / f"{i:04d}.jpg")
        ImageOps.mirror(Image.open(photo).convert("RGB")).save(
            out / "mirrored" / f"{i:04d}.jpg", quality=90
        )
    return out


def camera_corpus(work: Path, source: Path, count: int) -> Path:
    """count 4000x3000 JPEGs (quality 90) upscaled from real photos; made once."""
    from PIL import Image

    out = work / f"camera-{count}"
    if out.is_dir() and len(list(out.iterdir())) == count:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    photos = sorted(source.iterdir())[:count]
    for i, photo in enumerate(photos):
        img = Image.open(photo).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
        img.save(out / f"IMG_{i:04d}.jpg", quality=90)
    return out


def small_corpus(work: Path, count: int) -> Path:
    """count small generated JPEGs (96x72) in folders of 1000, made once."""
    from PIL import Image

    out = work / f"small-{count}"
    marker = out / ".complete"
    if marker.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(count)
    for i in range(count):
        folder = out / f"d{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (1, 1, 3))
        arr = np.clip(base + rng.normal(0, 40, (72, 96, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:06d}.jpg", quality=85)
    marker.touch()
    return out


def load(path: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path, columns=["key", "embedding"])
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return dict(zip(table.column("key").to_pylist(), vectors, strict=True))


def fidelity(indexer_dir: Path, script_file: Path) -> tuple[float, float, float]:
    """(mean cosine, min cosine, share of images whose nearest script vector is their own)."""
    ours, theirs = load(indexer_dir / "shards"), load(script_file)
    keys = sorted(theirs)
    a = np.stack([ours[k] for k in keys])
    b = np.stack([theirs[k] for k in keys])
    cos = (a * b).sum(1)
    nearest = (a @ b.T).argmax(1)
    return float(cos.mean()), float(cos.min()), float((nearest == np.arange(len(keys))).mean())


def indexer_cmd(images: Path, out: Path, ck: Path, *flags: str) -> list[str]:
    shutil.rmtree(out, ignore_errors=True)
    return [str(BIN / "indexer"), "build", str(images), "--out", str(out),
            "--checkpoint", str(ck), "--no-progress", *flags]  # fmt: skip


def measure_corpus(
    name: str, images: Path, work: Path, ck: Path, naive: bool, repeat: int
) -> list[str]:
    """Rates of each variant (best of ``repeat`` interleaved rounds), ratios and fidelity."""
    n = sum(1 for p in images.rglob("*") if p.is_file())
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    py = str(BIN / "python")
    variants = {
        "naive": lambda: [py, str(HERE / "naive.py"), str(images), str(ck), str(out / "naive.pq")],
        "script": lambda: [
            py,
            str(HERE / "script.py"),
            str(images),
            str(ck),
            str(out / "script.pq"),
        ],
        "indexer": lambda: indexer_cmd(images, out / "indexer", ck),
        "indexer uncached": lambda: [
            "env",
            f"INDEXER_CACHE_DIR={without_known_exports(work)}",
            *indexer_cmd(images, out / "indexer-uncached", ck),
        ],
        "indexer exact": lambda: indexer_cmd(
            images, out / "indexer-exact", ck, "--exact-preprocessing"
        ),
    }
    if not naive:
        del variants["naive"]
    best: dict[str, float] = {}
    for _ in range(repeat):
        for label, make_cmd in variants.items():
            seconds = run_timed(make_cmd()).seconds
            best[label] = min(best.get(label, seconds), seconds)
    rates = {label: n / seconds for label, seconds in best.items()}
    lines = [f"\n## {name}: {n} images ({images}), best of {repeat}"]
    lines += [f"{k:>14}: {v:8.1f} images/s" for k, v in rates.items()]
    lines.append(f"{'indexer/script':>14}: {rates['indexer'] / rates['script']:8.2f}x "
                 f"(without the known export: "
                 f"{rates['indexer uncached'] / rates['script']:.2f}x)")  # fmt: skip
    if naive:
        lines.append(f"{'indexer/naive':>14}: {rates['indexer'] / rates['naive']:8.2f}x")
    for label, folder in (("indexer", "indexer"), ("indexer exact", "indexer-exact")):
        mean, low, self_hit = fidelity(out / folder, out / "script.pq")
        lines.append(
            f"{'fidelity':>14}: {label:<13} cosine to script mean {mean:.6f} min {low:.6f}, "
            f"nearest-is-self {self_hit:.1%}"
        )
    return lines


def without_known_exports(work: Path) -> Path:
    """A copy of the user's indexer cache (data configs, exports) without the exports known
    by request: a first build as it runs without them (torch first, then its own export)."""
    from indexer.model.known_export import FOLDER

    return cache_without(work / "cache-uncached", FOLDER)


def cache_without(copy: Path, folder: str) -> Path:
    """A copy of the user's indexer cache at `copy`, less one of its folders."""
    from indexer.cache_dir import cache_dir

    shutil.rmtree(copy, ignore_errors=True)
    if cache_dir().is_dir():
        shutil.copytree(cache_dir(), copy, symlinks=True)
    shutil.rmtree(copy / folder, ignore_errors=True)
    return copy


def measure_memory(work: Path, ck: Path, sizes: list[int]) -> list[str]:
    lines = ["\n## peak memory of `indexer build` (process tree PSS, small generated JPEGs)"]
    peaks = []
    for size in sizes:
        images = small_corpus(work, size)
        run = run_timed(indexer_cmd(images, work / "out" / f"rss-{size}", ck), memory=True)
        peaks.append(run.peak_rss_mb)
        lines.append(
            f"{size:>8} images: peak {run.peak_rss_mb:7.0f} MB, {size / run.seconds:7.1f} images/s"
        )
    lines.append(f"{'ratio':>15}: {peaks[-1] / peaks[0]:.2f}x ({sizes[-1]} vs {sizes[0]})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench")
    parser.add_argument("--quick", action="store_true", help="smaller corpora, no naive run")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds; the best is kept")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ck = args.work / "seed0.safetensors"
    write_checkpoint(ck)
    photos = imagenet_corpus(args.work)
    imagenet = imagenet_1000(args.work, photos)
    camera = camera_corpus(args.work, photos, 20 if args.quick else 200)
    # Every run after a model's first remembers its data config; warm it, as a user's would be.
    run_timed(indexer_cmd(camera, args.work / "out" / "warm", ck))
    repeat = 1 if args.quick else args.repeat
    lines = [f"# indexer throughput benchmark ({os.cpu_count()} CPUs, model {MODEL})"]
    lines += measure_corpus("ImageNet-size JPEGs", imagenet, args.work, ck, not args.quick, repeat)
    lines += measure_corpus(
        "camera-size JPEGs (4000x3000)", camera, args.work, ck, not args.quick, repeat
    )
    if not args.skip_memory:
        sizes = [200, 2000] if args.quick else [2000, 20000]
        lines += measure_memory(args.work, ck, sizes)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
