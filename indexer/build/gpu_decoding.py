"""Whether a build decodes JPEGs on its GPU; its routed JPEGs decoded there ahead of the model."""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from indexer.build.stage_times import Stages
from indexer.config import BuildConfig
from indexer.decode.gpu_share import CpuShare
from indexer.decode.preprocess import Preprocessor
from indexer.model import data_config_cache as configcache

if TYPE_CHECKING:  # torch-heavy: imported only when a build has something to embed
    from indexer.model.runtime import Runtime
from indexer.build.decode_choice import choose_gpu_decoding
from indexer.build.threads import SWITCH_INTERVAL, close, produce_ahead
from indexer.decode.batch import Batch, RawItem

log = logging.getLogger(__name__)


def check_decode(cfg: BuildConfig) -> None:
    """--decode gpu refused before anything is written (and also when nothing changed): with
    exact preprocessing, without CUDA or a working nvJPEG, or in a Ray cluster without GPUs."""
    if cfg.loader.decode != "gpu":
        return
    if cfg.engine.kind != "ray":
        gpu_decoding(cfg)
        return
    from indexer.build.ray_engine import ray_plan

    ray_plan(cfg)


def gpu_decoding(cfg: BuildConfig) -> bool:
    """Whether this process decodes JPEGs on its GPU (choose_gpu_decoding; auto from the rates
    this machine measured for the model's input size, remembered from its last run: none
    known, the CPU). Never with the Ray engine: its GPU actors decide (rayengine)."""
    from indexer.build import decode_choice as decodechoice
    from indexer.model.timm_model import resolve_device

    if cfg.engine.kind == "ray":
        return False
    device = resolve_device(cfg.model.device)
    cuda = device.type == "cuda"

    def problem() -> str | None:
        from indexer.decode.gpu import unusable

        return unusable(device)

    exact = cfg.loader.preprocessing == "exact"
    rates: dict[str, float] = {}
    hint = configcache.lookup(cfg.model.name) if cuda and cfg.loader.decode == "auto" else None
    if hint is not None and not exact:  # the input size its last run resolved on this machine
        key = decodechoice.run_key(device, hint.input_size, cfg.loader)
        rates = {} if key is None else decodechoice.measured(key)
    return choose_gpu_decoding(cfg.loader.decode, cuda, exact, problem, measured=rates)


@dataclass(frozen=True)
class GpuDecoded:
    """A batch's raw items as nvJPEG left them (None: failed), and the seconds it took."""

    images: list[Any]
    seconds: float


class RawDecoding:
    """The batches' GPU-routed JPEGs decoded on the model's device; one the GPU cannot decode
    is decoded on the CPU here (an error row if that fails too), so none is lost.

    On CUDA the work runs on a stream of its own, waited for before the batch is handed on:
    the model's kernels never queue behind the next batch's decoding, nor its sync behind them.
    """

    def __init__(self, cfg: BuildConfig, stages: Stages | None = None) -> None:
        self.cfg = cfg
        self.stages = stages or Stages()
        self.decoder: Any = None
        self.cpu: Preprocessor | None = None
        self.stream: Any = None  # torch.cuda.Stream on CUDA
        self.share: CpuShare | None = None  # the loader's, once a batch brought it
        self.gpu, self.fallback = 0, 0

    def decode(self, batch: Batch, runtime: Runtime) -> None:
        """The batch's raw items decoded and added to its rows (both steps at once)."""
        self.prepare(batch, self.decode_only(batch, runtime))

    def decode_only(self, batch: Batch, runtime: Runtime) -> GpuDecoded:
        """Step one: the raw items decoded by nvJPEG, which returns when done (and lets
        the GIL go meanwhile); a None for each item it could not decode."""
        if not batch.raw:
            return GpuDecoded([], 0.0)
        if self.decoder is None:
            self._start(runtime)
        pairs = [
            (data, item.route) for data, item in zip(batch.raw_views(), batch.raw, strict=True)
        ]
        start = time.perf_counter()
        with self._on_stream():
            images = list(self.decoder.decode(pairs))
        seconds = time.perf_counter() - start
        self.stages.add("GPU decode", seconds)
        return GpuDecoded(images, seconds)

    def prepare(self, batch: Batch, decoded: GpuDecoded) -> None:
        """Step two: the decoded images oriented, resized and cropped, the failed ones
        decoded on the CPU, and all of them added to the batch's rows, in order. The GPU
        side's time is reported to the share of JPEGs the workers decode."""
        if not batch.raw:
            return
        start = time.perf_counter()
        with self._on_stream():
            routes = [item.route for item in batch.raw]
            pixels, good = self.decoder.prepare(decoded.images, routes)
            self._gather(batch, pixels, good)
            self._done(batch.pixels)
        seconds = time.perf_counter() - start
        self.stages.add("GPU resize", seconds)
        if batch.share is not None:  # the two steps overlap: the slower one sets the pace
            batch.share.update(batch.spent, len(good), max(decoded.seconds, seconds))
            self.share = batch.share

    def _start(self, runtime: Runtime) -> None:
        import torch

        from indexer.decode.gpu import GpuDecoder

        device = getattr(runtime, "device", "cuda")
        self.decoder = GpuDecoder(runtime.data_config, device)
        if self.decoder.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.decoder.device)
        loader = self.cfg.loader
        self.cpu = Preprocessor(runtime.data_config, loader.preprocessing, loader.max_pixels,
                                loader.allow_truncated)  # fmt: skip

    def _on_stream(self) -> Any:
        import torch

        return nullcontext() if self.stream is None else torch.cuda.stream(self.stream)

    def _gather(self, batch: Batch, decoded: Any, good: list[int]) -> None:
        """The batch's pixels: its CPU-decoded rows, then the GPU-decoded ones, then those
        the GPU failed on, decoded on the CPU here; each row added in the same order."""
        import torch

        device = self.decoder.device
        parts = [] if batch.pixels is None else [batch.pixels.to(device)]
        if decoded is not None:
            parts.append(decoded)
            for n in good:
                _add_row(batch, batch.raw[n])
        self.gpu += len(good)
        kept = set(good)
        fallen = []
        for item in (item for n, item in enumerate(batch.raw) if n not in kept):
            self.fallback += 1
            with self.stages.timed("CPU fallback"):
                image = self._on_cpu(batch, item)
            if image is not None:
                fallen.append(image)
                _add_row(batch, item)
        if fallen:
            parts.append(torch.stack(fallen).to(device))
        batch.pixels = (torch.cat(parts) if len(parts) > 1 else parts[0]) if parts else None
        batch.raw, batch.raw_blob = [], None

    def _done(self, pixels: Any) -> None:
        """The stream's work finished, and its output kept from reuse until the model's
        stream (the default one) is done with it."""
        import torch

        if self.stream is None:
            return
        if pixels is not None:
            pixels.record_stream(torch.cuda.default_stream(self.decoder.device))
        self.stream.synchronize()

    def _on_cpu(self, batch: Batch, item: RawItem) -> Any:
        import torch

        from indexer.decode.images import DecodeError

        assert self.cpu is not None
        try:
            pixels = self.cpu(batch.raw_bytes(item).numpy().tobytes()).pixels
            return torch.tensor(pixels)  # a copy: Pillow's array is read-only
        except DecodeError as exc:
            batch.errors.append((item.position, "decode", str(exc)))
        except Exception as exc:
            batch.errors.append((item.position, "preprocess", f"{type(exc).__name__}: {exc}"))
        return None

    def log_share(self) -> None:
        if self.gpu or self.fallback:
            taken = 0 if self.share is None else self.share.taken
            last = 0.0 if self.share is None else self.share.value
            log.info("decoded on the GPU: %d images; fell back to the CPU: %d; decoded by the "
                     "workers to keep pace: %d (share at the end %.2f)", self.gpu,
                     self.fallback, taken, last)  # fmt: skip


def _add_row(batch: Batch, item: RawItem) -> None:
    """A raw item's row, its size as the model saw it (after EXIF orientation)."""
    width, height = item.route.oriented_size
    batch.positions.append(item.position)
    batch.widths.append(width)
    batch.heights.append(height)
    batch.hashes.append(item.hash)
    batch.metadata.append(item.meta)


def decoded_ahead(batches: Iterator[Batch], raw: RawDecoding, runtime: Runtime,
                  depth: int = 2) -> Iterator[Batch]:  # fmt: skip
    """The batches with their GPU-routed JPEGs decoded ahead by two threads of their own:
    one runs nvJPEG on a batch while the other resizes the batch before it, up to `depth`
    batches ahead of the model. Order is kept; errors are raised here, in order."""
    stages = raw.stages
    previous = sys.getswitchinterval()
    lowered = previous if SWITCH_INTERVAL is None else min(previous, SWITCH_INTERVAL)
    sys.setswitchinterval(lowered)
    taken = stages.each(batches, "waiting for workers")
    decoded = produce_ahead(((b, raw.decode_only(b, runtime)) for b in taken), "gpu-decode", 1,
                    lambda: stages.timed("decode waiting for resize"))  # fmt: skip
    prepared = produce_ahead(_prepared(decoded, raw), "gpu-resize", depth,
                     lambda: stages.timed("waiting for the model"))  # fmt: skip
    try:
        yield from prepared
    finally:
        prepared.close()
        if sys.getswitchinterval() == lowered:  # unless another run changed it meanwhile
            sys.setswitchinterval(previous)


def ahead_if_routed(batches: Iterator[Batch], raw: RawDecoding,
                    runtime: Runtime) -> Iterator[Batch]:  # fmt: skip
    """decoded_ahead's threads where the loader routes JPEGs to the GPU (its batches carry the
    workers' share, or raw items); else the batches as they come, so the CPU path runs as
    with --decode cpu (the path whose rate --decode auto compares)."""
    try:
        first = next(batches, None)
        if first is None:
            return
        rest = itertools.chain([first], batches)
        if first.share is not None or first.raw:
            yield from decoded_ahead(rest, raw, runtime)
        else:
            yield from rest
    finally:
        close(batches)


def _prepared(decoded: Iterator[tuple[Batch, GpuDecoded]], raw: RawDecoding) -> Iterator[Batch]:
    try:
        for batch, images in decoded:
            raw.prepare(batch, images)
            yield batch
    finally:
        close(decoded)  # its thread stops and is joined now, not when it is collected
