"""The click command group: flags -> config -> library; typed errors -> messages and exit codes."""

from __future__ import annotations

import logging
import os
import signal
import sys

import click

from indexer.cli.build import build, run_job
from indexer.cli.demo import demo
from indexer.cli.index import index_cmd
from indexer.cli.info import info
from indexer.cli.query import dedup, query
from indexer.cli.serve import serve
from indexer.cli.verify import verify
from indexer.errors import (
    Interrupted,
)
from indexer.version import __version__


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="indexer")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
def main(verbose: bool) -> None:
    """Turn image folders and Hugging Face datasets into searchable embedding indexes."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if verbose:  # indexer's own progress; libraries (faiss's loader, datasets) say warnings only
        logging.getLogger("indexer").setLevel(logging.INFO)


for command in (build, run_job, query, dedup, info, index_cmd, verify, serve, demo):
    main.add_command(command)
