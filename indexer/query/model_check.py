"""The stored model checked against the stored vectors: sampled items embedded again, compared."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from indexer.collection.layout import CollectionPaths
from indexer.errors import CollectionError, InputError, ModelMismatchError
from indexer.model.runtime_choice import BOUND, PORTABLE, Choice, joined, recorded

if TYPE_CHECKING:
    from indexer.decode.preprocess import Preprocessor
    from indexer.model.runtime import Runtime
    from indexer.query.collection import Collection

log = logging.getLogger(__name__)

VERIFY_SAMPLE = 32  # stored items `indexer verify` embeds again
CHEAP_SAMPLE = 8  # ... an incremental build, or a service loading a version
RESERVE = 2  # rows sampled per item wanted: some may be gone or changed in their source
COLUMNS = ("key", "content_hash", "embedding")

Read = Callable[[str], "bytes | None"]


@dataclass(frozen=True)
class Stored:
    """A sampled row: its key, the sha256 of the bytes it was embedded from, its vector."""

    key: str
    content_hash: str | None
    vector: np.ndarray


@dataclass(frozen=True)
class ModelCheck:
    """What a check found: the runtime that embedded again, the sampled items it compared and
    those it skipped (gone, changed or undecodable in their source), the lowest cosine to the
    stored vectors, the bound and the keys below it; `note` says why nothing was compared."""

    runtime: str
    checked: int
    skipped: int
    worst: float | None
    bound: float
    below: tuple[str, ...] = ()
    note: str | None = None

    @property
    def ok(self) -> bool:
        """Nothing below the bound (also when nothing could be compared: see note)."""
        return not self.below

    def summary(self) -> str:
        if self.note is not None or self.worst is None:
            return f"the model was not checked: {self.note}"
        verdict = "reproduces" if self.ok else "does not reproduce"
        return (
            f"the model ({self.runtime}) {verdict} the stored vectors: lowest cosine "
            f"{self.worst:.5f} over {self.checked} sampled items (bound {self.bound:.4f})"
            + (f", {len(self.below)} below it" if self.below else "")
        )


def check_model(
    version: Path,
    manifest: dict[str, Any],
    runtime: Runtime | None = None,
    read: Read | None = None,
    sample: int = VERIFY_SAMPLE,
) -> ModelCheck:
    """Embed `sample` stored items of a version again, read from their sources (items.py) and
    prepared by the build's rules, with runtime (default: the version's portable model on the
    collection's runtime and precision), and compare each with its stored vector. Returns
    what was found; it raises only where the model cannot be loaded or a shard read."""
    if manifest.get("model") is None:
        return unchecked("the collection holds vectors indexed from Parquet, with no model")
    if runtime is None and "portable_model" not in manifest:
        return unchecked("the collection has no portable model")
    rows = stored_sample(version, manifest, sample * RESERVE)
    if not rows:
        return unchecked("the collection holds no rows")
    if runtime is None:
        runtime = stored_model(version, manifest)
    if read is None:
        from indexer.query.stored_items import ItemReader

        read = ItemReader(manifest).read
    return compare(rows, runtime, read, manifest, sample)


def check_collection(collection: Collection, sample: int = CHEAP_SAMPLE) -> ModelCheck:
    """For a service loading a version: the runtime its queries embed with
    (collection.embedder) checked on `sample` stored items. Raises ModelMismatchError (a
    CollectionError) when it does not reproduce them; returns the check otherwise (its note
    says when no item could be read from the sources, so nothing was compared)."""
    manifest = collection.manifest
    if manifest.get("model") is None:
        return unchecked("the collection holds vectors indexed from Parquet, with no model")
    from indexer.query.stored_items import ItemReader

    read = ItemReader(manifest, collection.storage_options).read
    found = check_model(collection.version, manifest, collection.embedder, read, sample)
    return refuse_unless_reproduced(found, collection.root)


def refuse_unless_reproduced(found: ModelCheck, root: Path) -> ModelCheck:
    """The check, or ModelMismatchError saying what to do when the model failed it."""
    if found.ok:
        return found
    raise ModelMismatchError(
        f"the model of {root} ({found.runtime}) does not reproduce its stored vectors: "
        f"{len(found.below)} of {found.checked} sampled items below cosine {found.bound:.4f} "
        f"(lowest {found.worst:.4f}), so it is not the model that made them: run "
        f"`indexer verify --repair {root}` to export it again from the recipe"
    )


def unchecked(note: str) -> ModelCheck:
    return ModelCheck("none", 0, 0, None, 1.0, note=note)


def stored_model(version: Path, manifest: dict[str, Any]) -> Runtime:
    """The version's portable model (its sha256 checked) on the collection's own runtime where
    that runs it and is installed here, else another portable one, at the precision a query
    embeds in (runtime.query_precision)."""
    from indexer.model.portable import load_portable
    from indexer.model.runtime import query_precision
    from indexer.model.runtime_choice import this_machine

    built, machine = recorded(manifest), this_machine(cuda=False)
    order = ((built.runtime,) if built is not None else ()) + PORTABLE
    backend = next((r for r in order if r in PORTABLE and r in machine.installed), None)
    if backend is None:
        raise InputError("neither onnxruntime nor openvino is installed here to run the "
                         "collection's model: pip install onnxruntime")  # fmt: skip
    return load_portable(version, manifest, backend, query_precision(backend, built, machine))


def compare(
    rows: list[Stored], runtime: Runtime, read: Read, manifest: dict[str, Any], sample: int
) -> ModelCheck:
    """The first `sample` rows whose items still hold their bytes, embedded again and compared
    with their stored vectors (cosine each, against `bound`)."""
    from indexer.query.collection import preprocessor

    precision = str(runtime.recipe.get("precision") or "fp32")
    label = f"{runtime.name} {precision}"
    limit = bound(recorded(manifest), Choice(runtime.name, precision))
    kept, pixels, tried = readable(rows, read, preprocessor(manifest, runtime.data_config), sample)
    if not kept:
        return ModelCheck(label, 0, tried, None, limit, note=(
            f"none of the {tried} sampled items could be read from the sources as they were "
            "embedded (moved, changed or unreadable)"))  # fmt: skip
    cosines = cosine(runtime.embed(np.stack(pixels)), np.stack([r.vector for r in kept]))
    below = tuple(r.key for r, c in zip(kept, cosines.tolist(), strict=True) if not c >= limit)
    worst = float(np.nan_to_num(cosines, nan=-1.0).min())  # NaN: no vector at all
    return ModelCheck(label, len(kept), tried - len(kept), worst, limit, below)


def bound(stored: Choice | None, checked: Choice) -> float:
    """The lowest cosine an item embedded again may have to its stored vector: the precision's
    bound (decide.BOUND) when the collection's own runtime and precision embed it again, else
    both bounds' angles added (each computation is within its bound of torch fp32)."""
    own = BOUND.get(checked.precision, BOUND["bf16"])
    if stored is None or stored == checked:
        return own
    return joined(own, BOUND.get(stored.precision, BOUND["bf16"]))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (n, dim) arrays (NaN where a row is zero or not finite)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def readable(
    rows: list[Stored], read: Read, preprocess: Preprocessor, sample: int
) -> tuple[list[Stored], list[np.ndarray], int]:
    """The first `sample` rows whose items still hold the bytes they were embedded from (their
    sha256), decoded and prepared; their pixels; and how many rows were tried."""
    from indexer.decode.images import DecodeError

    kept: list[Stored] = []
    pixels: list[np.ndarray] = []
    tried = 0
    for row in rows:
        if len(kept) == sample:
            break
        tried += 1
        data = read(row.key)
        if data is None or (row.content_hash and hashlib.sha256(data).hexdigest()
                            != row.content_hash):  # fmt: skip
            continue
        try:
            pixels.append(preprocess(data).pixels)
        except (OSError, DecodeError, ValueError, TypeError):
            continue
        kept.append(row)
    return kept, pixels, tried


def stored_sample(version: Path, manifest: dict[str, Any], count: int) -> list[Stored]:
    """Up to count rows with their vectors, spread over the first row groups of the version's
    shards in their order: deterministic, and at most a few row groups read at any size."""
    rows: list[Stored] = []
    for path in CollectionPaths(version).shard_paths(manifest):
        for table in row_groups(path):
            rows += [stored_row(table, n) for n in spread(table.num_rows, count - len(rows))]
            if len(rows) >= count:
                return rows
    return rows


def spread(rows: int, count: int) -> list[int]:
    """count row numbers spread evenly over rows (all of them when fewer), every other one
    first: the first half alone is as evenly spread (the rest stand in for items gone)."""
    if count >= rows:
        return list(range(rows))
    picks = [n * rows // count for n in range(max(count, 0))]
    return picks[::2] + picks[1::2]


def row_groups(path: Path) -> Iterator[pa.Table]:
    """A shard's row groups in order (key, content hash, vector), page checksums verified."""
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path, page_checksum_verification=True) as f:
            columns = [c for c in COLUMNS if c in f.schema_arrow.names]
            for group in range(f.num_row_groups):
                yield f.read_row_group(group, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise CollectionError(
            f"shard {path} is damaged or unreadable ({exc}): run `indexer verify --repair` on "
            "its collection"
        ) from exc


def stored_row(table: pa.Table, n: int) -> Stored:
    digest = table.column("content_hash")[n].as_py() if "content_hash" in table.column_names \
        else None  # fmt: skip
    vector = np.asarray(table.column("embedding")[n].as_py(), np.float32)
    return Stored(str(table.column("key")[n].as_py()), digest, vector)


def distrusted(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its portable model record marked as not this file's, so a run treats
    the file as damaged: torch embeds, and exports the model again from the recipe."""
    record = {**manifest["portable_model"], "sha256": "not the model that made the vectors"}
    return {**manifest, "portable_model": record}
