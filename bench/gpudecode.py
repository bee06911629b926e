"""JPEG decoding on the GPU against the CPU path (run on a GPU machine): `indexer build` end to
end with --decode cpu and --decode gpu on generated scenes and on photos, images/s and ratios
in one run, the fidelity of the GPU-decoded embeddings to the CPU path's, the fallback share."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import MODEL, count, write_checkpoint

from indexer.synthetic import write_corpus

SHARE = re.compile(r"decoded on the GPU: (\d+) images; fell back to the CPU: (\d+)")
AFTER = re.compile(r"after the first batch: (\d+) images in ([\d.]+) s, (\d+) images/s")
STAGES = re.compile(r"seconds by stage: (.*)")
KEPT_PACE = re.compile(r"decoded by the workers to keep pace: (\d+) \(share at the end ([\d.]+)\)")
OPTIONS = {
    "gil5ms": "import indexer.build.embed as e; e.SWITCH_INTERVAL = None",  # Python's 5 ms
    "gpuonly": "import indexer.decode.loader as l; l.SHARE = False",  # no JPEG left to the workers
    "groups": "import indexer.decode.gpu as g; g.RESIZE = 'groups'",  # interpolate by shape
}


def build(src: Path, out: Path, ck: Path, decode: str, workers: int, batch: int = 256,
          options: str = "") -> tuple[float, str]:  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    code = "from indexer.cli.main import entry; entry()"
    for option in filter(None, options.split(",")):  # A/B switches: constants set before
        code = f"{OPTIONS[option]}; {code}"
    cmd = [sys.executable, "-c", code, "-v", "build", str(src),
           "--out", str(out), "--checkpoint", str(ck), "--no-progress", "--batch-size", str(batch),
           "--workers", str(workers), "--decode", decode, "--device", "cuda"]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode not in (0, 5):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stderr


def vectors(out: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(out / "shards", columns=["key", "embedding"])
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    return dict(zip(table.column("key").to_pylist(), emb, strict=True))


def fidelity(gpu: Path, cpu: Path) -> str:
    a, b = vectors(gpu), vectors(cpu)
    keys = sorted(set(a) & set(b))
    x, y = np.stack([a[k] for k in keys]), np.stack([b[k] for k in keys])
    cos = np.sum(x * y, axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    # copies of the same photo are ties: "itself" is asked among one copy of each
    one = [n for n, k in enumerate(keys) if "copy" not in k or "copy000/" in k][:5000]
    nearest = np.argmax(x[one] @ y[one].T, axis=1)
    self_hit = float(np.mean(nearest == np.arange(len(one))))
    return (
        f"cosine to the CPU path mean {cos.mean():.5f} min {cos.min():.5f} ({len(keys)} "
        f"items; {len(a)} vs {len(b)} rows), nearest is itself {self_hit:.1%} of {len(one)}"
    )


def measure(name: str, src: Path, work: Path, ck: Path, workers: int, rounds: int,
            variants: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    n = sum(1 for p in src.rglob("*") if p.is_file())
    best: dict[str, float] = {}
    steady: dict[str, float] = {}
    share = ""
    stages: dict[str, str] = {}
    for _ in range(rounds):
        for decode in ("cpu", "gpu"):
            seconds, log = build(src, work / f"{name}-{decode}", ck, decode, workers)
            best[decode] = min(best.get(decode, seconds), seconds)
            found_stages = STAGES.search(log)
            if found_stages:
                stages[decode] = found_stages.group(1)
            after = AFTER.search(log)
            if after:
                steady[decode] = max(steady.get(decode, 0.0), float(after.group(3)))
            found, pace = SHARE.search(log), KEPT_PACE.search(log)
            if decode == "gpu" and found:
                gpu_n, fell = int(found.group(1)), int(found.group(2))
                kept = int(pace.group(1)) if pace else 0
                share = (f"GPU decoded {gpu_n} of {n} ({gpu_n / n:.1%}); routed but fell back "
                         f"{fell}; decoded by the workers to keep pace {kept} (share at the end "
                         f"{pace.group(2) if pace else '?'}); not routed (PNG, CMYK, ...) "
                         f"{n - gpu_n - fell - kept}")  # fmt: skip
    rates = {d: n / s for d, s in best.items()}
    return [
        f"\n## {name}: {n} images, indexer build end to end (shards and index), best of {rounds}",
        f"  --decode cpu: {rates['cpu']:8.1f} images/s ({workers} workers)",
        f"  --decode gpu: {rates['gpu']:8.1f} images/s",
        f"  gpu / cpu:    {rates['gpu'] / rates['cpu']:8.2f}x (target >= 3x)",
        f"  inside the run, after the first batch: cpu {steady.get('cpu', 0):.0f} images/s, "
        f"gpu {steady.get('gpu', 0):.0f} images/s "
        f"({steady.get('gpu', 0) / max(steady.get('cpu', 1), 1):.2f}x)",
        f"  {share}",
        *(f"  seconds by stage, {d}: {line}" for d, line in sorted(stages.items())),
        f"  fidelity of the run's mix: {fidelity(work / f'{name}-gpu', work / f'{name}-cpu')}",
        *other_batches(name, src, work, ck, workers, variants),
    ]


def other_batches(name: str, src: Path, work: Path, ck: Path, workers: int,
                  variants: tuple[str, ...]) -> list[str]:  # fmt: skip
    """--decode gpu with other settings, "BATCH[:OPTION,...]" (OPTIONS): the rate after the
    first batch, where the time went, and the fidelity to the CPU path."""
    lines = []
    for variant in variants:
        size, _, options = variant.partition(":")
        out = work / f"{name}-gpu-{variant.replace(':', '-').replace(',', '-')}"
        seconds, log = build(src, out, ck, "gpu", workers, int(size), options)
        after, stages, pace = AFTER.search(log), STAGES.search(log), KEPT_PACE.search(log)
        lines += [
            f"  --decode gpu --batch-size {size} {options}: {seconds:.1f} s, after the first "
            f"batch {after.group(3) if after else '?'} images/s; by the workers to keep pace "
            f"{pace.group(1) if pace else '?'} (share {pace.group(2) if pace else '?'})",
            f"    seconds by stage: {stages.group(1) if stages else '?'}",
            f"    fidelity: {fidelity(out, work / f'{name}-cpu')}",
        ]  # fmt: skip
    return lines


def micro(photos: Path, workers: int) -> list[str]:
    """The decode step alone on 256 photos: nvJPEG, nvJPEG + batched resize, and the CPU
    path in one process (times the workers for the pool's ceiling)."""
    import torch

    from indexer.config import DataConfig
    from indexer.decode.gpu import GpuDecoder, nvjpeg
    from indexer.decode.jpeg_route import route
    from indexer.decode.preprocess import Preprocessor

    cfg = DataConfig((3, 160, 160), "bicubic", 0.95, "center", (0.485, 0.456, 0.406),
                     (0.229, 0.224, 0.225))  # fmt: skip
    datas = [p.read_bytes() for p in sorted(photos.rglob("*.JPEG"))[:256]]
    items = [(d, route(d, 10**9)) for d in datas]
    blobs = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    decode, decoder = nvjpeg("cuda"), GpuDecoder(cfg, "cuda")

    def rate(work: object, reps: int = 5) -> float:
        work()  # type: ignore[operator]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            work()  # type: ignore[operator]
        torch.cuda.synchronize()
        return reps * len(datas) / (time.perf_counter() - t0)

    cpu = Preprocessor(cfg, "fast")
    t0 = time.perf_counter()
    for d in datas:
        cpu(d)
    one = len(datas) / (time.perf_counter() - t0)
    return [
        f"\n## the decode step alone, {len(datas)} photos",
        f"  nvJPEG batch decode:            {rate(lambda: decode(blobs)):8.0f} images/s",
        f"  nvJPEG + orient + batched resize: {rate(lambda: decoder(items)):8.0f} images/s",
        f"  CPU path (fast), one process:   {one:8.0f} images/s "
        f"(x{workers} workers: {one * workers:.0f})",
    ]


def linked_copies(folder: Path, copies: int, original: Path) -> Path:
    """folder holding `copies` copies of original's files (copy000, copy001, ...): the first a
    real copy, the others hard links, the same bytes under other names."""
    if not folder.is_dir():
        shutil.copytree(original, folder / "copy000")
        for n in range(1, copies):
            shutil.copytree(folder / "copy000", folder / f"copy{n:03d}", copy_function=os.link)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--photos", type=Path, help="a folder of ImageNet-size photos")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpudecode"))
    parser.add_argument("--scenes", type=count, default=3000)
    parser.add_argument("--rounds", type=count, default=2)
    parser.add_argument("--copies", type=count, default=10, help="photo copies (files)")
    parser.add_argument("--scene-copies", type=count, default=1, help="scene copies (hard links)")
    parser.add_argument(
        "--gpu-variant",
        action="append",
        default=[],
        help=f"also time --decode gpu on the photos: BATCH[:OPTION,...], options {list(OPTIONS)}",
    )
    parser.add_argument("--no-micro", dest="micro", action="store_false",
                        help="skip timing the decode step alone")  # fmt: skip
    args = parser.parse_args()
    for variant in args.gpu_variant:
        size, _, options = variant.partition(":")
        unknown = set(filter(None, options.split(","))) - set(OPTIONS)
        if not size.isdigit() or int(size) < 1 or unknown:
            parser.error(f"--gpu-variant {variant}: BATCH[:OPTION,...], options {list(OPTIONS)}")
    import torch
    import torchvision

    args.work.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(14, (os.cpu_count() or 2) - 2))
    versions = f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    lines = [f"# GPU decode: {torch.cuda.get_device_name()}, {versions}, {os.cpu_count()} CPUs, "
             f"model {MODEL}"]  # fmt: skip
    ck = args.work / "seed0.safetensors"
    write_checkpoint(ck)
    print("\n".join(lines), flush=True)
    if args.photos is not None:  # first: the figures that matter most, printed as they come
        if args.micro:
            print("\n".join(micro(args.photos, workers)), flush=True)
        photos = linked_copies(args.work / "photos", args.copies, args.photos)
        found = measure("photos", photos, args.work, ck, workers, args.rounds,
                        tuple(args.gpu_variant))  # fmt: skip
        print("\n".join(found), flush=True)
    scenes = args.work / "scenes"
    if not scenes.is_dir():
        write_corpus(scenes / "generated", args.scenes, duplicates=0, seed=7)
    scenes = linked_copies(args.work / "scene-copies", args.scene_copies, scenes / "generated")
    print("\n".join(measure("scenes", scenes, args.work, ck, workers, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
