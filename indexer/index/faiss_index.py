"""Build the FAISS index from the shards in bounded memory, tune it, save it and load it."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.collection.layout import CollectionPaths, write_json_atomic
from indexer.collection.shards import iter_embeddings, read_shard
from indexer.config import IndexConfig, file_sha256
from indexer.errors import CollectionError, InputError
from indexer.index.index_type import IndexChoice, choose_index, train_size
from indexer.index.tune import Probe, Tuning, exact_probe, tune
from indexer.safeio import read_regular_text

INDEX_FILE = "index.faiss"
LISTS_FILE = "lists.ivfdata"  # on-disk inverted lists, beside the index file
META_FILE = "meta.json"
BUILT = {"how": "rebuilt", "from_version": None, "why": "built from the shards"}
PROBE_FILE = "probe.npz"  # the recall probe's queries and exact candidates (indexupdate.py)
EF_LIMIT = 4096  # the largest efSearch: tuning stops there, and a larger one is refused


@dataclass(frozen=True)
class Vectors:
    """The vectors to index: shard files (read one at a time), their row counts, dim, metric."""

    paths: list[Path]
    counts: list[int]
    dim: int
    metric: str
    id_bound: int | None = None  # every id is below it (the manifest's next_id), when known

    @property
    def total(self) -> int:
        return sum(self.counts)

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Each shard's (ids, vectors), checked against the manifest's vector length."""
        for path, (ids, vectors) in zip(self.paths, iter_embeddings(self.paths), strict=True):
            if vectors.shape[1] != self.dim:
                raise CollectionError(
                    f"shard {path} holds {vectors.shape[1]}-d vectors, the manifest says "
                    f"{self.dim}-d: the collection was tampered with; run `indexer verify`"
                )
            self._check_ids(path, ids)
            yield ids, vectors

    def check_ids(self) -> None:
        """Every shard's ids within [0, next_id), the id column alone read."""
        for path in self.paths:
            self._check_ids(path, read_shard(path, ["id"]).column("id").to_numpy())

    def _check_ids(self, path: Path, ids: np.ndarray) -> None:
        if (
            self.id_bound is not None
            and len(ids)
            and not 0 <= ids.min() <= ids.max() < self.id_bound
        ):
            raise CollectionError(
                f"shard {path} holds ids outside [0, next_id={self.id_bound}): the "
                "collection was tampered with; run `indexer verify`"
            )

    def read(self, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of the rows at these sorted positions, read one shard at a time."""
        ids, picked, offset = [], [], 0
        for (shard_ids, vectors), count in zip(self.batches(), self.counts, strict=True):
            local = chosen[(chosen >= offset) & (chosen < offset + count)] - offset
            ids.append(shard_ids[local])
            picked.append(vectors[local])
            offset += count
        if not picked:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return np.concatenate(ids), np.ascontiguousarray(np.concatenate(picked), np.float32)


def draw_positions(total: int, n: int, seed: int, avoid: np.ndarray | None = None) -> np.ndarray:
    """n sorted row positions in [0, total) drawn without replacement; not in `avoid` (sorted)
    while enough others exist."""
    rng = np.random.default_rng(seed)
    n = min(n, total)
    if avoid is None or total - len(avoid) < n:
        return np.sort(rng.choice(total, size=n, replace=False))
    if total - len(avoid) < 2 * n:
        return np.sort(rng.choice(np.setdiff1d(np.arange(total), avoid), size=n, replace=False))
    picked = np.zeros(0, np.int64)
    while len(picked) < n:  # rejection: most draws land outside `avoid`
        draw = rng.choice(total, size=2 * n, replace=False)
        picked = np.union1d(picked, draw[~np.isin(draw, avoid)])
    return np.sort(rng.choice(picked, size=n, replace=False))


def reuse_index(
    source: Path, source_manifest: dict[str, Any], root: Path, manifest: dict[str, Any]
) -> dict[str, Any] | None:
    """For a version holding the source version's vectors under the same ids (only other
    columns changed, e.g. touched files' mtimes): the source's index files hard-linked, its
    metadata naming the new shards. None, and the index is built as usual, unless the
    source's index is whole and its own: built from the source's shards, every file's size
    and sha256 as recorded (a damaged index is never carried into a new version)."""
    meta = read_index_meta(source)
    folder = CollectionPaths(source).index
    recorded = (meta or {}).get("files") or {}
    if meta is None or not recorded or index_mismatch(meta, source_manifest):
        return None
    if check_index_files(folder, recorded, set(recorded)):
        return None
    target = CollectionPaths(root).index
    target.mkdir()
    for name in recorded:
        os.link(folder / str(name), target / str(name))
    meta = {**meta, "shards": manifest["shards"], "reused_from": source.name, "how": "reused",
            "from_version": source.name, "why": "the same vectors under the same ids"}  # fmt: skip
    write_json_atomic(target / META_FILE, meta)
    return meta


def version_vectors(root: Path, manifest: dict[str, Any]) -> Vectors:
    """The vectors of the version at root, its shards' checksums checked first."""
    paths = CollectionPaths(root)
    check_shard_checksums(paths, manifest)
    counts = [int(s["rows"]) for s in manifest["shards"]]
    return Vectors(paths.shard_paths(manifest), counts, int(manifest["embedding_dim"]),
                   manifest["metric"], manifest.get("next_id"))  # fmt: skip


def build_index(
    root: Path, manifest: dict[str, Any], cfg: IndexConfig, provenance: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Choose, train, fill, tune and save the index of the version at root; its metadata
    (with provenance: how it was made and why, see indexupdate.py)."""
    paths = CollectionPaths(root)
    vectors = version_vectors(root, manifest)
    choice = choose_index(vectors.total, vectors.dim, cfg.max_memory, cfg.index_type)
    paths.index.mkdir()
    start = time.perf_counter()
    index = new_index(choice, vectors)
    trained = train(index, vectors, choice, cfg.seed)
    if choice.on_disk:
        fill_on_disk(index, vectors, paths.index, cfg.max_memory)
    else:
        fill(index, vectors)
    build_seconds = time.perf_counter() - start
    probe = make_probe(vectors, cfg, trained)
    tuning = measure_and_tune(index, probe, cfg.target_recall)
    kind = {"type": choice.kind, "factory": choice.factory, "reason": choice.reason,
            "on_disk": choice.on_disk, "train_vectors": len(trained),
            **(provenance or BUILT)}  # fmt: skip
    took = {
        "build_seconds": build_seconds,
        "tune_seconds": time.perf_counter() - start - build_seconds,
    }
    return save_index(index, paths.index, kind, vectors, cfg, took, tuning, probe, manifest)


def save_index(
    index: Any,
    folder: Path,
    kind: dict[str, Any],
    vectors: Vectors,
    cfg: IndexConfig,
    took: dict[str, float],
    tuning: Tuning,
    probe: Probe | None,
    manifest: dict[str, Any],
) -> dict[str, Any]:
    """Write the index, its probe and its metadata (meta.json, last) into folder; the metadata."""
    write_index(index, folder / INDEX_FILE)
    if probe is not None and probe.pool_ids is not None:
        save_probe(folder, probe)
    meta = {
        **kind,
        "metric": vectors.metric,
        "dim": vectors.dim,
        "ntotal": int(index.ntotal),
        "nlist": search_param(index)[1] if search_param(index)[0] == "nprobe" else None,
        "max_memory": cfg.max_memory,
        "requested": cfg.index_type,
        **{name: round(seconds, 3) for name, seconds in took.items()},
        **tuning.to_meta(cfg.target_recall, probe),
        "bytes": sum(p.stat().st_size for p in folder.iterdir()),
        "files": index_files(folder),
        "shards": manifest["shards"],
    }
    write_json_atomic(folder / META_FILE, meta)
    return meta


def save_probe(folder: Path, probe: Probe) -> None:
    """The probe's queries and exact candidate pools, for the next version's update."""
    assert probe.pool_scores is not None and probe.pool_ids is not None
    with open(folder / PROBE_FILE, "wb") as out:
        np.savez(out, ids=probe.ids, queries=probe.queries, pool_scores=probe.pool_scores,
                 pool_ids=probe.pool_ids, k=np.array([probe.k]))  # fmt: skip


def load_probe(folder: Path, dim: int) -> Probe | None:
    """A saved probe (truth and ties left to compute from its pools); None when there is
    none or it is malformed (the update then measures a new one)."""
    path = folder / PROBE_FILE
    if path.is_symlink() or not path.is_file():  # a planted link is never followed
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            ids, queries = saved["ids"].astype(np.int64), saved["queries"].astype(np.float32)
            scores, pool = saved["pool_scores"].astype(np.float32), saved["pool_ids"]
            k = int(saved["k"][0])
    except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile):
        return None
    n = len(ids)
    if queries.shape != (n, dim) or scores.shape != pool.shape or len(pool) != n or k < 1:
        return None
    if not np.isfinite(queries).all() or np.isnan(scores).any() or np.isposinf(scores).any():
        return None  # -inf pads a short pool; anything else non-finite is damage
    empty = np.zeros((n, 0), np.int64)
    return Probe(ids, queries, empty, k, None, scores, pool.astype(np.int64))


def write_index(index: Any, path: Path) -> None:
    """faiss.write_index, its C++ write errors raised as the OSError they are (ENOSPC, ...)."""
    import faiss

    try:
        with native_output_silenced((1, 2)):  # FAISS prints its own half-line on a write error
            faiss.write_index(index, str(path))
    except RuntimeError as exc:
        text = str(exc)
        code = next((c for c in WRITE_ERRNOS if os.strerror(c) in text), errno.EIO)
        raise OSError(code, os.strerror(code), str(path)) from exc


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EIO)


def index_mismatch(meta: dict[str, Any], manifest: dict[str, Any]) -> str | None:
    """Why an index's metadata does not belong to this manifest (None when it does): the
    shards it was built from (names, rows, checksums), its size and its vector length."""

    def ident(shards: Any) -> list[tuple[Any, ...]]:
        return [(s.get("name"), s.get("rows"), s.get("sha256")) for s in shards or []
                if isinstance(s, dict)]  # fmt: skip

    if not isinstance(meta.get("shards"), list) or ident(meta["shards"]) != ident(
        manifest["shards"]
    ):
        return "it was not built from this version's shards (its record of them differs)"
    if meta.get("ntotal") != manifest["counts"]["embedded"]:
        said = manifest["counts"]["embedded"]
        return f"it holds {meta.get('ntotal')} vectors, the manifest says {said}"
    if meta.get("metric") != manifest["metric"]:
        return f"its metric is {meta.get('metric')}, the manifest's {manifest['metric']}"
    if meta.get("dim") not in (None, manifest["embedding_dim"]):
        return f"its vectors are {meta.get('dim')}-d, the manifest's {manifest['embedding_dim']}-d"
    return None


def check_shard_checksums(paths: CollectionPaths, manifest: dict[str, Any]) -> None:
    """Refuse to index a shard whose bytes differ from its recorded sha256 (~1 s per GB)."""
    for shard in manifest["shards"]:
        path = paths.shards / shard["name"]
        if shard.get("sha256") and file_sha256(path) != shard["sha256"]:
            raise CollectionError(
                f"shard {shard['name']} is damaged or unreadable (its checksum differs from the "
                "manifest's): run `indexer verify --repair` on its collection"
            )


def index_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each file of the index (meta.json aside): what verify checks."""
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.iterdir())
        if p.name != META_FILE
    }


def check_index_files(
    folder: Path, recorded: dict[str, dict[str, Any]], hashed: set[str]
) -> list[str]:
    """What differs from the recorded sizes (and sha256, for the files named in `hashed`);
    [] when all match."""
    if not isinstance(recorded, dict) or not all(
        isinstance(w, dict) and "bytes" in w and "sha256" in w for w in recorded.values()
    ):
        return ["its record of files and checksums is malformed"]
    problems = [] if INDEX_FILE in recorded else [f"no checksum is recorded for {INDEX_FILE}"]
    for name, want in recorded.items():
        path = folder / str(name)
        if "/" in str(name) or not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, not {want['bytes']}")
        elif name in hashed and file_sha256(path) != want["sha256"]:
            problems.append(f"{name} differs from its checksum")
    return problems


def metric_code(metric: str) -> int:
    import faiss

    return int(faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)


def new_index(choice: IndexChoice, vectors: Vectors) -> Any:
    """An empty index from the choice's factory string, able to take the shards' own ids."""
    import faiss

    try:
        index = faiss.index_factory(vectors.dim, choice.factory, metric_code(vectors.metric))
    except RuntimeError as exc:
        raise InputError(
            f"FAISS cannot build {choice.factory!r} for {vectors.dim}-d vectors "
            f"({str(exc).strip().splitlines()[-1]}): pick another --index-type"
        ) from exc
    ids_native = faiss.try_extract_index_ivf(index) is not None
    if not ids_native and not isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        index = faiss.IndexIDMap(index)
    return index


def train(index: Any, vectors: Vectors, choice: IndexChoice, seed: int) -> np.ndarray:
    """Train on a sample of the shards; the positions of the rows it used.

    The sample is the rows whose ids hash lowest (id_hashes), and an IVF's k-means starts from
    the lowest of those: a collection that changed a little is trained on nearly the same rows
    from nearly the same start, so its rebuilt index is nearly the one before (measured on 1M
    vectors with 3% changed: recall@10 at nprobe 2 within 0.0014, against 0.01 apart for two
    random samples), and an updated index can be compared with a rebuilt one."""
    if index.is_trained:
        return np.zeros(0, np.int64)
    chosen, order = lowest_hashes(vectors, train_size(vectors.total, choice.nlist), seed)
    _, sample = vectors.read(chosen)
    sample = sample[order]  # lowest hash first
    try:
        ivf = _ivf_untrained(index)
        if ivf is not None:
            train_quantizer(ivf, sample, vectors.metric)
        index.train(sample)  # what remains: an SQ8's ranges, a PQ's codebooks
    except RuntimeError as exc:
        raise InputError(
            f"{choice.factory} cannot be trained on this collection's {vectors.total} vectors "
            f"({str(exc).strip().splitlines()[-1]}): use --index-type auto or flat"
        ) from exc
    return chosen


def id_hashes(ids: np.ndarray, seed: int) -> np.ndarray:
    """A 64-bit mix (splitmix64) of each id and the seed: a stable, uniform order of rows."""
    with np.errstate(over="ignore"):
        x = ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def lowest_hashes(vectors: Vectors, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The sorted positions of the n rows whose ids hash lowest, and their order by hash."""
    ids = np.concatenate([np.zeros(0, np.int64)] + [
        read_shard(path, ["id"]).column("id").to_numpy() for path in vectors.paths
    ])  # fmt: skip
    hashes = id_hashes(ids, seed)
    n = min(n, len(ids))
    picked = np.argpartition(hashes, n - 1)[:n] if n < len(ids) else np.arange(len(ids))
    positions = np.sort(picked)
    return positions, np.argsort(hashes[positions], kind="stable")


def _ivf_untrained(index: Any) -> Any:
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or (ivf.quantizer.is_trained and ivf.quantizer.ntotal == ivf.nlist):
        return None
    return ivf


def train_quantizer(ivf: Any, sample: np.ndarray, metric: str) -> None:
    """The IVF's centroids: k-means (the index's own parameters) on the sample, started from
    its first nlist rows; IndexIVF.train then finds its quantizer trained."""
    import faiss

    nlist = int(ivf.nlist)
    clustering = faiss.Clustering(sample.shape[1], nlist, ivf.cp)
    faiss.copy_array_to_vector(np.ascontiguousarray(sample[:nlist], np.float32).ravel(),
                               clustering.centroids)  # fmt: skip
    flat = (
        faiss.IndexFlatIP(sample.shape[1]) if metric == "ip" else faiss.IndexFlatL2(sample.shape[1])
    )
    clustering.train(sample, flat)
    centroids = faiss.vector_to_array(clustering.centroids).reshape(nlist, sample.shape[1])
    ivf.quantizer.reset()
    ivf.quantizer.add(centroids)


def fill(index: Any, vectors: Vectors) -> None:
    """Add shard by shard with the shards' ids: memory = the index plus one shard."""
    for ids, batch in vectors.batches():
        index.add_with_ids(batch, ids)


def fill_on_disk(index: Any, vectors: Vectors, folder: Path, max_memory: int) -> None:
    """Add in blocks that fit the budget, each saved; then merge them into on-disk lists."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    per_vector = faiss.extract_index_ivf(index).code_size + 8
    block_rows = max(1, max_memory // 2 // per_vector)
    blocks: list[str] = []
    block, rows = faiss.clone_index(index), 0
    for ids, batch in vectors.batches():
        block.add_with_ids(batch, ids)
        rows += len(ids)
        if rows >= block_rows:
            blocks.append(_save_block(block, folder, len(blocks)))
            block, rows = faiss.clone_index(index), 0
    if rows or not blocks:
        blocks.append(_save_block(block, folder, len(blocks)))
    with native_output_silenced():  # FAISS printf()s each resize of the lists file
        merge_ondisk(index, blocks, str(folder / LISTS_FILE))
    for name in blocks:
        Path(name).unlink()


def _save_block(block: Any, folder: Path, number: int) -> str:

    name = str(folder / f".block-{number:05d}.faiss")
    write_index(block, Path(name))
    return name


def make_probe(vectors: Vectors, cfg: IndexConfig, trained: np.ndarray) -> Probe | None:
    """Stored vectors as queries (held out of the training sample where the collection allows)
    and their exact neighbours, the query itself left out; None below two vectors."""
    if vectors.total < 2:
        return None
    k = min(cfg.recall_k, vectors.total - 1)
    chosen = draw_positions(vectors.total, cfg.recall_queries, cfg.seed + 1, trained)
    ids, queries = vectors.read(chosen)
    truth, ties, scores, pool = exact_probe(vectors.batches, ids, queries, k, vectors.metric)
    return Probe(ids, queries, truth, k, ties, scores, pool)


def measure_and_tune(
    index: Any, probe: Probe | None, target: float, start: int | None = None
) -> Tuning:
    """The index's recall measured and its search parameter tuned (not below start)."""
    if probe is None:
        return Tuning(None, None, None, None, None, True)
    param, limit = search_param(index)
    return tune(index, param, limit, probe, target, start)


def search_param(index: Any) -> tuple[str | None, int]:
    """The parameter trading speed for recall, and its largest useful value."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return "nprobe", int(ivf.nlist)
    inner = index
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch", EF_LIMIT
    return None, 0


def apply_params(index: Any, params: dict[str, Any]) -> dict[str, int]:
    """Set tuned (or overriding) search parameters on a loaded index, each checked and
    bounded first (checked_param); the values set."""
    from indexer.index.tune import set_param

    own, limit = search_param(index)
    applied = {}
    for name, value in params.items():
        if name != own:
            raise InputError(
                f"this index has no {name} to set" + (f"; it takes {own}" if own else "")
            )
        applied[name] = checked_param(name, value, limit)
    for name, value in applied.items():
        set_param(index, name, value)
    return applied


def whole_number(name: str, value: Any) -> int:
    """value as an int of at least 1 (numpy ints welcome; bools, floats and text refused)."""
    import operator

    if isinstance(value, bool):
        raise InputError(f"{name} must be a whole number, not {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be a whole number, not {value!r}") from None
    if number < 1:
        raise InputError(f"{name} must be at least 1 (got {number})")
    return number


def checked_param(name: str, value: Any, limit: int) -> int:
    """A search parameter as a whole number of at least 1: nprobe above the index's nlist
    (limit) is nlist, the same search; efSearch above limit (EF_LIMIT) is refused."""
    number = whole_number(name, value)
    if number > limit and name != "nprobe":
        raise InputError(f"{name} must be at most {limit} (got {number}): give 1 to {limit}")
    return min(number, limit)


def load_index(
    root: Path, manifest: dict[str, Any], collection: Path | None = None
) -> tuple[Any, dict[str, Any]]:
    """The FAISS index of root (a version of ``collection``), tuned parameters applied; refused
    when it does not belong to the manifest's shards."""
    import faiss

    paths = CollectionPaths(root)
    name = collection or root
    fix = f"rebuild it with `indexer index {name}`"
    if not (paths.index / INDEX_FILE).is_file():
        raise CollectionError(f"{name} has no index: {fix}")
    try:
        meta = json.loads(read_regular_text(paths.index / META_FILE))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        # every file's size, the index file's checksum (a lists file's: `indexer verify`)
        damaged = check_index_files(paths.index, meta.get("files") or {}, {INDEX_FILE})
        mismatch = index_mismatch(meta, manifest)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CollectionError(
            f"the index metadata in {name} is unreadable ({exc}): run `indexer verify --repair "
            f"{name}`"
        ) from exc
    if damaged or mismatch:
        raise CollectionError(
            f"the index in {name} is damaged or not its own ({mismatch or '; '.join(damaged)}): "
            f"run `indexer verify --repair {name}`"
        )
    try:
        with native_output_silenced():  # on-disk lists: FAISS printf()s the path it resolves
            index = faiss.read_index(str(paths.index / INDEX_FILE), faiss.IO_FLAG_ONDISK_SAME_DIR)
    except Exception as exc:
        raise CollectionError(f"the index in {name} is unreadable ({exc}): {fix}") from exc
    apply_params(index, meta.get("params") or {})
    return index, meta


@contextmanager
def native_output_silenced(fds: tuple[int, ...] = (1,)) -> Iterator[None]:
    """Send what native code prints to these fds (stdout: it would corrupt --json output) to
    /dev/null."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    libc.fflush(None)
    saved = [os.dup(fd) for fd in fds]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(devnull, fd)
        yield
    finally:
        libc.fflush(None)
        for fd, copy in zip(fds, saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def read_index_meta(root: Path) -> dict[str, Any] | None:
    path = CollectionPaths(root).index / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(read_regular_text(path))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None
