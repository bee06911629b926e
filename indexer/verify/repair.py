"""Repair what verify found, under the lock: the index rebuilt, damaged items embedded again."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from indexer.build.partitions import part_of
from indexer.collection.layout import open_version, parse_manifest
from indexer.config import (
    DEFAULT_MAX_PIXELS,
    BuildConfig,
    IndexOverrides,
    LoaderConfig,
    ModelConfig,
    StorageOptions,
)
from indexer.errors import IndexerError, InputError
from indexer.index.faiss_index import read_index_meta
from indexer.model.runtime import export_from_recipe
from indexer.safeio import os_errors_as
from indexer.sources import source_spec
from indexer.verify.check import Report, verify


def repair(
    root: Path,
    keep: int,
    before_lock: Callable[[], None] | None = None,
    storage_options: StorageOptions = (),
) -> str:
    """Under the lock from the start: check the published version again, then publish one
    version with every item (the index rebuilt; damaged shards' items embedded or copied
    again). If it cannot finish, nothing is published and the damage stays reported."""
    from indexer.collection.lock import CollectionLock

    if before_lock is not None:
        before_lock()  # tests: a build may publish here, between the caller's check and ours
    with os_errors_as(f"repairing {root}"), CollectionLock(root, "repair"):
        report = verify(root, storage_options)  # what is published now, not what the caller saw
        if not report.problems:
            return f"{root} needs no repair now: its published version is whole."
        try:
            return repair_locked(report, keep, storage_options)
        except IndexerError as exc:
            raise type(exc)(f"nothing was repaired and the damage remains: {exc}") from exc


def repair_locked(report: Report, keep: int, storage_options: StorageOptions = ()) -> str:
    """Repair what report found, holding the lock: one version published, or none."""
    from indexer.build.pipeline import build_unlocked, reindex_unlocked

    manifest = parse_manifest(report.version)
    if {p.part for p in report.problems} & {"shards"}:
        again = ("`indexer index --from-parquet PARQUET... --out DIR`" if manifest["model"] is None
                 else "`indexer build ... --rebuild`")  # fmt: skip
        raise InputError(
            f"{report.root}'s shards disagree with each other or the manifest: rebuild it with "
            f"{again}"
        )
    bad = frozenset(p.name for p in report.problems if p.part == "shard")
    if bad and manifest["model"] is None:
        from indexer.build.from_parquet import index_parquet_unlocked

        index_parquet_unlocked(external_config(report.root, manifest, keep))
        return f"Copied the vectors of {report.root} again from its Parquet files and indexed them."
    if not bad:
        cfg = IndexOverrides().resolve(manifest["metric"], read_index_meta(report.version))
        model = any(p.part == "model" for p in report.problems)
        remake = partial(export_from_recipe, manifest["model"]) if model else None
        reindex_unlocked(report.root, report.version, manifest, cfg, keep, reexport=remake)
        return f"Rebuilt the index of {report.root} from its shards" + (
            " and exported its model again." if model else "."
        )
    rebuild = build_config(report.root, manifest, keep, storage_options)
    build_unlocked(replace(rebuild, drop_shards=bad))
    return (
        f"Embedded the items of {len(bad)} damaged shard(s) of {report.root} again and "
        "published them with the rest as one version."
    )


def build_config(
    root: Path, manifest: dict[str, Any], keep: int, storage_options: StorageOptions = ()
) -> BuildConfig:
    """The `indexer build` that made this collection, from what its manifest recorded (and
    the storage options given now)."""
    asked, weights = manifest["request"], manifest["model"]["weights"]
    sources = tuple(source_spec(s, storage_options) for s in manifest["sources"])
    decode = manifest["decode"]
    model = ModelConfig(
        name=asked["model"],
        pretrained=weights["kind"] == "pretrained",
        checkpoint=Path(weights["path"]) if weights["kind"] == "checkpoint" else None,
        seed=int(weights.get("seed") or 0),
        normalize=asked["normalize"],
        precision=asked["precision"],
        pooling=asked.get("pooling", "head"),
        feature_stage=asked.get("feature_stage"),
        labels=int(asked.get("labels") or 0),
    )
    loader = LoaderConfig(
        preprocessing=asked["preprocessing"],
        progress=False,
        max_pixels=int(decode.get("max_pixels") or DEFAULT_MAX_PIXELS),
        allow_truncated=bool(decode.get("allow_truncated")),
    )
    index = IndexOverrides().resolve(asked["metric"], read_index_meta(open_version(root)))
    return BuildConfig(sources, root, model, loader, index, keep=keep, partition=part_of(root))


def external_config(root: Path, manifest: dict[str, Any], keep: int) -> Any:
    """The `indexer index --from-parquet` that made this collection, from its manifest; the
    recorded files must still hold what was copied (their sha256), or repair is refused."""
    from indexer.build.from_parquet import ExternalConfig, recorded_checksums

    asked, sources = manifest["request"], manifest["sources"]
    expect = recorded_checksums(root, sources)
    paths = tuple(Path(s["path"]) for s in sources)
    index = IndexOverrides().resolve(manifest["metric"], read_index_meta(open_version(root)))
    return ExternalConfig(paths, root, asked["embedding_column"], asked["key_column"],
                          asked["normalize"], index=index, keep=keep, expect=expect)  # fmt: skip
