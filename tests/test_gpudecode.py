"""GPU decoding's logic, run here on the CPU (torchvision decodes there too): a failing batch
is split until the bad items are found, order and alignment kept; orientation and geometry
match the CPU path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from indexer.gpudecode import GpuDecoder, decode_split, nvjpeg, orient
from indexer.jpegroute import route
from indexer.preprocess import DataConfig, Preprocessor
from indexer.synthetic import scene

CFG = DataConfig((3, 160, 160), "bicubic", 0.95, "center", (0.5,) * 3, (0.5,) * 3)


def jpeg(seed: int, size: tuple[int, int] = (200, 150), **save: object) -> bytes:
    buffer = io.BytesIO()
    scene(seed, size).save(buffer, "JPEG", quality=95, **save)
    return buffer.getvalue()


def test_a_failing_batch_is_split_until_the_bad_items_are_found() -> None:
    blobs = [torch.tensor([n], dtype=torch.uint8) for n in range(11)]
    bad = {3, 7, 8}
    calls: list[int] = []

    def decode(batch: list[torch.Tensor]) -> list[torch.Tensor]:
        calls.append(len(batch))
        if any(int(b[0]) in bad for b in batch):
            raise RuntimeError("nvJPEG: bad bitstream")
        return [b.repeat(3, 1, 1) for b in batch]

    out = decode_split(blobs, decode)
    assert [o is None for o in out] == [n in bad for n in range(11)]
    assert [int(o[0, 0, 0]) for o in out if o is not None] == [n for n in range(11) if n not in bad]
    assert calls[0] == 11 and len(calls) < 2 * 11  # halves, not one call per item


def test_a_decoder_that_drops_an_item_is_not_trusted() -> None:
    blobs = [torch.tensor([n], dtype=torch.uint8) for n in range(4)]
    out = decode_split(blobs, lambda batch: [b.repeat(3, 1, 1) for b in batch][:-1] or [])
    assert out == [None] * 4


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pil(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    base = scene(4, (60, 40))
    buffer = io.BytesIO()
    base.save(buffer, "PNG", exif=exif)
    from PIL import ImageOps

    want = np.asarray(ImageOps.exif_transpose(Image.open(buffer)).convert("RGB"))
    got = orient(torch.from_numpy(np.array(base)).permute(2, 0, 1), orientation)
    assert np.array_equal(got.permute(1, 2, 0).numpy(), want)


def test_the_prepared_pixels_match_the_cpu_path() -> None:
    items = [jpeg(s, size) for s, size in ((1, (200, 150)), (2, (150, 260)), (3, (640, 480)))]
    truncated = jpeg(9)[:-2000]
    items.insert(1, truncated)
    routes = [route(data, 10**8) for data in items]
    assert all(r.gpu for r in routes)  # the truncated one's header is whole
    out = GpuDecoder(CFG, "cpu", nvjpeg("cpu"))(list(zip(items, routes, strict=True)))
    cpu = Preprocessor(CFG, "exact")
    for data, got in zip(items, out, strict=True):
        if data is truncated:
            continue  # decoded as far as it goes by libjpeg, or None: either way not misaligned
        assert got is not None and got.shape == (160, 160, 3) and got.dtype == torch.uint8
        want = cpu(data).pixels.astype(np.float64)
        assert np.abs(got.numpy().astype(np.float64) - want).mean() < 3.0
