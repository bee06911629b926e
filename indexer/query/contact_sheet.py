"""Contact sheets: each query image beside its results, or duplicate groups, labelled."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from indexer.safeio import os_errors_as, write_bytes_atomic

CELL = 160  # thumbnail side, pixels
LABEL = 48  # label band under each thumbnail: three lines
LINES = 3
PAD = 6
BACKGROUND = (255, 255, 255)
PLACEHOLDER = (200, 200, 200)


@dataclass(frozen=True)
class Cell:
    """One picture of the sheet: its encoded bytes or file (None: a placeholder) and its
    label lines."""

    image: bytes | Path | None
    lines: tuple[str, ...]


def wrapped(label: str, text: str) -> tuple[str, ...]:
    """A label line, then the whole text over the lines left (cut at the end only if it
    cannot fit)."""
    width, rest = 26, LINES - 1
    parts = [text[i : i + width] for i in range(0, len(text), width)] or [""]
    if len(parts) > rest:
        parts = [*parts[: rest - 1], _fit(text[width * (rest - 1) :])]
    return (label, *parts)


def thumbnail(image: bytes | Path | None) -> Image.Image:
    """The image fitted into a CELL square, or a grey placeholder when it cannot be read."""
    tile = Image.new("RGB", (CELL, CELL), PLACEHOLDER)
    try:
        if image is None:
            raise OSError("no file")
        from indexer.decode.images import decode_image

        data = image.read_bytes() if isinstance(image, Path) else image
        picture = ImageOps.contain(decode_image(data).image, (CELL, CELL))
        tile.paste(picture, ((CELL - picture.width) // 2, (CELL - picture.height) // 2))
    except Exception:  # a missing or broken file is drawn as a labelled placeholder
        ImageDraw.Draw(tile).text((CELL // 2 - 24, CELL // 2 - 6), "missing", fill=(90, 90, 90))
    return tile


def draw_sheet(rows: list[list[Cell]], out: Path) -> tuple[int, int]:
    """Write a PNG with one row of cells per list; its size (width, height)."""
    columns = max((len(r) for r in rows), default=1)
    width = columns * (CELL + PAD) + PAD
    height = max(len(rows), 1) * (CELL + LABEL + PAD) + PAD
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        top = PAD + r * (CELL + LABEL + PAD)
        for c, cell in enumerate(row):
            left = PAD + c * (CELL + PAD)
            sheet.paste(thumbnail(cell.image), (left, top))
            for n, line in enumerate(cell.lines[:LINES]):
                draw.text((left + 2, top + CELL + 2 + 14 * n), _fit(line), fill=(0, 0, 0))
    buffer = io.BytesIO()
    sheet.save(buffer, "PNG")
    with os_errors_as(f"writing the grid {out}"):
        out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out, buffer.getvalue(), sync=False)
    return width, height


def _fit(text: str, limit: int = 26) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]
