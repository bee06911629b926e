"""What a build must do: the listing compared with the published version, before any model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from indexer.build.partitions import in_partition
from indexer.collection.history import read_runs
from indexer.collection.layout import (
    CURRENT,
    ERRORS,
    CollectionPaths,
    check_build_dir,
    check_shard_files,
    open_version,
    parse_manifest,
)
from indexer.collection.shards import read_hashes, read_parquet, read_shard, shard_columns
from indexer.config import BuildConfig, file_sha256
from indexer.errors import CollectionError, InputError
from indexer.model.runtime_choice import check_asked, recorded
from indexer.sources import Item, Source, list_items, open_sources

PREV_COLUMNS = ["id", "key", "source", "file_size", "mtime_ns", "content_hash"]


@dataclass(frozen=True)
class PrevRow:
    """A row of the published version, as far as planning needs it."""

    id: int
    source: str
    fingerprint: Any  # (size, mtime_ns), with the ETag for a stored object; None: neither
    content_hash: str


@dataclass
class Plan:
    """keep: unchanged items (position -> id). check: positions to read, hash and maybe embed."""

    keep: dict[int, int] = field(default_factory=dict)
    check: list[int] = field(default_factory=list)
    ids: dict[int, int] = field(default_factory=dict)  # every listed position -> its id
    known: set[int] = field(default_factory=set)  # positions whose key is in the published version
    deleted: int = 0
    next_id: int = 0  # the next local number; a new row's id is next_id * stride + offset
    kept_errors: list[dict[str, Any]] = field(default_factory=list)  # unchanged failed files
    stride: int = 1  # part I of N: ids I, I+N, I+2N, ... (unique across the merged parts)
    offset: int = 0
    retained: set[int] = field(default_factory=set)  # ids kept though not listed (a repair)

    def kept_ids(self) -> set[int]:
        """Ids of the published rows the new version carries over."""
        return set(self.keep.values()) | self.retained

    @property
    def nothing_to_do(self) -> bool:
        return not self.check and not self.deleted


def read_prev_rows(version: Path, manifest: dict[str, Any]) -> dict[str, PrevRow]:
    """key -> PrevRow for every row of the published version (no embeddings are read)."""
    rows: dict[str, PrevRow] = {}
    for shard in manifest["shards"]:
        path = version / "shards" / shard["name"]
        etags = "etag" in shard_columns(path)  # a bucket's objects: size, mtime and ETag
        table = read_shard(path, PREV_COLUMNS + (["etag"] if etags else []))
        for r in table.to_pylist():
            size, mtime = r["file_size"], r["mtime_ns"]
            fingerprint: Any = (size, mtime) if size is not None and mtime is not None else None
            if fingerprint is not None and r.get("etag") is not None:
                fingerprint = (size, mtime, r["etag"])
            rows[r["key"]] = PrevRow(r["id"], r["source"], fingerprint, r["content_hash"])
    return rows


def damaged_keys(folder: Path, shards: list[dict[str, Any]]) -> dict[str, int] | None:
    """key -> id of the damaged shards' rows, read from those two columns alone (their pages'
    checksums verified, every row there); None when any of them cannot be read whole."""
    found: dict[str, int] = {}
    for shard in shards:
        try:
            table = read_parquet(folder / "shards" / shard["name"], ["key", "id"])
        except Exception:  # pyarrow raises several types for a damaged file
            return None
        if table.num_rows != int(shard["rows"]):
            return None
        found.update(zip(table.column("key").to_pylist(), table.column("id").to_pylist(),
                         strict=True))  # fmt: skip
    return found


def check_prev_ids(
    rows: dict[str, PrevRow], manifest: dict[str, Any], cfg: BuildConfig, folder: Path
) -> None:
    """The published ids must be unique and below next_id (times N for part I of N), or new
    rows would take ids already in use: refuse, naming verify."""
    ids = [row.id for row in rows.values()]
    stride = cfg.partition[1] if cfg.partition else 1
    bound = int(manifest.get("next_id", max(ids, default=-1) + 1)) * stride
    if len(set(ids)) != len(ids) or any(i < 0 or i >= bound for i in ids):
        raise CollectionError(
            f"the ids in {folder} repeat or are not below its next_id ({bound}): the collection "
            "was tampered with; run `indexer verify` on it, and rebuild with --rebuild"
        )


def unchanged_datasets(sources: list[Source], manifest: dict[str, Any]) -> set[str]:
    """Labels of dataset sources whose fingerprint equals the one the version was built from."""
    before = {
        (s.get("label"), s.get("name"), s.get("split")): s.get("fingerprint")
        for s in manifest["sources"]
        if s.get("kind") == "hf"
    }
    same = set()
    for source in sources:
        d = source.describe()
        if (
            d["kind"] == "hf"
            and before.get((d["label"], d["name"], d["split"])) == d["fingerprint"]
        ):
            same.add(source.label)
    return same


def read_prev_errors(version: Path) -> dict[str, dict[str, Any]]:
    """key -> error row of the published version's errors table."""
    path = version / ERRORS
    if not path.is_file():
        return {}
    return {row["key"]: row for row in read_parquet(path).to_pylist()}


def make_plan(
    items: list[Item],
    sources: list[Source],
    prev: dict[str, PrevRow],
    same_datasets: set[str],
    next_id: int,
    prev_errors: dict[str, dict[str, Any]] | None = None,
    partition: tuple[int, int] | None = None,
) -> Plan:
    """Unchanged: same key, source and (size, mtime), or a row of an unchanged dataset.

    A file that failed before and has not changed since stays failed without being read
    again, unless ``prev_errors`` is None (--retry-failed).
    """
    offset, stride = partition or (0, 1)
    plan = Plan(next_id=next_id, stride=stride, offset=offset)
    listed = set()
    for position, item in enumerate(items):
        listed.add(item.key)
        label = sources[item.source].label
        row = prev.get(item.key)
        failed = (prev_errors or {}).get(item.key)
        if row is None and failed is not None and failed["source"] == label:
            was: tuple[Any, ...] = (failed.get("file_size"), failed.get("mtime_ns"))
            if failed.get("etag") is not None:  # a stored object's: its ETag too
                was = (*was, failed["etag"])
            unchanged_row = item.fingerprint is None and label in same_datasets
            if unchanged_row or (item.fingerprint is not None and item.fingerprint == was):
                plan.kept_errors.append(failed)  # failed, and unchanged since: not retried
                continue
        if row is None or row.source != label:
            if row is not None:
                plan.deleted += 1  # the same key from another source: the old row goes
            plan.ids[position] = plan.next_id * plan.stride + plan.offset
            plan.next_id += 1
            plan.check.append(position)
            continue
        plan.ids[position] = row.id
        plan.known.add(position)
        same_file = item.fingerprint is not None and item.fingerprint == row.fingerprint
        if same_file or (item.fingerprint is None and label in same_datasets):
            plan.keep[position] = row.id
        else:
            plan.check.append(position)
    plan.deleted += sum(1 for key in prev if key not in listed)
    return plan


def make_repair_plan(
    items: list[Item],
    sources: list[Source],
    prev: dict[str, PrevRow],
    next_id: int,
    prev_errors: dict[str, dict[str, Any]],
    wanted: dict[str, int] | None = None,
    partition: tuple[int, int] | None = None,
) -> Plan:
    """A repair keeps every intact row as it is (listed or not, changed or not) and embeds
    the damaged shards' items: exactly those `wanted` keys, each with its old id, when they
    could be read (each must be listed, else InputError); otherwise every listed item no
    intact row or recorded failure holds (items added since included), with new ids."""
    offset, stride = partition or (0, 1)
    plan = Plan(next_id=next_id, stride=stride, offset=offset,
                retained={row.id for row in prev.values()})  # fmt: skip
    for position, item in enumerate(items):
        row, failed = prev.get(item.key), prev_errors.get(item.key)
        if row is not None:
            plan.keep[position] = plan.ids[position] = row.id
            plan.known.add(position)
        elif failed is not None and failed["source"] == sources[item.source].label:
            plan.kept_errors.append(failed)
        elif wanted is not None and item.key in wanted:
            plan.ids[position] = wanted[item.key]  # ids stay with their keys
            plan.check.append(position)
        elif wanted is None:
            plan.ids[position] = plan.next_id * plan.stride + plan.offset
            plan.next_id += 1
            plan.check.append(position)
    missing = sorted(set(wanted or ()) - {items[p].key for p in plan.check})
    if missing:
        raise InputError(
            f"{len(missing)} item(s) of the damaged shards are no longer in the sources (e.g. "
            f"{missing[0]!r}): restore them and repair again, or rebuild with --rebuild"
        )
    return plan


REQUEST_DEFAULTS: dict[str, Any] = {"pooling": "head", "feature_stage": None, "labels": 0}


def request(cfg: BuildConfig) -> dict[str, Any]:
    """The recipe the user asked for, comparable without loading the model."""
    m = cfg.model
    if m.checkpoint is not None:
        if not m.checkpoint.is_file():
            raise InputError(f"checkpoint {m.checkpoint} does not exist: check the path")
        weights: dict[str, Any] = {"kind": "checkpoint", "sha256": file_sha256(m.checkpoint)}
    elif m.pretrained:
        weights = {"kind": "pretrained"}
    else:
        weights = {"kind": "random", "seed": m.seed}
    return {
        "model": m.name,
        "weights": weights,
        "normalize": m.normalize,
        "precision": m.precision,
        "pooling": m.pooling,
        "feature_stage": m.feature_stage,
        "labels": m.labels,
        "preprocessing": cfg.loader.preprocessing,
        "metric": cfg.index.metric,
    }


def check_request(asked: dict[str, Any], manifest: dict[str, Any], root: Path) -> None:
    """Refuse to mix recipes in one collection (the precision apart: decide.check_asked
    compares it with the one the collection's first build decided)."""
    built = manifest.get("request")
    if built is not None:  # settings added since a collection was built take their defaults
        built = {**REQUEST_DEFAULTS, **built, "precision": asked.get("precision")}
    if built == asked:
        return
    if manifest.get("model") is None:
        raise InputError(
            f"{root} holds vectors indexed from Parquet (`indexer index --from-parquet`), "
            "not images: build into another --out"
        )
    diff = sorted(k for k in asked if built is None or built.get(k) != asked.get(k))
    raise InputError(
        f"{root} was built with a different {', '.join(diff) or 'recipe'} "
        f"(built: {_show(built, diff)}; asked: {_show(asked, diff)}): pass --rebuild to "
        "re-embed everything with the new settings, or choose another --out"
    )


def _show(request: dict[str, Any] | None, keys: list[str]) -> str:
    if request is None:
        return "unknown"
    return ", ".join(f"{k}={request.get(k)}" for k in keys)


@dataclass(frozen=True)
class PublishedVersion:
    """The published version a build updates (empty for a first build or --rebuild)."""

    folder: Path | None
    manifest: dict[str, Any] | None
    rows: dict[str, PrevRow]
    salvaged: list[Path] = field(default_factory=list)  # shards a killed run finished
    lost: int = 0  # a repair: rows of the damaged shards left out, to be embedded again
    lost_keys: dict[str, int] | None = None  # their keys and ids, where those pages are whole

    def stored_shards(self) -> list[Path]:
        """Every shard whose vectors may be reused: the published ones, then salvaged ones."""
        published = []
        if self.folder is not None and self.manifest is not None:
            published = CollectionPaths(self.folder).shard_paths(self.manifest)
        return published + self.salvaged

    def errors(self) -> dict[str, dict[str, Any]]:
        return read_prev_errors(self.folder) if self.folder is not None else {}

    def known_hashes(self) -> frozenset[str]:
        salvaged = {h for path in self.salvaged for h in read_hashes(path)}
        return frozenset({r.content_hash for r in self.rows.values()} | salvaged)

    @classmethod
    def of(cls, cfg: BuildConfig, sources: list[Source], asked: dict[str, Any]) -> PublishedVersion:
        if cfg.rebuild or not (cfg.out / CURRENT).exists():
            return cls(None, None, {})
        folder = open_version(cfg.out)
        manifest = parse_manifest(folder)
        lost, lost_keys = 0, None
        if cfg.drop_shards:  # repair: their rows count as never embedded
            dropped = [s for s in manifest["shards"] if s["name"] in cfg.drop_shards]
            lost = sum(int(s["rows"]) for s in dropped)
            lost_keys = damaged_keys(folder, dropped)
            manifest = {**manifest, "shards": [s for s in manifest["shards"] if s not in dropped]}
        check_shard_files(folder, manifest)
        check_request(asked, manifest, cfg.out)
        built = recorded(manifest)
        if built is not None:
            check_asked(cfg.model.runtime, cfg.model.precision, built, cfg.out)
        rows = read_prev_rows(folder, manifest)
        check_prev_ids(rows, manifest, cfg, folder)
        return cls(folder, manifest, rows, lost=lost, lost_keys=lost_keys)

    def next_id(self) -> int:
        if self.manifest is None:
            return 0
        return int(
            self.manifest.get("next_id", max((r.id for r in self.rows.values()), default=-1) + 1)
        )


@dataclass(frozen=True)
class Planned:
    sources: list[Source]
    items: list[Item]
    asked: dict[str, Any]
    prev: PublishedVersion
    plan: Plan


def plan_build(cfg: BuildConfig, listings: Mapping[str, dict[str, Any]] | None = None) -> Planned:
    """list -> plan: what a build would do, reading only listings and the published version
    (`listings`: object-store prefixes' listings made already, by the SOURCE given)."""
    sources = open_sources(cfg.sources, cfg.loader.max_pixels, listings)
    items = list_items(sources)
    check_unique_keys(items, sources)
    if not items:
        raise InputError("the sources hold no images: check the paths (hidden files are skipped)")
    if cfg.partition is not None:
        items = [item for item in items if in_partition(item.key, cfg.partition)]
        if not items:
            raise InputError(f"part {cfg.partition[0]}/{cfg.partition[1]} holds no items")
    check_build_dir(cfg.out)
    asked = request(cfg)
    prev = PublishedVersion.of(cfg, sources, asked)
    same = unchanged_datasets(sources, prev.manifest) if prev.manifest else set()
    prev_errors = None if cfg.retry_failed else prev.errors()
    if cfg.drop_shards:
        plan = make_repair_plan(items, sources, prev.rows, prev.next_id(), prev.errors(),
                                prev.lost_keys, cfg.partition)  # fmt: skip
    else:
        plan = make_plan(items, sources, prev.rows, same, prev.next_id(), prev_errors,
                         cfg.partition)  # fmt: skip
    return Planned(sources, items, asked, prev, plan)


def check_unique_keys(items: list[Item], sources: list[Source]) -> None:
    """Refuse, before any work, a listing in which two items share a key (naming both)."""
    seen: dict[str, Item] = {}
    for item in items:
        first = seen.setdefault(item.key, item)
        if first is not item:
            where = [f"{sources[i.source].describe().get('path') or sources[i.source].label}"
                     f" ({i.locator})" for i in (first, item)]  # fmt: skip
            raise InputError(
                f"two items have the key {item.key!r}: {where[0]} and {where[1]}; rename one, "
                "or give the sources distinct folder names"
            )


def dry_run(cfg: BuildConfig) -> dict[str, Any]:
    """The plan's counts and a time estimate from the last runs; nothing is changed."""
    planned = plan_build(cfg)
    plan = planned.plan
    rates = [r["images_per_second"] for r in read_runs(cfg.out, 20) if r.get("images_per_second")]
    rate, basis = (rates[-1], "runs") if rates else (timed_rate_here(cfg), "timing")
    estimate = len(plan.check) / rate if rate and plan.check else None
    return {
        "listed": len(planned.items),
        "to_check": len(plan.check),
        "unchanged": len(plan.keep),
        "deleted": plan.deleted,
        "failed_unchanged": len(plan.kept_errors),
        "estimated_seconds": None if estimate is None else round(estimate, 1),
        "estimated_from": None if estimate is None else basis,
        "rebuild": planned.prev.manifest is None,
    }


def timed_rate_here(cfg: BuildConfig) -> float | None:
    """What this machine timed for this model and runtime request before (a first build of
    any collection records it): images/s of the model alone, or None."""
    from indexer.model.known_export import request_identity
    from indexer.model.runtime_choice import cache_key, timed_rate

    key = cache_key(request_identity(cfg.model), cfg.model.runtime, cfg.model.precision)
    return None if key is None else timed_rate(key)
