"""`indexer query` and `indexer dedup`: nearest neighbours and near-duplicate groups, printed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from indexer.cli.options import parse_pairs, storage_option, with_options
from indexer.jsontext import json_text

if TYPE_CHECKING:
    from indexer.query.collection import QueryResult
from indexer.cli.common import run_library
from indexer.cli.describe import format_hits
from indexer.cli.options import device_option, runtime_option

QUERY_OPTIONS = (
    click.option(
        "--index",
        "root",
        required=True,
        type=click.Path(path_type=Path),
        help="Collection directory made by `indexer build`.",
    ),
    click.option(
        "--id", "ids", multiple=True, help="Query with a stored item, by key (repeatable)."
    ),
    click.option(
        "-k", default=10, show_default=True, type=click.IntRange(1), help="Results per query."
    ),
    click.option(
        "--threshold", type=float, help="Keep results with score >= T (ip) or distance <= T (l2)."
    ),
    click.option(
        "--where",
        multiple=True,
        help="Keep results whose row satisfies this: COL=VALUE, COL!=VALUE, COL<N, COL>N (<=, >=) "
        "on any shard column; label=NAME for the top predicted label. Repeat to AND them.",
    ),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON document."),
    click.option("--jsonl", is_flag=True, help="Print one JSON line per query."),
    click.option(
        "--paths-only",
        is_flag=True,
        help="Print each result's absolute path, one a line (items of datasets and tar shards have "
        "no file of their own: their key).",
    ),
    click.option(
        "--grid",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Also draw a PNG: each query beside its results, labelled with rank, score and key.",
    ),
    device_option,
    runtime_option,
    click.option(
        "--nprobe", type=click.IntRange(1), help="IVF lists to scan (default: the tuned value)."
    ),
    click.option("--ef", type=click.IntRange(1), help="HNSW efSearch (default: the tuned value)."),
    storage_option,
)


@click.command()
@click.argument("images", nargs=-1)
@with_options(*QUERY_OPTIONS)
def query(
    images: tuple[str, ...],
    root: Path,
    ids: tuple[str, ...],
    k: int,
    threshold: float | None,
    where: tuple[str, ...],
    as_json: bool,
    jsonl: bool,
    paths_only: bool,
    grid: Path | None,
    device: str,
    runtime: str,
    nprobe: int | None,
    ef: int | None,
    storage_options: tuple[str, ...],
) -> None:
    """Find the K nearest items to each IMAGE (files, folders or glob patterns) or stored item.

    The images are embedded with the recipe recorded in the collection's manifest; `--id KEY`
    uses the stored vector, without embedding. The index answers with the search parameters
    tuned when it was built (see `indexer info`).

    \b
    Examples:
      indexer query beach.jpg --index photos.idx -k 5
      indexer query 'new/*.jpg' --index photos.idx --jsonl
      indexer query --id holidays/IMG_0042.jpg --index photos.idx --paths-only | xargs open
    """
    if sum((as_json, jsonl, paths_only)) > 1:
        raise click.UsageError("choose one of --json, --jsonl and --paths-only")
    from indexer.query.collection import Collection, expand_images

    params = {name: v for name, v in (("nprobe", nprobe), ("efSearch", ef)) if v is not None}

    def run() -> tuple[Collection, list[QueryResult]]:
        from indexer.safeio import check_writable

        if grid is not None:
            check_writable(grid, "--grid")  # refused before the work, not after it
        options = parse_pairs(storage_options, "--storage-option")
        collection = Collection(root, device, params, runtime, strict_params=True,
                                storage_options=options)  # fmt: skip
        files = expand_images(list(images))
        return collection, collection.query(files, list(ids), k, threshold, list(where))

    collection, results = run_library(run)
    if not (as_json or jsonl or paths_only):  # for a program: the results alone
        note_random_weights(collection.manifest)
    if grid is not None:
        from indexer.query.contact_sheet import Cell, draw_sheet, wrapped

        rows = [
            [Cell(r.path or collection.image_of(r.name), wrapped("query", r.name))]
            + [Cell(collection.image_of(h.key), (f"#{h.rank}  score {h.score:.3f}", h.key))
               for h in r.hits]
            for r in results
        ]  # fmt: skip
        run_library(lambda: draw_sheet(rows, grid))
        click.echo(f"Wrote the contact sheet to {grid}.", err=True)
    if as_json:
        click.echo(json_text([r.to_dict() for r in results], indent=2))
    elif jsonl:
        for r in results:
            click.echo(json_text(r.to_dict()))
    elif paths_only:
        for r in results:
            for h in r.hits:
                click.echo(str(collection.path_of(h.key) or h.key))
    else:
        for r in results:
            click.echo(format_hits(r.name, r.hits))


@click.command()
@click.argument("root", metavar="DIR", type=click.Path(path_type=Path))
@click.option(
    "--threshold",
    default=0.95,
    show_default=True,
    type=float,
    help="Near-duplicates: score >= T (ip; cosine when normalised) or distance <= T (l2). "
    "0.95 suits pretrained weights (near-identical pictures: crops, re-encodes, small edits); "
    "with random weights (--no-pretrained) unrelated pictures score 0.98 and more, so no "
    "threshold separates duplicates from the rest.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Parquet file of the groups: group, key, score.",
)
@click.option(
    "-k", default=10, show_default=True, type=click.IntRange(2), help="Neighbours per item."
)
@click.option(
    "--grid",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also draw a PNG of the largest groups.",
)
@storage_option
def dedup(
    root: Path,
    threshold: float,
    out: Path,
    k: int,
    grid: Path | None,
    storage_options: tuple[str, ...],
) -> None:
    """Find groups of near-duplicate items in DIR with its index (a self k-NN join)."""
    from indexer.query.collection import Collection
    from indexer.query.dedup import find_duplicates, write_groups

    def run() -> tuple[Collection, Any]:
        from indexer.safeio import check_writable

        check_writable(out, "--out")  # refused before the work, not after it
        if grid is not None:
            check_writable(grid, "--grid")
        options = parse_pairs(storage_options, "--storage-option")
        collection = Collection(root, storage_options=options)
        return collection, find_duplicates(collection, threshold, k)

    collection, groups = run_library(run)
    note_random_weights(collection.manifest)
    run_library(lambda: write_groups(groups, out))
    sizes = [len(g) for g in groups.members]
    click.echo(
        f"{len(sizes)} group(s) of near-duplicates, {groups.items} items"
        + (f" (largest {sizes[0]})" if sizes else "")
        + f", threshold {threshold:g}: written to {out}."
    )
    if grid is not None:
        from indexer.query.contact_sheet import Cell, draw_sheet

        rows = [
            [
                Cell(collection.image_of(key), (f"group {n}  score {s:.3f}", key))
                for key, s in members[:8]
            ]
            for n, members in enumerate(groups.members[:12])
        ]
        run_library(lambda: draw_sheet(rows, grid))
        click.echo(f"Wrote the contact sheet of the largest groups to {grid}.", err=True)


def note_random_weights(manifest: dict[str, Any]) -> None:
    """One line on stderr where results come from a model with random weights."""
    from indexer.collection.layout import RANDOM_WEIGHTS, random_weights

    if random_weights(manifest):
        click.echo(f"Note: {RANDOM_WEIGHTS}.", err=True)
