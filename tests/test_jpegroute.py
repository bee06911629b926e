"""The GPU decode router: which files go to the GPU, read from generated files of every kind."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from indexer.jpegroute import exif_orientation, route
from indexer.synthetic import scene

LIMIT = 10_000_000


def jpeg(mode: str = "RGB", **save: object) -> bytes:
    buffer = io.BytesIO()
    scene(1, (120, 80)).convert(mode).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def with_exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(exif=exif)


def sof_patched(data: bytes, offset: int, value: bytes) -> bytes:
    """The file with bytes of its frame header (after the SOF marker and length) replaced."""
    at = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    start = at + 4 + offset
    return data[:start] + value + data[start + len(value) :]


def with_adobe(data: bytes, transform: int) -> bytes:
    segment = b"Adobe" + b"\x00\x64" + b"\x00\x00" + b"\x00\x00" + bytes([transform])
    app14 = b"\xff\xee" + (len(segment) + 2).to_bytes(2, "big") + segment
    return data[:2] + app14 + data[2:]


def png() -> bytes:
    buffer = io.BytesIO()
    scene(1, (40, 40)).save(buffer, "PNG")
    return buffer.getvalue()


CASES = [
    ("baseline", lambda: jpeg(), True, ""),
    ("progressive", lambda: jpeg(progressive=True), True, ""),
    ("grey", lambda: jpeg("L"), True, ""),
    ("CMYK", lambda: jpeg("CMYK"), False, "4 components"),
    ("YCCK", lambda: with_adobe(jpeg("CMYK"), 2), False, "4 components"),
    ("Adobe RGB", lambda: with_adobe(jpeg(), 0), False, "Adobe RGB"),
    ("Adobe YCbCr", lambda: with_adobe(jpeg(), 1), True, ""),
    ("12-bit", lambda: sof_patched(jpeg(), 0, b"\x0c"), False, "12-bit"),
    ("bomb", lambda: sof_patched(jpeg(), 1, b"\xff\xff\xff\xff"), False, "pixel limit"),
    ("no height", lambda: sof_patched(jpeg(), 1, b"\x00\x00"), False, "no size"),
    ("PNG", png, False, "not a JPEG"),
    ("truncated header", lambda: jpeg()[:40], False, "truncated header"),
    ("empty", lambda: b"", False, "not a JPEG"),
    ("garbage after SOI", lambda: b"\xff\xd8" + b"\x00" * 50, False, "corrupt header"),
]


@pytest.mark.parametrize(("name", "make", "gpu", "reason"), CASES, ids=[c[0] for c in CASES])
def test_route(name: str, make: object, gpu: bool, reason: str) -> None:
    got = route(make(), LIMIT)  # type: ignore[operator]
    assert got.gpu == gpu and reason in got.reason, got
    if gpu:
        assert (got.width, got.height) == (120, 80)


def test_a_truncated_image_body_goes_to_the_gpu_and_its_failure_is_caught_there() -> None:
    data = jpeg()
    assert route(data[: len(data) * 2 // 3], LIMIT).gpu  # the header is whole; decode fails


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_read(orientation: int) -> None:
    got = route(with_exif(orientation), LIMIT)
    assert got.gpu and got.orientation == orientation


@pytest.mark.parametrize("tiff", [b"", b"XX\x00\x00", b"II*\x00\xff\xff\xff\x7f", b"MM\x00*\x00"])
def test_malformed_exif_means_upright(tiff: bytes) -> None:
    assert exif_orientation(tiff) == 1


def test_the_pixel_limit_is_the_callers() -> None:
    assert not route(jpeg(), 120 * 80 - 1).gpu and route(jpeg(), 120 * 80).gpu
