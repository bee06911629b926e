"""`indexer index`: a collection indexed again, parts merged, or Parquet embeddings indexed."""

from __future__ import annotations

from pathlib import Path

import click

from indexer.cli.common import run_library
from indexer.cli.describe import below_target, describe_index
from indexer.cli.options import index_options, keep_option, with_options
from indexer.config import (
    METRICS,
    IndexOverrides,
)

INDEX_COMMAND_OPTIONS = (
    click.option(
        "--from-parquet",
        is_flag=True,
        help="Index embeddings made elsewhere: the arguments are Parquet files or folders of them.",
    ),
    click.option(
        "--out", type=click.Path(path_type=Path), help="Collection to create (--from-parquet)."
    ),
    click.option(
        "--embedding-column", default="embedding", show_default=True, help="List of floats."
    ),
    click.option("--key-column", default="key", show_default=True, help="Unique string or int."),
    click.option(
        "--normalize", is_flag=True, help="L2-normalise the vectors on the way in (--from-parquet)."
    ),
    click.option(
        "--metric",
        type=click.Choice(METRICS),
        default="ip",
        show_default=True,
        help="Index metric (--from-parquet; a collection keeps its own).",
    ),
    click.option(
        "--shard-size",
        default=50_000,
        show_default=True,
        type=click.IntRange(1, 2**31 - 1),
        help="Rows per Parquet shard (--from-parquet).",
    ),
    index_options(defaults=False),
    click.option(
        "--rebuild-index",
        is_flag=True,
        help="Build the index from scratch instead of updating the previous version's.",
    ),
    keep_option,
)


@click.command(name="index")
@click.argument("paths", metavar="DIR | PARQUET...", nargs=-1, type=click.Path(path_type=Path))
@with_options(*INDEX_COMMAND_OPTIONS)
def index_cmd(
    paths: tuple[Path, ...],
    from_parquet: bool,
    out: Path | None,
    embedding_column: str,
    key_column: str,
    normalize: bool,
    metric: str,
    shard_size: int,
    index_type: str | None,
    max_index_memory: str | None,
    target_recall: float | None,
    rebuild_index: bool,
    keep: int,
) -> None:
    """Index collection DIR again, as a new version; or, with --from-parquet, make (or update,
    by key) a collection of embeddings made elsewhere and index it. The previous version's
    index is updated when few vectors changed, else rebuilt; the index's meta.json says which.

    \b
    Examples:
      indexer index photos.idx --index-type hnsw
      indexer index --from-parquet embeddings/ --out vectors.idx --key-column path
    """
    from indexer.index.index_type import parse_index_flags

    _, memory = run_library(lambda: parse_index_flags(index_type, max_index_memory))
    overrides = IndexOverrides(index_type, memory, target_recall, rebuild_index)
    if from_parquet:
        from indexer.build.from_parquet import ExternalConfig, index_parquet, recorded_index

        if not paths or out is None:
            raise click.UsageError("--from-parquet needs Parquet files or folders, and --out DIR")
        recorded = recorded_index(out)  # a re-run keeps the settings it was indexed with
        source = click.get_current_context().get_parameter_source("metric")
        if recorded and source is not click.core.ParameterSource.COMMANDLINE:
            metric = str(recorded.get("metric") or metric)
        cfg = ExternalConfig(paths, out, embedding_column, key_column, normalize, shard_size,
                             overrides.resolve(metric, recorded), keep)  # fmt: skip
        meta = run_library(lambda: index_parquet(cfg))
        where = out
    else:
        if len(paths) != 1 or out is not None:
            raise click.UsageError(
                "give one collection DIR (or --from-parquet PARQUET... --out DIR)"
            )
        from indexer.build.partitions import merge, merge_needed
        from indexer.build.pipeline import reindex
        from indexer.collection.layout import PARTS

        root = paths[0]
        parted = (root / PARTS).is_dir() and any((root / PARTS).iterdir())
        if parted and run_library(lambda: merge_needed(root)):  # assemble new parts, index
            meta = run_library(lambda: merge(root, keep, overrides))
        else:
            meta = run_library(lambda: reindex(root, keep, overrides))
        where = root
    click.echo(f"Indexed {where}: {describe_index(meta)}.")
    if meta.get("target_met") is False:
        click.echo(f"Warning: {below_target(meta)}", err=True)
