"""Fast start: `indexer --help`, and `indexer query` of one image (the portable model, and
torch) against the bare cost of importing torch and timm and creating the model; best of
several fresh processes, ratios."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (
    BIN,
    MODEL,
    REPO,
    imagenet_corpus,
    indexer_cmd,
    prepared,
    run_timed,
)

BARE = f"import torch, timm; timm.create_model({MODEL!r}, pretrained=False)"


def best(cmd: list[str], rounds: int) -> float:
    return min(run_timed(cmd).seconds for _ in range(rounds))


FIRST = re.compile(r"first batch embedded \((\S+)\) ([\d.]+) s after the process started")
AFTER = re.compile(r"after the first batch: (\d+) images in ([\d.]+) s, (\d+) images/s \((\S+)\)")


def build_startup(cmd: list[str]) -> tuple[float, str, str]:
    """(seconds from process start to the first batch embedded, its runtime, the rate after)."""
    done = subprocess.run([cmd[0], "-v", *cmd[1:]], capture_output=True, text=True, check=True)
    first = FIRST.search(done.stderr)
    after = AFTER.search(done.stderr)
    if first is None:
        raise SystemExit(f"no first-batch line in:\n{done.stderr[-2000:]}")
    rate = f"{after.group(3)} images/s after it ({after.group(4)})" if after else "one batch"
    return float(first.group(2)), first.group(1), rate


def build_startups(images: Path, work: Path, ck: Path) -> list[str]:
    """A first build of the photos, and an incremental run after 64 new ones."""
    src = work / "startup-src"
    shutil.rmtree(src, ignore_errors=True)
    files = sorted(p for p in images.rglob("*") if p.is_file())
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    for i, path in enumerate(files):
        shutil.copy(path, src / ("b" if i < 64 else "a") / path.name)
    shutil.move(src / "b", work / "startup-new")
    out = work / "out" / "startup-build"
    lines = []
    first, runtime, rate = build_startup(indexer_cmd(src, out, ck))
    lines.append(f"{'first build, to first batch':>34}: {first:6.3f} s ({runtime}; {rate})")
    shutil.move(work / "startup-new", src / "b")
    cmd = indexer_cmd(src, work / "out" / "unused", ck)
    cmd[cmd.index("--out") + 1] = str(out)
    first, runtime, rate = build_startup(cmd)
    floor = best([sys.executable, "-c", "import torch"], 3)
    met = "met" if first <= 2.2 else "NOT met"
    lines.append(f"{'64 new files, to first batch':>34}: {first:6.3f} s ({runtime}; {rate}; "
                 f"target <= 2.2 s: {met})")  # fmt: skip
    lines.append(f"{'the floor: python -c import torch':>34}: {floor:6.3f} s (the start-up above "
                 f"is {first - floor:+.3f} s beyond it)")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ck = prepared(args.work)
    images = imagenet_corpus(args.work)
    out = args.work / "out" / "startup"
    if not (out / "manifest.json").exists() or "portable_model" not in (
        json.loads((out / "manifest.json").read_text())
    ):
        run_timed(indexer_cmd(images, out, ck))
    image = sorted(p for p in images.rglob("*") if p.is_file())[0]
    indexer = str(BIN / "indexer")
    python_only = best([sys.executable, "-c", "pass"], args.rounds)
    help_s = best([indexer, "--help"], args.rounds)
    bare = best([sys.executable, "-c", BARE], args.rounds)
    argv = [indexer, "query", str(image), "--index", str(out), "-k", "10"]
    query = best(argv, args.rounds)
    query_torch = best([*argv, "--runtime", "torch"], args.rounds)
    print(f"# fast start (best of {args.rounds} fresh processes)")
    print(f"{'python -c pass':>34}: {python_only:6.3f} s")
    print(
        f"{'indexer --help':>34}: {help_s:6.3f} s  (target < 0.3 s: "
        f"{'met' if help_s < 0.3 else 'NOT met'})"
    )
    print(f"{'import torch+timm, create model':>34}: {bare:6.3f} s")
    print(
        f"{'indexer query, one image':>34}: {query:6.3f} s = {query / bare:.2f}x the bare cost "
        f"(portable model; target <= 0.25x: {'met' if query <= 0.25 * bare else 'NOT met'})"
    )
    for line in build_startups(images, args.work, ck):
        print(line)
    print(
        f"{'indexer query --runtime torch':>34}: {query_torch:6.3f} s = "
        f"{query_torch / bare:.2f}x the bare cost (target <= 1.3x: "
        f"{'met' if query_torch <= 1.3 * bare else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
