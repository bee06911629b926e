"""Why nvJPEG decodes slower inside a build than alone (run on a GPU machine): the same batch
of photos decoded alone, from pinned memory, beside a model loop on the same GPU, beside a
GIL-holding Python thread, beside busy niced worker processes, and re-encoded progressive;
images/s and the ratio to "alone", in one run. `--device cpu` is a smoke run of the script."""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import MODEL, count

from indexer.build.threads import SWITCH_INTERVAL

WORKER_NICE = 5  # as indexer.decode.loader's workers


def burn(datas: list[bytes], stop: object) -> None:
    """A decoding worker's load: Pillow decodes and resizes the photos until told to stop."""
    from PIL import Image

    os.nice(WORKER_NICE)
    while not stop.is_set():  # type: ignore[attr-defined]
        for data in datas[:16]:
            Image.open(io.BytesIO(data)).convert("RGB").resize((160, 160))


@contextmanager
def workers(count: int, datas: list[bytes]) -> Iterator[None]:
    """`count` processes (spawned: the parent holds CUDA) decoding with Pillow meanwhile."""
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs = [ctx.Process(target=burn, args=(datas, stop), daemon=True) for _ in range(count)]
    for proc in procs:
        proc.start()
    time.sleep(2.0)  # spawned interpreters import Pillow before they load the cores
    try:
        yield
    finally:
        stop.set()
        for proc in procs:
            proc.join(10)


@contextmanager
def beside(work: Callable[[], None]) -> Iterator[None]:
    """`work` run in a loop on a thread of its own meanwhile."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            work()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    time.sleep(0.5)
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def switch_interval() -> Iterator[None]:
    """Python's switch interval as a build sets it while its decode threads run."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL or interval)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def model_loop(device: str, batch: int) -> Callable[[], None]:
    """One forward of the benchmark model on a random batch, as the build runs it."""
    import timm
    import torch

    model = timm.create_model(MODEL, pretrained=False).eval().to(device)
    model = model.to(memory_format=torch.channels_last)
    x = torch.rand(batch, 3, 160, 160, device=device).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.inference_mode(), torch.autocast(torch.device(device).type, torch.bfloat16):
            model.forward_head(model.forward_features(x), pre_logits=True)
        if device != "cpu":
            torch.cuda.synchronize()

    return step


def gil_holder() -> None:
    """Pure Python work: holds the GIL in 5 ms slices, as busy Python threads do."""
    total = 0
    for i in range(20000):
        total += i * i


def reencoded(datas: list[bytes], progressive: bool) -> list[bytes]:
    """The photos saved again by Pillow at quality 90, baseline or progressive."""
    from PIL import Image

    out = []
    for data in datas:
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buf, "JPEG", quality=90,
                                                         progressive=progressive)  # fmt: skip
        out.append(buf.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("photos", type=Path, help="a folder of ImageNet-size JPEG photos")
    parser.add_argument("--images", type=count, default=256)
    parser.add_argument("--reps", type=count, default=8)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workers", type=count, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    args = parser.parse_args()
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    files = sorted(p for p in args.photos.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
    datas = [p.read_bytes() for p in files[: args.images]]
    if not datas:
        raise SystemExit(f"no JPEG photos under {args.photos}")
    cuda = args.device != "cpu"

    def blobs_of(raw: list[bytes], pin: bool = False) -> list[torch.Tensor]:
        blobs = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in raw]
        return [b.pin_memory() for b in blobs] if pin else blobs

    def rate(blobs: list[torch.Tensor]) -> float:
        decode_jpeg(blobs, mode=ImageReadMode.RGB, device=args.device)  # warm
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.reps):
            decode_jpeg(blobs, mode=ImageReadMode.RGB, device=args.device)
        if cuda:
            torch.cuda.synchronize()
        return args.reps * len(blobs) / (time.perf_counter() - t0)

    name = torch.cuda.get_device_name() if cuda else "cpu (smoke run)"
    print(f"# nvJPEG probe: {name}, {len(datas)} photos x {args.reps}, {os.cpu_count()} CPUs")
    plain = blobs_of(datas)
    alone = rate(plain)
    rows: list[tuple[str, float]] = [("alone (pageable input)", alone)]
    if cuda:
        rows.append(("pinned input", rate(blobs_of(datas, pin=True))))
    step = model_loop(args.device, 256)
    with beside(step):
        rows.append(("beside the model loop (batch 256, bf16)", rate(plain)))
    with beside(gil_holder):
        rows.append(("beside a GIL-holding Python thread", rate(plain)))
        with switch_interval():
            rows.append((f"  the same, switch interval {SWITCH_INTERVAL} s", rate(plain)))
    with workers(args.workers, datas):
        rows.append((f"beside {args.workers} niced Pillow workers", rate(plain)))
        with beside(step), beside(gil_holder), switch_interval():
            rows.append(("all three at once, the build's switch interval", rate(plain)))
    base, prog = reencoded(datas, False), reencoded(datas, True)
    base_rate = rate(blobs_of(base))
    rows += [("re-encoded q90 baseline", base_rate), ("re-encoded q90 progressive",
             rate(blobs_of(prog)))]  # fmt: skip
    for label, value in rows:
        print(f"  {label:48s} {value:8.0f} images/s  {value / alone:5.2f}x alone")
    print(f"  progressive / baseline (same pixels): {rows[-1][1] / base_rate:.2f}x")
    print("\n".join(resizes(datas, args.device, args.reps)))


def resizes(datas: list[bytes], device: str, reps: int) -> list[str]:
    """The batch's two resizes (indexer.decode.gpu.RESIZE) on the decoded photos: images/s,
    and how far each is from the CPU path's pixels (mean levels; the worst image's mean)."""
    import numpy as np
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from indexer.config import DataConfig
    from indexer.decode.gpu import resize_crop_batch, resize_crop_groups
    from indexer.decode.preprocess import Preprocessor

    cfg = DataConfig((3, 160, 160), "bicubic", 0.95, "center", (0.485, 0.456, 0.406),
                     (0.229, 0.224, 0.225))  # fmt: skip
    blobs = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    images = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
    want = [Preprocessor(cfg, "exact")(d).pixels.astype(np.float32) for d in datas]
    lines = [f"\n## the batch's resize, {len(datas)} photos ({len(set(i.shape for i in images))} "
             "shapes)"]  # fmt: skip
    for name, resize in (("roi", resize_crop_batch), ("groups", resize_crop_groups)):
        pixels = resize(images, cfg)
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            pixels = resize(images, cfg)
        if device != "cpu":
            torch.cuda.synchronize()
        rate = reps * len(images) / (time.perf_counter() - t0)
        off = [float(np.abs(p.cpu().numpy().astype(np.float32) - w).mean())
               for p, w in zip(pixels, want, strict=True)]  # fmt: skip
        lines.append(f"  {name:8s} {rate:8.0f} images/s; off the CPU path by {np.mean(off):.2f} "
                     f"levels (worst image {max(off):.2f})")  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
