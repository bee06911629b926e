"""Procedural images for the demo and the tests: varied scenes and their near-duplicates."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def scene(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A random scene: a two-colour gradient, shapes, lines and a little texture."""
    rng = np.random.default_rng(seed)
    w, h = size
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, w)[None, :, None]
    angle_mix = rng.uniform(0, 1)
    s = np.linspace(0.0, 1.0, h)[:, None, None]
    mix = angle_mix * t + (1 - angle_mix) * s
    base = (c0 * (1 - mix) + c1 * mix).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(np.broadcast_to(base, (h, w, 3))), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, 12)))
    noise = rng.normal(0, 12, (h, w, 3))
    arr = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def near_duplicate(img: Image.Image, kind: str, seed: int = 0) -> Image.Image:
    """A crop, a resize, a JPEG re-encode or a slight blur of img."""
    rng = np.random.default_rng(seed)
    w, h = img.size
    if kind == "crop":
        dx, dy = int(w * rng.uniform(0.03, 0.08)), int(h * rng.uniform(0.03, 0.08))
        return img.crop((dx, dy, w - dx, h - dy))
    if kind == "resize":
        return img.resize((int(w * 0.6), int(h * 0.6)), Image.Resampling.BILINEAR)
    if kind == "reencode":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=40)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(1.0))
    raise ValueError(f"unknown near-duplicate kind {kind!r}")


DUPLICATE_KINDS = ("crop", "resize", "reencode", "blur")


def write_corpus(root: Path, count: int, duplicates: int = 0, seed: int = 0) -> list[Path]:
    """Write ``count`` scenes (JPEG, PNG) in subfolders, and near-duplicates of the first ones."""
    paths = []
    for i in range(count):
        folder = root / f"group{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        img = scene(seed * 100_003 + i)
        path = folder / (f"scene{i:04d}.png" if i % 5 == 0 else f"scene{i:04d}.jpg")
        img.save(path, quality=92) if path.suffix == ".jpg" else img.save(path)
        paths.append(path)
    dup_dir = root / "near-duplicates"
    for j in range(duplicates):
        dup_dir.mkdir(parents=True, exist_ok=True)
        kind = DUPLICATE_KINDS[j % len(DUPLICATE_KINDS)]
        img = near_duplicate(Image.open(paths[j]).convert("RGB"), kind, seed=j)
        path = dup_dir / f"{paths[j].stem}-{kind}.jpg"
        img.save(path, quality=92)
        paths.append(path)
    return paths
