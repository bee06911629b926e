"""Which items the GPU may decode: a JPEG's header read in pure Python, nothing decoded."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

SOF_GPU = {0xC0: False, 0xC1: False, 0xC2: True}  # baseline, extended, progressive (Huffman)
SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # lossless, arithmetic
STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: no length
ORIENTATION_TAG = 0x0112
SHORT, LONG = 3, 4  # TIFF field types
TIFF_HEADERS = (b"II*\x00", b"MM\x00*")
PILLOW_ONLY_TIFF = (b"MM*\x00", b"II\x00*", b"MM\x00+", b"II+\x00")  # it reads these too
XMP = b"http://ns.adobe.com/xap/1.0/\x00"
XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # as Pillow's getexif reads it
MAX_SCANS = 64  # libjpeg writes ~10; each costs a pass over the image, with no timeout on the GPU


@dataclass(frozen=True)
class Route:
    """Where an item is decoded: gpu, or cpu with the reason (reported as the fallback share)."""

    gpu: bool
    reason: str = ""
    width: int = 0
    height: int = 0
    orientation: int = 1  # EXIF 1-8, applied to the decoded pixels
    progressive: bool = False

    @property
    def oriented_size(self) -> tuple[int, int]:
        """(width, height) as the model sees the image: after its EXIF orientation."""
        if self.orientation >= 5:
            return self.height, self.width
        return self.width, self.height


def route(data: bytes, max_pixels: int) -> Route:
    """gpu for a baseline or progressive 8-bit JPEG of 1 or 3 components (no Adobe CMYK,
    YCCK or RGB transform) within the pixel limit; otherwise cpu and why. The header is read
    to the start of the scan, as Pillow reads it: the first EXIF segment counts, wherever it
    is; anything Pillow might read otherwise goes to the CPU (two EXIF segments, which it
    joins; an XMP orientation where EXIF has none). So do files of more than MAX_SCANS scans:
    the GPU side has no --decode-timeout, and a file of many scans takes as long as it likes."""
    if not data.startswith(b"\xff\xd8"):
        return Route(False, "not a JPEG")
    i, adobe, frame = 2, None, None
    orientation, exif, xmp = 0, False, False  # orientation 0: no EXIF tag read
    while True:
        if i + 4 > len(data):
            return Route(False, "truncated header")
        if data[i] != 0xFF:
            return Route(False, "corrupt header")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in STANDALONE:
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # the scan (or the end): the header is read
            break
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2 or i + 2 + length > len(data):
            return Route(False, "truncated header")
        segment = data[i + 4 : i + 2 + length]
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
            if exif:
                return Route(False, "two EXIF segments")
            found = exif_orientation(segment[6:])
            if found is None:
                return Route(False, "an EXIF orientation of an unusual type, count or header")
            orientation, exif = found, True
        elif marker == 0xE1 and segment.startswith(XMP):
            xmp = xmp or any(m[2] not in b"019" for m in XMP_ORIENTATION.finditer(segment))
        elif marker == 0xEE and segment.startswith(b"Adobe") and len(segment) >= 12:
            if frame is not None:
                return Route(False, "an Adobe segment after the frame header")
            adobe = segment[11]
        elif marker in SOF_OTHER:
            return Route(False, "lossless, hierarchical or arithmetic-coded JPEG")
        elif marker in SOF_GPU:
            if frame is not None:
                return Route(False, "two frame headers")
            frame = (segment, SOF_GPU[marker])
        i += 2 + length
    if frame is None or marker == 0xD9:
        return Route(False, "no frame header")
    if xmp and not orientation:
        return Route(False, "an XMP orientation")
    if data.count(b"\xff\xda", i) > MAX_SCANS:  # 0xFF in entropy-coded data is 0xFF00 or RSTn
        return Route(False, f"more than {MAX_SCANS} scans")
    return _frame(frame[0], frame[1], orientation or 1, adobe, max_pixels)


def _frame(
    segment: bytes, progressive: bool, orientation: int, adobe: int | None, max_pixels: int
) -> Route:
    if len(segment) < 6:
        return Route(False, "truncated header")
    precision, components = segment[0], segment[5]
    height, width = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big")
    if precision != 8:
        return Route(False, f"{precision}-bit samples")
    if components not in (1, 3):
        return Route(False, f"{components} components (CMYK or YCCK)")
    if components == 3 and adobe == 0:
        return Route(False, "Adobe RGB transform (not YCbCr)")
    if width == 0 or height == 0:
        return Route(False, "no size in the frame header")
    if width * height > max_pixels:
        return Route(False, "over the pixel limit")
    return Route(True, "", width, height, orientation, progressive)


def exif_orientation(tiff: bytes) -> int | None:
    """The Orientation tag of an EXIF block's first IFD: 1-8 (1 when out of range: Pillow then
    turns nothing either); 0 when there is none (absent or malformed); None when it is not one
    SHORT or LONG, or the header is one only Pillow reads: not ours to guess."""
    if tiff[:4] in PILLOW_ONLY_TIFF:
        return None
    if tiff[:4] not in TIFF_HEADERS:
        return 0
    order: Literal["little", "big"] = "little" if tiff[:2] == b"II" else "big"
    offset = int.from_bytes(tiff[4:8], order)
    if offset + 2 > len(tiff):
        return 0
    count = int.from_bytes(tiff[offset : offset + 2], order)
    for n in range(count):
        entry = tiff[offset + 2 + 12 * n : offset + 14 + 12 * n]
        if len(entry) < 12:
            return 0
        if int.from_bytes(entry[0:2], order) != ORIENTATION_TAG:
            continue
        kind, values = int.from_bytes(entry[2:4], order), int.from_bytes(entry[4:8], order)
        if values != 1 or kind not in (SHORT, LONG):
            return None
        value = int.from_bytes(entry[8:10] if kind == SHORT else entry[8:12], order)
        return value if 1 <= value <= 8 else 1
    return 0
