"""A hostile corpus, generated: every listed item ends up embedded correctly or failed with a
reason, the run finishes, and each stored vector is its own file's."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from indexer.build.failures import reason_of
from indexer.query.collection import Collection
from indexer.sources.folder import walk_images
from tests.helpers import BUILD_FLAGS, run_cli
from tests.hooks import use_decode_hook

OK = "embedded"


def scene(w: int = 96, h: int = 72, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :] * np.ones((h, 1))
    y = np.linspace(0, 255, h)[:, None] * np.ones((1, w))
    rgb = np.stack([x, y, (x + y) / 2 + rng.uniform(0, 40)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims another size (a decompression bomb's header)."""
    data = bytearray(encode(scene(8, 8), "PNG"))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(scene(8, 8).convert("P"), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen
    return bytes(data)


def ycck() -> bytes:
    """A 4-channel JPEG whose Adobe marker says YCCK (transform 2): libjpeg's YCCK path."""
    data = bytearray(encode(scene(seed=6).convert("CMYK"), "JPEG"))
    adobe = data.index(b"Adobe")
    data[adobe + 11] = 2  # 'Adobe', version (2 bytes), flags0 (2), flags1 (2), transform
    return bytes(data)


def frames(fmt: str) -> bytes:
    first, *rest = [scene(64, 48, seed=i) for i in range(3)]
    return encode(first, fmt, save_all=True, append_images=rest, duration=100, loop=0)


def oriented(n: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = n
    return encode(scene(80, 40, seed=n), "JPEG", exif=exif, quality=95)


def write_hostile(root: Path, outside: Path) -> dict[str, str]:
    """The corpus under root; returns key -> expected outcome (OK or a failure reason)."""
    good = encode(scene(), "JPEG", quality=90)
    png = encode(scene(seed=1), "PNG")
    grey16 = Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16))
    palette = scene(seed=2).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    files: dict[str, tuple[bytes, str]] = {
        "good.jpg": (good, OK),
        "truncated.jpg": (good[: len(good) // 2], "truncated"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "zero.jpg": (b"", "empty file"),
        "html.jpg": (b"<html><body>404 Not Found</body></html>", "not an image"),
        "png-named.jpg": (png, OK),
        "bomb.png": (png_claiming(100_000, 100_000), "too large"),
        "bomb.gif": (gif_claiming(65_535, 65_535), "too large"),
        "pixel-1x1.png": (encode(scene(1, 1), "PNG"), OK),
        "tall-1x20000.png": (encode(scene(1, 20_000), "PNG"), OK),
        "cmyk-adobe.jpg": (encode(scene(seed=3).convert("CMYK"), "JPEG"), OK),
        "ycck.jpg": (ycck(), OK),
        "grey16.png": (encode(grey16, "PNG"), OK),
        "palette-alpha.png": (encode(palette, "PNG"), OK),
        "la.png": (encode(scene(seed=4).convert("LA"), "PNG"), OK),
        "rgba.png": (encode(scene(seed=5).convert("RGBA"), "PNG"), OK),
        "animated.gif": (frames("GIF"), OK),
        "animated.webp": (frames("WEBP"), OK),
        "pages.tif": (frames("TIFF"), OK),
        "vanish.jpg": (good, "not found"),
        "rewrite.jpg": (good, OK),
        "forbidden.jpg": (good, OK if os.geteuid() == 0 else "permission denied"),
        **{f"orient-{n}.jpg": (oriented(n), OK) for n in range(1, 9)},
    }
    root.mkdir()
    expected = {}
    for name, (data, outcome) in files.items():
        (root / name).write_bytes(data)
        expected[name] = outcome
    (root / "forbidden.jpg").chmod(0)
    (root / "broken-link.jpg").symlink_to(root / "missing.jpg")
    (root / "loop-a.jpg").symlink_to(root / "loop-b.jpg")
    (root / "loop-b.jpg").symlink_to(root / "loop-a.jpg")
    (outside / "secret.jpg").write_bytes(good)
    (root / "outside.jpg").symlink_to(outside / "secret.jpg")
    (root / "cycle").symlink_to(root)  # a folder cycle: walked once, never again
    (root / "inside").mkdir()
    (root / "inside" / "real.png").write_bytes(png)
    (root / "inside-link.png").symlink_to(root / "inside" / "real.png")  # followed
    with open(os.path.join(os.fsencode(root), b"caf\xe9.jpg"), "wb") as f:
        f.write(good)  # not UTF-8: a printable key
    expected.update({
        "broken-link.jpg": "not found", "loop-a.jpg": "symlink loop", "loop-b.jpg": "symlink loop",
        "outside.jpg": "outside the source folder", "inside/real.png": OK,
        "inside-link.png": OK, "caf\\xe9.jpg": OK,
    })  # fmt: skip
    return expected


@pytest.mark.slow
def test_hostile_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, outside = tmp_path / "hostile", tmp_path / "elsewhere"
    outside.mkdir()
    expected = write_hostile(root, outside)
    replacement = tmp_path / "replacement.jpg"
    replacement.write_bytes(encode(scene(seed=9), "JPEG", quality=90))
    use_decode_hook(monkeypatch, "tests.hooks:vanishing")
    monkeypatch.setenv("INDEXER_TEST_ROOT", str(root))
    monkeypatch.setenv("INDEXER_TEST_REPLACEMENT", str(replacement))
    listed = walk_images(root)
    assert not any(key.startswith("cycle/") for key in listed)  # the cycle was not walked
    out = tmp_path / "c"
    result = run_cli(
        "build", root, "--out", out, "--no-pretrained", "--no-progress", "--workers", "2",
        "--batch-size", "4", "--precision", "fp32", "--max-failures", "20",
    )  # fmt: skip
    assert result.exit_code == 5, result.output  # partial: the failures are within budget
    errors = {e["key"]: e for e in pq.read_table(out / "errors.parquet").to_pylist()}
    stored = pq.read_table(out / "shards").to_pylist()
    outcome = {row["key"]: OK for row in stored}
    outcome.update({k: reason_of(e["stage"], e["error"]) for k, e in errors.items()})
    assert len(outcome) == len(stored) + len(errors)  # never both embedded and failed
    assert outcome == expected

    collection = Collection.open(out)  # each stored vector is its file's, embedded alone
    alone_paths = [replacement if r["key"] == "rewrite.jpg" else root / r["key"] for r in stored
                   if "\\x" not in r["key"]]  # fmt: skip
    alone = collection.embed_files(alone_paths)
    vectors = np.stack([np.asarray(r["embedding"]) for r in stored if "\\x" not in r["key"]])
    assert np.min(np.sum(alone * vectors, axis=1)) >= 0.9999
    by_key = {r["key"]: r for r in stored}
    assert (by_key["tall-1x20000.png"]["width"], by_key["tall-1x20000.png"]["height"]) == (1, 20000)
    for n in range(1, 9):  # EXIF orientation 5-8 swaps the displayed width and height
        row = by_key[f"orient-{n}.jpg"]
        assert (row["width"], row["height"]) == ((40, 80) if n >= 5 else (80, 40)), n

    summary = result.output.split("Failed: ")[1]  # per stage, with its most common reason
    for stage, n in Counter(e["stage"] for e in errors.values()).items():
        assert f"{stage} {n} (" in summary, summary
    assert str(out / "errors.parquet") in summary
    run = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert sum(run["failures"].values()) == len(errors) and run["failures"]["not found"] == 2
    assert run["failures"]["truncated"] == run["failures"]["symlink loop"] == 2
    assert run["failures"]["too large"] == 2


def test_failures_are_described_per_stage_with_the_most_common_reason() -> None:
    from indexer.build.failures import count_stages, describe_stages

    errors = [{"stage": "fetch", "error": "HTTP 404 Not Found"}] * 4 + [
        {"stage": "fetch", "error": "HTTP 503"},
        {"stage": "decode", "error": "image file is truncated"},
    ]
    stages = count_stages(errors)
    assert stages == {"fetch": {"HTTP 404 not found": 4, "HTTP 503 unavailable": 1},
                      "decode": {"truncated": 1}}  # fmt: skip
    assert describe_stages(stages) == (
        "fetch 5 (4 HTTP 404 not found, 1 HTTP 503 unavailable), decode 1 (1 truncated)"
    )


def test_truncated_files_can_be_allowed(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    good = encode(scene(), "JPEG", quality=90)
    (root / "cut.jpg").write_bytes(good[: len(good) * 2 // 3])
    (root / "whole.jpg").write_bytes(good)
    flags = ("--no-pretrained", "--no-progress", "--workers", "0")
    strict = run_cli("build", root, "--out", tmp_path / "a", *flags, "--max-failures", "1")
    assert strict.exit_code == 5 and "1 truncated" in strict.output, strict.output
    lenient = run_cli("build", root, "--out", tmp_path / "b", *flags, "--allow-truncated")
    assert lenient.exit_code == 0, lenient.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["decode"]["allow_truncated"] is True


def test_max_image_pixels_is_enforced_and_recorded(tmp_path: Path) -> None:
    root = tmp_path / "p"
    root.mkdir()
    (root / "big.png").write_bytes(encode(scene(200, 100), "PNG"))
    (root / "small.png").write_bytes(encode(scene(100, 50), "PNG"))
    flags = ("--no-pretrained", "--no-progress", "--workers", "0", "--max-failures", "1")
    result = run_cli("build", root, "--out", tmp_path / "c", *flags, "--max-image-pixels", "10000")
    assert result.exit_code == 5 and "1 too large" in result.output, result.output
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["decode"]["max_pixels"] == 10000
    query = run_cli("query", root / "big.png", "--index", tmp_path / "c")  # query follows it
    assert query.exit_code == 2 and "over the limit of 10000 pixels" in query.output


@pytest.mark.parametrize(
    ("stage", "error", "reason"),
    [
        ("decode", "empty file", "empty file"),
        ("decode", "cannot decode image: OSError: image file is truncated (3 bytes)", "truncated"),
        ("decode", "cannot decode image: OSError: broken data stream when reading", "truncated"),
        ("decode", "image is 9x9, over the limit of 10 pixels", "too large"),
        ("decode", "cannot decode image: DecompressionBombError: Image size", "too large"),
        ("decode", "cannot decode image: UnidentifiedImageError: cannot identify image file",
         "not an image"),
        ("decode", "the decoder crashed (SIGSEGV); the item was skipped", "decoder crashed"),
        ("decode", "decoding took longer than 2s (--decode-timeout); skipped", "timed out"),
        ("read", "FileNotFoundError: [Errno 2] No such file or directory: 'x'", "not found"),
        ("read", "PermissionError: [Errno 13] Permission denied: 'x'", "permission denied"),
        ("read", "OSError: [Errno 40] Too many levels of symbolic links: 'a'", "symlink loop"),
        ("read", "PermissionError: it is a symlink to a file outside the source folder",
         "outside the source folder"),
        ("read", "IsADirectoryError: [Errno 21] Is a directory", "is a folder"),
        ("preprocess", "ValueError: something new", "other preprocess error"),
        ("fetch", "HTTP 404 Not Found", "HTTP 404 not found"),
        ("fetch", "HTTP 403", "HTTP 403 forbidden"),
        ("fetch", "not fetched by its downloader (failed_to_download: HTTP Error 404: File not "
                  "found)", "HTTP 404 not found"),
        ("fetch", "HTTP 599 odd", "HTTP 599 error"),
        ("fetch", "ClientConnectorError: Cannot connect: Connection refused", "connection refused"),
        ("fetch", "TimeoutError: read timed out", "timed out"),
        ("fetch", "FileNotFoundError: not found (HTTP 404, or no such object)",
         "HTTP 404 not found"),
    ],
)  # fmt: skip
def test_failure_reasons(stage: str, error: str, reason: str) -> None:
    assert reason_of(stage, error) == reason


def test_dataset_rows_follow_the_same_rules(tmp_path: Path) -> None:
    import datasets

    good = encode(scene(), "JPEG", quality=90)
    rows = {
        "good": good,
        "truncated": good[: len(good) // 2],
        "html": b"<html>nope</html>",
        "bomb": png_claiming(100_000, 100_000),
        "empty": b"",
        "ycck": ycck(),
    }
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in rows.values()], "name": list(rows)},
        features=datasets.Features({"image": datasets.Image(), "name": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "c"
    result = run_cli("build", f"hf:{tmp_path / 'ds'}", "--out", out, "--no-pretrained",
                     "--no-progress", "--workers", "2", "--max-failures", "4")  # fmt: skip
    assert result.exit_code == 5, result.output
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    reasons = {e["key"]: reason_of(e["stage"], e["error"]) for e in errors}
    assert reasons == {"train/1": "truncated", "train/2": "not an image", "train/3": "too large",
                       "train/4": "empty file"}  # fmt: skip
    stored = pq.read_table(out / "shards").to_pylist()
    assert sorted((r["key"], r["name"]) for r in stored) == [
        ("train/0", "good"),
        ("train/5", "ycck"),
    ]


def test_a_fifo_or_device_named_like_an_image_fails_alone(corpus: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    good = sorted(corpus.rglob("*.jpg"))[0]
    (src / "good.jpg").write_bytes(good.read_bytes())
    os.mkfifo(src / "pipe.jpg")
    (src / "zero.jpg").symlink_to("/dev/zero")
    out = tmp_path / "c"
    result = run_cli("build", src, "--out", out, *BUILD_FLAGS, "--follow-symlinks",
                     "--max-failures", "2")  # fmt: skip
    assert result.exit_code == 5, result.output  # partial: the two failed, nothing hung
    assert "2 not a regular file" in result.output
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert sorted(e["key"] for e in errors) == ["pipe.jpg", "zero.jpg"]
