"""`indexer info`: a collection described (model, counts, index, last runs), or as JSON."""

from __future__ import annotations

from pathlib import Path

import click

from indexer.cli.common import run_library
from indexer.cli.describe import describe, describe_runs
from indexer.jsontext import json_text


@click.command()
@click.argument("root", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and index metadata.")
def info(root: Path, as_json: bool) -> None:
    """Describe the collection at DIR: model, weights, counts, shards, index and last runs."""
    from indexer.collection.history import read_runs
    from indexer.collection.layout import open_version, read_manifest
    from indexer.index.faiss_index import read_index_meta

    version = run_library(lambda: open_version(root))
    manifest = run_library(lambda: read_manifest(version))
    index_meta = read_index_meta(version)
    runs = read_runs(root)
    from indexer.collection.layout import CollectionPaths
    from indexer.collection.shards import top_labels

    labels = top_labels(CollectionPaths(version).shard_paths(manifest))
    if as_json:
        doc = {"manifest": manifest, "index": index_meta, "runs": runs, "top_labels": labels}
        click.echo(json_text(doc, indent=2))
        return
    click.echo(describe(root, manifest, index_meta))
    if labels:
        click.echo("labels:      " + ", ".join(f"{name} {count}" for name, count in labels))
    click.echo(describe_runs(runs))
