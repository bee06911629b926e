"""Preprocessing: 'exact' equals timm's eval transform pixel for pixel; 'fast' stays close."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from timm.data import create_transform

from indexer.config import DataConfig
from indexer.decode.images import decode_image
from indexer.decode.preprocess import Preprocessor
from indexer.synthetic import scene

CONVNEXT = DataConfig((3, 160, 160), "bicubic", 0.95, "center", (0.5,) * 3, (0.5,) * 3)


def jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def timm_pixels(data: bytes, cfg: DataConfig) -> np.ndarray:
    """timm's own eval transform (uint8 variant), HWC."""
    transform = create_transform(
        input_size=cfg.input_size, interpolation=cfg.interpolation, crop_pct=cfg.crop_pct,
        crop_mode=cfg.crop_mode, mean=cfg.mean, std=cfg.std, use_prefetcher=True,
    )  # fmt: skip
    return transform(Image.open(io.BytesIO(data)).convert("RGB")).permute(1, 2, 0).numpy()


CONFIGS = [
    CONVNEXT,
    DataConfig((3, 224, 224), "bilinear", 0.875, "center", (0.4,) * 3, (0.2,) * 3),
    DataConfig((3, 192, 192), "bicubic", 1.0, "squash", (0.5,) * 3, (0.5,) * 3),
    DataConfig((3, 160, 160), "bicubic", 0.9, "border", (0.5,) * 3, (0.5,) * 3),  # timm path
    DataConfig((3, 128, 192), "bicubic", 0.9, "center", (0.5,) * 3, (0.5,) * 3),  # timm path
]
SIZES = [(500, 375), (375, 500), (161, 161), (120, 90), (1203, 401)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.crop_mode}-{c.input_size[1:]}")
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_exact_mode_equals_timm(cfg: DataConfig, size: tuple[int, int]) -> None:
    data = jpeg(scene(sum(size), size))
    ours = Preprocessor(cfg, "exact")(data)
    assert ours.pixels.dtype == np.uint8
    assert ours.pixels.shape == (cfg.input_size[1], cfg.input_size[2], 3)
    assert (ours.width, ours.height) == size
    diff = np.abs(ours.pixels.astype(int) - timm_pixels(data, cfg).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_fast_mode_drafts_large_jpegs_and_stays_close() -> None:
    big = scene(5, (320, 240)).resize((2400, 1800), Image.Resampling.BICUBIC)
    data = jpeg(big, 90)
    fast = Preprocessor(CONVNEXT, "fast")
    drafted = decode_image(data, draft=fast._draft_size)
    assert drafted.image.size == (600, 450)  # 1/4 scale: still >= 2x the 224x168 resize
    assert (drafted.width, drafted.height) == (2400, 1800)
    ours = fast(data)
    assert (ours.width, ours.height) == (2400, 1800)
    diff = np.abs(ours.pixels.astype(int) - timm_pixels(data, CONVNEXT).astype(int))
    assert diff.mean() < 2.0


def test_fast_mode_on_small_images_is_exact() -> None:
    data = jpeg(scene(9, (500, 375)))
    fast, exact = Preprocessor(CONVNEXT, "fast")(data), Preprocessor(CONVNEXT, "exact")(data)
    np.testing.assert_array_equal(fast.pixels, exact.pixels)


def test_data_config_round_trips() -> None:
    assert DataConfig.from_dict(CONVNEXT.to_dict()) == CONVNEXT
    assert CONVNEXT.geometry_supported and not CONFIGS[3].geometry_supported


@pytest.mark.parametrize(
    ("size", "crop_mode", "want"),
    [
        ((168, 168), "center", False),  # 160 / 0.95 = 168: the short side stays
        ((167, 500), "center", True),
        ((500, 167), "center", True),
        ((640, 480), "center", False),
        ((3, 3), "center", True),
        ((150, 400), "squash", True),  # squash resizes both sides to 168
        ((400, 200), "squash", False),
    ],
)
def test_which_images_the_resize_enlarges(
    size: tuple[int, int], crop_mode: str, want: bool
) -> None:
    from dataclasses import replace

    from indexer.decode.preprocess import enlarges

    assert enlarges(*size, replace(CONVNEXT, crop_mode=crop_mode)) is want
