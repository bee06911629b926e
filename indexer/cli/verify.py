"""`indexer verify [--repair]`: a collection checked against its manifest, and repaired."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from indexer.cli.common import run_library
from indexer.cli.options import keep_option, parse_pairs, storage_option


@click.command()
@click.argument("root", metavar="DIR", type=click.Path(path_type=Path))
@click.option(
    "--repair",
    is_flag=True,
    help="Rebuild what is damaged: the index, or the items of damaged shards (embedded again).",
)
@keep_option
@storage_option
def verify(root: Path, repair: bool, keep: int, storage_options: tuple[str, ...]) -> None:
    """Check the collection at DIR against its manifest: every shard's checksum, rows and ids,
    the index's checksums and ids, and that its model embeds a sample of items (read from the
    sources) as their stored vectors. Exit 0 when whole, 3 when damaged."""
    from indexer.verify.check import verify as check
    from indexer.verify.repair import repair as repair_collection

    options = parse_pairs(storage_options, "--storage-option")
    report = run_library(lambda: check(root, options))
    if not report.problems:
        click.echo(f"{root} is whole: {report.shards} shard(s), {report.rows} rows, and the index.")
        click.echo("".join(f"  {note}\n" for note in report.notes), nl=False)
        return
    click.echo(f"{root} is damaged ({report.version.name}):")
    for problem in report.problems:
        click.echo(f"  {problem}")
    if not repair:
        click.echo(f"Run `indexer verify --repair {root}` to rebuild what is damaged.", err=True)
        sys.exit(3)
    click.echo(run_library(lambda: repair_collection(root, keep, storage_options=options)))
    after = run_library(lambda: check(root, options))
    if after.problems:
        click.echo(f"Still damaged: {'; '.join(map(str, after.problems))}", err=True)
        sys.exit(3)
    click.echo(f"{root} is whole again: {after.shards} shard(s), {after.rows} rows, and the index.")
    click.echo("".join(f"  {note}\n" for note in after.notes), nl=False)
