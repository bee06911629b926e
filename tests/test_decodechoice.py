"""Where --decode auto decodes JPEGs, from a table with stand-in timings (no GPU, any CPU): nvJPEG
only where this machine measured it faster than the CPU path; the measurements' cache is read
safely (corrupt, foreign and linked entries ignored), and builds keep their rates."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from indexer.build import decode_choice as decodechoice
from indexer.build.decode_choice import MARGIN, MIN_IMAGES, choose_decoder, measured, record_rate
from indexer.errors import InputError

NO_NVJPEG = "RuntimeError: no nvJPEG"
EXACT = decodechoice.EXACT
NO_CUDA = "--decode gpu needs a CUDA GPU: use --decode cpu (or auto)"
BROKEN = f"--decode gpu: nvJPEG does not work here ({NO_NVJPEG}): use --decode cpu"
NOTHING = ("no measurement of nvJPEG against the CPU on this machine yet (neither path measured): "
           "run one build with --decode gpu and one with --decode cpu")  # fmt: skip
CPU_PATH = 3142.0  # images/s: stand-ins, this machine's speed plays no part
FASTER = {"gpu": 9706.0, "cpu": CPU_PATH}  # 3.09x
SLOWER = {"gpu": CPU_PATH * 0.67, "cpu": CPU_PATH}  # issue 27's H100 on photos
EQUAL = {"gpu": CPU_PATH, "cpu": CPU_PATH}
WITHIN = {"gpu": CPU_PATH * (1 + MARGIN / 2), "cpu": CPU_PATH}  # within run-to-run noise


@pytest.mark.parametrize(
    ("asked", "cuda", "exact", "problem", "rates", "want", "checked", "why"),
    [
        ("cpu", True, False, None, FASTER, False, False, "--decode cpu"),
        ("gpu", True, False, None, SLOWER, True, True, "nvJPEG passes its check"),
        ("gpu", True, True, None, FASTER, EXACT, False, ""),
        ("gpu", False, False, None, FASTER, NO_CUDA, False, ""),
        ("gpu", True, False, NO_NVJPEG, FASTER, BROKEN, True, ""),
        ("auto", False, False, None, FASTER, False, False, "no CUDA device"),
        ("auto", True, True, None, FASTER, False, False, "exact preprocessing (timm's"),
        ("auto", True, False, None, {}, False, False, NOTHING),
        ("auto", True, False, None, {"cpu": CPU_PATH}, False, False,
         "no measurement of nvJPEG against the CPU on this machine yet (only the CPU path "
         "measured, 3142 images/s): run one build with --decode gpu"),
        ("auto", True, False, None, {"gpu": 9706.0}, False, False,
         "no measurement of nvJPEG against the CPU on this machine yet (only nvJPEG "
         "measured, 9706 images/s)"),
        ("auto", True, False, None, FASTER, True, True,
         "nvJPEG measured 9706 images/s here, the CPU path 3142 (3.09x)"),
        ("auto", True, False, None, SLOWER, False, False,
         "nvJPEG measured 2105 images/s here, the CPU path 3142 (0.67x; auto needs over 1.05x)"),
        ("auto", True, False, None, EQUAL, False, False, "nvJPEG measured 3142 images/s here"),
        ("auto", True, False, None, WITHIN, False, False, "nvJPEG measured 3221 images/s here"),
        ("auto", True, False, NO_NVJPEG, FASTER, False, True,
         f"nvJPEG does not work here ({NO_NVJPEG})"),
        ("auto", True, False, None, {"gpu": float("nan"), "cpu": CPU_PATH}, False, False,
         "no measurement"),
        ("fast", True, False, None, FASTER, "unknown --decode 'fast': use auto, cpu or gpu",
         False, ""),
    ],
    ids=["cpu", "gpu-ok", "gpu-exact", "gpu-no-cuda", "gpu-nvjpeg-fails", "auto-no-cuda",
         "auto-exact", "auto-unmeasured", "auto-cpu-only", "auto-gpu-only", "auto-gpu-faster",
         "auto-gpu-slower", "auto-equal", "auto-within-margin", "auto-nvjpeg-fails",
         "auto-nan", "unknown"],
)  # fmt: skip
def test_where_auto_decodes(
    asked: str, cuda: bool, exact: bool, problem: str | None, rates: dict[str, float],
    want: bool | str, checked: bool, why: str,
) -> None:  # fmt: skip
    """The selector alone: asked, CUDA, exact preprocessing, nvJPEG's check and the measured
    rates in; where, and why, out. The check runs only where it decides something."""
    calls: list[bool] = []

    def check() -> str | None:
        calls.append(True)
        return problem

    if isinstance(want, str):
        with pytest.raises(InputError) as raised:
            choose_decoder(asked, cuda, exact, check, rates)
        assert str(raised.value) == want
    else:
        where = choose_decoder(asked, cuda, exact, check, rates)
        assert where.gpu is want
        assert where.why.startswith(why), where.why
        assert "\n" not in where.why  # one line in the log
        # a warning where something is to be done: measure, or nvJPEG fails its check
        assert where.warn is (asked == "auto" and (why.startswith("no measurement") or
                                                   problem is not None))  # fmt: skip
    assert calls == ([True] if checked else [])


def test_the_rule_never_picks_the_slower_path() -> None:
    """Whatever the two rates, auto decodes on the GPU only where nvJPEG was measured faster
    (by more than MARGIN), and on the CPU wherever the GPU path was measured slower."""
    for gpu in (1.0, 500.0, 3000.0, 3142.0, 3299.0, 3300.0, 9706.0, 1e6):
        where = choose_decoder("auto", True, False, lambda: None, {"gpu": gpu, "cpu": CPU_PATH})
        assert where.gpu is (gpu > CPU_PATH * (1 + MARGIN)), gpu
        assert not where.warn


KEY = decodechoice.machine_key("NVIDIA H100 80GB HBM3", (3, 224, 224), 14, 256)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("INDEXER_CACHE_DIR", str(folder))
    return folder


def test_rates_round_trip_and_the_latest_is_kept(cache: Path) -> None:
    assert measured(KEY) == {}  # nothing yet: no warning, nothing written
    assert not (cache / "decode").exists()
    assert record_rate(KEY, "cpu", 3142.04, MIN_IMAGES)
    assert record_rate(KEY, "gpu", 2105.0, 59_744)
    assert measured(KEY) == {"cpu": 3142.0, "gpu": 2105.0}
    assert record_rate(KEY, "gpu", 9706.0, 59_744)  # the latest replaces the one before
    assert measured(KEY) == {"cpu": 3142.0, "gpu": 9706.0}
    path = decodechoice.entry_path(KEY)
    assert path.parent == cache / "decode"
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    entry = json.loads(path.read_text())
    assert entry["key"] == KEY and entry["rates"]["gpu"]["images"] == 59_744
    same = decodechoice.machine_key("NVIDIA H100 80GB HBM3", [3, 224, 224], 14, 256)
    assert measured(same) == measured(KEY)  # a list or a tuple: the same key
    for other in (
        decodechoice.machine_key("NVIDIA H200", (3, 224, 224), 14, 256),
        decodechoice.machine_key("NVIDIA H100 80GB HBM3", (3, 384, 384), 14, 256),
        decodechoice.machine_key("NVIDIA H100 80GB HBM3", (3, 224, 224), 2, 256),
        decodechoice.machine_key("NVIDIA H100 80GB HBM3", (3, 224, 224), 14, 64),
        {**KEY, "cpu": "another CPU"},
        {**KEY, "cores": KEY["cores"] + 1},
    ):
        assert measured(other) == {}
    assert KEY["cores"] >= 1 and KEY["versions"].keys() == {"torch", "torchvision"}


def test_too_short_or_odd_rates_are_not_kept(cache: Path) -> None:
    assert not record_rate(KEY, "gpu", 9706.0, MIN_IMAGES - 1)  # start-up, not a rate
    for odd in (0.0, -5.0, float("nan"), float("inf")):
        assert not record_rate(KEY, "cpu", odd, 10_000)
    assert measured(KEY) == {} and not (cache / "decode").exists()
    with pytest.raises(ValueError, match="gpu or cpu"):
        record_rate(KEY, "nvjpeg", 100.0, 10_000)


def _entry(key: dict[str, Any], **rates: Any) -> bytes:
    body = {p: {"images_per_second": r, "images": 5000, "measured_at": 0.0}
            for p, r in rates.items()}  # fmt: skip
    return json.dumps({"format": 1, "key": key, "rates": body}).encode()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "Expecting property name"),
        (b"\x80\x81 garbage", "can't decode"),
        (b"[1, 2]", "not a decode measurement of this version"),
        (json.dumps({"format": 99}).encode(), "not a decode measurement of this version"),
        (_entry(KEY, gpu=-1.0, cpu=3142.0), "not a positive number"),
        (_entry(KEY, gpu=True), "not a positive number"),
        (_entry(KEY, gpu="fast"), "not a positive number"),
        (_entry(KEY, gpu=9706.0, fpga=1e9), "not by path"),
        (b'{"format": 1, "key": ' + json.dumps(KEY).encode() + b', "rates": []}', "not by path"),
        (b'{"format": 1, "key": ' + json.dumps(KEY).encode() + b', "rates": {"gpu": NaN}}',
         "not a positive number"),
        (_entry({**KEY, "gpus": "another GPU"}, gpu=9706.0, cpu=3142.0), "another machine"),
        (b" " * (decodechoice.MAX_ENTRY_BYTES + 1), "over the limit"),
        (b"[" * 16_000, "recursion"),
    ],
    ids=["json", "bytes", "list", "format", "negative", "bool", "text", "extra-path",
         "rates-list", "nan", "foreign", "too-large", "deep"],
)  # fmt: skip
def test_a_corrupt_or_foreign_entry_is_ignored_with_a_warning(
    cache: Path, content: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = decodechoice.entry_path(KEY)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="indexer.build.decode_choice"):
        assert measured(KEY) == {}
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and warned[0].startswith(f"the decode measurement {path} is not usable")
    assert reason in warned[0], warned[0]
    assert record_rate(KEY, "cpu", 3142.0, MIN_IMAGES)  # a new measurement replaces it
    assert measured(KEY) == {"cpu": 3142.0}


def test_a_linked_entry_is_ignored_and_replaced_never_written_through(
    cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A symlink at the entry's name (even to a well-formed entry of the same key) is not
    read; a new measurement replaces the link, and the file it pointed to is unchanged."""
    target = tmp_path / "planted.json"
    target.write_bytes(_entry(KEY, gpu=1e9, cpu=1.0))  # would turn nvJPEG on
    path = decodechoice.entry_path(KEY)
    path.parent.mkdir(parents=True)
    path.symlink_to(target)
    with caplog.at_level(logging.WARNING, logger="indexer.build.decode_choice"):
        assert measured(KEY) == {}
    assert any("a symbolic link" in r.getMessage() for r in caplog.records)
    before = target.read_bytes()
    assert record_rate(KEY, "gpu", 2105.0, 5000)
    assert not path.is_symlink() and measured(KEY) == {"gpu": 2105.0}
    assert target.read_bytes() == before


def test_a_fifo_or_folder_at_the_entry_never_blocks_or_raises(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = decodechoice.entry_path(KEY)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    with caplog.at_level(logging.WARNING, logger="indexer.build.decode_choice"):
        assert measured(KEY) == {}  # refused without being opened for a writer
    path.unlink()
    path.mkdir()
    with caplog.at_level(logging.WARNING, logger="indexer.build.decode_choice"):
        assert measured(KEY) == {}
        assert not record_rate(KEY, "cpu", 3142.0, 5000)  # cannot replace a folder: logged
    messages = [r.getMessage() for r in caplog.records]
    assert sum("not a regular file" in m for m in messages) == 3, messages  # read 2x, then 1x
    assert any(m.startswith("cannot keep the decode measurement") for m in messages)


def test_an_unwritable_cache_costs_only_the_measurement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("INDEXER_CACHE_DIR", str(blocker / "cache"))  # under a file
    with caplog.at_level(logging.WARNING, logger="indexer.build.decode_choice"):
        assert not record_rate(KEY, "gpu", 9706.0, 5000)
        assert measured(KEY) == {}
    assert any("cannot keep the decode measurement" in r.getMessage() for r in caplog.records)


def test_the_module_imports_no_torch() -> None:
    code = "import sys, indexer.build.decode_choice; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


STAND_IN = "Stand-in GPU 80GB"


@pytest.fixture
def stand_in_cuda(cache: Path, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """This process as if on CUDA: the device named STAND_IN, nvJPEG passing its check (each
    check recorded), the model's data config remembered from an earlier run."""
    import indexer.decode.gpu
    import indexer.model.timm_model
    from indexer.config import DataConfig, ModelConfig
    from indexer.model import data_config_cache as configcache

    checks: list[bool] = []

    def unusable(device: object) -> None:
        checks.append(True)

    monkeypatch.setattr(
        indexer.model.timm_model, "resolve_device", lambda name: SimpleNamespace(type="cuda")
    )
    monkeypatch.setattr(decodechoice, "cuda_names", lambda device: STAND_IN)
    monkeypatch.setattr(indexer.decode.gpu, "unusable", unusable)
    data = DataConfig((3, 224, 224), "bicubic", 0.875, "center", (0.5,) * 3, (0.5,) * 3)
    configcache.store(ModelConfig().name, data)
    return checks


@pytest.mark.parametrize(
    ("rates", "decode", "exact", "want"),
    [
        ({}, "auto", False, False),
        ({"cpu": CPU_PATH}, "auto", False, False),
        (FASTER, "auto", False, True),
        (SLOWER, "auto", False, False),
        (FASTER, "auto", True, False),
        (FASTER, "cpu", False, False),
        (SLOWER, "gpu", False, True),
    ],
)
def test_a_build_on_cuda_decodes_where_its_machine_measured(
    stand_in_cuda: list[bool], rates: dict[str, float], decode: str, exact: bool, want: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """embed.gpu_decoding looks the rates up under the key a build records them under (the
    device, the remembered input size, the loader's workers and batch size), through
    record_run as embed_items calls it."""
    from indexer.build.gpu_decoding import gpu_decoding
    from indexer.config import BuildConfig, LoaderConfig

    loader = LoaderConfig(workers=14, batch_size=256, decode=decode,
                          preprocessing="exact" if exact else "fast")  # fmt: skip
    for path, rate in rates.items():
        assert decodechoice.record_run("cuda:0", (3, 224, 224), loader, path, rate, 5000)
    cfg = BuildConfig((), Path("out"), loader=loader)
    with caplog.at_level(logging.INFO, logger="indexer.build.decode_choice"):
        assert gpu_decoding(cfg) is want
    assert stand_in_cuda == ([True] if want else [])  # nvJPEG checked where it decides
    said = [r.getMessage() for r in caplog.records if "decoding JPEGs on the" in r.getMessage()]
    assert len(said) == (1 if decode == "auto" and not exact else 0), said
    other = BuildConfig((), Path("out"), loader=LoaderConfig(workers=2, batch_size=256))
    assert gpu_decoding(other) is False  # other workers: not what was measured


def test_a_build_without_a_remembered_input_size_decodes_on_the_cpu(
    stand_in_cuda: list[bool], cache: Path
) -> None:
    from indexer.build.gpu_decoding import gpu_decoding
    from indexer.config import BuildConfig, LoaderConfig

    loader = LoaderConfig(workers=14, batch_size=256)
    for path, rate in FASTER.items():
        assert decodechoice.record_run("cuda:0", (3, 224, 224), loader, path, rate, 5000)
    assert gpu_decoding(BuildConfig((), Path("out"), loader=loader)) is True
    (cache / "data-configs.json").unlink()  # the model's input size not known before it loads
    assert gpu_decoding(BuildConfig((), Path("out"), loader=loader)) is False
    assert stand_in_cuda == [True]


def test_the_ray_engine_decodes_in_its_cpu_tasks_unless_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing measures nvJPEG on the Ray actors against the CPU tasks: auto never routes
    JPEGs to them; --decode gpu does."""
    pytest.importorskip("ray")
    import ray

    import indexer.build.ray_engine as rayengine
    from indexer.config import BuildConfig, EngineConfig, LoaderConfig

    monkeypatch.setattr(rayengine, "start_ray", lambda address: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 4.0})
    engine = EngineConfig("ray", None, 2)

    def plan(decode: str, preprocessing: str = "fast") -> rayengine.RayPlan:
        loader = LoaderConfig(decode=decode, preprocessing=preprocessing)
        return rayengine.ray_plan(BuildConfig((), Path("out"), loader=loader, engine=engine))

    assert plan("auto") == rayengine.RayPlan(1, False)
    assert plan("cpu") == rayengine.RayPlan(1, False)
    assert plan("gpu") == rayengine.RayPlan(1, True)
    assert plan("auto", "exact") == rayengine.RayPlan(1, False)
    with pytest.raises(InputError, match="drop --exact-preprocessing"):
        plan("gpu", "exact")


@pytest.mark.slow
def test_builds_on_cuda_keep_the_rate_of_the_path_that_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two builds as on CUDA (the model on the CPU, flagged on_cuda; torchvision decodes as
    nvJPEG would): --decode cpu keeps the CPU path's rate, a GPU-path build nvJPEG's, under
    the key gpu_decoding looks up; a CPU-path build starts no decode threads."""
    import indexer.build.model_start
    import indexer.model.timm_model
    from indexer.config import ModelConfig
    from indexer.model import data_config_cache as configcache
    from indexer.synthetic import write_corpus
    from tests.helpers import pretend_cuda, run_cli

    monkeypatch.setenv("INDEXER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(decodechoice, "MIN_IMAGES", 8)
    monkeypatch.setattr(decodechoice, "cuda_names", lambda device: STAND_IN)
    threads = pretend_cuda(monkeypatch)
    src = tmp_path / "src"
    write_corpus(src, 40, duplicates=0, seed=5)
    flags = ("--no-pretrained", "--no-progress", "--workers", "2", "--batch-size", "4",
             "--runtime", "torch", "--device", "cpu")  # fmt: skip
    monkeypatch.setattr(indexer.build.model_start, "gpu_decoding", lambda cfg: False)
    cpu = run_cli("build", src, "--out", tmp_path / "a", *flags, "--decode", "auto")
    assert cpu.exit_code == 0, cpu.output
    assert threads == []  # the CPU path, as with --decode cpu: no decode threads
    hint = configcache.lookup(ModelConfig().name)
    assert hint is not None
    key = decodechoice.machine_key(STAND_IN, hint.input_size, 2, 4)
    assert measured(key).keys() == {"cpu"}
    monkeypatch.setattr(indexer.build.model_start, "gpu_decoding", lambda cfg: True)
    gpu = run_cli("build", src, "--out", tmp_path / "b", *flags, "--decode", "auto")
    assert gpu.exit_code == 0, gpu.output
    assert threads == ["gpu-decode", "gpu-resize"]
    rates = measured(key)
    assert rates.keys() == {"cpu", "gpu"} and min(rates.values()) > 0
