"""Where --decode auto decodes JPEGs: nvJPEG only where measured faster than the CPU path here."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from indexer.cache_dir import cache_dir
from indexer.config import LoaderConfig
from indexer.errors import InputError
from indexer.model.runtime_choice import cpu_flags, package_version, threads
from indexer.safeio import read_bounded, write_bytes_atomic

log = logging.getLogger(__name__)

PATHS = ("gpu", "cpu")  # the GPU path (nvJPEG, the workers taking a share) and the CPU path
MARGIN = 0.05  # auto needs nvJPEG over 5% faster: closer rates are within run-to-run noise
MIN_IMAGES = 1000  # fewer images after the first batch measure start-up, not a path's rate
FOLDER = "decode"
MAX_ENTRY_BYTES = 1 << 14
FORMAT = 1
VERSIONED = ("torch", "torchvision")  # nvJPEG, the resize and the model are theirs
EXACT = (
    "--decode gpu resizes on the GPU, not with timm's transform pixel for pixel: drop "
    "--exact-preprocessing, or use --decode cpu"
)


class Where(NamedTuple):
    """Whether the GPU decodes JPEGs, why, and whether the reason asks for attention (a
    warning: nvJPEG failing its check, or nothing measured yet) rather than a settled rule."""

    gpu: bool
    why: str
    warn: bool = False


def choose_decoder(
    asked: str,
    cuda: bool,
    exact: bool,
    problem: Callable[[], str | None],
    measured: Mapping[str, float],
    needs: str = "a CUDA GPU",
) -> Where:
    """--decode cpu: the CPU. gpu: nvJPEG, refused with exact preprocessing (timm's transform
    pixel for pixel, which the GPU's resize is not), without CUDA (`needs`), or failing its
    check (problem() is a reason). auto: the CPU, unless on CUDA without exact preprocessing
    `measured` (images/s after the first batch, by path, on this machine) has nvJPEG over
    MARGIN faster than the CPU path and nvJPEG passes its check. The check runs only where
    it decides something."""
    if asked == "cpu":
        return Where(False, "--decode cpu")
    if asked == "gpu":
        if exact:
            raise InputError(EXACT)
        if not cuda:
            raise InputError(f"--decode gpu needs {needs}: use --decode cpu (or auto)")
        return check_nvjpeg(asked, problem)
    if asked != "auto":
        raise InputError(f"unknown --decode {asked!r}: use auto, cpu or gpu")
    if exact:
        return Where(False, "exact preprocessing (timm's transform pixel for pixel, which "
                     "the GPU's resize is not)")  # fmt: skip
    if not cuda:
        return Where(False, "no CUDA device")
    gpu, cpu = _rate(measured.get("gpu")), _rate(measured.get("cpu"))
    if gpu is None or cpu is None:
        have = ("neither path measured" if gpu is None and cpu is None else
                f"only the CPU path measured, {cpu:.0f} images/s" if gpu is None else
                f"only nvJPEG measured, {gpu:.0f} images/s")  # fmt: skip
        return Where(False, f"no measurement of nvJPEG against the CPU on this machine yet "
                     f"({have}): run one build with --decode gpu and one with --decode cpu "
                     f"(at least {MIN_IMAGES} images each, the same --workers and --batch-size); "
                     "auto then keeps the faster", warn=True)  # fmt: skip
    against = f"nvJPEG measured {gpu:.0f} images/s here, the CPU path {cpu:.0f} ({gpu / cpu:.2f}x"
    if gpu <= cpu * (1 + MARGIN):
        return Where(False, f"{against}; auto needs over {1 + MARGIN:.2f}x)")
    checked = check_nvjpeg(asked, problem)
    return checked if not checked.gpu else Where(True, f"{against})")


def check_nvjpeg(asked: str, problem: Callable[[], str | None]) -> Where:
    """nvJPEG where it passes its check (it decodes test JPEGs as Pillow does); failing it,
    --decode gpu is refused and auto decodes on the CPU (a warning)."""
    why = problem()
    if why is None:
        return Where(True, "nvJPEG passes its check")
    if asked == "gpu":
        raise InputError(f"--decode gpu: nvJPEG does not work here ({why}): use --decode cpu")
    return Where(False, f"nvJPEG does not work here ({why})", warn=True)


def _rate(value: object) -> float | None:
    """A usable rate: a finite number of images/s above zero (anything else: unmeasured)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def machine_key(gpus: str, input_size: Sequence[int], workers: int,
                batch_size: int) -> dict[str, Any]:  # fmt: skip
    """What a measured rate holds for: the GPU(s) (names as given), the CPU (its model, the
    cores this process may use and the machine's count), the model's input size, the
    loader's workers and batch size (the CPU path's rate scales with the workers, the GPU
    path's with the batch), and torch's and torchvision's versions."""
    return {
        "gpus": gpus,
        "cpu": cpu_flags()[0] or platform.machine(),
        "cores": threads(),
        "cpu_count": os.cpu_count() or 0,
        "input_size": [int(n) for n in input_size],
        "workers": int(workers),
        "batch_size": int(batch_size),
        "versions": {name: package_version(name) for name in VERSIONED},
    }


def cuda_names(device: Any) -> str | None:
    """The name of the CUDA device that decodes and embeds (torch imported here only); None
    where it cannot be named."""
    try:
        import torch

        return str(torch.cuda.get_device_name(device))
    except Exception as exc:  # no CUDA after all: nothing is measured or looked up
        log.info("cannot name the CUDA device %s: %s", device, exc)
        return None


def run_key(device: Any, input_size: Sequence[int], loader: LoaderConfig) -> dict[str, Any] | None:
    """A build's key: machine_key for its CUDA device and loader (None: the device unnamed)."""
    name = cuda_names(device)
    if name is None:
        return None
    return machine_key(name, input_size, loader.workers, loader.batch_size)


def record_run(device: Any, input_size: Sequence[int], loader: LoaderConfig, path: str,
               images_per_second: float, images: int) -> bool:  # fmt: skip
    """A CUDA build's rate after its first batch, kept for the path that decoded (record_rate)."""
    if _kept_rate(path, images_per_second, images) is None:  # not worth naming the device
        return False
    key = run_key(device, input_size, loader)
    return key is not None and record_rate(key, path, images_per_second, images)


def _canonical(key: Any) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)


def entry_path(key: Mapping[str, Any]) -> Path:
    """The cache file of this key's rates: DIR/decode/<hash of the key>.json."""
    digest = hashlib.sha256(_canonical(key).encode()).hexdigest()[:32]
    return cache_dir() / FOLDER / f"{digest}.json"


def measured(key: Mapping[str, Any]) -> dict[str, float]:
    """This key's latest rates (images/s by path) that were measured; {} when none. A corrupt,
    foreign (another key's), linked or unreadable entry is ignored with a warning."""
    found = _read(key, entry_path(key))
    return {path: float(rate["images_per_second"]) for path, rate in found.items()}


def _read(key: Mapping[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise ValueError("a symbolic link")
        entry = json.loads(read_bounded(path, MAX_ENTRY_BYTES, "a decode measurement"))
        if not isinstance(entry, dict) or entry.get("format") != FORMAT:
            raise ValueError("not a decode measurement of this version")
        if _canonical(entry.get("key")) != _canonical(key):
            raise ValueError("it was measured on another machine or with other settings")
        rates = entry.get("rates")
        if not isinstance(rates, dict) or not set(rates) <= set(PATHS):
            raise ValueError("its rates are not by path (gpu, cpu)")
        for rate in rates.values():
            if not isinstance(rate, dict) or _rate(rate.get("images_per_second")) is None:
                raise ValueError("a rate that is not a positive number of images/s")
        return rates
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, RecursionError) as exc:  # FileRefused: an OSError
        log.warning("the decode measurement %s is not usable (%s); ignored", path, exc)
        return {}


def record_rate(key: Mapping[str, Any], path: str, images_per_second: float, images: int) -> bool:
    """Keep this run's rate for its path (the latest replaces the one before: a best-ever
    rate would only ever rise, so one lucky run, or a machine since slowed by an upgrade or
    a busier node, would decide for good). A run of fewer than MIN_IMAGES after its first
    batch measures its start-up and is not kept. A cache that cannot be written costs only
    the measurement (logged, never raised). True when kept."""
    rate = _kept_rate(path, images_per_second, images)
    if rate is None:
        return False
    where = entry_path(key)
    rates = _read(key, where)
    rates[path] = {"images_per_second": round(rate, 1), "images": int(images),
                   "measured_at": round(time.time(), 3)}  # fmt: skip
    entry = {"format": FORMAT, "key": json.loads(_canonical(key)), "rates": rates}
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(where, json.dumps(entry, indent=1, sort_keys=True).encode(), sync=False)
    except OSError as exc:
        log.warning("cannot keep the decode measurement in %s: %s", where, exc)
        return False
    log.info("kept the %s path's rate on this machine: %.0f images/s (%s)", path, rate, where)
    return True


def _kept_rate(path: str, images_per_second: float, images: int) -> float | None:
    """The rate, if it is one to keep for this path (None, logged: too few images after the
    first batch, or not a positive number)."""
    if path not in PATHS:
        raise ValueError(f"a decode path is gpu or cpu, not {path!r}")
    rate = _rate(images_per_second)
    if rate is None or images < MIN_IMAGES:
        log.info("not keeping the %s path's rate: %d images after the first batch (%d needed)",
                 path, images, MIN_IMAGES)  # fmt: skip
        return None
    return rate


def choose_gpu_decoding(
    asked: str,
    cuda: bool,
    exact: bool,
    problem: Callable[[], str | None],
    needs: str = "a CUDA GPU",
    measured: Mapping[str, float] | None = None,
) -> bool:
    """decodechoice.choose_decoder: --decode gpu where nvJPEG passes its check (refused without
    CUDA, with exact preprocessing or failing the check); auto on the GPU only where this
    machine measured nvJPEG faster than the CPU path (`measured`, images/s by path). auto on
    CUDA logs why (a warning when nvJPEG fails its check or nothing is measured yet)."""
    from indexer.build.decode_choice import choose_decoder

    where = choose_decoder(asked, cuda, exact, problem, measured or {}, needs)
    if asked == "auto" and cuda and not exact:
        log.log(logging.WARNING if where.warn else logging.INFO, "decoding JPEGs on the %s: %s",
                "GPU" if where.gpu else "CPU", where.why)  # fmt: skip
    return where.gpu
