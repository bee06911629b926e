"""Which runtime and precision embed a collection: chosen once (timed, cached, forced), kept."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from indexer.config import PRECISIONS, RUNTIMES
from indexer.errors import InputError, RecipeMismatchError

log = logging.getLogger(__name__)

NAME_OF = {"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino"}  # --runtime -> name
PORTABLE = ("onnxruntime", "openvino")  # the exported model's CPU runtimes
ORDER = ("onnxruntime", "openvino", "torch")  # preferred among equally fast: fewest imports
BOUND = {"fp32": 0.9999, "bf16": 0.999}  # per-image cosine to torch fp32 a runtime must reach
LABELS_TOLERANCE = {"fp32": 1e-3, "bf16": 2e-2}  # largest difference of a class probability
TIE = 0.05  # rates within 5% of the fastest are a tie: the preferred one wins (stable choices)
CACHE = "runtimes"
MAX_ENTRY_BYTES = 1 << 16
VERSIONED = ("torch", "onnxruntime", "openvino", "timm")  # whose versions a timing depends on


@dataclass(frozen=True, order=True)
class Choice:
    """One way to embed: a runtime (torch, onnxruntime, openvino) at a precision (fp32, bf16)."""

    runtime: str
    precision: str

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.precision}"


@dataclass(frozen=True)
class Machine:
    """What this process can run: a CUDA device, native bf16 on the CPU, the portable runtimes
    installed here."""

    cuda: bool
    native_bf16: bool
    installed: frozenset[str]


@dataclass(frozen=True)
class Decision:
    """The collection's runtime and precision, how they were decided (timed, cached, forced,
    recorded, engine) and why, with the rates timed (images/s by Choice.label)."""

    choice: Choice
    how: str
    why: str
    rates: dict[str, float] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The manifest's `runtime` record (and the run history's)."""
        out: dict[str, Any] = {"name": self.choice.runtime, "precision": self.choice.precision,
                               "how": self.how, "why": self.why}  # fmt: skip
        if self.rates:
            out["images_per_second"] = {k: round(v, 1) for k, v in sorted(self.rates.items())}
        if self.fidelity:
            out["fidelity"] = self.fidelity
        return out


@dataclass(frozen=True)
class RuntimePlan:
    """What a build's first batch settles: the candidates, and whether it times them (auto),
    takes a cached choice among them (cached), or runs the only one (forced, recorded)."""

    candidates: tuple[Choice, ...]
    how: str  # auto, cached, forced, recorded, engine
    why: str
    key: str | None = None  # the decision cache's key (auto and cached)
    others: tuple[Choice, ...] = ()  # cached: what is timed if the cached choice fails

    @property
    def single(self) -> Choice | None:
        return self.candidates[0] if len(self.candidates) == 1 else None


def angle(cosine: float) -> float:
    """The angle of a cosine, rounding's excursions past +-1 clipped."""
    return math.acos(max(-1.0, min(1.0, cosine)))


def joined(a: float, b: float) -> float:
    """The least cosine between two computations, each within cosine a and b of a third
    (torch fp32, say): their angles add (the triangle inequality on the sphere)."""
    return math.cos(angle(a) + angle(b))


def candidates(runtime: str, precision: str, machine: Machine) -> tuple[Choice, ...]:
    """Every (runtime, precision) a first build may embed with, for what was asked; a pair the
    runtime or the CPU cannot do natively is refused in one line."""
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if machine.cuda:
        if runtime in ("onnx", "openvino"):
            raise InputError(
                f"--runtime {runtime} runs on the CPU: use --device cpu, or --runtime auto"
            )
        return (Choice("torch", "bf16" if precision == "auto" else precision),)
    if precision == "bf16" and not machine.native_bf16:
        raise InputError("--precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX): "
                         "use --precision fp32 (or auto)")  # fmt: skip
    if runtime == "onnx" and precision == "bf16":
        raise InputError("--runtime onnx computes in fp32 only: use --precision fp32, or "
                         "--runtime openvino or torch for bf16")  # fmt: skip
    names = ORDER if runtime == "auto" else (NAME_OF[runtime],)
    for name in names:
        if runtime != "auto" and name in PORTABLE and name not in machine.installed:
            raise InputError(f"--runtime {runtime}: the {name} package is not installed: "
                             f"pip install {name}, or use --runtime auto")  # fmt: skip
    precisions = ("fp32", "bf16") if machine.native_bf16 else ("fp32",)
    if precision != "auto":
        precisions = (precision,)
    return tuple(
        Choice(name, p)
        for name in names
        for p in precisions
        if (name == "torch" or name in machine.installed) and supports(name, p)
    )


def supports(runtime: str, precision: str) -> bool:
    """Whether the runtime computes in that precision (onnxruntime's CPU runtime: fp32 only)."""
    return precision == "fp32" or runtime in ("torch", "openvino")


def first_plan(runtime: str, precision: str, machine: Machine, key: str | None) -> RuntimePlan:
    """A first build's (or a --rebuild's) plan: one candidate is forced; several are timed on
    the first batch, unless the cache holds this machine's choice among them."""
    found = candidates(runtime, precision, machine)
    if len(found) == 1:
        asked = " ".join(f"--{k} {v}" for k, v in (("runtime", runtime), ("precision", precision))
                         if v != "auto")  # fmt: skip
        why = f"asked for ({asked})" if asked else "the only one this machine offers"
        if machine.cuda:
            why = "torch embeds on CUDA" + (f", {asked}" if asked else "")
        return RuntimePlan(found, "forced", why)
    cached = lookup(key, found) if key is not None else None
    if cached is not None:
        why = f"timed before on this machine (decision {key})"
        return RuntimePlan((cached,), "cached", why, key, found)
    return RuntimePlan(found, "auto", "", key)


def recorded(manifest: dict[str, Any] | None) -> Choice | None:
    """The collection's runtime and precision (None: no model). Collections built before they
    were recorded: torch at the recipe's precision, or onnxruntime where an fp32 collection
    carries its portable model (what their later runs used). None too for a collection whose
    runs embedded nothing yet (its record is null)."""
    if manifest is None or manifest.get("model") is None:
        return None
    if "runtime" in manifest and manifest["runtime"] is None:
        return None  # nothing embedded yet: the first run that embeds decides
    record = manifest.get("runtime")
    if isinstance(record, dict) and "name" in record and "precision" in record:
        return Choice(str(record["name"]), str(record["precision"]))
    precision = str(manifest["model"].get("precision", "fp32"))
    portable = "portable_model" in manifest and precision == "fp32"
    return Choice("onnxruntime" if portable else "torch", precision)


def check_asked(runtime: str, precision: str, built: Choice, root: Path) -> None:
    """A later run may ask for the collection's runtime and precision, or auto; another one
    is a --rebuild (refused before anything is read, and also when nothing changed)."""
    if precision not in ("auto", built.precision):
        raise RecipeMismatchError(
            f"{root} embeds in {built.precision} (decided at its first build), not {precision}: "
            "drop --precision, or pass --rebuild to embed everything again"
        )
    if runtime != "auto" and NAME_OF.get(runtime) != built.runtime:
        raise RecipeMismatchError(
            f"{root} embeds with {built.runtime} (decided at its first build), not "
            f"{NAME_OF.get(runtime, runtime)}: drop --runtime, or pass --rebuild to embed "
            "everything again"
        )


def later_plan(
    runtime: str, precision: str, machine: Machine, built: Choice, root: Path
) -> RuntimePlan:
    """A later run of a collection embeds as its first build decided; asking for another
    runtime or precision is a --rebuild; a path that must differ (torch on CUDA) says so."""
    check_asked(runtime, precision, built, root)
    why = "the collection's runtime, decided at its first build"
    if machine.cuda:
        if built.runtime != "torch":
            log.warning("embedding with torch on CUDA in %s, not the collection's %s (a CPU "
                        "runtime): vectors stay within the %s bound (cosine >= %s)",
                        built.precision, built.runtime, built.precision,
                        BOUND[built.precision])  # fmt: skip
            why = f"torch on CUDA in place of {built.runtime}, within the {built.precision} bound"
        return RuntimePlan((Choice("torch", built.precision),), "recorded", why)
    if built.precision == "bf16" and not machine.native_bf16:
        raise InputError(
            f"{root} embeds in bf16, which this CPU does not compute natively (no AVX512-BF16 "
            "or AMX): run it where it was built, or pass --rebuild --precision fp32"
        )
    if built.runtime in PORTABLE and built.runtime not in machine.installed:
        raise InputError(
            f"{root} embeds with {built.runtime}, which is not installed here: pip install "
            f"{built.runtime}, or pass --rebuild to choose another runtime"
        )
    return RuntimePlan((built,), "recorded", why)


def pick(rates: dict[Choice, float]) -> Choice:
    """The fastest; rates within TIE of the fastest are a tie, won by fp32 (the closer to the
    reference), then by ORDER (fewer imports for queries and later runs)."""
    best = max(rates.values())
    close = [c for c, r in rates.items() if r >= best * (1 - TIE)]
    return min(close, key=lambda c: (c.precision != "fp32", ORDER.index(c.runtime)))


def this_machine(cuda: bool) -> Machine:
    """This process's machine: CUDA as resolved, native bf16 from the CPU flags, and the
    portable runtimes that are installed (found without importing them)."""
    from importlib.util import find_spec

    installed = frozenset(name for name in PORTABLE if find_spec(name) is not None)
    return Machine(cuda, cpu_has_native_bf16(), installed)


def cpu_flags() -> tuple[str, list[str]]:
    """The CPU's model name and flags, from /proc/cpuinfo (empty where there is none)."""
    name, flags = "", list[str]()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
                if name and flags:
                    break
    except OSError:
        pass
    return name, flags


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 computed natively (INDEXER_NATIVE_BF16=0, false, no or off
    says it is not: a CPU treated as one without, e.g. to build collections it can share)."""
    if os.environ.get("INDEXER_NATIVE_BF16", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    flags = cpu_flags()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def threads() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cache_key(identity: dict[str, Any] | None, runtime: str, precision: str) -> str | None:
    """The decision cache's key: the CPU (model, flags), threads, the model and its weights
    (the request's identity), what was asked, and the runtimes' versions."""
    if identity is None:
        return None
    name, flags = cpu_flags()
    text = json.dumps({
        "cpu": name, "flags": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest(),
        "native_bf16": cpu_has_native_bf16(), "threads": threads(), "model": identity,
        "asked": [runtime, precision], "versions": {p: package_version(p) for p in VERSIONED},
    }, sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def package_version(package: str) -> str | None:
    """An installed package's version (None: not installed), without importing it."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _entry(key: str) -> Path:
    from indexer.cache_dir import cache_dir

    return cache_dir() / CACHE / f"{key}.json"


def lookup(key: str, among: tuple[Choice, ...]) -> Choice | None:
    """The choice this machine timed before for this key, if it is one of `among`. A corrupt,
    foreign or stale entry is ignored (and timed again): it never decides a vector, and the
    choice it names still passes its fidelity check on the build's images."""
    from indexer.safeio import FileRefused, read_bounded

    path = _entry(key)
    try:
        entry = json.loads(read_bounded(path, MAX_ENTRY_BYTES, "a runtime decision"))
        if entry.get("key") != key:
            raise ValueError("it was made for another key")
        choice = Choice(str(entry["runtime"]), str(entry["precision"]))
    except FileNotFoundError:
        return None
    except (OSError, FileRefused, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("the runtime decision %s is not usable (%s); timing again", path, exc)
        return None
    if choice not in among:
        log.warning("the runtime decision %s names %s, not offered here; timing again",
                    path, choice.label)  # fmt: skip
        return None
    return choice


def timed_rate(key: str) -> float | None:
    """Images/s of the choice this machine timed for this key (None: nothing timed, or an
    entry that is not usable): the model alone, without decoding."""
    from indexer.safeio import FileRefused, read_bounded

    try:
        entry = json.loads(read_bounded(_entry(key), MAX_ENTRY_BYTES, "a runtime decision"))
        label = Choice(str(entry["runtime"]), str(entry["precision"])).label
        rate = float(entry["images_per_second"][label])
    except (OSError, FileRefused, ValueError, KeyError, TypeError, AttributeError):
        return None
    return rate if entry.get("key") == key and rate > 0 else None


def remember(key: str | None, decision: Decision) -> None:
    """Keep a timed decision for later first builds on this machine; a cache that cannot be
    written costs only a timing (logged, not raised)."""
    if key is None:
        return
    from indexer.safeio import write_bytes_atomic

    path = _entry(key)
    entry = {"key": key, "runtime": decision.choice.runtime,
             "precision": decision.choice.precision, "images_per_second": decision.rates,
             "measured_at": time.time()}  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, json.dumps(entry, sort_keys=True).encode(), sync=False)
    except OSError as exc:
        log.info("cannot remember the runtime decision in %s: %s", path.parent, exc)
