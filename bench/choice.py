"""--runtime auto against every explicit runtime and precision this CPU offers: a 1,000-photo
first build each, in fresh processes, on the same photos and weights; auto timed (no decision
cached yet) and auto cached. Prints seconds, images/s, auto over the fastest explicit choice
(target: within 10%), each build's fidelity to the torch fp32 build (fp32 >= 0.9999, bf16 >=
0.999), and the DataLoader script's rate (bench/script.py) with indexer's ratio to it."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (
    BIN,
    HERE,
    REPO,
    cache_without,
    imagenet_1000,
    imagenet_corpus,
    indexer_cmd,
    load,
    prepared,
    run_timed,
)

from indexer.model.runtime_choice import BOUND, CACHE, candidates, cpu_flags, this_machine

FLAG = {"onnxruntime": "onnx", "openvino": "openvino", "torch": "torch"}


def cpu_line() -> str:
    name, flags = cpu_flags()
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name or 'unknown CPU'}, {os.cpu_count()} cores, native bf16: {native or 'none'}"


def cache_without_decisions(work: Path) -> Path:
    """A copy of the user's indexer cache (data configs, exports) without runtime decisions:
    auto times its candidates on the first batch, as on a machine seen for the first time."""
    return cache_without(work / "cache-undecided", CACHE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; best counts")
    args = parser.parse_args()
    ck = prepared(args.work)
    images = imagenet_1000(args.work, imagenet_corpus(args.work))
    n = sum(1 for p in images.rglob("*.jpg"))
    out = args.work / "choice"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    offered = [c.label for c in candidates("auto", "auto", this_machine(cuda=False))]
    variants = {
        label: indexer_cmd(images, out / label.replace(" ", "-"), ck, "--runtime",
                           FLAG[label.split()[0]], "--precision", label.split()[1])
        for label in offered
    }  # fmt: skip
    variants["auto timed"] = ["env", f"INDEXER_CACHE_DIR={cache_without_decisions(args.work)}",
                              *indexer_cmd(images, out / "auto-timed", ck)]  # fmt: skip
    variants["auto cached"] = indexer_cmd(images, out / "auto-cached", ck)
    py = str(BIN / "python")
    variants["script"] = [py, str(HERE / "script.py"), str(images), str(ck), str(out / "s.pq")]
    run_timed(indexer_cmd(images, out / "warm-up", ck))  # the decision cached, exports known
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for label, cmd in variants.items():
            if label == "auto timed":
                cmd = ["env", f"INDEXER_CACHE_DIR={cache_without_decisions(args.work)}",
                       *indexer_cmd(images, out / "auto-timed", ck)]  # fmt: skip
            else:
                cmd = [*cmd]
                if cmd[0].endswith("indexer"):
                    shutil.rmtree(cmd[cmd.index("--out") + 1], ignore_errors=True)
            seconds = run_timed(cmd).seconds
            best[label] = min(best.get(label, seconds), seconds)
    reference = load(out / "torch-fp32" / "shards")
    keys = sorted(reference)
    want = np.stack([reference[k] for k in keys])
    print(f"# --runtime auto vs explicit, {n} photos ({images}); {cpu_line()}; best of "
          f"{args.rounds}, fresh processes")  # fmt: skip
    for label, seconds in best.items():
        line = f"{label:>16}: {seconds:6.2f} s {n / seconds:7.1f} images/s"
        folder = out / label.replace(" ", "-")
        if label != "script" and (folder / "manifest.json").exists():
            got = load(folder / "shards")
            cos = (np.stack([got[k] for k in keys]) * want).sum(1)
            chosen = json.loads((folder / "manifest.json").read_text())["runtime"]
            precision = chosen["precision"]
            bound = BOUND[precision]
            ok = "ok" if cos.min() >= bound else "BELOW BOUND"
            line += (
                f"  {chosen['name']} {precision} ({chosen['how']}); cosine to torch fp32 "
                f"min {cos.min():.6f} mean {cos.mean():.6f} ({ok}, bound {bound})"
            )
        print(line)
    fastest = min(best[label] for label in offered)
    for label in ("auto timed", "auto cached"):
        print(f"{label + ' / fastest':>26}: {best[label] / fastest:.2f}x the time (target <= 1.10)")
    for label in ("auto timed", "auto cached"):
        print(f"{label + ' / script':>26}: {best['script'] / best[label]:.2f}x the rate")


if __name__ == "__main__":
    main()
