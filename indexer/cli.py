"""The click command group: flags -> config -> library; typed errors -> messages and exit codes."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from indexer import __version__
from indexer.config import (
    DEFAULT_MODEL,
    METRICS,
    PRECISIONS,
    BuildConfig,
    IndexConfig,
    LoaderConfig,
    ModelConfig,
    SourceSpec,
)
from indexer.errors import (
    CollectionError,
    CollectionLockedError,
    IndexerError,
    InputError,
    ModelError,
    TooManyFailuresError,
)

if TYPE_CHECKING:
    from indexer.pipeline import BuildReport
    from indexer.search import Hit

EXIT_PARTIAL = 5  # the build finished; some items failed, within the failure budget
EXIT_CODES: tuple[tuple[type[IndexerError], int], ...] = (
    (InputError, 2),
    (CollectionError, 3),
    (ModelError, 4),
    (TooManyFailuresError, 6),
    (CollectionLockedError, 75),  # EX_TEMPFAIL: another run holds the collection; try later
    (IndexerError, 1),
)


def exit_code(exc: IndexerError) -> int:
    return next(code for cls, code in EXIT_CODES if isinstance(exc, cls))


def run_library(fn: Callable[[], Any]) -> Any:
    """Call into the library; a typed error becomes one line on stderr and its exit code."""
    try:
        return fn()
    except IndexerError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exit_code(exc))
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


def entry() -> None:
    """The console script: run the command, flush, and exit without interpreter teardown.

    With torch and timm loaded, Python's shutdown takes about a second; every file has been
    written, closed and renamed by the time a command returns, so nothing is lost by skipping it.
    """
    try:
        main()
        code: int = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            click.echo(str(exc.code), err=True)
            code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 1
    os._exit(code)


keep_option = click.option(
    "--keep",
    default=2,
    show_default=True,
    type=click.IntRange(1),
    help="Published versions to keep (at least 2 while queries run); older ones are deleted.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="indexer")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
def main(verbose: bool) -> None:
    """Turn image folders and Hugging Face datasets into searchable embedding indexes."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Collection directory.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Any timm model name.")
@click.option(
    "--pretrained/--no-pretrained",
    default=True,
    show_default=True,
    help="Use timm's pretrained weights (fetched from the hub), or random ones.",
)
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Local weights (.safetensors, .pth, .bin); overrides --pretrained.",
)
@click.option("--seed", default=0, show_default=True, help="Seed for --no-pretrained weights.")
@click.option(
    "--normalize/--no-normalize",
    default=True,
    show_default=True,
    help="L2-normalise embeddings (cosine similarity with --metric ip).",
)
@click.option(
    "--metric",
    type=click.Choice(METRICS),
    default="ip",
    show_default=True,
    help="Index metric: inner product or L2 distance.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Model arithmetic; default auto: bf16 on CUDA and CPUs with native bf16 "
    "(fp32 with --exact-preprocessing).",
)
@click.option(
    "--exact-preprocessing",
    is_flag=True,
    help="Reproduce timm's transform pixel for pixel (no JPEG draft), in fp32.",
)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option(
    "--workers",
    default=2,
    show_default=True,
    type=click.IntRange(0),
    help="DataLoader worker processes decoding images.",
)
@click.option(
    "--shard-size",
    default=50_000,
    show_default=True,
    type=click.IntRange(1),
    help="Rows per Parquet shard.",
)
@click.option("--split", help="Dataset split for hf: sources (default: the only one, or train).")
@click.option("--image-column", help="Image column for hf: sources (default: the only one).")
@click.option("--dry-run", is_flag=True, help="Print what a build would do; change nothing.")
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Read again the items that failed before, even if their files did not change.",
)
@click.option(
    "--rebuild",
    is_flag=True,
    help="Re-embed everything (needed after changing the model, weights or "
    "preprocessing); by default a build updates an existing collection incrementally.",
)
@click.option(
    "--max-failures",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0),
    help="Failure budget: a count (>= 1) or a fraction of the items (< 1). Within it "
    "a run with failures exits 5 (partial); over it, 6.",
)
@keep_option
@click.option(
    "--metrics-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write Prometheus textfile metrics of the run here (node_exporter).",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a tty).")
def build(
    sources: tuple[str, ...],
    out: Path,
    model: str,
    pretrained: bool,
    checkpoint: Path | None,
    seed: int,
    normalize: bool,
    metric: str,
    device: str,
    precision: str | None,
    exact_preprocessing: bool,
    batch_size: int,
    workers: int,
    shard_size: int,
    split: str | None,
    image_column: str | None,
    dry_run: bool,
    retry_failed: bool,
    rebuild: bool,
    max_failures: float,
    keep: int,
    metrics_file: Path | None,
    progress: bool | None,
) -> None:
    """Embed SOURCES (folders, or hf:DATASET) into a collection at --out and index it.

    \b
    Example:
      indexer build ~/photos --out ~/photos.idx
      indexer build hf:./my_dataset --split test --out ds.idx
    """
    cfg = BuildConfig(
        sources=tuple(SourceSpec(s, split, image_column) for s in sources),
        out=out,
        model=ModelConfig(
            name=model,
            pretrained=pretrained,
            checkpoint=checkpoint,
            seed=seed,
            normalize=normalize,
            device=device,
            precision=precision or ("fp32" if exact_preprocessing else "auto"),
        ),
        loader=LoaderConfig(
            batch_size=batch_size,
            workers=workers,
            preprocessing="exact" if exact_preprocessing else "fast",
            progress=progress,
        ),
        index=IndexConfig(metric=metric),
        shard_size=shard_size,
        rebuild=rebuild,
        retry_failed=retry_failed,
        max_failures=max_failures,
        keep=keep,
        metrics_file=metrics_file,
    )
    from indexer.pipeline import build as run_build
    from indexer.plan import dry_run as plan_only

    if dry_run:
        plan = run_library(lambda: plan_only(cfg))
        eta = plan["estimated_seconds"]
        click.echo(
            f"Dry run for {out}: {plan['listed']} listed; {plan['to_check']} to read "
            f"(new or changed), {plan['unchanged']} unchanged, {plan['deleted']} to delete, "
            f"{plan['failed_unchanged']} unchanged failures; estimated "
            f"{'unknown (no earlier run)' if eta is None else f'{eta}s of embedding'}. "
            "Nothing was changed."
        )
        return
    report = run_library(lambda: run_build(cfg))
    click.echo(summarize(report))
    if report.status == "partial":
        sys.exit(EXIT_PARTIAL)


@main.command(name="run")
@click.argument("job", type=click.Path(path_type=Path, dir_okay=False))
@click.pass_context
def run_job(ctx: click.Context, job: Path) -> None:
    """Run the build described by a JOB file (TOML; see jobs/README.md).

    A job file holds `indexer build` settings under their flag names (sources, out, model,
    batch_size, max_failures, ...): the same settings, written down, checked the same way.
    """
    from indexer.config import read_job

    settings = run_library(lambda: read_job(job))
    argv = run_library(lambda: job_argv(settings, job))
    try:
        sub = build.make_context("build", argv, parent=ctx)
    except click.ClickException as exc:
        click.echo(f"Error: job file {job}: {exc.format_message()}", err=True)
        sys.exit(2)
    with sub:
        build.invoke(sub)


def job_argv(settings: dict[str, Any], job: Path) -> list[str]:
    """The `indexer build` command line a job file's settings stand for."""
    options: list[str] = []
    arguments: list[str] = []
    left = dict(settings)
    for param in build.params:
        if param.name not in left:
            continue
        value = left.pop(param.name)
        if isinstance(param, click.Argument):
            arguments += [str(v) for v in (value if isinstance(value, list) else [value])]
        elif isinstance(param, click.Option) and param.is_flag:
            if not isinstance(value, bool):
                raise InputError(f"job file {job}: setting '{param.name}' must be true or false")
            if value or param.secondary_opts:
                options.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            options += [param.opts[0], str(value)]
    if left:
        known = ", ".join(p.name or "" for p in build.params)
        raise InputError(f"job file {job} has unknown setting(s) {sorted(left)}; known: {known}")
    return [*options, "--", *arguments]


def summarize(report: BuildReport) -> str:
    c = report.counts
    if report.index is None:
        return (
            f"Nothing changed in {report.root}: {c['unchanged']} items unchanged "
            f"(version {report.version} stays), {report.seconds:.1f}s."
        )
    done = c["new"] + c["changed"]
    rate = done / report.seconds if report.seconds else 0.0
    text = (
        f"Built {report.root}: {report.rows} embedded, {c['failed']} failed "
        f"({c['new']} new, {c['changed']} changed, {c['unchanged']} unchanged, "
        f"{c['deleted']} deleted), version {report.version}, {report.shards} shard(s), "
        f"{report.seconds:.1f}s ({rate:.1f} images/s)."
    )
    if c["failed"]:
        text += f" Failures are listed in {report.root / 'errors.parquet'}."
    recall = report.index.get("recall_at_k")
    if recall is not None:
        text += f" Index: {report.index['type']}, recall@{report.index['recall_k']} {recall:.3f}."
    return text


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--index",
    "root",
    required=True,
    type=click.Path(path_type=Path),
    help="Collection directory made by `indexer build`.",
)
@click.option(
    "-k", default=10, show_default=True, type=click.IntRange(1), help="Results per image."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def query(images: tuple[Path, ...], root: Path, k: int, as_json: bool, device: str) -> None:
    """Find the K nearest items of the collection to each IMAGE.

    The images are embedded with the recipe recorded in the collection's manifest.
    """
    from indexer.search import Searcher

    def run() -> list[list[Hit]]:
        searcher = Searcher(root, device)
        return searcher.search(searcher.embed_files(list(images)), k)

    results = run_library(run)
    if as_json:
        doc = [
            {"query": str(img), "results": [h.to_dict() for h in hits]}
            for img, hits in zip(images, results, strict=True)
        ]
        click.echo(json.dumps(doc, indent=2, default=str))
        return
    for img, hits in zip(images, results, strict=True):
        click.echo(format_hits(str(img), hits))


def format_hits(query_name: str, hits: list[Hit]) -> str:
    lines = [f"query: {query_name}", f"{'rank':>4}  {'score':>7}  key"]
    lines += [f"{h.rank:>4}  {h.score:>7.4f}  {h.key}" for h in hits]
    return "\n".join(lines) + "\n"


@main.command()
@click.argument("root", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and index metadata.")
def info(root: Path, as_json: bool) -> None:
    """Describe the collection at DIR: model, weights, counts, shards, index and last runs."""
    from indexer.catalog import open_version, read_manifest
    from indexer.history import read_runs
    from indexer.index import read_index_meta

    version = run_library(lambda: open_version(root))
    manifest = run_library(lambda: read_manifest(version))
    index_meta = read_index_meta(version)
    runs = read_runs(root)
    if as_json:
        doc = {"manifest": manifest, "index": index_meta, "runs": runs}
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(describe(root, manifest, index_meta))
    click.echo(describe_runs(runs))


def describe_runs(runs: list[dict[str, Any]]) -> str:
    lines = ["last runs:" if runs else "last runs:   none recorded"]
    for run in reversed(runs):
        c = run.get("counts") or {}
        lines.append(
            f"  {run['started']}  {run['command']:<6} {run['status']:<8} {run['seconds']:>8.1f}s  "
            f"listed {c.get('listed', '-')}, new {c.get('new', '-')}, "
            f"failed {c.get('failed', '-')}" + (f"  ({run['error']})" if run.get("error") else "")
        )
    return "\n".join(lines)


def describe(root: Path, manifest: dict[str, Any], index_meta: dict[str, Any] | None) -> str:
    m, counts, dc = manifest["model"], manifest["counts"], manifest["model"]["data_config"]
    weights = m["weights"]
    ident = {
        "pretrained": weights.get("tag"),
        "checkpoint": weights.get("path"),
        "random": f"seed {weights.get('seed')}",
    }.get(weights["kind"])
    lines = [
        f"collection:  {root} (version {manifest.get('version')})",
        f"created:     {manifest.get('created_at')} (indexer {manifest.get('indexer_version')})",
        f"model:       {m['name']} (timm {m['timm_version']}, torch {m['torch_version']}, "
        f"{m['precision']})",
        f"weights:     {weights['kind']}: {ident}",
        f"embedding:   {manifest['embedding_dim']}-d, "
        f"{'L2-normalised' if manifest['normalized'] else 'raw'}, metric {manifest['metric']}",
        f"preprocess:  {dc['input_size'][1]}x{dc['input_size'][2]} {dc['interpolation']}, "
        f"crop_pct {dc['crop_pct']} ({dc['crop_mode']}), mean {dc['mean']}, std {dc['std']}, "
        f"{manifest['decode']['mode']} decoding",
        "sources:     " + ", ".join(_source_name(s) for s in manifest["sources"]),
        f"items:       {counts['items']} "
        f"({counts['embedded']} embedded, {counts['failed']} failed)",
        f"shards:      {len(manifest['shards'])}",
    ]
    if index_meta is None:
        lines.append(f"index:       missing: run `indexer index {root}`")
    else:
        recall = index_meta.get("recall_at_k")
        lines.append(
            f"index:       {index_meta['type']} ({index_meta['factory']}), "
            f"{index_meta['ntotal']} vectors, built in {index_meta['build_seconds']}s, "
            f"recall@{index_meta['recall_k']} "
            f"{'n/a' if recall is None else f'{recall:.3f}'}"
        )
    return "\n".join(lines)


def _source_name(source: dict[str, Any]) -> str:
    if source["kind"] == "hf":
        return f"hf:{source['name']} [{source['split']}] ({source['rows']} rows)"
    return str(source["path"])


@main.command(name="index")
@click.argument("root", metavar="DIR", type=click.Path(path_type=Path))
@keep_option
def index_cmd(root: Path, keep: int) -> None:
    """Rebuild the FAISS index of DIR from its shards alone, as a new version."""
    from indexer.pipeline import reindex

    meta = run_library(lambda: reindex(root, keep))
    click.echo(
        f"Indexed {root}: {meta['ntotal']} vectors, {meta['type']}, "
        f"{meta['build_seconds']}s, recall@{meta['recall_k']} {meta['recall_at_k']}."
    )


@main.command()
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
    from indexer.demo import run_demo

    result = run_library(lambda: run_demo(out, count))
    if result.fallback:
        click.echo(f"Pretrained weights unavailable ({result.fallback}); using --no-pretrained.")
    click.echo(summarize(result.report))
    for query_path, hits in zip(result.queries, result.hits, strict=True):
        click.echo(format_hits(str(query_path), hits))
