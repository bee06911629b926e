"""Decoding rules shared by build and query: orientation, modes, animation, broken files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from indexer.decode.images import DecodeError, decode_image


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def gradient(w: int = 64, h: int = 32) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    return Image.fromarray(np.stack([x, x[::-1, ::-1], np.full_like(x, 90)], axis=2), "RGB")


def decode_rgb(data: bytes, **kwargs: int) -> Image.Image:
    return decode_image(data, **kwargs).image


def test_exif_orientation_is_applied() -> None:
    img = gradient(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(encode(img, "JPEG", exif=exif, quality=95))
    out = decoded.image
    assert out.size == (32, 64) and (decoded.width, decoded.height) == (32, 64)
    expected = img.transpose(Image.Transpose.ROTATE_270)
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(expected, np.int16)).mean()
    assert diff < 3


def test_alpha_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = np.asarray(decode_rgb(encode(rgba, "PNG")))
    assert tuple(out[1, 1]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (0, 0, 255)
    la = Image.new("LA", (2, 2), (0, 0))
    assert tuple(np.asarray(decode_rgb(encode(la, "PNG")))[0, 0]) == (255, 255, 255)


def test_palette_with_transparency() -> None:
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((0, 0), 0)
    out = np.asarray(decode_rgb(encode(p, "PNG", transparency=0)))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[1, 1]) == (10, 200, 30)


def test_sixteen_bit_grey_is_scaled_not_clamped() -> None:
    arr = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16)
    img = Image.fromarray(arr)
    out = np.asarray(decode_rgb(encode(img, "PNG")))[..., 0]
    assert out.tolist() == [[0, 128, 255, 4]]


def test_cmyk_jpeg_keeps_its_colours() -> None:
    rgb = Image.new("RGB", (16, 16), (200, 40, 40))
    out = np.asarray(decode_rgb(encode(rgb.convert("CMYK"), "JPEG", quality=95)))
    assert np.abs(out[8, 8].astype(int) - [200, 40, 40]).max() < 12


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(decode_rgb(data))
    assert out[4, 4, 0] > 200 and out[4, 4, 1] < 50


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"<html>not a picture</html>", "cannot decode"),
        (encode(gradient(), "JPEG")[:200], "cannot decode"),
        (encode(gradient(), "PNG")[:60], "cannot decode"),
    ],
)
def test_broken_files_raise(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_image(data)


def test_pixel_limit_is_an_error() -> None:
    with pytest.raises(DecodeError, match="over the limit"):
        decode_rgb(encode(gradient(64, 32), "PNG"), max_pixels=1000)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_pixel_limit_raised_past_pillows_is_kept(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--max-image-pixels above Pillow's bomb limit (here lowered to 1000) decodes what it
    allows, also past twice Pillow's limit (where Pillow raises, not warns); each call keeps
    its own limit, whatever Pillow's has grown to."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(gradient(64, 32), fmt)  # 2,048 pixels
    with pytest.raises(DecodeError, match="too large"):
        decode_rgb(data, max_pixels=900)  # Pillow's limit is kept where it is the lower
    assert decode_rgb(data, max_pixels=5000).size == (64, 32)
    with pytest.raises(DecodeError, match=r"over the limit"):
        decode_rgb(data, max_pixels=2000)


def with_tiff(jpeg: bytes, tiff: bytes) -> bytes:
    segment = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment + jpeg[2:]


def test_odd_exif_that_pillow_cannot_rewrite_is_still_turned() -> None:
    """Orientation 6 beside a standard tag of the wrong type: ImageOps.exif_transpose fails
    rewriting the EXIF; the pixels are turned all the same."""
    entries = [(0x0106, 2, 4, b"Cam\x00"), (0x0112, 3, 1, (6).to_bytes(2, "little") + bytes(2))]
    tiff = b"II*\x00" + (8).to_bytes(4, "little") + len(entries).to_bytes(2, "little")
    for tag, kind, count, value in entries:
        tiff += tag.to_bytes(2, "little") + kind.to_bytes(2, "little")
        tiff += count.to_bytes(4, "little") + value
    img = gradient(64, 32)
    decoded = decode_image(with_tiff(encode(img, "JPEG", quality=95), tiff + bytes(4)))
    assert (decoded.width, decoded.height) == decoded.image.size == (32, 64)
    expected = np.asarray(img.transpose(Image.Transpose.ROTATE_270), np.int16)
    assert np.abs(np.asarray(decoded.image, np.int16) - expected).mean() < 3


@pytest.mark.parametrize("dpi", [None, (72, 72)])
def test_exif_that_is_not_tiff_means_upright(dpi: tuple[int, int] | None) -> None:
    """Pillow reads such a file upright without a JFIF density and fails with one; here it
    is upright either way (the pixels are whole)."""
    img = gradient(64, 32)
    jpeg = encode(img, "JPEG", quality=95, **({"dpi": dpi} if dpi else {}))
    decoded = decode_image(with_tiff(jpeg, b"XXXX\x00\x00\x00\x08" + bytes(6)))
    assert decoded.image.size == (64, 32)


def test_odd_metadata_decodes_without_pillows_warnings() -> None:
    """A tag whose data lies past the EXIF block: Pillow warns ("Tag data larger than file")
    and reads on; a build or a query says nothing of it on stderr."""
    import warnings

    make = (0x010F).to_bytes(2, "little") + (2).to_bytes(2, "little")
    make += (20).to_bytes(4, "little") + (200).to_bytes(4, "little")  # 20 bytes at 200: past
    tiff = b"II*\x00" + (8).to_bytes(4, "little") + (1).to_bytes(2, "little") + make + bytes(4)
    data = with_tiff(encode(gradient(64, 32), "JPEG", quality=95), tiff)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert decode_rgb(data).size == (64, 32)
    assert not caught, [str(w.message) for w in caught]
