"""The CLI's side of the library: a typed error becomes one line on stderr and its exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from indexer.errors import (
    CollectionError,
    CollectionLockedError,
    IndexerError,
    InputError,
    Interrupted,
    ModelError,
    TooManyFailuresError,
)

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
