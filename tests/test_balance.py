"""The share of GPU-decodable JPEGs the workers decode themselves: the balance from a table,
its spread over positions, its convergence, and the workers seeing it change mid-run."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from indexer.config import DataConfig
from indexer.decode.gpu_share import MAX_SHARE, SMOOTHING, CpuShare, WorkerTime, balanced_share
from indexer.decode.preprocess import Preprocessor
from indexer.synthetic import scene

CFG = DataConfig((3, 160, 160), "bicubic", 0.95, "center", (0.5,) * 3, (0.5,) * 3)


def jpeg(seed: int, size: tuple[int, int] = (240, 180)) -> bytes:
    buffer = io.BytesIO()
    scene(seed, size).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("eligible", "gpu", "workers", "base", "cpu", "want"),
    [
        (256, 1e-4, 14, 0.03, 4e-3, 0.2375),  # the H100's photos, roughly: a quarter
        (256, 5e-6, 14, 0.03, 4e-3, 0.0),  # a GPU this fast: the workers' reading is the pace
        (256, 1e-2, 14, 0.03, 4e-3, MAX_SHARE),  # a slow GPU: the workers take all they may
        (256, 1e-4, 0, 0.03, 4e-3, 0.0),  # no workers: nothing is decoded in the main process
        (256, 1e-4, 14, 0.03, 0.0, 0.0),  # no decode time measured yet
        (0, 1e-4, 14, 0.03, 4e-3, 0.0),  # no JPEG the GPU could decode
        (256, 1e-4, 14, 5.0, 4e-3, 0.0),  # the workers are the pace already
    ],
)
def test_balanced_share_from_a_table(
    eligible: int, gpu: float, workers: int, base: float, cpu: float, want: float
) -> None:
    got = balanced_share(eligible, gpu, workers, base, cpu)
    assert got == pytest.approx(want, abs=5e-4)
    if 0 < got < MAX_SHARE:  # both sides take as long
        x = got * eligible
        assert (base + x * cpu) / workers == pytest.approx((eligible - x) * gpu)


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5, 0.9])
def test_every_run_of_positions_holds_about_the_share(share: float) -> None:
    split = CpuShare(4, start=share)
    taken = np.array([split.takes(p) for p in range(20_000)])
    windows = np.convolve(taken, np.ones(256), "valid")  # every 256 consecutive positions
    assert np.abs(windows - share * 256).max() <= 3


def test_the_share_converges_to_the_balance() -> None:
    cpu, gpu, workers, base, eligible = 4e-3, 1.2e-4, 14, 0.03, 256
    split = CpuShare(workers)
    for _ in range(60):  # each batch: the workers decode the share, the GPU the rest
        shared = round(split.value * eligible)
        spent = WorkerTime(base + shared * cpu, shared, shared * cpu)
        split.update(spent, eligible - shared, (eligible - shared) * gpu)
    assert split.value == pytest.approx(balanced_share(eligible, gpu, workers, base, cpu), abs=0.01)
    assert split.taken > 0


def test_without_workers_nothing_is_taken() -> None:
    split = CpuShare(0)
    split.update(WorkerTime(1.0, 0, 0.0), 100, 10.0)
    assert split.value == 0.0 and not any(split.takes(p) for p in range(1000))


def test_workers_see_the_share_change_mid_run(tmp_path: Path) -> None:
    from indexer.config import LoaderConfig, SourceSpec
    from indexer.decode.loader import iter_batches
    from indexer.sources import list_items, open_sources

    root = tmp_path / "src"
    root.mkdir()
    datas = {f"{n:03d}.jpg": jpeg(n) for n in range(72)}
    for name, data in datas.items():
        (root / name).write_bytes(data)
    sources = open_sources((SourceSpec(str(root)),))
    items = list_items(sources)
    prep = Preprocessor(CFG, "fast")
    seen: dict[int, str] = {}
    batches: list[Any] = []
    for batch in iter_batches(items, sources, prep, LoaderConfig(batch_size=4, workers=2),
                              gpu_decode=True):  # fmt: skip
        assert batch.share is not None
        if not batches:
            batch.share._value.value = 1.0  # from now on the workers decode every JPEG
        batches.append(batch)
        for position in batch.positions:
            seen[position] = "cpu"
        for item in batch.raw:
            seen[item.position] = "gpu"
    assert sorted(seen) == list(range(len(items)))  # every item once, one way or the other
    assert {"cpu", "gpu"} <= set(seen.values())  # the start share split the first batches
    assert not batches[-1].raw and batches[-1].spent.shared == 4  # the change reached them
    assert all(b.spent.seconds > 0 for b in batches)
    for batch in batches:  # a JPEG the workers took is the CPU path's pixels, in its row
        rows = [] if batch.pixels is None else list(batch.pixels)
        for position, pixels in zip(batch.positions, rows, strict=True):
            want = prep(datas[items[position].key]).pixels
            assert np.array_equal(pixels.numpy(), want)


def test_the_gpu_side_reports_its_pace_to_the_share() -> None:
    from indexer.build.gpu_decoding import RawDecoding
    from indexer.config import BuildConfig, LoaderConfig
    from indexer.decode.batch import Batch, RawItem
    from indexer.decode.gpu import GpuDecoder, nvjpeg
    from indexer.decode.jpeg_route import route
    from indexer.decode.loader import pack_raw

    datas = [jpeg(s) for s in range(6)]
    raw = [RawItem(n, 0, 0, route(d, 10**8), "h", {}) for n, d in enumerate(datas)]
    raw, blob = pack_raw(raw, datas)
    split = CpuShare(2)
    batch = Batch(raw=raw, raw_blob=blob, spent=WorkerTime(0.01, 2, 0.008), share=split)
    decoding = RawDecoding(BuildConfig((), Path("x"), loader=LoaderConfig()))
    decoding.decoder = GpuDecoder(CFG, "cpu", nvjpeg("cpu"))
    decoding.cpu = Preprocessor(CFG, "fast")
    decoding.decode(batch, runtime=None)  # type: ignore[arg-type]
    assert split.taken == 2 and split._gpu > 0 and split._cpu == pytest.approx(0.004)
    target = balanced_share(6 + 2, split._gpu, 2, 0.01 - 0.008, 0.004)  # 6 decoded, 2 shared
    assert split.value == pytest.approx(0.25 + SMOOTHING * (target - 0.25))  # a step toward it
    assert batch.pixels is not None and isinstance(batch.pixels, torch.Tensor)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_a_clock_gone_wrong_leaves_the_share_alone(bad: float) -> None:
    split = CpuShare(14)
    good = (WorkerTime(0.5, 60, 0.24), 196, 0.02)
    split.update(*good)
    value = split.value
    split.update(WorkerTime(bad, 60, 0.24), 196, 0.02)
    split.update(WorkerTime(0.5, 60, bad), 196, 0.02)
    split.update(WorkerTime(0.5, 60, 0.24), 196, bad)
    assert split.value == value
    split.update(*good)  # and it goes on from there
    assert 0.0 <= split.value <= MAX_SHARE and split.value != value
