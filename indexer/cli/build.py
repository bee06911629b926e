"""`indexer build` and `indexer run JOB.toml`: flags or a job file -> BuildConfig -> the build."""

from __future__ import annotations

import sys
from collections.abc import Mapping
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
    with_options,
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
from indexer.errors import InputError

MODEL_OPTIONS = (  # The model and how it embeds: ModelConfig (and the preprocessing it reads).
    click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Any timm model name."),
    click.option(
        "--pretrained/--no-pretrained",
        default=True,
        show_default=True,
        help="Use timm's pretrained weights (fetched from the hub), or random ones.",
    ),
    click.option(
        "--checkpoint",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Local weights (.safetensors, .pth, .bin); overrides --pretrained.",
    ),
    click.option(
        "--seed",
        default=0,
        show_default=True,
        type=click.IntRange(0, 2**63 - 1),
        help="Seed for --no-pretrained weights.",
    ),
    click.option(
        "--normalize/--no-normalize",
        default=True,
        show_default=True,
        help="L2-normalise embeddings (cosine similarity with --metric ip).",
    ),
    click.option(
        "--pooling",
        type=click.Choice(POOLINGS),
        default="head",
        show_default=True,
        help="head: the model's own pre-logits; avg, max or gem (generalised mean, p=3) over the "
        "last feature map (or --feature-stage's).",
    ),
    click.option(
        "--labels",
        default=0,
        show_default=True,
        type=click.IntRange(0),
        help="Store the classifier's top-K classes (index, name, probability) per item, from the "
        "same forward pass; needs a model with its classifier.",
    ),
    click.option(
        "--feature-stage",
        type=click.IntRange(0),
        help="Pool this stage's feature map (timm feature extraction) instead of the last one.",
    ),
    device_option,
    runtime_option,
    click.option(
        "--precision",
        type=click.Choice(PRECISIONS),
        default=None,
        help="Model arithmetic, decided at a collection's first build: fp32, bf16 (CUDA or a CPU "
        "with AVX512-BF16/AMX), or auto (timed among those; fp32 with --exact-preprocessing).",
    ),
    click.option(
        "--exact-preprocessing",
        is_flag=True,
        help="Reproduce timm's transform pixel for pixel (no JPEG draft); fp32 unless "
        "--precision says otherwise.",
    ),
)


LOADER_OPTIONS = (  # How items are read and decoded: LoaderConfig.
    click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1, 1_000_000)),
    click.option(
        "--workers",
        default=2,
        show_default=True,
        type=click.IntRange(0, 1024),
        help="DataLoader worker processes decoding images.",
    ),
    click.option(
        "--decode",
        default="auto",
        show_default=True,
        type=click.Choice(["auto", "cpu", "gpu"]),
        help="Where JPEGs are decoded: gpu (nvJPEG, in batches; others on the CPU), cpu, or auto "
        "(gpu on CUDA only where this machine measured nvJPEG faster than the CPU path).",
    ),
    click.option(
        "--decode-timeout",
        default=60.0,
        show_default=True,
        type=FiniteFloat(0),
        help="Seconds one image may take to read and decode in a worker; past it (or if the "
        "decoder crashes) the image is recorded as failed and the run goes on. 0: no limit. "
        "Needs --workers >= 1.",
    ),
    click.option(
        "--max-image-pixels",
        default=DEFAULT_MAX_PIXELS,
        show_default=True,
        type=click.IntRange(1),
        help="Larger images (by their header) are recorded as failed, never decoded.",
    ),
    click.option(
        "--allow-truncated",
        is_flag=True,
        help="Embed truncated files with their missing part grey (default: a failure).",
    ),
    click.option(
        "--progress/--no-progress",
        default=None,
        help="A progress bar on stderr (default: only on a terminal; --progress shows it in "
        "logs and CI too, --no-progress never).",
    ),
)


SOURCE_OPTIONS = (  # How each SOURCE is read: SourceSpec.
    click.option(
        "--follow-symlinks",
        is_flag=True,
        help="Read symlinked files and folders that point outside the source folder "
        "(default: only links inside it are followed).",
    ),
    click.option(
        "--split", help="Dataset split for hf: sources (default: the only one, or train)."
    ),
    click.option(
        "--image-column",
        help="Image column for hf: sources: an Image column or one of image bytes (default: the "
        "only one).",
    ),
    click.option(
        "--key-column",
        help="Column whose values are the keys, for hf: sources (default: key, else file_name, "
        "else the image files' paths, else SPLIT/ROW).",
    ),
    storage_option,
    click.option(
        "--url-column",
        default="url",
        show_default=True,
        help="For a list file SOURCE (.parquet, .csv, .jsonl, .txt): the column of URLs or paths.",
    ),
    click.option(
        "--refetch",
        is_flag=True,
        help="For a list file SOURCE: fetch every row again (an image may change behind its URL; "
        "rows whose bytes did not change keep their vectors).",
    ),
    click.option(
        "--read-retries",
        type=click.IntRange(0, 20),
        default=3,
        show_default=True,
        help="For buckets and list files: tries again after a passing failure (503, 429, reset, "
        "timeout), with backoff; then the item is an error row.",
    ),
    click.option(
        "--read-concurrency",
        type=click.IntRange(1, 1024),
        default=64,
        show_default=True,
        help="Objects fetched at once by each decoding worker, for bucket sources.",
    ),
)


RUN_OPTIONS = (  # The run itself: shards, failures, versions kept, partitions.
    click.option(
        "--shard-size",
        default=50_000,
        show_default=True,
        type=click.IntRange(1, 2**31 - 1),
        help="Rows per Parquet shard.",
    ),
    click.option("--dry-run", is_flag=True, help="Print what a build would do; change nothing."),
    click.option(
        "--retry-failed",
        is_flag=True,
        help="Read again the items that failed before, even if their files did not change.",
    ),
    click.option(
        "--rebuild",
        is_flag=True,
        help="Re-embed everything (needed after changing the model, weights or "
        "preprocessing); by default a build updates an existing collection incrementally.",
    ),
    click.option(
        "--max-failures",
        default=0.05,
        show_default=True,
        type=FiniteFloat(0),
        help="Failure budget: a count (>= 1) or a fraction of the items (< 1). Within it "
        "a run with failures exits 5 (partial); over it, 6.",
    ),
    keep_option,
    click.option(
        "--metrics-file",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Write Prometheus textfile metrics of the run here (node_exporter).",
    ),
    click.option(
        "--partition",
        metavar="I/N",
        help="Build only part I of N (0 <= I < N, chosen by a hash of each key) into "
        "DIR/parts/; N such runs (an array job) then `indexer index DIR` merges and indexes them.",
    ),
)


INDEX_OPTIONS = (  # The index: IndexConfig.
    click.option(
        "--metric",
        type=click.Choice(METRICS),
        default="ip",
        show_default=True,
        help="Index metric: inner product or L2 distance.",
    ),
    index_options(defaults=True),
)


ENGINE_OPTIONS = (  # Where the work runs: EngineConfig.
    click.option(
        "--engine",
        type=click.Choice(ENGINES),
        default="local",
        show_default=True,
        help="local: this machine's DataLoader; ray: Ray Data (pip install 'indexer[ray]').",
    ),
    click.option("--ray-address", help="Ray cluster to join (default: start a local Ray)."),
    click.option(
        "--concurrency", type=click.IntRange(1), help="Ray: embedding actors, one model each."
    ),
)


@click.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Collection directory.")
@with_options(*MODEL_OPTIONS)
@with_options(*LOADER_OPTIONS)
@with_options(*SOURCE_OPTIONS)
@with_options(*RUN_OPTIONS)
@with_options(*INDEX_OPTIONS)
@with_options(*ENGINE_OPTIONS)
def build(**flags: Any) -> None:
    """Embed SOURCES (folders, s3://, gs:// or az:// prefixes, or hf:DATASET) into a
    collection at --out and index it.

    \b
    Example:
      indexer build ~/photos --out ~/photos.idx
      indexer build s3://my-bucket/photos/ --out photos.idx
      indexer build hf:./my_dataset --split test --out ds.idx
    """
    run_build(build_config(flags), flags["dry_run"])


@click.command(name="run")
@click.argument("job", type=click.Path(path_type=Path, dir_okay=False))
def run_job(job: Path) -> None:
    """Run the build described by a JOB file (TOML; see jobs/README.md).

    A job file holds `indexer build` settings under their flag names (sources, out, model,
    batch_size, max_failures, ...): the same settings, written down, checked the same way.
    """
    from indexer.cli.jobs import job_flags, read_job

    settings = run_library(lambda: read_job(job))
    flags = run_library(lambda: job_flags(settings, job, build))
    run_build(run_library(lambda: job_config(flags, job)), flags["dry_run"])


def job_config(flags: Mapping[str, Any], job: Path) -> BuildConfig:
    """build_config, its usage errors (a --storage-option that is not KEY=VALUE) naming the
    job file, on one line: a job has no command line to show the usage of."""
    try:
        return build_config(flags)
    except click.UsageError as exc:
        raise InputError(f"job file {job}: {exc.format_message()}") from exc


def run_build(cfg: BuildConfig, dry_run: bool) -> None:
    """The build (or its dry run, nothing changed), summarised on stdout."""
    from indexer.build.pipeline import build as run
    from indexer.build.plan import dry_run as plan_only

    if dry_run:
        plan = run_library(lambda: plan_only(cfg))
        click.echo(
            f"Dry run for {cfg.out}: {plan['listed']} listed; {plan['to_check']} to read "
            f"(new or changed), {plan['unchanged']} unchanged, {plan['deleted']} to delete, "
            f"{plan['failed_unchanged']} unchanged failures; {estimate_text(plan)}. "
            "Nothing was changed."
        )
        return
    report = run_library(lambda: run(cfg))
    click.echo(summarize(report))
    if not cfg.model.pretrained and cfg.model.checkpoint is None and report.runtime is not None:
        from indexer.collection.layout import RANDOM_WEIGHTS

        click.echo(f"Note: {RANDOM_WEIGHTS}.", err=True)
    if report.status == "partial":
        sys.exit(EXIT_PARTIAL)


def estimate_text(plan: Mapping[str, Any]) -> str:
    """How long the embedding should take, and from what."""
    eta, basis = plan["estimated_seconds"], plan.get("estimated_from")
    if eta is None and plan["to_check"] == 0:
        return "nothing to embed"
    if eta is None:
        return ("no estimate yet: nothing was timed on this machine for this model (a build "
                "records its rate; a later --dry-run estimates from it)")  # fmt: skip
    took = f"{eta}s" if eta >= 1 else "under 1s"
    if basis == "timing":
        return (f"estimated {took} of embedding at the rate this machine timed for this model "
                "(decoding not included: a first build takes longer)")  # fmt: skip
    return f"estimated {took} of embedding (at the last run's rate)"


def build_config(flags: Mapping[str, Any]) -> BuildConfig:
    """The build's flags (from the command line or a job file) as its configuration."""
    from indexer.build.partitions import parse_partition

    partition = flags["partition"]
    return BuildConfig(
        sources=tuple(source_spec(location, flags) for location in flags["sources"]),
        out=flags["out"],
        model=model_config(flags),
        loader=loader_config(flags),
        index=index_config(
            flags["metric"], flags["index_type"], flags["max_index_memory"], flags["target_recall"]
        ),
        shard_size=flags["shard_size"],
        rebuild=flags["rebuild"],
        retry_failed=flags["retry_failed"],
        max_failures=flags["max_failures"],
        keep=flags["keep"],
        metrics_file=flags["metrics_file"],
        partition=None if partition is None else run_library(lambda: parse_partition(partition)),
        engine=EngineConfig(flags["engine"], flags["ray_address"], flags["concurrency"]),
    )


def source_spec(location: str, flags: Mapping[str, Any]) -> SourceSpec:
    """SOURCE_OPTIONS: how one SOURCE is read."""
    return SourceSpec(
        location,
        flags["split"],
        flags["image_column"],
        flags["follow_symlinks"],
        flags["key_column"],
        parse_pairs(flags["storage_options"], "--storage-option"),
        flags["read_concurrency"],
        flags["url_column"],
        flags["refetch"],
        flags["read_retries"],
    )


def model_config(flags: Mapping[str, Any]) -> ModelConfig:
    """MODEL_OPTIONS: the model and how it embeds (--exact-preprocessing: fp32 unless asked)."""
    exact = flags["exact_preprocessing"]
    return ModelConfig(
        name=flags["model"],
        pretrained=flags["pretrained"],
        checkpoint=flags["checkpoint"],
        seed=flags["seed"],
        normalize=flags["normalize"],
        device=flags["device"],
        precision=flags["precision"] or ("fp32" if exact else "auto"),
        pooling=flags["pooling"],
        feature_stage=flags["feature_stage"],
        labels=flags["labels"],
        runtime=flags["runtime"],
    )


def loader_config(flags: Mapping[str, Any]) -> LoaderConfig:
    """LOADER_OPTIONS: how items are read and decoded."""
    return LoaderConfig(
        batch_size=flags["batch_size"],
        workers=flags["workers"],
        preprocessing="exact" if flags["exact_preprocessing"] else "fast",
        progress=flags["progress"],
        decode_timeout=flags["decode_timeout"],
        max_pixels=flags["max_image_pixels"],
        allow_truncated=flags["allow_truncated"],
        decode=flags["decode"],
    )
