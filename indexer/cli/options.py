"""Click options that several commands share: one definition, one help text, one parser."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import click

from indexer.config import (
    RUNTIMES,
    IndexConfig,
)

storage_option = click.option(
    "--storage-option",
    "storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="For s3://, gs://, az:// sources: an fsspec option (endpoint_url=..., anon=true, "
    "profile=...); repeatable. Credentials otherwise come from the store's usual places.",
)


def parse_pairs(pairs: tuple[str, ...], flag: str) -> tuple[tuple[str, str], ...]:
    """KEY=VALUE flags as pairs, or a usage error naming the one without '='."""
    parsed = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.UsageError(f"{flag} {pair!r}: write KEY=VALUE, e.g. endpoint_url=URL")
        parsed.append((key.strip(), value))
    return tuple(parsed)


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
    from indexer.cli.common import run_library
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


def with_options(*decorators: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Several click options as one decorator, listed in the order --help shows them."""

    def decorate(fn: Any) -> Any:
        for option in reversed(decorators):
            fn = option(fn)
        return fn

    return decorate
