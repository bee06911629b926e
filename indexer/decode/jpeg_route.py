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
TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8,
                   13: 4, 16: 8, 17: 8, 18: 8}  # fmt: skip
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
    i, adobe, frame, jfif = 2, None, None, False
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
                return Route(False, "unusual EXIF (Pillow's reading is not ours to guess)")
            orientation, exif = found, True
        elif marker == 0xE0 and segment.startswith(b"JFIF\x00"):
            jfif = True
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
    if adobe is None and not jfif and frame[0][6:15:3] == b"RGB":  # libjpeg reads it as RGB
        return Route(False, "RGB components (no JFIF or Adobe segment)")
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
    """The Orientation tag of an EXIF block's first IFD, read as Pillow reads it: 1-8 (1 when
    out of range: Pillow then turns nothing either); 0 when the block holds none; None when
    anything is unusual (a header only Pillow reads, or none it reads; an IFD or a value that
    runs past the block, where Pillow stops reading; a tag that is not one SHORT or LONG):
    not ours to guess, the CPU path decodes it."""
    if tiff.startswith(b"Exif\x00\x00"):  # Pillow strips a second prefix too
        tiff = tiff[6:]
    if not tiff:
        return 0
    if tiff[:4] not in TIFF_HEADERS:
        return None
    order: Literal["little", "big"] = "little" if tiff[:2] == b"II" else "big"
    offset = int.from_bytes(tiff[4:8], order)
    if offset + 2 > len(tiff):
        return None
    count = int.from_bytes(tiff[offset : offset + 2], order)
    for n in range(count):
        entry = tiff[offset + 2 + 12 * n : offset + 14 + 12 * n]
        if len(entry) < 12:
            return None
        tag, kind = int.from_bytes(entry[0:2], order), int.from_bytes(entry[2:4], order)
        values = int.from_bytes(entry[4:8], order)
        if tag == ORIENTATION_TAG:
            if values != 1 or kind not in (SHORT, LONG):
                return None
            value = int.from_bytes(entry[8:10] if kind == SHORT else entry[8:12], order)
            return value if 1 <= value <= 8 else 1
        size = values * TIFF_TYPE_SIZES.get(kind, 0)  # Pillow skips a type it does not know
        if size > 4 and int.from_bytes(entry[8:12], order) + size > len(tiff):
            return None
    return 0
