"""The click command group: flags -> config -> library; typed errors -> messages and exit codes."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from indexer.cli.options import parse_pairs, storage_option
from indexer.config import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MODEL,
    ENGINES,
    METRICS,
    POOLINGS,
    PRECISIONS,
    RUNTIMES,
    BuildConfig,
    EngineConfig,
    IndexConfig,
    IndexOverrides,
    LoaderConfig,
    ModelConfig,
    SourceSpec,
)
from indexer.errors import (
    CollectionError,
    CollectionLockedError,
    IndexerError,
    InputError,
    Interrupted,
    ModelError,
    TooManyFailuresError,
)
from indexer.jsontext import json_text
from indexer.version import __version__

if TYPE_CHECKING:
    from indexer.build.pipeline import BuildReport
    from indexer.query.collection import Hit, QueryResult

DECODE_HOOK_ENV = "INDEXER_TEST_DECODE_HOOK"  # module:function run before each decode (tests)
REPAIR_HOOK_ENV = "INDEXER_TEST_REPAIR_HOOK"  # module:function run before repair locks (tests)
EXIT_PARTIAL = 5  # the build finished; some items failed, within the failure budget
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended
EXIT_CODES: tuple[tuple[type[IndexerError], int], ...] = (
    (InputError, 2),
    (CollectionError, 3),
    (ModelError, 4),
    (TooManyFailuresError, 6),
    (CollectionLockedError, 75),  # EX_TEMPFAIL: another run holds the collection; try later
    (IndexerError, 1),
)


def load_hook(spec: str) -> Callable[[], None]:
    """A test hook named module:function."""
    import importlib

    module, _, name = spec.partition(":")
    hook: Callable[[], None] = getattr(importlib.import_module(module), name)
    return hook


def exit_code(exc: IndexerError) -> int:
    return next(code for cls, code in EXIT_CODES if isinstance(exc, cls))


def run_library(fn: Callable[[], Any]) -> Any:
    """Call into the library; a typed error becomes one line on stderr and its exit code."""
    try:
        return fn()
    except IndexerError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exit_code(exc))
    except Interrupted:
        click.echo("Terminated (SIGTERM): stopped cleanly; nothing half-written was published.",
                   err=True)  # fmt: skip
        sys.exit(EXIT_TERMINATED)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


def raise_interrupted(signum: int, frame: object) -> None:
    """SIGTERM (systemd, Kubernetes, timeout) unwinds like Ctrl-C: locks freed, run recorded."""
    raise Interrupted("terminated by SIGTERM")


def entry() -> None:
    """The console script: run the command, flush, and exit without interpreter teardown.

    With torch and timm loaded, Python's shutdown takes about a second; every file has been
    written, closed and renamed by the time a command returns, so nothing is lost by skipping it.
    """
    signal.signal(signal.SIGTERM, raise_interrupted)
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


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf (which compare false with every bound)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if number is not None and not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


keep_option = click.option(
    "--keep",
    default=2,
    show_default=True,
    type=click.IntRange(1),
    help="Published versions to keep (at least 2 while queries run); older ones are deleted.",
)


def index_options(defaults: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--index-type, --max-index-memory, --target-recall (defaults None: keep the recorded)."""
    keep = "" if defaults else " Default: what the collection was indexed with, else"

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn = click.option(
            "--target-recall",
            type=FiniteFloat(0, 1, min_open=True),
            default=0.95 if defaults else None,
            show_default=defaults,
            help="recall@10 the search parameter (nprobe, efSearch) is tuned to reach."
            + (f"{keep} 0.95." if not defaults else ""),
        )(fn)
        fn = click.option(
            "--max-index-memory",
            default="16G" if defaults else None,
            show_default=defaults,
            help="Memory the index may hold (e.g. 512M, 16G); beyond it the choice "
            "compresses vectors or keeps inverted lists on disk."
            + (f"{keep} 16G." if not defaults else ""),
        )(fn)
        return click.option(
            "--index-type",
            default="auto" if defaults else None,
            show_default=defaults,
            help="auto (by size and memory), flat (exact), ivf, ivfsq, hnsw, or a FAISS "
            "factory string such as IVF4096,SQ8." + (f"{keep} auto." if not defaults else ""),
        )(fn)

    return decorate


def index_config(
    metric: str, index_type: str, max_index_memory: str, target_recall: float
) -> IndexConfig:
    from indexer.index.index_type import parse_index_flags

    _, memory = run_library(lambda: parse_index_flags(index_type, max_index_memory))
    return IndexConfig(
        metric=metric, index_type=index_type, max_memory=memory, target_recall=target_recall
    )


device_option = click.option(
    "--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."
)
runtime_option = click.option(
    "--runtime",
    type=click.Choice(RUNTIMES),
    default="auto",
    show_default=True,
    help="What embeds images: torch, onnx (onnxruntime) or openvino (the exported model); "
    "auto: the collection's own (a first build times each on its first batch).",
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
@click.option(
    "--pooling",
    type=click.Choice(POOLINGS),
    default="head",
    show_default=True,
    help="head: the model's own pre-logits; avg, max or gem (generalised mean, p=3) over the "
    "last feature map (or --feature-stage's).",
)
@click.option(
    "--labels",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Store the classifier's top-K classes (index, name, probability) per item, from the "
    "same forward pass; needs a model with its classifier.",
)
@click.option(
    "--feature-stage",
    type=click.IntRange(0),
    help="Pool this stage's feature map (timm feature extraction) instead of the last one.",
)
@device_option
@runtime_option
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Model arithmetic, decided at a collection's first build: fp32, bf16 (CUDA or a CPU "
    "with AVX512-BF16/AMX), or auto (timed among those; fp32 with --exact-preprocessing).",
)
@click.option(
    "--exact-preprocessing",
    is_flag=True,
    help="Reproduce timm's transform pixel for pixel (no JPEG draft); fp32 unless "
    "--precision says otherwise.",
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
    "--decode",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "cpu", "gpu"]),
    help="Where JPEGs are decoded: gpu (nvJPEG, in batches; others on the CPU), cpu, or auto "
    "(gpu on CUDA only where this machine measured nvJPEG faster than the CPU path).",
)
@click.option(
    "--shard-size",
    default=50_000,
    show_default=True,
    type=click.IntRange(1),
    help="Rows per Parquet shard.",
)
@click.option(
    "--decode-timeout",
    default=60.0,
    show_default=True,
    type=FiniteFloat(0),
    help="Seconds one image may take to read and decode in a worker; past it (or if the "
    "decoder crashes) the image is recorded as failed and the run goes on. 0: no limit. "
    "Needs --workers >= 1.",
)
@click.option(
    "--max-image-pixels",
    default=DEFAULT_MAX_PIXELS,
    show_default=True,
    type=click.IntRange(1),
    help="Larger images (by their header) are recorded as failed, never decoded.",
)
@click.option(
    "--allow-truncated",
    is_flag=True,
    help="Embed truncated files with their missing part grey (default: a failure).",
)
@click.option(
    "--follow-symlinks",
    is_flag=True,
    help="Read symlinked files and folders that point outside the source folder "
    "(default: only links inside it are followed).",
)
@click.option("--split", help="Dataset split for hf: sources (default: the only one, or train).")
@click.option(
    "--image-column",
    help="Image column for hf: sources: an Image column or one of image bytes (default: the "
    "only one).",
)
@click.option(
    "--key-column",
    help="Column whose values are the keys, for hf: sources (default: key, else file_name, "
    "else the image files' paths, else SPLIT/ROW).",
)
@storage_option
@click.option(
    "--url-column",
    default="url",
    show_default=True,
    help="For a list file SOURCE (.parquet, .csv, .jsonl, .txt): the column of URLs or paths.",
)
@click.option(
    "--refetch",
    is_flag=True,
    help="For a list file SOURCE: fetch every row again (an image may change behind its URL; "
    "rows whose bytes did not change keep their vectors).",
)
@click.option(
    "--read-retries",
    type=click.IntRange(0, 20),
    default=3,
    show_default=True,
    help="For buckets and list files: tries again after a passing failure (503, 429, reset, "
    "timeout), with backoff; then the item is an error row.",
)
@click.option(
    "--read-concurrency",
    type=click.IntRange(1, 1024),
    default=64,
    show_default=True,
    help="Objects fetched at once by each decoding worker, for bucket sources.",
)
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
    type=FiniteFloat(0),
    help="Failure budget: a count (>= 1) or a fraction of the items (< 1). Within it "
    "a run with failures exits 5 (partial); over it, 6.",
)
@keep_option
@click.option(
    "--metrics-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write Prometheus textfile metrics of the run here (node_exporter).",
)
@index_options(defaults=True)
@click.option(
    "--partition",
    metavar="I/N",
    help="Build only part I of N (0 <= I < N, chosen by a hash of each key) into "
    "DIR/parts/; N such runs (an array job) then `indexer index DIR` merges and indexes them.",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="local",
    show_default=True,
    help="local: this machine's DataLoader; ray: Ray Data (pip install 'indexer[ray]').",
)
@click.option("--ray-address", help="Ray cluster to join (default: start a local Ray).")
@click.option(
    "--concurrency", type=click.IntRange(1), help="Ray: embedding actors, one model each."
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
    pooling: str,
    labels: int,
    feature_stage: int | None,
    device: str,
    runtime: str,
    precision: str | None,
    exact_preprocessing: bool,
    batch_size: int,
    workers: int,
    decode: str,
    shard_size: int,
    decode_timeout: float,
    max_image_pixels: int,
    allow_truncated: bool,
    follow_symlinks: bool,
    split: str | None,
    image_column: str | None,
    key_column: str | None,
    storage_options: tuple[str, ...],
    url_column: str,
    refetch: bool,
    read_retries: int,
    read_concurrency: int,
    dry_run: bool,
    retry_failed: bool,
    rebuild: bool,
    max_failures: float,
    keep: int,
    metrics_file: Path | None,
    index_type: str,
    max_index_memory: str,
    target_recall: float,
    partition: str | None,
    engine: str,
    ray_address: str | None,
    concurrency: int | None,
    progress: bool | None,
) -> None:
    """Embed SOURCES (folders, s3://, gs:// or az:// prefixes, or hf:DATASET) into a
    collection at --out and index it.

    \b
    Example:
      indexer build ~/photos --out ~/photos.idx
      indexer build s3://my-bucket/photos/ --out photos.idx
      indexer build hf:./my_dataset --split test --out ds.idx
    """
    from indexer.build.partitions import parse_partition

    cfg = BuildConfig(
        sources=tuple(
            SourceSpec(
                s,
                split,
                image_column,
                follow_symlinks,
                key_column,
                parse_pairs(storage_options, "--storage-option"),
                read_concurrency,
                url_column,
                refetch,
                read_retries,
            )
            for s in sources
        ),
        out=out,
        model=ModelConfig(
            name=model,
            pretrained=pretrained,
            checkpoint=checkpoint,
            seed=seed,
            normalize=normalize,
            device=device,
            precision=precision or ("fp32" if exact_preprocessing else "auto"),
            pooling=pooling,
            feature_stage=feature_stage,
            labels=labels,
            runtime=runtime,
        ),
        loader=LoaderConfig(
            batch_size=batch_size,
            workers=workers,
            preprocessing="exact" if exact_preprocessing else "fast",
            progress=progress,
            decode_timeout=decode_timeout,
            max_pixels=max_image_pixels,
            allow_truncated=allow_truncated,
            decode_hook=os.environ.get(DECODE_HOOK_ENV) or None,
            decode=decode,
        ),
        index=index_config(metric, index_type, max_index_memory, target_recall),
        shard_size=shard_size,
        rebuild=rebuild,
        retry_failed=retry_failed,
        max_failures=max_failures,
        keep=keep,
        metrics_file=metrics_file,
        partition=None if partition is None else run_library(lambda: parse_partition(partition)),
        engine=EngineConfig(engine, ray_address, concurrency),
    )
    from indexer.build.pipeline import build as run_build
    from indexer.build.plan import dry_run as plan_only

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
    """The `indexer build` command line a job file's settings stand for.

    Each value must have the TOML type of its flag (config.toml_kind of the click type): a list
    of strings for SOURCES, true or false for flags, integers, numbers or strings for the rest;
    click then checks the values themselves (ranges, choices) as it does the flags'.
    """
    from indexer.config import setting_text, toml_kind

    options: list[str] = []
    arguments: list[str] = []
    left = dict(settings)
    for param in build.params:
        if param.name not in left:
            continue
        value = left.pop(param.name)
        many = param.multiple or param.nargs != 1
        texts = setting_text(job, param.name, value, toml_kind(param.type), many)
        if isinstance(param, click.Argument):
            arguments += texts
        elif isinstance(param, click.Option) and param.is_flag:
            if value or param.secondary_opts:
                options.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            options += [item for text in texts for item in (param.opts[0], text)]
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
    if report.reindexed:
        return (
            f"No item changed in {report.root}; re-indexed with the new index settings as "
            f"version {report.version}: {describe_index(report.index)}."
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
        from indexer.build.failures import describe_reasons

        text += (
            f" Failed: {describe_reasons(report.failures)}; listed in "
            f"{report.root / 'errors.parquet'}."
        )
    if report.index.get("part"):
        return text + f" A part: `indexer index {report.root.parent.parent}` merges the parts."
    text += f" Index: {describe_index(report.index)}."
    if report.index.get("target_met") is False:
        text += f" Warning: {below_target(report.index)}"
    return text


def below_target(meta: dict[str, Any]) -> str:
    return (
        f"recall@{meta['recall_k']} {meta['recall_at_k']} stays below the target "
        f"{meta['target_recall']} even at the slowest search setting: choose "
        "--index-type ivf or flat (uncompressed vectors) or a lower --target-recall."
    )


@main.command()
@click.argument("images", nargs=-1)
@click.option(
    "--index",
    "root",
    required=True,
    type=click.Path(path_type=Path),
    help="Collection directory made by `indexer build`.",
)
@click.option("--id", "ids", multiple=True, help="Query with a stored item, by key (repeatable).")
@click.option(
    "-k", default=10, show_default=True, type=click.IntRange(1), help="Results per query."
)
@click.option(
    "--threshold", type=float, help="Keep results with score >= T (ip) or distance <= T (l2)."
)
@click.option(
    "--where",
    multiple=True,
    help="Keep results whose row satisfies this: COL=VALUE, COL!=VALUE, COL<N, COL>N (<=, >=) "
    "on any shard column; label=NAME for the top predicted label. Repeat to AND them.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--jsonl", is_flag=True, help="Print one JSON line per query.")
@click.option(
    "--paths-only",
    is_flag=True,
    help="Print each result's absolute path, one a line (items of datasets and tar shards have "
    "no file of their own: their key).",
)
@click.option(
    "--grid",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also draw a PNG: each query beside its results, labelled with rank, score and key.",
)
@device_option
@runtime_option
@click.option(
    "--nprobe", type=click.IntRange(1), help="IVF lists to scan (default: the tuned value)."
)
@click.option("--ef", type=click.IntRange(1), help="HNSW efSearch (default: the tuned value).")
@storage_option
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
    if grid is not None:
        from indexer.query.contact_sheet import Cell, draw_sheet, wrapped

        rows = [
            [Cell(r.path or collection.image_of(r.name), wrapped("query", r.name))]
            + [Cell(collection.image_of(h.key), (f"#{h.rank}  score {h.score:.3f}", h.key))
               for h in r.hits]
            for r in results
        ]  # fmt: skip
        run_library(lambda: draw_sheet(rows, grid))
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


def _short(name: str) -> str:
    return Path(name).name or name


def format_hits(query_name: str, hits: list[Hit]) -> str:
    lines = [f"query: {query_name}", f"{'rank':>4}  {'score':>7}  key"]
    lines += [f"{h.rank:>4}  {h.score:>7.4f}  {h.key}" for h in hits]
    return "\n".join(lines) + "\n"


@main.command()
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


def describe_runs(runs: list[dict[str, Any]]) -> str:
    lines = ["last runs:" if runs else "last runs:   none recorded"]
    for run in reversed(runs):
        c = run.get("counts") or {}
        lines.append(
            f"  {run['started']}  {run['command']:<6} {run['status']:<8} {run['seconds']:>8.1f}s  "
            f"listed {c.get('listed', '-')}, new {c.get('new', '-')}, "
            f"failed {c.get('failed', '-')}"
            + (f", {run['runtime']}" if run.get("runtime") else "")
            + (f"  ({run['error']})" if run.get("error") else "")
        )
    return "\n".join(lines)


def describe(root: Path, manifest: dict[str, Any], index_meta: dict[str, Any] | None) -> str:
    counts = manifest["counts"]
    lines = [
        f"collection:  {root} (version {manifest.get('version')})",
        f"created:     {manifest.get('created_at')} (indexer {manifest.get('indexer_version')})",
        *describe_model(manifest),
        f"embedding:   {manifest['embedding_dim']}-d, "
        f"{'L2-normalised' if manifest['normalized'] else 'raw'}, metric {manifest['metric']}",
        "sources:     " + ", ".join(_source_name(s) for s in manifest["sources"]),
        f"items:       {counts['items']} "
        f"({counts['embedded']} embedded, {counts['failed']} failed)",
        f"shards:      {len(manifest['shards'])}",
    ]
    if index_meta is None:
        lines.append(f"index:       missing: run `indexer index {root}`")
    else:
        lines.append(f"index:       {describe_index(index_meta)}")
        met = "met" if index_meta.get("target_met", True) else "NOT met"
        lines.append(
            f"             chosen because: {index_meta.get('reason', 'n/a')}; target recall "
            f"{index_meta.get('target_recall', 'n/a')} {met}"
        )
    return "\n".join(lines)


def describe_model(manifest: dict[str, Any]) -> list[str]:
    m = manifest["model"]
    if m is None:
        return ["model:       none: vectors indexed from Parquet (query with vectors)"]
    weights, dc = m["weights"], m["data_config"]
    ident = {
        "pretrained": weights.get("tag"),
        "checkpoint": weights.get("path"),
        "random": f"seed {weights.get('seed')}",
    }.get(weights["kind"])
    return [
        f"model:       {m['name']} (timm {m['timm_version']}, torch {m['torch_version']}, "
        f"{m['precision']})",
        f"weights:     {weights['kind']}: {ident}",
        f"preprocess:  {dc['input_size'][1]}x{dc['input_size'][2]} {dc['interpolation']}, "
        f"crop_pct {dc['crop_pct']} ({dc['crop_mode']}), mean {dc['mean']}, std {dc['std']}, "
        f"{manifest['decode']['mode']} decoding",
        describe_runtime(manifest),
        describe_portable(manifest),
    ]


def describe_runtime(manifest: dict[str, Any]) -> str:
    """The collection's runtime and precision, and how they were decided."""
    from indexer.model.runtime_choice import recorded

    built = recorded(manifest)
    record = manifest.get("runtime") or {}
    how = record.get("how", "inferred: built before runtimes were recorded")
    why = f": {record['why']}" if record.get("why") else ""
    return f"runtime:     {built.label if built else 'none'} ({how}{why})"


def describe_portable(manifest: dict[str, Any]) -> str:
    record = manifest.get("portable_model")
    if record is None:
        why = manifest.get("portable_model_reason") or "built before models were exported"
        return f"portable:    none ({why}): queries run torch"
    fidelity = record.get("fidelity") or {}
    return (
        f"portable:    {record['path']} (ONNX opset {record.get('opset')}, exported with torch "
        f"{record.get('torch_version')}; cosine to torch min {fidelity.get('min_cosine', 0):.6f}, "
        f"mean {fidelity.get('mean_cosine', 0):.6f} on {fidelity.get('images')} images)"
    )


def _source_name(source: dict[str, Any]) -> str:
    if source["kind"] == "parquet":
        return f"{source['path']} ({source['rows']} rows)"
    if source["kind"] == "hf":
        return f"hf:{source['name']} [{source['split']}] ({source['rows']} rows)"
    return str(source["path"])


@main.command(name="index")
@click.argument("paths", metavar="DIR | PARQUET...", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--from-parquet",
    is_flag=True,
    help="Index embeddings made elsewhere: the arguments are Parquet files or folders of them.",
)
@click.option(
    "--out", type=click.Path(path_type=Path), help="Collection to create (--from-parquet)."
)
@click.option("--embedding-column", default="embedding", show_default=True, help="List of floats.")
@click.option("--key-column", default="key", show_default=True, help="Unique string or int.")
@click.option(
    "--normalize", is_flag=True, help="L2-normalise the vectors on the way in (--from-parquet)."
)
@click.option(
    "--metric", type=click.Choice(METRICS), default="ip", show_default=True,
    help="Index metric (--from-parquet; a collection keeps its own).",
)  # fmt: skip
@click.option(
    "--shard-size", default=50_000, show_default=True, type=click.IntRange(1),
    help="Rows per Parquet shard (--from-parquet).",
)  # fmt: skip
@index_options(defaults=False)
@click.option(
    "--rebuild-index", is_flag=True,
    help="Build the index from scratch instead of updating the previous version's.",
)  # fmt: skip
@keep_option
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


def describe_index(meta: dict[str, Any]) -> str:
    """One line: type, size, build time, tuned parameters, recall, speed, bytes."""
    params = ", ".join(f"{k}={v}" for k, v in (meta.get("params") or {}).items())
    recall = meta.get("recall_at_k")
    qps = meta.get("queries_per_second")
    made = (
        f"reused from {meta['reused_from']} (files only touched)" if meta.get("reused_from")
        else f"updated from {meta['from_version']} in {meta['build_seconds']}s ({meta['why']})"
        if meta.get("how") == "updated"
        else f"built in {meta['build_seconds']}s"
    )  # fmt: skip
    return (
        f"{meta['type']} ({meta['factory']}{', on disk' if meta.get('on_disk') else ''}"
        f"{'; ' + params if params else ''}), {meta['ntotal']} vectors, {made}, "
        f"recall@{meta.get('recall_k')} "
        f"{'n/a' if recall is None else f'{recall:.3f}'}"
        f"{'' if qps is None else f', {qps:,.0f} queries/s'}, "
        f"{meta.get('bytes', 0) / 2**20:.1f} MiB"
    )


@main.command()
@click.argument("root", metavar="DIR", type=click.Path(path_type=Path))
@click.option(
    "--threshold",
    default=0.95,
    show_default=True,
    type=float,
    help="Near-duplicates: score >= T (ip; cosine when normalised) or distance <= T (l2).",
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


@main.command()
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
    from indexer.verify.check import repair as mend
    from indexer.verify.check import verify as check

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
    hook = os.environ.get(REPAIR_HOOK_ENV)
    click.echo(run_library(lambda: mend(root, keep, load_hook(hook) if hook else None, options)))
    after = run_library(lambda: check(root, options))
    if after.problems:
        click.echo(f"Still damaged: {'; '.join(map(str, after.problems))}", err=True)
        sys.exit(3)
    click.echo(f"{root} is whole again: {after.shards} shard(s), {after.rows} rows, and the index.")
    click.echo("".join(f"  {note}\n" for note in after.notes), nl=False)


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
    from indexer.cli.demo import run_demo

    result = run_library(lambda: run_demo(out, count))
    if result.fallback:
        click.echo(f"Pretrained weights unavailable ({result.fallback}); using --no-pretrained.")
    click.echo(summarize(result.report))
    for query_path, hits in zip(result.queries, result.hits, strict=True):
        click.echo(format_hits(str(query_path), hits))


from indexer.cli.serve import serve  # noqa: E402  # its own module: cli.py stays one read

main.add_command(serve)
