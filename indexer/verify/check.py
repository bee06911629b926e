"""Check a collection against its manifest (checksums, rows, ids, index); repair the damage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.build.partitions import part_of
from indexer.collection.layout import SHARDS, CollectionPaths, open_version, parse_manifest
from indexer.collection.shards import read_parquet
from indexer.config import (
    StorageOptions,
    file_sha256,
)
from indexer.errors import InputError
from indexer.index.faiss_index import INDEX_FILE, check_index_files, index_mismatch, read_index_meta


@dataclass(frozen=True)
class Problem:
    part: str  # shard, shards, index, model
    name: str
    detail: str

    def __str__(self) -> str:
        where = f"{self.part} {self.name}" if self.name else self.part
        return f"{where}: {self.detail}"


@dataclass(frozen=True)
class Report:
    root: Path
    version: Path
    shards: int
    rows: int
    problems: list[Problem]
    notes: tuple[str, ...] = ()  # what was checked beyond the problems (the model's check)


def verify(root: Path, storage_options: StorageOptions = ()) -> Report:
    """Every shard against its recorded checksum and row count, ids unique and below next_id,
    the index against its checksums, its size, its record of the shards and their ids, and
    the portable model against a sample of the stored vectors (modelcheck.py; items read from
    their sources with ``storage_options``)."""
    version = open_version(root)
    manifest = parse_manifest(version)
    shards, dim = manifest["shards"], int(manifest["embedding_dim"])
    problems: list[Problem] = []
    ids: list[np.ndarray] = []
    for shard in shards:
        problems += check_shard(version / SHARDS, shard, dim, ids)
    every = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    problems += check_ids(every, id_bound(root, manifest))
    embedded = int(manifest["counts"]["embedded"])
    if not any(p.part == "shard" for p in problems) and len(every) != embedded:
        problems.append(Problem("shards", "", f"{len(every)} rows, the manifest says {embedded}"))
    if not any(p.part == "shard" for p in problems) and part_of(root) is None:
        problems += check_index(version, manifest, every)  # a part is indexed when merged
    problems += check_portable(version, manifest)
    notes: list[str] = []
    if not any(p.part in ("shard", "shards", "model") for p in problems):
        problems += check_reproduces(version, manifest, notes, storage_options)
    return Report(root, version, len(shards), len(every), problems, tuple(notes))


def check_portable(version: Path, manifest: dict[str, Any]) -> list[Problem]:
    """The portable model file, when the manifest records one: present, its recorded bytes."""
    record = manifest.get("portable_model")
    if record is None:
        return []
    from indexer.errors import CollectionError
    from indexer.model.portable import read_model

    try:
        read_model(version, record)
    except CollectionError:
        path = version / str(record["path"])
        state = (
            "a symbolic link" if path.is_symlink()
            else "its bytes differ from the recorded checksum" if path.is_file()
            else "not a regular file" if path.exists() else "missing"
        )  # fmt: skip
        return [Problem("model", str(record["path"]), f"{state} (damaged)")]
    return []


def check_reproduces(
    version: Path, manifest: dict[str, Any], notes: list[str], storage_options: StorageOptions = ()
) -> list[Problem]:
    """The portable model, run on the collection's runtime and precision, embeds a sample of
    stored items (read from their sources) as their stored vectors (modelcheck.py); what it
    found goes into notes, a model that does not reproduce them is a problem."""
    if manifest.get("model") is None or "portable_model" not in manifest:
        return []
    from indexer.errors import CollectionError
    from indexer.query.model_check import check_model

    name = str(manifest["portable_model"]["path"])
    try:
        from indexer.query.stored_items import ItemReader

        found = check_model(version, manifest, read=ItemReader(manifest, storage_options).read)
    except CollectionError as exc:  # the runtime cannot load the file
        return [Problem("model", name, f"cannot be run ({exc})")]
    except InputError as exc:  # no portable runtime installed here
        notes.append(f"the model was not checked: {exc}")
        return []
    notes.append(found.summary())
    if found.ok:
        return []
    return [Problem("model", name, f"does not reproduce the stored vectors ({len(found.below)} "
                                   f"of {found.checked} sampled items below cosine "
                                   f"{found.bound:.4f}, lowest {found.worst:.4f}): not the model "
                                   "that made them")]  # fmt: skip


def id_bound(root: Path, manifest: dict[str, Any]) -> int | None:
    """Every id is below this: next_id, times N for part I of N (ids I, I+N, ...)."""
    if "next_id" not in manifest:
        return None  # collections from before next_id was recorded
    part = part_of(root)
    return int(manifest["next_id"]) * (part[1] if part else 1)


def check_ids(ids: np.ndarray, bound: int | None) -> list[Problem]:
    """Ids unique, none negative, all below the bound (a small pure check)."""
    problems = []
    repeated = len(ids) - len(np.unique(ids))
    if repeated:
        problems.append(Problem("shards", "", f"{repeated} ids repeat"))
    if len(ids) and int(ids.min()) < 0:
        problems.append(Problem("shards", "", f"{int((ids < 0).sum())} ids are negative"))
    if bound is not None and len(ids) and int(ids.max()) >= bound:
        beyond = int((ids >= bound).sum())
        problems.append(Problem("shards", "", f"{beyond} ids are not below next_id ({bound})"))
    return problems


def check_shard(
    folder: Path, shard: dict[str, Any], dim: int, ids: list[np.ndarray]
) -> list[Problem]:
    """One shard: present, its checksum, readable (page checksums too), rows, vector size."""
    name = str(shard.get("name"))
    path = folder / name
    if not path.is_file():
        return [Problem("shard", name, "missing")]
    if shard.get("sha256") and file_sha256(path) != shard["sha256"]:
        return [Problem("shard", name, "its bytes differ from the recorded checksum (damaged)")]
    try:
        table = read_parquet(path, ["id", "embedding"])
    except Exception as exc:  # pyarrow raises several types for a broken file
        return [Problem("shard", name, f"unreadable ({type(exc).__name__}: {exc})")]
    if table.num_rows != int(shard.get("rows", -1)):
        said = shard.get("rows")
        return [Problem("shard", name, f"{table.num_rows} rows, the manifest says {said}")]
    emb = table.schema.field("embedding").type
    if getattr(emb, "list_size", None) != dim:
        return [Problem("shard", name, f"embeddings are {emb}, not {dim} floats")]
    ids.append(table.column("id").to_numpy())
    return []


def check_index(version: Path, manifest: dict[str, Any], shard_ids: np.ndarray) -> list[Problem]:
    import faiss

    from indexer.index.faiss_index import native_output_silenced

    folder = CollectionPaths(version).index
    meta = read_index_meta(version)
    if meta is None:
        return [Problem("index", "", "missing, or its meta.json is unreadable")]
    mismatch = index_mismatch(meta, manifest)
    if mismatch:
        return [Problem("index", "", mismatch)]
    recorded = meta.get("files") or {}
    damaged = check_index_files(folder, recorded, set(recorded))
    if damaged:
        return [Problem("index", "", "; ".join(damaged))]
    try:
        with native_output_silenced():
            index = faiss.read_index(str(folder / INDEX_FILE), faiss.IO_FLAG_ONDISK_SAME_DIR)
    except Exception as exc:
        return [Problem("index", "", f"unreadable ({exc})")]
    from indexer.index.update import kind_of

    said = KINDS.get(str(meta.get("type")))
    if said is not None and kind_of(index) != said:  # meta.json has no checksum of its own
        return [Problem("index", "", f"it is a {kind_of(index)} index, its metadata says "
                                     f"{meta.get('type')}")]  # fmt: skip
    stored = np.sort(index_ids(index))
    if len(stored) != len(shard_ids) or not np.array_equal(stored, np.sort(shard_ids)):
        missing = len(np.setdiff1d(shard_ids, stored))
        unknown = len(np.setdiff1d(stored, shard_ids))
        return [Problem("index", "", f"its ids differ from the shards' ({missing} shard rows "
                                     f"not in it, {unknown} ids not in the shards)")]  # fmt: skip
    return []


KINDS = {"flat": "flat", "ivf": "ivf", "ivfsq": "ivfsq", "hnsw": "IndexHNSWFlat"}


def index_ids(index: Any) -> np.ndarray:
    """Every id an index holds: an IVF's lists, or an id map's."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    lists: Any = ivf.invlists
    parts = [np.zeros(0, np.int64)]
    for number in range(ivf.nlist):
        size = lists.list_size(number)
        if size:
            pointer = lists.get_ids(number)
            parts.append(faiss.rev_swig_ptr(pointer, size).astype(np.int64))
            lists.release_ids(number, pointer)
    return np.concatenate(parts)
