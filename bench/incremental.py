"""The incremental day at scale: day 1 indexed with `indexer index --from-parquet`, day 2 (1% of
keys deleted, 1% with new vectors, 1% added) with the same command into the same collection,
each in a fresh process. Day 2's index time against day 1's, its recall@10 on unseen queries
against a from-scratch index of day 2 (`indexer index DIR --rebuild-index` on a copy: the same
shards and ids) at the same nprobe, and a 30%-changed day that must be rebuilt."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index import clustered
from throughput import BIN, REPO


def write_day(path: Path, keys: np.ndarray, vectors: np.ndarray) -> None:
    names = pa.array([f"v{k:09d}" for k in keys.tolist()])
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    pq.write_table(pa.table({"key": names, "embedding": emb}), path)


def next_day(keys: np.ndarray, vectors: np.ndarray, share: float, seed: int, clusters: int,
             next_key: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """`share` of the keys deleted, `share` given new vectors, `share` new keys added."""
    rng = np.random.default_rng(seed)
    n, dim = vectors.shape
    count = int(n * share)
    order = rng.permutation(n)
    deleted, changed = order[:count], order[count : 2 * count]
    vectors = vectors.copy()
    vectors[changed] = clustered(count, dim, seed + 1, clusters, 0.5)
    keep = np.ones(n, bool)
    keep[deleted] = False
    added_keys = np.arange(next_key, next_key + count)
    added = clustered(count, dim, seed + 2, clusters, 0.5)
    return (np.concatenate([keys[keep], added_keys]),
            np.concatenate([vectors[keep], added]))  # fmt: skip


def index(parquet: Path, out: Path, *flags: str) -> tuple[dict, float]:
    """`indexer index --from-parquet` in a fresh process; the index metadata, wall seconds."""
    start = time.perf_counter()
    argv = [str(BIN / "indexer"), "index", "--from-parquet", str(parquet), "--out", str(out)]
    subprocess.run([*argv, "--keep", "2", *flags], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return json.loads((out / "current" / "index" / "meta.json").read_text()), wall


def rebuild(out: Path) -> tuple[dict, float]:
    """`indexer index DIR --rebuild-index` in a fresh process: the same shards (the same ids),
    the index trained from scratch."""
    start = time.perf_counter()
    argv = [str(BIN / "indexer"), "index", str(out), "--rebuild-index", "--keep", "2"]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return json.loads((out / "current" / "index" / "meta.json").read_text()), wall


def recall_at(out: Path, queries: np.ndarray, truth: np.ndarray, nprobe: int) -> float:
    from indexer import Collection

    collection = Collection.open(out)
    collection.set_search_params({"nprobe": nprobe})
    _, ids = collection.index.search(collection.prepare(queries), truth.shape[1])
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in
                          zip(ids.tolist(), truth.tolist(), strict=True)]))  # fmt: skip


def exact(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    import faiss

    flat = faiss.IndexIDMap(faiss.IndexFlatIP(vectors.shape[1]))
    flat.add_with_ids(vectors, ids)
    return flat.search(queries, k)[1]


def ids_of(out: Path, keys: np.ndarray) -> np.ndarray:
    """The collection's id of each key (the order of `keys`)."""
    table = pq.read_table(out / "current" / "shards", columns=["key", "id"])
    by_key = dict(zip(table.column("key").to_pylist(), table.column("id").to_pylist(), strict=True))
    return np.array([by_key[f"v{k:09d}"] for k in keys.tolist()], np.int64)


def reseeded_recalls(scratch: Path, queries: np.ndarray, truth: np.ndarray, nprobe: int,
                     seeds: tuple[int, ...]) -> list[float]:  # fmt: skip
    """recall@10 at nprobe of from-scratch indexes of the same version trained on other
    samples (IndexConfig.seed): the spread k-means alone puts between two rebuilds."""
    import tempfile

    import faiss

    from indexer.config import IndexConfig
    from indexer.index.faiss_index import INDEX_FILE, build_index

    version = (scratch / "current").resolve()
    manifest = json.loads((version / "manifest.json").read_text())
    out = []
    for seed in seeds:
        root = Path(tempfile.mkdtemp(prefix="reseeded-"))
        shutil.copytree(version / "shards", root / "shards", copy_function=os.link)
        build_index(root, manifest, IndexConfig(seed=seed))
        index = faiss.read_index(str(root / "index" / INDEX_FILE))
        faiss.extract_index_ivf(index).nprobe = nprobe
        found = index.search(queries, truth.shape[1])[1]
        out.append(float(np.mean([len(set(a) & set(b)) / len(b) for a, b in
                                  zip(found.tolist(), truth.tolist(), strict=True)])))  # fmt: skip
        shutil.rmtree(root)
    return out


def index_seconds(meta: dict) -> float:
    return float(meta["build_seconds"]) + float(meta["tune_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench" / "incremental")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    clusters = max(1, args.n // 100)
    keys1 = np.arange(args.n)
    day1 = clustered(args.n, args.dim, 0, clusters, 0.5)
    keys2, day2 = next_day(keys1, day1, 0.01, 10, clusters, args.n)
    keys3, day3 = next_day(keys2, day2, 0.10, 20, clusters, int(keys2.max()) + 1)  # 30% changed
    files = [work / f"day{n}.parquet" for n in (1, 2, 3)]
    for path, keys, vectors in zip(files, (keys1, keys2, keys3), (day1, day2, day3), strict=True):
        write_day(path, keys, vectors)
    out, scratch = work / "daily", work / "scratch"
    for folder in (out, scratch):
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    meta1, wall1 = index(files[0], out)
    meta2, wall2 = index(files[1], out)
    shutil.copytree(out, scratch, symlinks=True)  # day 2 as published; its index rebuilt
    meta_s, wall_s = rebuild(scratch)
    queries = clustered(args.queries, args.dim, 1, clusters, 0.5)  # unseen, same distribution
    truth = exact(day2, ids_of(out, keys2), queries, 10)
    truth_s = exact(day2, ids_of(scratch, keys2), queries, 10)
    nprobe = int((meta2.get("params") or {}).get("nprobe") or 1)
    r_upd = recall_at(out, queries, truth, nprobe)
    r_scr = recall_at(scratch, queries, truth_s, nprobe)
    spread = [r_scr, *reseeded_recalls(scratch, queries, truth_s, nprobe, (1, 2))]
    meta3, wall3 = index(files[2], out)
    ratio = index_seconds(meta2) / index_seconds(meta1)
    print(f"# incremental day: {args.n:,} x {args.dim} clustered vectors, day 2 = 1% deleted, "
          f"1% changed, 1% added; {args.queries} unseen queries")  # fmt: skip
    for name, meta, wall in (("day 1", meta1, wall1), ("day 2", meta2, wall2),
                             ("day 2 from scratch", meta_s, wall_s),
                             ("day 3 (30% changed)", meta3, wall3)):  # fmt: skip
        print(f"  {name:<20} {meta['how']:<8} {meta['factory']:<14} build "
              f"{meta['build_seconds']:7.2f} s  tune {meta['tune_seconds']:6.2f} s  process "
              f"{wall:6.1f} s  params {meta.get('params')}  recall bound "
              f"{meta.get('recall_lower_bound')}  why: {meta.get('why')}")  # fmt: skip
    print(f"  recall@10 on unseen queries at nprobe={nprobe}: updated {r_upd:.4f}, from scratch "
          f"{r_scr:.4f} (difference {r_upd - r_scr:+.4f})")  # fmt: skip
    print(f"  from scratch trained on other samples (seeds 0, 1, 2): "
          f"{', '.join(f'{r:.4f}' for r in spread)}; mean {np.mean(spread):.4f}, updated - mean "
          f"{r_upd - np.mean(spread):+.4f}")  # fmt: skip
    checks = [
        (f"day 2 index time {ratio:.1%} of day 1's <= 10%", ratio <= 0.10),
        (f"day 2's index says {meta2['how']!r}", meta2["how"] == "updated"),
        (
            f"recall within 0.005 of from scratch ({r_upd - r_scr:+.4f})",
            abs(r_upd - r_scr) <= 0.005,
        ),
        (f"30% changed: {meta3['how']!r} ({meta3.get('why')})", meta3["how"] == "rebuilt"),
    ]
    print("targets:")
    for text, ok in checks:
        print(f"  {'✓' if ok else '✗'} {text}")


if __name__ == "__main__":
    main()
