"""The ceiling a build's two stages imply on this machine's cores, and the build's real rate.

On the same photos, in one run: `indexer build` in a fresh process (its rate after the first
batch, from its -v log, its seconds by stage, and from /proc the CPU its own process and its
decoding workers spent); then, in this process, the decode + preprocess core-ms per photo of
the build's own decoder (Preprocessor, the model's data config, fast mode, one thread, as a
DataLoader worker runs it) and the model core-ms per photo (process CPU time, all its threads)
of the runtime and precision that build chose (its manifest's), on the decoded uint8 batches.
The ceiling is cores * 1000 / (decode_ms + model_ms): every core busy with useful work only.
Prints the table and rate/ceiling (target >= 0.85), split into the ideal work per photo over
the window's (main process and workers, each against its stage alone) and the cores busy.

1,000 photos make a short window: photos decoded ahead while the model loads flatter it, and
the fixed costs of a run that land in it (a known export's confirmation) weigh on it; --photos
6000 measures closer to the steady state. --extra and --env pass flags and variables to the
builds, to measure what keeps them below the ceiling. Run with `make bench`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import BIN, MODEL, REPO, count, imagenet_corpus

TARGET = 0.85  # rate/ceiling a build should reach
RATE_LINE = re.compile(
    r"after the first batch: (\d+) images in ([\d.]+) s, (\d+) images/s \(([^)]*)\)"
)
STAGE_LINE = re.compile(r"seconds by stage: (.*)")


@dataclass
class Build:
    """One `indexer build` run: its rate after the first batch and how it spent its time."""

    images: int
    seconds: float
    rate: float
    runtime: str
    precision: str
    stages: dict[str, float]
    wall: float  # the whole process, imports and index included
    cpu: float  # user + system seconds of the process and its workers
    others: float  # cores other processes kept busy meanwhile
    main_window: float  # CPU seconds of the build's own process after its first batch
    workers_before: float  # CPU seconds its workers had spent when its first batch was embedded
    workers_total: float  # ... and in all (0: no /proc)
    collection: Path = field(repr=False)


class Others:
    """How many cores other processes kept busy meanwhile (from /proc/stat, less this
    process's own CPU time and its waited-for children's): the other load a timing shared
    the machine with. A build timed beside another job is slower for that reason alone."""

    def __enter__(self) -> Others:
        self.start = (busy_seconds(), own_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        end = (busy_seconds(), own_seconds(), time.perf_counter())
        busy, own, wall = (b - a for a, b in zip(self.start, end, strict=True))
        self.cores = max(0.0, busy - own) / wall if busy > 0 else float("nan")


def busy_seconds() -> float:
    """Seconds all CPUs spent busy since boot (user, nice, system, irq, softirq); 0 without
    /proc."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cpu_name() -> str:
    """'model name (avx512_bf16 yes, amx_bf16 no)' from /proc/cpuinfo."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    has = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx512_bf16", "amx_bf16"))
    return f"{name} ({has})"


def cores() -> int:
    """The cores this process may run on (its affinity), as a build's processes share them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def with_comment(data: bytes, text: str) -> bytes:
    """A JPEG's bytes with a comment segment (COM) after its SOI: other bytes, the same pixels
    and the same decoding work."""
    comment = text.encode()
    return data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]


def corpus(photos: Path, n: int, out: Path) -> list[Path]:
    """n files: the photos, then copies of them that differ in bytes (a unique JPEG comment;
    re-encoded at quality 90 when one is not a JPEG). No two files have equal bytes."""
    from PIL import Image

    sources = sorted(p for p in photos.rglob("*") if p.is_file())
    files, seen = [], set()
    for i in range(n):
        photo = sources[i % len(sources)]
        data, rnd = photo.read_bytes(), i // len(sources)
        if rnd:
            if data[:2] == b"\xff\xd8":
                data = with_comment(data, f"indexer bench copy {rnd} of {photo.name}")
            else:
                path = out / "tmp.jpg"
                Image.open(photo).convert("RGB").save(path, quality=90 - rnd % 10)
                data = path.read_bytes()
                path.unlink()
        folder = out / (f"copies{rnd}" if rnd else "photos")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{photo.stem}.jpg"
        path.write_bytes(data)
        seen.add(hashlib.sha256(data).digest())
        files.append(path)
    if len(seen) != n:
        raise SystemExit(f"{n - len(seen)} of the {n} files have another's bytes")
    return files


def build(photos: Path, out: Path, args: argparse.Namespace) -> Build:
    """`indexer -v build` in a fresh process; its logged rate, stages and chosen runtime, and
    the CPU its processes spent (from /proc) when its first batch was embedded and when it
    logged its rate."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(BIN / "indexer"), "-v", "build", str(photos), "--out", str(out),
           "--no-pretrained", "--seed", "0", "--model", args.model, "--runtime", args.runtime,
           "--precision", args.precision, "--batch-size", str(args.batch_size), "--no-progress",
           *shlex.split(args.extra)]  # fmt: skip
    env = {**os.environ, **dict(kv.split("=", 1) for kv in args.env)}
    before = os.times()
    start = time.perf_counter()
    log, first, rated = [], (0.0, 0.0), (0.0, 0.0)
    with Others() as others:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=env)  # fmt: skip
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            if "first batch embedded" in line:
                first = tree_cpu(proc.pid)
            elif RATE_LINE.search(line):
                rated = tree_cpu(proc.pid)
        proc.wait()
    wall = time.perf_counter() - start
    after = os.times()
    text = "".join(log)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    rate = RATE_LINE.search(text)
    stages = STAGE_LINE.search(text)
    if rate is None or stages is None:
        raise SystemExit(f"no rate or stage line in the build's log:\n{text[-3000:]}")
    runtime = json.loads((out / "manifest.json").read_text())["runtime"]
    return Build(
        images=int(rate[1]),
        seconds=float(rate[2]),
        rate=int(rate[1]) / float(rate[2]),
        runtime=runtime["name"],
        precision=runtime["precision"],
        stages={
            m[1]: float(m[2]) for m in re.finditer(r"([a-zA-Z ]+?) ([\d.]+) s(?:, |$)", stages[1])
        },
        wall=wall,
        cpu=(after.children_user - before.children_user)
        + (after.children_system - before.children_system),
        others=others.cores,
        main_window=rated[0] - first[0],
        workers_before=first[1],
        workers_total=rated[1],
        collection=out,
    )


def tree_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of a process itself (all its threads) and of its child processes, the
    decoding workers (live ones from /proc, exited ones from its waited-for children's time);
    zeros without /proc."""
    tick = os.sysconf("SC_CLK_TCK")

    def times(p: int | str) -> tuple[int, int, int]:
        """(ppid, its own CPU ticks, its waited-for children's)"""
        with open(f"/proc/{p}/stat", encoding="ascii") as f:
            stat = f.read().rsplit(")", 1)[1].split()  # state, ppid, ... utime is the 12th
        return int(stat[1]), int(stat[11]) + int(stat[12]), int(stat[13]) + int(stat[14])

    try:
        _, own, children = times(pid)
    except OSError:
        return 0.0, 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid, cpu, _ = times(entry)
            except OSError:
                continue
            if ppid == pid:
                children += cpu
    return own / tick, children / tick


def decode_ms(files: list[Path], data_config: Any) -> tuple[float, float, np.ndarray]:
    """(decode + preprocess core-ms per photo, read + sha256 core-ms per photo, the pixels):
    each photo prepared by the build's own Preprocessor in fast mode, one at a time on this
    thread, timed with its CPU clock (thread_time) as a worker spends it."""
    from indexer.decode.preprocess import Preprocessor

    prep = Preprocessor(data_config, "fast")
    prep(files[0].read_bytes())  # warm-up: Pillow's plugins imported
    pixels, spent, read = [], 0.0, 0.0
    for path in files:
        start = time.thread_time()
        data = path.read_bytes()
        hashlib.sha256(data).hexdigest()
        mid = time.thread_time()
        pixels.append(prep(data).pixels)
        spent += time.thread_time() - mid
        read += mid - start
    return 1000 * spent / len(files), 1000 * read / len(files), np.stack(pixels)


def runtime_of(collection: Path, name: str, precision: str) -> Any:
    """The runtime the build embedded with, made as a build makes it: the collection's portable
    model on onnxruntime or OpenVINO at its precision, or torch from its recipe."""
    manifest = json.loads((collection / "manifest.json").read_text())
    if name == "torch":
        from indexer.model.timm_model import embedder_from_recipe

        return embedder_from_recipe(manifest["model"], "cpu")
    from indexer.model.portable import load_portable

    return load_portable((collection / "current").resolve(), manifest, name, precision)


def model_ms(runtime: Any, batches: list[np.ndarray], rounds: int) -> tuple[float, float, float]:
    """(process CPU core-ms per photo, wall ms per photo, the threads busy: CPU / wall) of the
    best of `rounds` passes over the batches; the runtime's own threads, whatever they are."""
    import torch

    def embed(batch: np.ndarray) -> Any:
        return runtime.embed_with_labels(torch.from_numpy(batch))

    embed(batches[0])  # warm-up: allocations, kernels chosen, graphs compiled
    best = (float("inf"), float("inf"))
    for _ in range(rounds):
        cpu, wall = time.process_time(), time.perf_counter()
        for batch in batches:
            embed(batch)
        best = min(best, (time.process_time() - cpu, time.perf_counter() - wall))
    n = sum(len(b) for b in batches)
    return 1000 * best[0] / n, 1000 * best[1] / n, best[0] / best[1]


def window_lines(b: Build, args: argparse.Namespace, decode: float, model: float,
                 n_cores: int) -> list[str]:  # fmt: skip
    """Where the build's window (after its first batch) spent its cores, per photo: its own
    process (the model, and whatever else runs there) and its workers (all their decoding over
    all photos, so that photos decoded ahead of the window count too)."""
    if b.workers_total <= 0 or b.images <= 0:
        return []
    main_ms = 1000 * b.main_window / b.images
    workers_ms = 1000 * b.workers_total / args.photos
    busy = (b.main_window + b.workers_total - b.workers_before) / b.seconds
    ahead = args.photos * b.workers_before / b.workers_total - args.batch_size
    return [
        f"{'in its window':>22}: {main_ms + workers_ms:7.2f} core-ms/photo: main process "
        f"{main_ms:.2f} (model alone {model:.2f}), workers {workers_ms:.2f} (decode+read alone "
        f"{decode:.2f}); {busy:.2f} of {n_cores} cores busy; ~{max(0, ahead):.0f} photos "
        "decoded ahead when it opened",
        f"{'work/ideal, busy':>22}: {(decode + model) / (main_ms + workers_ms):7.2f} x "
        f"{busy / n_cores:.2f} (the ideal work per photo over the window's; cores busy)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--photos", type=count, default=1000,
                        help="photos: the sample's, then byte-distinct copies of them")  # fmt: skip
    parser.add_argument("--runtime", default="auto", choices=("auto", "torch", "onnx", "openvino"),
                        help="passed to the build")  # fmt: skip
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="passed to the build")  # fmt: skip
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--batch-size", type=count, default=64)
    parser.add_argument("--builds", type=count, default=3,
                        help="build runs; the best rate after the first batch counts")  # fmt: skip
    parser.add_argument("--rounds", type=count, default=3, help="model passes; the best counts")
    parser.add_argument("--extra", default="", help="more build flags, e.g. '--workers 3'")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable of the builds (repeatable)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench")
    args = parser.parse_args()
    if any("=" not in kv for kv in args.env):
        parser.error("--env takes NAME=VALUE")
    from indexer.config import DataConfig

    with tempfile.TemporaryDirectory(prefix="ceiling-") as tmp:
        folder = Path(tmp)
        files = corpus(imagenet_corpus(args.work), args.photos, folder / "photos")
        # the first build also settles (and caches) the runtime, as a user's first run would
        builds = [build(folder / "photos", folder / f"out{i}", args) for i in range(args.builds)]
        best = max(builds, key=lambda b: b.rate)
        manifest = json.loads((best.collection / "manifest.json").read_text())
        with Others() as decode_others:
            decode, read, pixels = decode_ms(
                files, DataConfig.from_dict(manifest["model"]["data_config"])
            )
        runtime = runtime_of(best.collection, best.runtime, best.precision)
        step = args.batch_size
        batches = [pixels[i : i + step] for i in range(0, len(pixels), step)]
        with Others() as model_others:
            model, model_wall, busy = model_ms(runtime, batches, args.rounds)
    n_cores = cores()
    ceiling = n_cores * 1000 / (decode + model)
    with_read = n_cores * 1000 / (decode + read + model)
    chosen = f"{best.runtime} {best.precision}"
    flags = " ".join([args.extra, *(f"env {kv}" for kv in args.env)]).strip()
    stages = ", ".join(f"{k} {v:.2f}" for k, v in best.stages.items())
    each = ", ".join(f"{b.rate:.0f} ({b.others:.2f})" for b in builds)
    lines = [
        f"# ceiling: {cpu_name()}, {n_cores} cores, {args.model}, {args.photos} photos, "
        f"batch {args.batch_size}" + (f", build flags: {flags}" if flags else ""),
        f"{'decode+preprocess':>22}: {decode:7.2f} core-ms/photo (Preprocessor fast, 1 thread, "
        f"thread CPU time; read+sha256 {read:.2f} more; others {decode_others.cores:.2f} cores)",
        f"{'model ' + chosen:>22}: {model:7.2f} core-ms/photo (process CPU time; wall "
        f"{model_wall:.2f} ms/photo, {busy:.2f} threads busy, {1000 / model_wall:.0f} photos/s; "
        f"others {model_others.cores:.2f} cores)",
        f"{'ceiling':>22}: {ceiling:7.0f} photos/s = {n_cores} x 1000 / ({decode:.2f} + "
        f"{model:.2f}) (with read+sha256: {with_read:.0f})",
        f"{'build, after 1st batch':>22}: {best.rate:7.0f} photos/s ({chosen}; best of "
        f"{len(builds)}, each with the cores others used: {each})",
        f"{'its stages':>22}: {stages} s; whole run {best.wall:.1f} s, "
        f"{best.cpu / best.wall:.2f} cores busy",
        *window_lines(best, args, decode + read, model, n_cores),
        f"{'rate/ceiling':>22}: {best.rate / ceiling:7.2f} (target >= {TARGET}: "
        f"{'met' if best.rate / ceiling >= TARGET else 'missed'})",
    ]
    if any(f"{b.runtime} {b.precision}" != chosen for b in builds):
        lines.append("# note: the builds chose different runtimes: "
                     + ", ".join(f"{b.runtime} {b.precision}" for b in builds))  # fmt: skip
    if max(decode_others.cores, model_others.cores, best.others) > 0.1:
        lines.append("# note: other processes used the cores during a timing: rerun when idle")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
