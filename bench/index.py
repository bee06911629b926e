"""Index at scale: `indexer index --from-parquet` against exact search and autofaiss, on the same
deterministic clustered unit vectors (1M x 64 by default), plus real embeddings of the throughput
corpus and the sizes that place the exact-search threshold. Ratios come from one run."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import BIN, REPO, SAMPLE, indexer_cmd, run_timed, write_checkpoint

FILE_ROWS = 100_000
VARIANTS = (  # name, output folder suffix, `indexer index` flags
    ("indexer flat (exact)", "flat", ("--index-type", "flat")),
    ("indexer auto", "auto", ()),
    ("indexer auto @0.99", "auto99", ("--target-recall", "0.99")),
    ("indexer hnsw", "hnsw", ("--index-type", "hnsw")),
    ("indexer IVF4096,PQ16", "pq", ("--index-type", "IVF4096,PQ16")),
    ("indexer auto, 128M", "budget128", ("--max-index-memory", "128M")),  # floats do not fit
    ("indexer auto, 32M", "budget32", ("--max-index-memory", "32M")),  # nor SQ8: lists on disk
)
ROUNDS = 3
AUTOFAISS_SCRIPT = r"""
import json, sys, time
import numpy as np, faiss
from autofaiss import build_index
vectors, queries, truth = (np.load(p) for p in sys.argv[1:4])
start = time.perf_counter()
index, infos = build_index(embeddings=vectors, save_on_disk=False, metric_type="ip",
                           verbose=40)
build = time.perf_counter() - start
best = float("inf")
for _ in range(3):
    t = time.perf_counter(); _, found = index.search(queries, 10)
    best = min(best, time.perf_counter() - t)
hits = sum(len(set(f) & set(t)) for f, t in zip(found.tolist(), truth.tolist()))
faiss.write_index(index, sys.argv[4])
import os
print(json.dumps({"build_seconds": build, "qps": len(queries) / best,
                  "recall": hits / truth.size, "bytes": os.path.getsize(sys.argv[4]),
                  "factory": infos.get("index_key"), "params": infos.get("index_param")}))
"""


@dataclass
class Result:
    name: str
    build_seconds: float
    recall: float
    qps: float
    bytes: int
    detail: str
    peak_mb: float | None = None  # the process tree's peak PSS (indexer runs)


def clustered(n: int, dim: int, seed: int, clusters: int, spread: float) -> np.ndarray:
    """n unit vectors around `clusters` random centres (per-cluster spread spread/2..3*spread/2
    times 1/sqrt(dim)); the centres depend only on dim and clusters, so queries drawn with
    another seed come from the same distribution."""
    centres_rng = np.random.default_rng(12345)
    centres = centres_rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    widths = (spread * centres_rng.uniform(0.5, 1.5, clusters) / np.sqrt(dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, FILE_ROWS):
        m = min(FILE_ROWS, n - start)
        label = rng.integers(0, clusters, m)
        noise = rng.standard_normal((m, dim), dtype=np.float32)
        block = centres[label] + widths[label, None] * noise
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def write_parquet(vectors: np.ndarray, folder: Path) -> None:
    """Files of FILE_ROWS rows: key (string) and embedding (fixed-size list of float32)."""
    folder.mkdir(parents=True, exist_ok=True)
    dim = vectors.shape[1]
    for number, start in enumerate(range(0, len(vectors), FILE_ROWS)):
        block = vectors[start : start + FILE_ROWS]
        keys = pa.array([f"v{i:09d}" for i in range(start, start + len(block))])
        emb = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), dim)
        pq.write_table(pa.table({"key": keys, "embedding": emb}), folder / f"{number:04d}.parquet")


def exact_truth(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Exact top-k ids and the queries/s of FAISS's brute force (the 'exact' baseline)."""
    import faiss

    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    best, truth = float("inf"), None
    for _ in range(ROUNDS):
        start = time.perf_counter()
        _, truth = flat.search(queries, k)
        best = min(best, time.perf_counter() - start)
    assert truth is not None
    return truth, len(queries) / best


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f) & set(t)) for f, t in zip(found.tolist(), truth.tolist(), strict=True))
    return hits / truth.size


def search_qps(collection: object, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Ids found (mapped from keys 'vNNN') and the best batch queries/s of Collection.search."""
    best, keys = float("inf"), None
    for _ in range(ROUNDS):
        start = time.perf_counter()
        _, keys = collection.search(queries, k)  # type: ignore[attr-defined]
        best = min(best, time.perf_counter() - start)
    assert keys is not None
    ids = np.vectorize(lambda key: int(key[1:]) if key else -1, otypes=[np.int64])(keys)
    return ids, len(queries) / best


def run_indexer(
    name: str, vectors_dir: Path, out: Path, queries: np.ndarray, truth: np.ndarray, *flags: str
) -> Result:
    from indexer import Collection

    cmd = [
        str(BIN / "indexer"),
        "index",
        "--from-parquet",
        str(vectors_dir),
        "--out",
        str(out),
        "--keep",
        "1",
        *flags,
    ]
    run = run_timed(cmd, memory=True)
    collection = Collection.open(out)
    found, qps = search_qps(collection, queries, truth.shape[1])
    meta = collection.index_meta
    params = ", ".join(f"{k}={v}" for k, v in meta["params"].items()) or "-"
    detail = f"{meta['factory']} {params}; own estimate recall {meta['recall_at_k']}"
    return Result(
        name, run.seconds, recall(found, truth), qps, meta["bytes"], detail, run.peak_rss_mb
    )


def run_autofaiss(python: Path, work: Path, files: tuple[Path, Path, Path]) -> Result | None:
    out = subprocess.run(
        [str(python), "-c", AUTOFAISS_SCRIPT, *map(str, files), str(work / "autofaiss.index")],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        print(f"autofaiss failed, skipped:\n{out.stderr[-1500:]}")
        return None
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    detail = f"{doc['factory']} {doc['params']}"
    return Result(
        "autofaiss", doc["build_seconds"], doc["recall"], doc["qps"], doc["bytes"], detail
    )


def find_autofaiss(given: Path | None) -> Path | None:
    candidates = [given] if given else [REPO / "build" / "autofaiss-venv" / "bin" / "python"]
    for python in candidates:
        if python is not None and python.exists():
            return python
    probe = subprocess.run([sys.executable, "-c", "import autofaiss"], capture_output=True)
    return Path(sys.executable) if probe.returncode == 0 else None


def print_table(results: list[Result], exact_qps: float) -> None:
    auto_fa = next((r for r in results if r.name == "autofaiss"), None)
    print(
        f"{'index':<22} {'build s':>8} {'recall@10':>9} {'queries/s':>10} {'x exact':>8} "
        f"{'x autofaiss':>11} {'index MiB':>9} {'peak MiB':>8}  detail"
    )
    for r in results:
        vs_fa = f"{r.qps / auto_fa.qps:10.1f}x" if auto_fa else f"{'-':>11}"
        peak = f"{r.peak_mb:8.0f}" if r.peak_mb is not None else f"{'-':>8}"
        print(
            f"{r.name:<22} {r.build_seconds:8.1f} {r.recall:9.4f} {r.qps:10.0f} "
            f"{r.qps / exact_qps:7.1f}x {vs_fa} {r.bytes / 2**20:9.1f} {peak}  {r.detail}"
        )


def check_targets(results: list[Result], exact_qps: float) -> None:
    by = {r.name: r for r in results}
    auto, high, fa = by.get("indexer auto"), by.get("indexer auto @0.99"), by.get("autofaiss")
    if auto is None:
        return
    lines = [
        (f"recall@10 {auto.recall:.4f} >= 0.95", auto.recall >= 0.95),
        (f"queries/s {auto.qps / exact_qps:.0f}x exact >= 50x", auto.qps >= 50 * exact_qps),
    ]
    if fa is not None:
        lines += [
            (f"queries/s {auto.qps / fa.qps:.1f}x autofaiss >= 10x", auto.qps >= 10 * fa.qps),
            (
                f"build {auto.build_seconds / fa.build_seconds:.2f}x autofaiss <= 0.5x",
                auto.build_seconds <= 0.5 * fa.build_seconds,
            ),
        ]
        if high is not None:
            lines.append(
                (
                    f"@0.99: recall {high.recall:.4f}, queries/s {high.qps / fa.qps:.1f}x "
                    "autofaiss >= 5x",
                    high.qps >= 5 * fa.qps and high.recall >= 0.99,
                )
            )
    print("targets:")
    for text, ok in lines:
        print(f"  {'✓' if ok else '✗'} {text}")


def real_embeddings(work: Path) -> None:
    """The throughput corpus's embeddings (seeded model): flat against IVF on real vectors."""
    from indexer import Collection

    images = SAMPLE if SAMPLE.is_dir() else None
    if images is None:
        print("real embeddings: ../shared/data/imagenet-sample not found, skipped")
        return
    ck = work / "seed0.safetensors"
    write_checkpoint(ck)
    out = work / "index-real"
    run_timed(indexer_cmd(images, out, ck, "--keep", "1"))
    print(
        f"# real embeddings: {images.name} through a seeded {ck.name} (stored vectors as queries)"
    )
    for kind in ("flat", "ivf", "hnsw"):
        run_timed([str(BIN / "indexer"), "index", str(out), "--index-type", kind, "--keep", "1"])
        meta = Collection.open(out).index_meta
        print(
            f"  {kind:<5} {meta['factory']:<18} recall@{meta['recall_k']} "
            f"{meta['recall_at_k']:.4f}, {meta['queries_per_second']:>9,.0f} queries/s, "
            f"params {meta['params'] or '-'}"
        )


def threshold_table(work: Path, sizes: list[int], dim: int, clusters_per: int) -> None:
    """Exact against IVF at each size: where an approximate index starts to pay."""
    from indexer import Collection

    print("# exact-search threshold: flat vs ivf by collection size (stored vectors as queries)")
    print(
        f"{'vectors':>9} {'flat q/s':>9} {'flat 1-query ms':>15} {'ivf build s':>11} "
        f"{'ivf q/s':>8} {'ivf recall':>10}"
    )
    for n in sizes:
        folder = work / f"vectors-{n}x{dim}"
        if not folder.is_dir():
            write_parquet(clustered(n, dim, 0, max(1, n // clusters_per), 0.5), folder)
        row = []
        for kind in ("flat", "ivf"):
            out = work / f"index-{n}-{kind}"
            seconds = run_timed(
                [
                    str(BIN / "indexer"),
                    "index",
                    "--from-parquet",
                    str(folder),
                    "--out",
                    str(out),
                    "--index-type",
                    kind,
                    "--keep",
                    "1",
                ]
            ).seconds
            c = Collection.open(out)
            one = c.prepare(np.ones((1, dim), np.float32))
            times = []
            for _ in range(50):
                start = time.perf_counter()
                c.index.search(one, 10)
                times.append(time.perf_counter() - start)
            row.append((c.index_meta, seconds, float(np.median(times)) * 1000))
        (flat, _, flat_ms), (ivf, ivf_s, _) = row
        print(
            f"{n:>9} {flat['queries_per_second']:>9,.0f} {flat_ms:>15.2f} {ivf_s:>11.1f} "
            f"{ivf['queries_per_second']:>8,.0f} {ivf['recall_at_k']:>10.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench")
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--per-cluster", type=int, default=100, help="vectors per cluster")
    parser.add_argument("--autofaiss-python", type=Path, help="a python with autofaiss")
    parser.add_argument(
        "--sizes", default="30000,100000,300000", help="sizes for the threshold table ('' to skip)"
    )
    parser.add_argument("--skip-real", action="store_true")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    clusters = max(1, args.n // args.per_cluster)
    folder = work / f"vectors-{args.n}x{args.dim}"
    vectors = clustered(args.n, args.dim, 0, clusters, 0.5)
    if not folder.is_dir():
        write_parquet(vectors, folder)
    queries = clustered(args.queries, args.dim, 1, clusters, 0.5)  # unseen, same distribution
    truth, exact_qps = exact_truth(vectors, queries, 10)
    files = (work / "vectors.npy", work / "queries.npy", work / "truth.npy")
    for path, array in zip(files, (vectors, queries, truth), strict=True):
        np.save(path, array)
    del vectors
    print(
        f"# {args.n:,} x {args.dim} clustered unit vectors ({clusters:,} clusters), "
        f"{args.queries} unseen queries in one batch, recall@10 against exact search"
    )
    results = [
        run_indexer(name, folder, work / f"index-{slug}", queries, truth, *flags)
        for name, slug, flags in VARIANTS
    ]
    python = find_autofaiss(args.autofaiss_python)
    fa = run_autofaiss(python, work, files) if python else None
    if fa is None and python is None:
        print("autofaiss: not installed (make bench-index installs it in build/autofaiss-venv)")
    results += [fa] if fa else []
    print_table(results, exact_qps)
    print(f"(exact = FAISS brute force in this process: {exact_qps:,.0f} queries/s)")
    check_targets(results, exact_qps)
    if not args.skip_real:
        real_embeddings(work)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if sizes:
        threshold_table(work, sizes, args.dim, args.per_cluster)


if __name__ == "__main__":
    main()
