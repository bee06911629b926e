"""The built-in demo behind `make run`: generate a small varied corpus, build it, query it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from indexer.config import (
    BuildConfig,
    LoaderConfig,
    ModelConfig,
    SourceSpec,
)
from indexer.errors import (
    WeightsUnavailableError,
)
from indexer.synthetic import near_duplicate, scene, write_corpus

if TYPE_CHECKING:
    from indexer.build.new_version import BuildReport
    from indexer.query.collection import Hit
from indexer.cli.common import run_library
from indexer.cli.describe import format_hits, summarize


@dataclass(frozen=True)
class DemoResult:
    images: Path
    report: BuildReport
    queries: list[Path]
    hits: list[list[Hit]]
    fallback: str | None  # why pretrained weights were not used, if they were not


def run_demo(out: Path, count: int = 300, progress: bool | None = None) -> DemoResult:
    """Build a collection over generated scenes and query it with two unseen near-duplicates."""
    from indexer.build.pipeline import build
    from indexer.query.collection import Collection

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


@click.command()
@click.option(
    "--out",
    default="build/demo",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Where the demo images and collection go.",
)
@click.option(
    "--images",
    "count",
    default=300,
    show_default=True,
    type=click.IntRange(8),
    help="How many scenes to generate.",
)
def demo(out: Path, count: int) -> None:
    """Generate a small image collection, build it, and query it with near-duplicates."""
    from indexer.cli.demo import run_demo

    result = run_library(lambda: run_demo(out, count))
    if result.fallback:
        click.echo(f"Pretrained weights unavailable ({result.fallback}); using --no-pretrained.")
    click.echo(summarize(result.report))
    for query_path, hits in zip(result.queries, result.hits, strict=True):
        click.echo(format_hits(str(query_path), hits))
