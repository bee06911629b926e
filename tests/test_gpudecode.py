"""GPU decoding's logic, run here on the CPU (torchvision decodes there too): a failing batch
is split until the bad items are found, order and alignment kept; orientation and geometry
match the CPU path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from indexer.config import DataConfig
from indexer.decode.gpu import Decode, GpuDecoder, decode_split, nvjpeg, orient
from indexer.decode.jpeg_route import route
from indexer.decode.preprocess import Preprocessor
from indexer.synthetic import scene

CFG = DataConfig((3, 160, 160), "bicubic", 0.95, "center", (0.5,) * 3, (0.5,) * 3)


def jpeg(seed: int, size: tuple[int, int] = (240, 180), **save: object) -> bytes:
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


def test_workers_pass_routed_jpegs_on_undecoded(tmp_path: object) -> None:
    from pathlib import Path

    from indexer.config import SourceSpec
    from indexer.decode.item_dataset import ItemDataset
    from indexer.decode.loader import collate
    from indexer.sources import list_items, open_sources

    root = Path(str(tmp_path)) / "src"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg(1))
    scene(2, (90, 90)).save(root / "b.png")
    scene(3, (90, 90)).convert("CMYK").save(root / "c.jpg")
    (root / "d.jpg").write_bytes(jpeg(4, progressive=True))
    sources = open_sources((SourceSpec(str(root)),))
    items = list_items(sources)
    dataset = ItemDataset(items, sources, Preprocessor(CFG, "fast"), gpu_pixels=10**8)
    batch = collate([dataset[i] for i in range(len(items))])
    assert sorted(items[r.position].key for r in batch.raw) == ["a.jpg", "d.jpg"]
    assert sorted(items[p].key for p in batch.positions) == ["b.png", "c.jpg"]  # the CPU's
    assert batch.pixels is not None and batch.pixels.shape[0] == 2
    for r in batch.raw:  # each item's bytes, whole, in its slice of the batch's one blob
        assert batch.raw_bytes(r).numpy().tobytes() == (root / items[r.position].key).read_bytes()


def test_raw_bytes_cross_from_workers_whole(tmp_path: object) -> None:
    """Through a real DataLoader with worker processes (the blob in shared memory)."""
    from pathlib import Path

    from indexer.config import LoaderConfig, SourceSpec
    from indexer.decode.loader import iter_batches
    from indexer.sources import list_items, open_sources

    root = Path(str(tmp_path)) / "src"
    root.mkdir()
    for n in range(10):
        (root / f"{n}.jpg").write_bytes(jpeg(n, progressive=n % 2 == 1))
    sources = open_sources((SourceSpec(str(root)),))
    items = list_items(sources)
    cfg = LoaderConfig(workers=2, batch_size=4, progress=False)
    seen, kept_pace = {}, set()
    for batch in iter_batches(items, sources, Preprocessor(CFG, "fast"), cfg, gpu_decode=True):
        assert not batch.errors and batch.spent.shared == len(batch.positions)
        kept_pace |= {items[p].key for p in batch.positions}  # the workers' share, decoded
        for r in batch.raw:
            seen[items[r.position].key] = batch.raw_bytes(r).numpy().tobytes()
    assert seen and not set(seen) & kept_pace
    assert seen == {p.name: p.read_bytes() for p in root.iterdir() if p.name not in kept_pace}


def test_a_batch_of_raw_and_decoded_items_keeps_every_item_once() -> None:
    from indexer.build.gpu_decoding import RawDecoding
    from indexer.config import BuildConfig, LoaderConfig
    from indexer.decode.batch import Batch, RawItem
    from indexer.decode.loader import pack_raw

    datas = [jpeg(s) for s in range(6)]
    datas[2] = datas[2][: len(datas[2]) // 2]  # header whole, body cut: both decoders fail
    raw = [RawItem(10 + n, 0, 0, route(d, 10**8), f"h{n}", {"n": n}) for n, d in enumerate(datas)]
    raw, blob = pack_raw(raw, datas)  # as collate packs them: one blob, a slice each
    assert [blob[r.start : r.end].numpy().tobytes() for r in raw] == datas
    cpu_pixels = torch.from_numpy(np.stack([Preprocessor(CFG, "fast")(jpeg(99)).pixels]))
    batch = Batch(positions=[1], pixels=cpu_pixels, widths=[200], heights=[150],
                  hashes=["h"], metadata=[{}], raw=raw, raw_blob=blob)  # fmt: skip

    def decode(blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        if any(b.numel() in {len(datas[4]), len(datas[2])} for b in blobs):
            raise RuntimeError("nvJPEG failed")
        return nvjpeg("cpu")(blobs)

    decoding = RawDecoding(BuildConfig((), Path("x"), loader=LoaderConfig(decode="cpu")))
    decoding.decoder = GpuDecoder(CFG, "cpu", decode)
    decoding.cpu = Preprocessor(CFG, "fast")
    decoding.decode(batch, runtime=None)  # type: ignore[arg-type]
    assert sorted(batch.positions) == [1, 10, 11, 13, 14, 15]  # 12 failed both ways
    assert [p for p, _, _ in batch.errors] == [12]
    assert batch.pixels is not None and batch.pixels.shape == (6, 160, 160, 3)
    assert len(batch.hashes) == len(batch.widths) == len(batch.metadata) == 6
    assert (decoding.gpu, decoding.fallback) == (4, 2)  # 14 decoded on the CPU after all
    assert batch.raw == [] and batch.raw_blob is None
    for position, row in zip(batch.positions, batch.pixels, strict=True):
        if position >= 10:
            want = Preprocessor(CFG, "exact")(datas[position - 10]).pixels.astype(float)
            assert np.abs(row.numpy().astype(float) - want).mean() < 3.0  # aligned


def test_decode_gpu_needs_cuda(corpus: object, tmp_path: Path) -> None:
    """Refused before anything is written, and also on a collection with nothing to do: a
    scheduled job asking for the GPU where there is none fails every run, not only the
    runs with new files."""
    from tests.helpers import BUILD_FLAGS, run_cli

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine decodes on the GPU")
    out = tmp_path / "c"
    result = run_cli("build", corpus, "--out", out, *BUILD_FLAGS, "--decode", "gpu")
    assert result.exit_code == 2 and "--decode gpu needs a CUDA GPU" in result.output
    assert not out.exists()
    assert run_cli("build", corpus, "--out", out, *BUILD_FLAGS).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = run_cli("build", corpus, "--out", out, *BUILD_FLAGS, "--decode", "gpu")
    assert again.exit_code == 2 and "--decode gpu needs a CUDA GPU" in again.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    exact = run_cli("build", corpus, "--out", tmp_path / "e", *BUILD_FLAGS, "--decode", "gpu",
                    "--exact-preprocessing")  # fmt: skip
    assert exact.exit_code == 2 and EXACT in exact.output and not (tmp_path / "e").exists()


def test_batched_resize_is_chunked_without_changing_a_pixel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import indexer.decode.gpu as gd

    images = [torch.from_numpy(np.array(scene(s, size))).permute(2, 0, 1)
              for s, size in enumerate([(200, 150), (150, 260), (640, 480), (90, 90)])]  # fmt: skip
    whole = gd.resize_crop_batch(images, CFG)
    monkeypatch.setattr(gd, "CHUNK_BYTES", 3 * 260 * 200 * 4)  # one or two images a chunk
    assert torch.equal(gd.resize_crop_batch(images, CFG), whole)
    for image, got in zip(images, whole, strict=True):
        diff = got.float() - gd.resize_crop(image, CFG).float()
        assert diff.abs().mean() < 2.0  # the per-image resize, within sampling differences


def test_batches_decoded_ahead_arrive_in_order_and_errors_surface() -> None:
    from indexer.build.gpu_decoding import RawDecoding, decoded_ahead
    from indexer.config import BuildConfig, LoaderConfig
    from indexer.decode.batch import Batch

    decoding = RawDecoding(BuildConfig((), Path("x"), loader=LoaderConfig()))
    batches = [Batch(positions=[n]) for n in range(7)]
    got = [b.positions[0] for b in decoded_ahead(iter(batches), decoding, None)]  # type: ignore[arg-type]
    assert got == list(range(7))

    def failing() -> object:
        yield Batch(positions=[0])
        raise OSError("the loader broke")

    with pytest.raises(OSError, match="loader broke"):
        list(decoded_ahead(failing(), decoding, None))  # type: ignore[arg-type]


def test_two_decode_threads_keep_order_rows_and_stop_with_the_consumer() -> None:
    import threading
    import time

    from indexer.build.gpu_decoding import RawDecoding, decoded_ahead
    from indexer.config import BuildConfig, LoaderConfig
    from indexer.decode.batch import Batch, RawItem
    from indexer.decode.loader import pack_raw

    def batches() -> object:
        for b in range(6):
            datas = [jpeg(10 * b + n) for n in range(3)]
            raw = [RawItem(10 * b + n, 0, 0, route(d, 10**8), f"h{b}{n}", {}) for n, d in
                   enumerate(datas)]  # fmt: skip
            raw, blob = pack_raw(raw, datas)
            yield Batch(raw=raw, raw_blob=blob)

    decoding = RawDecoding(BuildConfig((), Path("x"), loader=LoaderConfig()))
    decoding.decoder = GpuDecoder(CFG, "cpu", nvjpeg("cpu"))
    decoding.cpu = Preprocessor(CFG, "fast")
    import sys

    before = sys.getswitchinterval()
    intervals = []
    got = []
    for batch in decoded_ahead(batches(), decoding, None):  # type: ignore[arg-type]
        intervals.append(sys.getswitchinterval())
        got.append(batch)
    assert set(intervals) == {min(before, 0.0005)} and sys.getswitchinterval() == before
    assert [b.positions for b in got] == [[10 * b + n for n in range(3)] for b in range(6)]
    for b, batch in enumerate(got):
        assert batch.pixels is not None and batch.pixels.shape == (3, 160, 160, 3)
        want = GpuDecoder(CFG, "cpu")([(jpeg(10 * b + 2), route(jpeg(10 * b + 2), 10**8))])
        assert torch.equal(batch.pixels[2], want[0])  # each row its own image
    assert {"GPU decode", "GPU resize", "waiting for workers"} <= set(decoding.stages.seconds)

    stream = decoded_ahead(batches(), decoding, None)  # type: ignore[arg-type]
    next(stream)
    stream.close()  # the consumer stops early: both threads end
    assert sys.getswitchinterval() == before
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
        t.name in ("gpu-decode", "gpu-resize") for t in threading.enumerate()
    ):
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t.name in ("gpu-decode", "gpu-resize")]


@pytest.mark.parametrize("crop_pct", [0.95, 1.0])
def test_an_image_resizes_the_same_whatever_shares_its_batch(crop_pct: float) -> None:
    import indexer.decode.gpu as gd

    cfg = DataConfig((3, 160, 160), "bicubic", crop_pct, "center", (0.5,) * 3, (0.5,) * 3)
    sizes = [(200, 150), (90, 90), (200, 150), (640, 480), (90, 90), (150, 260), (200, 150)]
    images = [torch.from_numpy(np.array(scene(s, size))).permute(2, 0, 1)
              for s, size in enumerate(sizes)]  # fmt: skip
    whole = gd.resize_crop_batch(images, cfg)  # runs of a size copied at once, order kept
    for image, got in zip(images, whole, strict=True):
        # alone, nothing is padded: the edge a sample reads past is the image's own (padding
        # zeros would darken the edge by tens of levels; float rounding may move one by 1)
        alone = gd.resize_crop_batch([image], cfg)[0]
        diff = (got.int() - alone.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


def test_raw_views_are_each_items_bytes_packed_or_not() -> None:
    from dataclasses import replace

    from indexer.decode.batch import Batch, RawItem
    from indexer.decode.loader import pack_raw

    datas = [jpeg(s) for s in range(5)]
    raw, blob = pack_raw([RawItem(n, 0, 0, route(d, 10**8), "h", {}) for n, d in
                          enumerate(datas)], datas)  # fmt: skip
    packed = Batch(raw=raw, raw_blob=blob)
    assert [v.numpy().tobytes() for v in packed.raw_views()] == datas
    shuffled = Batch(raw=[raw[3], raw[0], raw[4]], raw_blob=blob)  # not end to end
    assert [v.numpy().tobytes() for v in shuffled.raw_views()] == [datas[3], datas[0], datas[4]]
    gap = Batch(raw=[replace(raw[0], end=raw[0].end - 1), raw[1]], raw_blob=blob[: raw[1].end])
    assert [v.numpy().tobytes() for v in gap.raw_views()] == [datas[0][:-1], datas[1]]


def test_ray_actors_decode_the_rows_the_tasks_routed(tmp_path: object) -> None:
    """The Ray engine's split, in one process: tasks read and route, the actor decodes (here
    torchvision on the CPU stands in for nvJPEG), the CPU path where that fails."""
    from indexer.build.ray_engine import FAILED, OK, RAW, EmbedActor, decode_rows, to_batch
    from indexer.config import LoaderConfig, ModelConfig, SourceSpec
    from indexer.decode.item_dataset import ItemDataset
    from indexer.model.timm_model import load_embedder
    from indexer.sources import list_items, open_sources

    root = Path(str(tmp_path)) / "src"
    root.mkdir()
    for n in range(5):
        (root / f"{n}.jpg").write_bytes(jpeg(n, (200 + 20 * n, 180)))
    (root / "cut.jpg").write_bytes(jpeg(9)[:5000])  # header whole, body cut: fails both ways
    scene(7, (90, 90)).save(root / "p.png")
    scene(8, (90, 90)).convert("CMYK").save(root / "k.jpg")
    sources = open_sources((SourceSpec(str(root)),))
    items = list_items(sources)
    model = ModelConfig(pretrained=False, device="cpu", precision="fp32")
    driver = load_embedder(model)
    prep = Preprocessor(driver.data_config, "fast")
    dataset = ItemDataset(items, sources, prep, gpu_pixels=prep.max_pixels)
    rows = decode_rows({"position": np.arange(len(items))}, dataset)
    keys = [items[p].key for p in rows["position"]]
    routed = {k for k, s in zip(keys, rows["status"], strict=True) if s == RAW}
    assert routed == {f"{n}.jpg" for n in range(5)} | {"cut.jpg"}
    actor = EmbedActor(model, driver.recipe["state_sha256"], LoaderConfig(), gpu_decode=True)
    out = actor(rows)
    assert "raw" not in out and "pixels" not in out
    status = dict(zip(keys, out["status"].tolist(), strict=True))
    assert status == {**{k: OK for k in keys}, "cut.jpg": FAILED}
    batch = to_batch(out)
    assert [items[p].key for p, _, _ in batch.errors] == ["cut.jpg"]
    assert len(batch.positions) == len(items) - 1 and batch.vectors is not None
    want = driver.embed(np.stack([prep((root / items[p].key).read_bytes()).pixels
                                  for p in batch.positions]))  # fmt: skip
    cosine = np.sum(want * batch.vectors, axis=1)  # normalized vectors
    assert cosine.min() > 0.99 and cosine.mean() > 0.999
    sizes = {items[p].key: (w, h) for p, w, h in zip(batch.positions, batch.widths, batch.heights,
                                                     strict=True)}  # fmt: skip
    assert sizes["3.jpg"] == (260, 180) and sizes["p.png"] == (90, 90)


def test_grey_and_colour_images_of_one_size_and_odd_outputs() -> None:
    import indexer.decode.gpu as gd

    colour = torch.from_numpy(np.array(scene(1, (200, 150)))).permute(2, 0, 1)
    grey = colour[:1].clone()
    out = gd.resize_crop_batch([colour, grey, colour], CFG)  # one size, two shapes
    assert torch.equal(out[1], gd.resize_crop_batch([grey.expand(3, -1, -1)], CFG)[0])
    assert torch.equal(out[0], gd.resize_crop_batch([colour], CFG)[0])

    def odd(blobs: list[torch.Tensor]) -> list[torch.Tensor]:  # flat, empty, 4-channel
        return [torch.zeros(10, dtype=torch.uint8), torch.zeros((3, 0, 5), dtype=torch.uint8),
                torch.zeros((4, 8, 8), dtype=torch.uint8), colour][: len(blobs)]  # fmt: skip

    items = [(jpeg(n), route(jpeg(n), 10**8)) for n in range(4)]
    assert [x is None for x in GpuDecoder(CFG, "cpu", odd).decode(items)] == [True] * 3 + [False]
    empty = GpuDecoder(CFG, "cpu").decode([(b"", items[0][1]), items[1]])
    assert empty[0] is None and empty[1] is not None  # an empty item fails alone


def test_the_switch_interval_comes_back_whichever_run_ends_first() -> None:
    import sys

    from indexer.build.gpu_decoding import RawDecoding, decoded_ahead
    from indexer.config import BuildConfig, LoaderConfig
    from indexer.decode.batch import Batch

    before = sys.getswitchinterval()
    for first_ends in ("a", "b"):
        decoding = RawDecoding(BuildConfig((), Path("x"), loader=LoaderConfig()))
        runs = {name: decoded_ahead(iter([Batch(positions=[n]) for n in range(3)]), decoding,
                                    None) for name in "ab"}  # type: ignore[arg-type]  # fmt: skip
        next(runs["a"])
        next(runs["b"])
        runs[first_ends].close()
        runs["b" if first_ends == "a" else "a"].close()
        assert sys.getswitchinterval() == before


def test_a_consumer_that_raises_leaves_no_decode_thread_running() -> None:
    import threading

    from indexer.build.gpu_decoding import RawDecoding, decoded_ahead
    from indexer.build.threads import closing_iterator
    from indexer.config import BuildConfig, LoaderConfig
    from indexer.decode.batch import Batch

    decoding = RawDecoding(BuildConfig((), Path("x"), loader=LoaderConfig()))
    stream = decoded_ahead(iter([Batch(positions=[n]) for n in range(50)]), decoding, None)  # type: ignore[arg-type]
    with pytest.raises(OSError, match="disk full"), closing_iterator(stream):
        for _ in stream:
            raise OSError("disk full")  # the writer failed; the traceback keeps `stream`
    assert not [t.name for t in threading.enumerate() if t.name in ("gpu-decode", "gpu-resize")]


def mixed_folder(root: Path) -> set[str]:
    """Every kind of file a GPU build meets, the names of those that cannot be decoded."""
    root.mkdir()
    for n in range(14):  # baseline JPEGs of several sizes, across batches
        (root / f"base{n:02d}.jpg").write_bytes(jpeg(n, (200 + 10 * n, 170 + 5 * (n % 3))))
    for n in range(3):
        (root / f"prog{n}.jpg").write_bytes(jpeg(20 + n, (210, 180), progressive=True))
    scene(30, (180, 180)).convert("L").save(root / "grey.jpg", quality=95)
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        (root / f"exif{orientation}.jpg").write_bytes(jpeg(40 + orientation, (240, 180), exif=exif))
    plain = jpeg(45, (240, 180))  # turned by its XMP alone, which Pillow reads: the CPU's
    xmp = b'http://ns.adobe.com/xap/1.0/\x00<rdf:Description tiff:Orientation="6"/>'
    segment = b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp
    (root / "xmp6.jpg").write_bytes(plain[:2] + segment + plain[2:])
    (root / "small.jpg").write_bytes(jpeg(46, (120, 90)))  # the resize enlarges it: the CPU's
    scene(50, (120, 100)).save(root / "scene.png")
    scene(51, (120, 100)).convert("CMYK").save(root / "cmyk.jpg")
    whole = jpeg(60, (240, 180))
    (root / "cut.jpg").write_bytes(whole[:4000])  # header whole, body cut: routed, fails both ways
    (root / "noise.jpg").write_bytes(bytes(range(256)) * 8)  # not a JPEG at all
    return {"cut.jpg", "noise.jpg"}


@pytest.mark.slow
@pytest.mark.parametrize("threads", [False, True], ids=["inline", "two-threads"])
def test_a_whole_build_on_the_gpu_path_matches_the_cpu_build(
    threads: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """`indexer build` through the CLI with the GPU path forced on (torchvision decodes on the
    CPU here, as nvJPEG would on CUDA): real workers routing and sharing, decoding inline or
    (as on CUDA) on both decode threads, the share balanced from measured times; every item
    once, the same failures, the same vectors as the CPU path's build, and the GPU side's
    count reported."""
    import logging
    import re

    import indexer.build.model_start
    import indexer.model.timm_model
    from tests.helpers import pretend_cuda, read_embeddings_by_key, run_cli

    started: list[str] = []
    if threads:  # embed_items decodes ahead, on two threads, for a model on CUDA
        started = pretend_cuda(monkeypatch)

    src = tmp_path / "src"
    bad = mixed_folder(src)
    flags = ("--no-pretrained", "--no-progress", "--workers", "2", "--batch-size", "8",
             "--runtime", "torch", "--device", "cpu", "--max-failures", "0.2")  # fmt: skip
    cpu = run_cli("build", src, "--out", tmp_path / "cpu", *flags, "--decode", "cpu")
    gpu_when_asked = lambda cfg: cfg.loader.decode != "cpu"  # noqa: E731
    monkeypatch.setattr(indexer.build.model_start, "gpu_decoding", gpu_when_asked)
    with caplog.at_level(logging.INFO, logger="indexer.build.gpu_decoding"):
        gpu = run_cli("build", src, "--out", tmp_path / "gpu", *flags, "--decode", "auto")
    for result in (cpu, gpu):
        assert result.exit_code == 5, result.output  # some items failed, the rest published
        assert "2 failed" in result.output
    said = next(r.getMessage() for r in caplog.records if "decoded on the GPU" in r.getMessage())
    counts = re.search(r"GPU: (\d+) images; fell back to the CPU: (\d+); decoded by the "
                       r"workers to keep pace: (\d+)", said)  # fmt: skip
    assert counts is not None, said
    on_gpu, fell, shared = map(int, counts.groups())
    routed = 14 + 3 + 1 + 3 + 1  # baseline, progressive, grey, EXIF, cut
    assert on_gpu + shared == routed - 1 and fell == 1 and on_gpu > 0  # cut fell back, failed
    a, b = read_embeddings_by_key(tmp_path / "cpu"), read_embeddings_by_key(tmp_path / "gpu")
    names = {p.name for p in src.iterdir()}
    assert set(a) == set(b) == names - bad
    keys = sorted(a)
    x, y = np.stack([a[k] for k in keys]), np.stack([b[k] for k in keys])
    cosine = np.sum(x * y, axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    assert cosine.min() > 0.99 and cosine.mean() > 0.999, dict(zip(keys, cosine, strict=True))
    assert (np.argmax(x @ y.T, axis=1) == np.arange(len(keys))).all()
    import pyarrow.parquet as pq

    for out in ("cpu", "gpu"):
        table = pq.read_table(tmp_path / out / "shards")
        assert len(set(table.column("key").to_pylist())) == table.num_rows == len(keys)
    sizes = [pq.read_table(tmp_path / out / "shards", columns=["key", "width", "height"])
             .sort_by("key").to_pylist() for out in ("cpu", "gpu")]  # fmt: skip
    assert sizes[0] == sizes[1]
    failed = [pq.read_table(tmp_path / out / "errors.parquet").sort_by("key").to_pylist()
              for out in ("cpu", "gpu")]  # fmt: skip
    assert {row["key"] for row in failed[0]} == bad
    assert [{k: v for k, v in row.items() if k != "id"} for row in failed[0]] == [
        {k: v for k, v in row.items() if k != "id"} for row in failed[1]]  # fmt: skip
    if threads:
        assert len(started) == 2, started  # the decode and the resize thread


def test_the_nvjpeg_check_passes_a_working_decoder_and_says_why_another_fails() -> None:
    from indexer.decode.gpu import unusable

    def not_built(blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        raise RuntimeError("torchvision not compiled with nvJPEG support\nstack trace ...")

    def grey(blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.full((3, 48, 64), 128, dtype=torch.uint8) for _ in blobs]

    def swapped(blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [image.flip(0) for image in nvjpeg("cpu")(blobs)]  # BGR

    assert unusable("cpu") is None  # torchvision's decoder, as on CUDA
    assert unusable("cpu", not_built) == (
        "RuntimeError: torchvision not compiled with nvJPEG support"
    )
    assert unusable("cpu", grey) == "its pixels differ from Pillow's on a test image"
    assert unusable("cpu", swapped) == "its pixels differ from Pillow's on a test image"
    assert unusable("cpu", lambda blobs: blobs[:1]) == (
        "the decoder returned other images than it was given"
    )
    assert unusable("cpu", lambda blobs: [b[:, :40] for b in grey(blobs)]) == (
        "a test image decoded to 64x40, not 64x48"
    )

    class Unprintable(RuntimeError):
        def __str__(self) -> str:
            raise ValueError("no message")

    def raising(exc: Exception) -> Decode:
        def decode(blobs: list[torch.Tensor]) -> list[torch.Tensor]:
            raise exc

        return decode

    odd: list[Decode] = [  # a one-line reason for each, never an exception
        lambda blobs: [b.numpy() for b in grey(blobs)],  # type: ignore[misc]
        lambda blobs: [b.float().requires_grad_() for b in grey(blobs)],
        lambda blobs: [torch.full((3, 48, 64), float("nan")) for _ in blobs],
        lambda blobs: [torch.empty((3, 48, 64), dtype=torch.uint8, device="meta") for _ in blobs],
        raising(Unprintable()),
        raising(RuntimeError("")),
    ]
    reasons = [unusable("cpu", decode) for decode in odd]
    assert reasons[:3] == ["the decoder returned other images than it was given"] * 3
    assert reasons[3] is not None and reasons[3].startswith("NotImplementedError")
    assert reasons[4:] == ["Unprintable", "RuntimeError"]


EXACT = (
    "--decode gpu resizes on the GPU, not with timm's transform pixel for pixel: drop "
    "--exact-preprocessing, or use --decode cpu"
)


FASTER = {"gpu": 9706.0, "cpu": 3142.0}  # measured on this machine: nvJPEG 3.09x
SLOWER = {"gpu": 2105.0, "cpu": 3142.0}  # nvJPEG 0.67x (issue 27's H100, photos)


@pytest.mark.parametrize(
    ("asked", "cuda", "exact", "problem", "measured", "want"),
    [
        ("cpu", True, False, None, FASTER, False),
        ("cpu", False, False, None, None, False),
        ("auto", False, False, None, FASTER, False),
        ("auto", True, False, None, FASTER, True),  # measured faster here, nvJPEG checked
        ("auto", True, False, None, None, False),  # nothing measured: the CPU, and says so
        ("auto", True, False, None, SLOWER, False),  # measured slower: the CPU
        ("auto", True, True, None, FASTER, False),  # timm's transform pixel for pixel: the CPU's
        ("auto", True, False, "RuntimeError: no nvJPEG", FASTER, False),  # warned, the CPU
        ("gpu", True, False, None, SLOWER, True),  # asked for: measurements do not overrule it
        ("gpu", True, True, None, None, EXACT),
        ("gpu", False, False, None, None,
         "--decode gpu needs a CUDA GPU: use --decode cpu (or auto)"),
        ("gpu", True, False, "RuntimeError: no nvJPEG", None,
         "--decode gpu: nvJPEG does not work here (RuntimeError: no nvJPEG): use --decode cpu"),
    ],
)  # fmt: skip
def test_where_jpegs_are_decoded(
    asked: str, cuda: bool, exact: bool, problem: str | None, measured: dict[str, float] | None,
    want: object, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    import logging

    from indexer.build.decode_choice import choose_gpu_decoding
    from indexer.errors import InputError

    checked: list[bool] = []

    def check() -> str | None:
        checked.append(True)
        return problem

    if isinstance(want, str):
        with pytest.raises(InputError) as raised:
            choose_gpu_decoding(asked, cuda, exact, check, measured=measured)
        assert str(raised.value) == want
        return
    with caplog.at_level(logging.INFO, logger="indexer.build.decode_choice"):
        assert choose_gpu_decoding(asked, cuda, exact, check, measured=measured) is want
    counts = cuda and not exact and (asked == "gpu" or (asked == "auto" and measured == FASTER))
    assert checked == ([True] if counts else [])  # checked only when it counts
    said = [r for r in caplog.records if r.getMessage().startswith("decoding JPEGs on the")]
    if asked != "auto" or not cuda or exact:
        assert said == []  # nothing to explain: asked for, or no choice
        return
    assert len(said) == 1  # auto on CUDA says where, and why, in one line
    line, level = said[0].getMessage(), said[0].levelno
    if problem:
        assert line == f"decoding JPEGs on the CPU: nvJPEG does not work here ({problem})"
        assert level == logging.WARNING
    elif measured is None:
        assert line.startswith("decoding JPEGs on the CPU: no measurement of nvJPEG against the "
                               "CPU on this machine yet (neither path measured): run one build "
                               "with --decode gpu and one with --decode cpu")  # fmt: skip
        assert level == logging.WARNING
    else:
        assert line.startswith(f"decoding JPEGs on the {'GPU' if want else 'CPU'}: nvJPEG "
                               f"measured {measured['gpu']:.0f} images/s here")  # fmt: skip
        assert level == logging.INFO


def test_a_ray_actor_whose_nvjpeg_fails_decodes_on_the_cpu_or_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import indexer.decode.gpu
    from indexer.build.ray_engine import EmbedActor
    from indexer.config import LoaderConfig, ModelConfig
    from indexer.errors import InputError
    from indexer.model.timm_model import load_embedder

    model = ModelConfig(pretrained=False, device="cpu", precision="fp32")
    sha = load_embedder(model).recipe["state_sha256"]
    assert EmbedActor(model, sha, LoaderConfig(), gpu_decode=True).decoder is not None
    monkeypatch.setattr(indexer.decode.gpu, "unusable", lambda device: "RuntimeError: no nvJPEG")
    actor = EmbedActor(model, sha, LoaderConfig(decode="auto"), gpu_decode=True)
    assert actor.decoder is None  # its RAW rows go to the CPU path
    with pytest.raises(InputError, match=r"--decode gpu: nvJPEG does not work here"):
        EmbedActor(model, sha, LoaderConfig(decode="gpu"), gpu_decode=True)


@pytest.mark.parametrize("crop_pct", [0.95, 1.0])
def test_resizing_by_shape_groups_is_each_image_resized_alone(
    crop_pct: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """resize_crop_groups: each row is exactly resize_crop of its image alone (grey ones made
    RGB), in the order given, however the runs are chunked; and within half a level of the CPU
    path on average, where the roi_align batch is further off."""
    import indexer.decode.gpu as gd

    cfg = DataConfig((3, 160, 160), "bicubic", crop_pct, "center", (0.5,) * 3, (0.5,) * 3)
    sizes = [(200, 150), (90, 90), (200, 150), (640, 480), (3, 3), (150, 260), (200, 150)]
    datas = [jpeg(s, size) if min(size) > 20 else _tiny_jpeg(size) for s, size in enumerate(sizes)]
    datas.insert(2, _grey_jpeg((200, 150)))
    images = nvjpeg("cpu")([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas])
    whole = gd.resize_crop_groups(images, cfg)
    assert whole.shape == (len(images), 160, 160, 3) and whole.dtype == torch.uint8
    for image, got in zip(images, whole, strict=True):
        assert torch.equal(got, gd.resize_crop(image, cfg).expand(160, 160, 3))
    monkeypatch.setattr(gd, "CHUNK_BYTES", 3 * 200 * 150 * 4)  # one image of a run a chunk
    assert torch.equal(gd.resize_crop_groups(images, cfg), whole)
    cpu = Preprocessor(cfg, "exact")
    roi = gd.resize_crop_batch(images, cfg)
    for data, got, other in zip(datas, whole, roi, strict=True):
        want = cpu(data).pixels.astype(np.float64)
        off = np.abs(got.numpy().astype(np.float64) - want).mean()
        assert off < 0.5 and off <= np.abs(other.numpy().astype(np.float64) - want).mean()


def _tiny_jpeg(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    scene(3, (400, 300)).resize(size, Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _grey_jpeg(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    scene(4, size).convert("L").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_the_decoder_resizes_as_resize_says(monkeypatch: pytest.MonkeyPatch) -> None:
    import indexer.decode.gpu as gd

    datas = [jpeg(s, (200 + 10 * s, 150)) for s in range(3)]
    pairs = [(data, route(data, 10**8)) for data in datas]
    decoder = GpuDecoder(CFG, "cpu", nvjpeg("cpu"))
    images = decoder.decode(pairs)
    for mode, resize in (("roi", gd.resize_crop_batch), ("groups", gd.resize_crop_groups)):
        monkeypatch.setattr(gd, "RESIZE", mode)
        pixels, good = decoder.prepare(images, [r for _, r in pairs])
        assert good == [0, 1, 2] and pixels is not None
        assert torch.equal(pixels, resize([i for i in images if i is not None], CFG))
