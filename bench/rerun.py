"""Scheduled re-runs: a full build of 10k small JPEGs, then a re-run with nothing changed, one
after 20 files were only touched (same bytes), and one after 1% of the files changed, each as a
fresh `indexer build` process; times and ratios, and the runtime each run recorded."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import REPO, indexer_cmd, run_timed, small_corpus, write_checkpoint


def change_files(images: Path, fraction: float, seed: int) -> int:
    """Rewrite a fraction of the files with new pixels; the number changed."""
    files = sorted(p for p in images.rglob("*.jpg"))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(files), size=max(1, int(len(files) * fraction)), replace=False)
    for i in chosen:
        arr = rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)
        Image.fromarray(arr).save(files[i], quality=85)
    return len(chosen)


def touch_files(images: Path, count: int) -> int:
    """Give files a new mtime, bytes unchanged."""
    files = sorted(p for p in images.rglob("*.jpg"))[:count]
    for path in files:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    return len(files)


def last_runtime(out: Path) -> str:
    runs = (out / "runs.jsonl").read_text().splitlines()
    return str(json.loads(runs[-1]).get("runtime") or "none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench")
    parser.add_argument("--files", type=int, default=10_000)
    args = parser.parse_args()
    ck = args.work / "seed0.safetensors"
    args.work.mkdir(parents=True, exist_ok=True)
    write_checkpoint(ck)
    source = small_corpus(args.work, args.files)
    images = args.work / f"rerun-{args.files}"  # a copy: the 1% change must not touch the cache
    shutil.rmtree(images, ignore_errors=True)
    shutil.copytree(source, images)
    out = args.work / "out" / "rerun"
    full = run_timed(indexer_cmd(images, out, ck)).seconds
    cmd = [*indexer_cmd(images, args.work / "out" / "unused", ck)]
    cmd[cmd.index("--out") + 1] = str(out)  # same collection, not cleared
    full_runtime = last_runtime(out)
    manifest = json.loads((out / "manifest.json").read_text())
    export_s = (manifest.get("portable_model") or {}).get("export_seconds")
    noop = run_timed(cmd).seconds
    touched = touch_files(images, 20)
    touch = run_timed(cmd).seconds
    touch_runtime = last_runtime(out)
    changed = change_files(images, 0.01, seed=1)
    one_percent = run_timed(cmd).seconds
    print(f"# re-runs over {args.files} small JPEGs (each a fresh process, imports included)")
    print(f"{'full build':>22}: {full:7.2f} s ({full_runtime})")
    if export_s is not None:
        print(f"{'of which the export':>22}: {export_s:7.2f} s = {export_s / full:6.1%} of full")
    else:
        print(f"{'portable model':>22}: none ({manifest.get('portable_model_reason')})")
    print(f"{'nothing changed':>22}: {noop:7.2f} s = {noop / full:6.1%} of full (target <= 3%)")
    print(
        f"{f'{touched} files touched':>22}: {touch:7.2f} s = {touch / full:6.1%} of full "
        f"(target <= 3%; {touch_runtime})"
    )
    print(
        f"{f'{changed} files changed':>22}: {one_percent:7.2f} s = "
        f"{one_percent / full:6.1%} of full (target <= 10%; {last_runtime(out)})"
    )


if __name__ == "__main__":
    main()
