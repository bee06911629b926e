"""Partitions for array jobs: which items part I of N takes, where it lives, and the merge."""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pyarrow as pa

from indexer.collection.layout import (
    CURRENT,
    ERRORS,
    PARTS,
    SHARDS,
    CollectionPaths,
    open_version,
    read_manifest,
    write_json_atomic,
)
from indexer.collection.shards import read_parquet, write_errors
from indexer.config import IndexOverrides
from indexer.errors import InputError
from indexer.model.portable import Exported
from indexer.model.runtime import with_portable

PART_NAME = re.compile(r"^(\d{5})-of-(\d{5})$")


def parse_partition(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; InputError otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise InputError(
            f"--partition {text!r} is not I/N with 0 <= I < N (e.g. 0/8 ... 7/8, as a Slurm "
            "array or Kubernetes Indexed Job index)"
        )
    return int(match.group(1)), int(match.group(2))


def in_partition(key: str, partition: tuple[int, int]) -> bool:
    """Whether a key belongs to part I of N: by a hash of the key alone, so the split is the
    same in every run and whatever order the items are listed in."""
    index, count = partition
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count == index


def part_of(folder: Path) -> tuple[int, int] | None:
    """(I, N) when folder is part I of N of a partitioned collection (DIR/parts/IIIII-of-NNNNN)."""
    match = PART_NAME.match(folder.name) if folder.parent.name == PARTS else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def part_dir(root: Path, partition: tuple[int, int]) -> Path:
    index, count = partition
    return root / PARTS / f"{index:05d}-of-{count:05d}"


def merge(root: Path, keep: int, overrides: IndexOverrides | None = None) -> dict[str, Any]:
    """One new version of root holding every part's shards (hard links) and errors; indexed.

    Holds root's lock and every part's, so no part changes while it is read."""
    from indexer.collection.lock import CollectionLock
    from indexer.collection.versions import clear_salvage, prune, publish, salvage, start_version
    from indexer.index.faiss_index import build_index, read_index_meta

    with ExitStack() as held:
        held.enter_context(CollectionLock(root, "merge"))
        parts = finished_parts(root)
        for part in parts:
            held.enter_context(CollectionLock(part, "merge"))
        versions = [open_version(p) for p in parts]
        manifests = [read_manifest(v) for v in versions]
        check_parts_agree(root, manifests)
        request = manifests[0].get("request", {})
        salvage(root, request)
        number, building = start_version(root, request)
        paths = CollectionPaths(building)
        paths.shards.mkdir()
        shards = _link_shards(versions, manifests, paths.shards)
        write_errors(paths.errors, *_errors(versions))
        manifest = _merged_manifest(manifests, shards, number, versions)
        manifest = with_portable(manifest, _merged_portable(versions, manifests, building))
        write_json_atomic(paths.manifest, manifest)
        recorded = read_index_meta(open_version(root)) if (root / CURRENT).exists() else None
        cfg = (overrides or IndexOverrides()).resolve(manifest["metric"], recorded)
        meta = build_index(building, manifest, cfg)
        publish(root, number, building)
        clear_salvage(root)  # what killed merges left: a merge links, never embeds
        prune(root, keep)
    return meta


def check_parts_agree(root: Path, manifests: list[dict[str, Any]]) -> None:
    """The parts must share one recipe and the same sources, else InputError naming the odd one."""
    for field, what in (("request", "settings"), ("sources", "sources")):
        first = _comparable(manifests[0], field)
        odd = next((n for n, m in enumerate(manifests) if _comparable(m, field) != first), None)
        if odd is not None:
            raise InputError(
                f"part {odd} of {root} was built with other {what} than part 0 ({field}: "
                f"{_comparable(manifests[odd], field)} vs {first}): build every part with the "
                "same `indexer build SOURCE... --partition I/N` command"
            )
    from indexer.model.runtime_choice import recorded

    built = [recorded(m) for m in manifests]
    odd = next((n for n, b in enumerate(built) if b != built[0]), None)
    if odd is not None:
        names = [b.label if b else "no model" for b in (built[odd], built[0])]
        raise InputError(
            f"part {odd} of {root} embeds with {names[0]}, part 0 with {names[1]} (each "
            "part's first build chose its own): build every part with the same --runtime "
            "and --precision, e.g. --runtime onnx --precision fp32"
        )


def _comparable(manifest: dict[str, Any], field: str) -> str:
    value = manifest.get(field)
    if field == "sources":  # what names the source, not what was listed in it this time
        value = [{k: v for k, v in s.items() if k not in ("rows", "fingerprint")}
                 for s in value or []]  # fmt: skip
    return json.dumps(value, sort_keys=True)


def merge_needed(root: Path) -> bool:
    """Whether `indexer index DIR` should merge DIR's parts (True) or re-index the published
    version (False: it already holds exactly these parts). InputError when the published
    version was built whole after the parts: merging them would bring old data back."""
    if not (root / CURRENT).exists():
        return True
    published = read_manifest(open_version(root))
    parts = finished_parts(root)
    stamps = [_part_stamp(p) for p in parts]
    if "part_versions" in published:
        return bool(published["part_versions"] != stamps)
    if all(str(s["created_at"]) > str(published.get("created_at")) for s in stamps):
        return True
    raise InputError(
        f"{root} was built whole after its parts in {root / PARTS} were: merging them would "
        f"bring back older data; remove {root / PARTS} (the parts are not needed), or rebuild "
        "every part (`indexer build ... --partition I/N --rebuild`) before merging"
    )


def _part_stamp(part: Path) -> dict[str, Any]:
    """What identifies a part's published version: its folder name and creation time."""
    version = open_version(part)
    return {"version": version.name, "created_at": read_manifest(version).get("created_at")}


def finished_parts(root: Path) -> list[Path]:
    """Every part of the same N, each with a published version; InputError naming the rest."""
    folder = root / PARTS
    found = {}
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = PART_NAME.match(entry.name)
        if match:
            found[(int(match.group(1)), int(match.group(2)))] = entry
    counts = {count for _, count in found}
    if len(counts) != 1:
        raise InputError(
            f"{folder} holds parts of {sorted(counts) or 'no'} partitionings: build every part "
            "with the same N (`indexer build ... --partition I/N`)"
        )
    count = counts.pop()
    missing = [i for i in range(count) if not (found.get((i, count), folder) / CURRENT).exists()]
    if missing:
        raise InputError(
            f"part(s) {', '.join(f'{i}/{count}' for i in missing[:5])} of {root} have not "
            f"finished: run `indexer build ... --partition I/{count}` for them, then merge"
        )
    return [found[(i, count)] for i in range(count)]


def _link_shards(
    versions: list[Path], manifests: list[dict[str, Any]], target: Path
) -> list[dict[str, Any]]:
    shards = []
    for number, (version, manifest) in enumerate(zip(versions, manifests, strict=True)):
        for shard in manifest["shards"]:
            name = f"p{number:05d}-{shard['name']}"
            os.link(version / SHARDS / shard["name"], target / name)
            shards.append({**shard, "name": name})
    return shards


def _merged_portable(
    versions: list[Path], manifests: list[dict[str, Any]], building: Path
) -> Exported:
    """The parts' portable model (one recipe, so one model): the first whole one, linked."""
    from indexer.model.runtime import carry_portable, export_from_recipe

    for version, manifest in zip(versions, manifests, strict=True):
        record = carry_portable(version, manifest, manifests[0]["model"], building)
        if record is not None:
            return Exported(record)
    if any("portable_model" in m for m in manifests):  # every part's file damaged
        return export_from_recipe(manifests[0]["model"], building)
    reasons = [m.get("portable_model_reason") for m in manifests]
    return Exported(None, next((r for r in reasons if r), "built before models were exported"))


def _errors(versions: list[Path]) -> tuple[list[dict[str, Any]], pa.Schema]:
    """The parts' error rows, and the columns they carry besides the contract's (a URL
    list's); older tables lack the contract's newer columns, which become null."""
    rows: list[dict[str, Any]] = []
    extra: list[pa.Field] = []
    for version in versions:
        path = version / ERRORS
        if path.is_file():
            table = read_parquet(path)
            rows += table.to_pylist()
            extra += [f for f in table.schema if f.name not in {e.name for e in extra}]
    return rows, pa.schema(extra)


def _merged_manifest(
    manifests: list[dict[str, Any]],
    shards: list[dict[str, Any]],
    number: int,
    versions: list[Path],
) -> dict[str, Any]:
    fields = ("items", "embedded", "failed")
    counts = {k: sum(int(m["counts"][k]) for m in manifests) for k in fields}
    # part I of N numbers its rows I, I+N, I+2N, ...: below its next local number times N
    next_id = max(int(m.get("next_id", 0)) for m in manifests) * len(manifests)
    return {
        **manifests[0],
        "shards": shards,
        "counts": counts,
        "version": number,
        "next_id": next_id,
        "parts": len(manifests),
        "part_versions": [
            {"version": v.name, "created_at": m.get("created_at")}
            for v, m in zip(versions, manifests, strict=True)
        ],
    }
