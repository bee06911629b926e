"""The built-in demo behind `make run`: generate a small varied corpus, build it, query it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from indexer.build.pipeline import BuildReport, build
from indexer.config import BuildConfig, LoaderConfig, ModelConfig, SourceSpec
from indexer.errors import WeightsUnavailableError
from indexer.query.collection import Collection, Hit
from indexer.synthetic import near_duplicate, scene, write_corpus


@dataclass(frozen=True)
class DemoResult:
    images: Path
    report: BuildReport
    queries: list[Path]
    hits: list[list[Hit]]
    fallback: str | None  # why pretrained weights were not used, if they were not


def run_demo(out: Path, count: int = 300, progress: bool | None = None) -> DemoResult:
    """Build a collection over generated scenes and query it with two unseen near-duplicates."""
    images = out / "images"
    if not (images / "near-duplicates").is_dir():
        write_corpus(images, count, duplicates=max(4, count // 10), seed=7)
    cfg = BuildConfig(
        sources=(SourceSpec(str(images)),),
        out=out / "collection",
        model=ModelConfig(pretrained=True),
        loader=LoaderConfig(progress=progress),
        rebuild=True,
    )
    fallback = None
    try:
        report = build(cfg)
    except WeightsUnavailableError as exc:
        fallback = str(exc)
        report = build(replace(cfg, model=replace(cfg.model, pretrained=False)))
    queries = write_queries(out / "queries", seed=7)
    collection = Collection(cfg.out)
    hits = collection.hits(collection.embed_files(queries), k=5)
    return DemoResult(images, report, queries, hits, fallback)


def write_queries(folder: Path, seed: int) -> list[Path]:
    """Near-duplicates of two corpus scenes that are not themselves in the collection."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i, kind in ((2, "crop"), (3, "reencode")):
        path = folder / f"scene{i:04d}-{kind}-query.jpg"
        near_duplicate(scene(seed * 100_003 + i), kind, seed=99).save(path, quality=90)
        made.append(path)
    return made
