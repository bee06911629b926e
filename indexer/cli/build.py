"""`indexer build` and `indexer run JOB.toml`: flags or a job file -> BuildConfig -> the build."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from indexer.cli.common import EXIT_PARTIAL, run_library
from indexer.cli.describe import summarize
from indexer.cli.options import (
    FiniteFloat,
    device_option,
    index_config,
    index_options,
    keep_option,
    parse_pairs,
    runtime_option,
    storage_option,
)
from indexer.config import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MODEL,
    ENGINES,
    METRICS,
    POOLINGS,
    PRECISIONS,
    BuildConfig,
    EngineConfig,
    LoaderConfig,
    ModelConfig,
    SourceSpec,
)
from indexer.errors import (
    InputError,
)

DECODE_HOOK_ENV = "INDEXER_TEST_DECODE_HOOK"  # module:function run before each decode (tests)


@click.command()
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


@click.command(name="run")
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
