"""The GPU decode router: which files go to the GPU, read from generated files of every kind."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from indexer.decode.jpeg_route import exif_orientation, route
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


def test_empty_exif_means_upright() -> None:
    assert exif_orientation(b"") == exif_orientation(b"Exif\x00\x00") == 0  # no tag
    got = route(jpeg()[:2] + app1(b"") + jpeg()[2:], LIMIT)
    assert got.gpu and got.orientation == 1


def ifd(order: str, *entries: tuple[int, int, int, int]) -> bytes:
    """A TIFF block whose first IFD holds these (tag, type, count, value or offset) entries."""
    end = "big" if order == "MM" else "little"
    head = b"MM\x00*" if order == "MM" else b"II*\x00"
    body = b"".join(t.to_bytes(2, end) + k.to_bytes(2, end) + c.to_bytes(4, end)
                    + (v.to_bytes(2, end) + bytes(2) if k == 3 else v.to_bytes(4, end))
                    for t, k, c, v in entries)  # fmt: skip
    return head + (8).to_bytes(4, end) + len(entries).to_bytes(2, end) + body + bytes(4)


MALFORMED = [  # each one Pillow reads its own way (or fails on): the CPU path decodes it
    b"XX\x00\x00",  # no TIFF header Pillow reads
    b"MM*\x00\x00\x00\x00\x08",  # one only Pillow reads
    b"II*\x00\xff\xff\xff\x7f",  # the IFD past the end
    b"MM\x00*\x00",  # cut in the header
    ifd("II", (0x0112, 3, 1, 6))[:20],  # cut in the IFD
    ifd("II", (0x010F, 2, 20, 200), (0x0112, 3, 1, 6)),  # Make's text past the end: Pillow stops
    b"Exif\x00\x00Exif\x00\x00" + ifd("II", (0x0112, 3, 1, 6)),  # a third prefix: not TIFF
]


@pytest.mark.parametrize("tiff", MALFORMED)
def test_malformed_exif_goes_to_the_cpu(tiff: bytes) -> None:
    assert exif_orientation(tiff) is None
    got = route(jpeg()[:2] + app1(tiff) + jpeg()[2:], LIMIT)
    assert not got.gpu and "unusual EXIF" in got.reason


@pytest.mark.parametrize(
    ("tiff", "want"),
    [
        (b"Exif\x00\x00" + ifd("II", (0x0112, 3, 1, 6)), 6),  # a second prefix, which Pillow strips
        (ifd("MM", (0x010F, 2, 4, 0), (0x0112, 3, 1, 8)), 8),  # a short value held in its entry
        (ifd("II", (0x010F, 99, 9, 10**6), (0x0112, 3, 1, 3)), 3),  # a type Pillow skips
        (ifd("II", (0x0110, 2, 6, 8 + 2 + 12 + 4)) + b"Model\x00", 0),  # no Orientation
    ],
)
def test_exif_read_past_other_tags_as_pillow_does(tiff: bytes, want: int) -> None:
    from PIL import Image

    assert exif_orientation(tiff) == want
    data = jpeg()[:2] + app1(tiff) + jpeg()[2:]
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112, 0) == want
    got = route(data, LIMIT)
    assert got.gpu and got.orientation == (want or 1)


def test_the_pixel_limit_is_the_callers() -> None:
    assert not route(jpeg(), 120 * 80 - 1).gpu and route(jpeg(), 120 * 80).gpu


def app1(tiff: bytes) -> bytes:
    segment = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment


def tiff_orientation(order: str, kind: int, value: int, count: int = 1) -> bytes:
    """A TIFF block whose first IFD holds only the Orientation tag, of the given field type."""
    end = "big" if order == "MM" else "little"
    head = b"MM\x00*" if order == "MM" else b"II*\x00"
    size = 2 if kind == 3 else 4 if kind == 4 else 1
    data = value.to_bytes(size, end).ljust(4, b"\x00")
    entry = (0x0112).to_bytes(2, end) + kind.to_bytes(2, end) + count.to_bytes(4, end) + data
    return head + (8).to_bytes(4, end) + (1).to_bytes(2, end) + entry + bytes(4)


def after_frame(data: bytes, segment: bytes) -> bytes:
    at = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xC0)
    end = at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return data[:end] + segment + data[end:]


def xmp(body: bytes) -> bytes:
    segment = b"http://ns.adobe.com/xap/1.0/\x00" + body
    return b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment


def inserted(*segments: bytes) -> bytes:
    return jpeg()[:2] + b"".join(segments) + jpeg()[2:]


XMP_ATTRIBUTE = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
XMP_ELEMENT = b"<x:xmpmeta><tiff:Orientation>8</tiff:Orientation></x:xmpmeta>"


def many_scans(count: int) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has `count` scans."""
    data = jpeg(progressive=True)
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * (count - data.count(b"\xff\xda")) + b"\xff\xd9"


EXIF_CASES = [  # each as Pillow reads it: the first EXIF segment, wherever it is, by its type
    ("EXIF after the frame", lambda: after_frame(jpeg(), app1(tiff_orientation("MM", 3, 6))), 6),
    ("big-endian LONG", lambda: jpeg()[:2] + app1(tiff_orientation("MM", 4, 6)) + jpeg()[2:], 6),
    ("little-endian LONG", lambda: jpeg()[:2] + app1(tiff_orientation("II", 4, 8)) + jpeg()[2:], 8),
    ("big-endian SHORT", lambda: jpeg()[:2] + app1(tiff_orientation("MM", 3, 5)) + jpeg()[2:], 5),
    (
        "EXIF's tag before XMP's",
        lambda: inserted(app1(tiff_orientation("II", 3, 3)), xmp(XMP_ATTRIBUTE)),
        3,
    ),
    ("XMP orientation 1", lambda: inserted(xmp(XMP_ATTRIBUTE.replace(b'"6"', b'"1"'))), 1),
    ("XMP without orientation", lambda: inserted(xmp(b"<x:xmpmeta/>")), None),
    ("progressive, 64 scans", lambda: many_scans(64), None),
]


def rgb_ids(data: bytes, keep_jfif: bool = False) -> bytes:
    """The JPEG with its components named R, G, B (as libjpeg names an RGB frame), its JFIF
    segment dropped unless kept: without JFIF or Adobe, libjpeg reads such a frame as RGB."""
    if not keep_jfif and data[2:4] == b"\xff\xe0":
        data = data[:2] + data[4 + int.from_bytes(data[4:6], "big") :]
    out = bytearray(data)
    sof, sos = data.index(b"\xff\xc0"), data.index(b"\xff\xda")
    for k in range(min(data[sof + 9], 3)):  # the frame's and the scan's names of each
        out[sof + 10 + 3 * k] = out[sos + 5 + 2 * k] = b"RGB"[k]
    return bytes(out)


CPU_CASES = [  # what Pillow reads otherwise than the first EXIF segment: the CPU path decodes
    (
        "two EXIF segments",
        lambda: inserted(app1(tiff_orientation("II", 3, 6)), app1(tiff_orientation("II", 3, 8))),
        "two EXIF",
    ),
    ("XMP attribute", lambda: inserted(xmp(XMP_ATTRIBUTE)), "XMP orientation"),
    ("XMP element", lambda: inserted(xmp(XMP_ELEMENT)), "XMP orientation"),
    (
        "XMP, EXIF without the tag",
        lambda: inserted(app1(b"II*\x00" + (8).to_bytes(4, "little") + bytes(6)), xmp(XMP_ELEMENT)),
        "XMP orientation",
    ),
    (
        "MM*\\0 header",
        lambda: inserted(app1(b"MM*\x00" + tiff_orientation("MM", 3, 6)[4:])),
        "unusual EXIF",
    ),
    (
        "II\\0* header",
        lambda: inserted(app1(b"II\x00*" + tiff_orientation("II", 3, 6)[4:])),
        "unusual EXIF",
    ),
    ("65 scans", lambda: many_scans(65), "more than 64 scans"),
    ("RGB component IDs", lambda: rgb_ids(jpeg()), "RGB components"),
]


def test_rgb_component_ids_with_jfif_are_ycbcr() -> None:
    assert route(rgb_ids(jpeg(), keep_jfif=True), LIMIT).gpu  # JFIF: libjpeg reads YCbCr
    assert route(rgb_ids(jpeg("L")), LIMIT).gpu  # one component: grey, whatever its name


@pytest.mark.parametrize(("name", "make", "reason"), CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_what_pillow_reads_otherwise_goes_to_the_cpu(name: str, make: object, reason: str) -> None:
    from PIL import ImageOps

    data = make()  # type: ignore[operator]
    got = route(data, LIMIT)
    assert not got.gpu and reason in got.reason, got
    ImageOps.exif_transpose(Image.open(io.BytesIO(data))).load()  # the CPU path can decode it


@pytest.mark.parametrize(("name", "make", "want"), EXIF_CASES, ids=[c[0] for c in EXIF_CASES])
def test_exif_is_read_as_pillow_reads_it(name: str, make: object, want: int) -> None:
    from PIL import ImageOps

    data = make()  # type: ignore[operator]
    got = route(data, LIMIT)
    image = Image.open(io.BytesIO(data))
    assert image.getexif().get(0x0112) == want
    assert got.gpu and got.orientation == (want or 1)
    swapped = (got.height, got.width) if got.orientation >= 5 else (got.width, got.height)
    assert swapped == ImageOps.exif_transpose(image).size


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("BYTE orientation", jpeg()[:2] + app1(tiff_orientation("II", 1, 6)) + jpeg()[2:],
         "unusual EXIF"),
        ("two orientation values", jpeg()[:2] + app1(tiff_orientation("II", 3, 6, count=2))
         + jpeg()[2:], "unusual EXIF"),
        ("Adobe after the frame", after_frame(jpeg(), with_adobe(b"\xff\xd8", 0)[2:]),
         "Adobe segment after"),
        ("cut between frame and scan", after_frame(jpeg(), b"")[: jpeg().index(b"\xff\xc4") + 6],
         "truncated header"),
    ],
)  # fmt: skip
def test_what_pillow_might_read_otherwise_goes_to_the_cpu(name: str, data: bytes,
                                                          reason: str) -> None:  # fmt: skip
    got = route(data, LIMIT)
    assert not got.gpu and reason in got.reason, got
