"""`indexer serve`: the command that runs the search service (its own group of options)."""

from __future__ import annotations

import ipaddress
import logging
import sys
from pathlib import Path
from typing import Any

import click

from indexer.cli.options import parse_pairs, storage_option, with_options

LOOPBACK_NAMES = ("localhost",)
SWITCH_SECONDS = 0.0005


SERVE_OPTIONS = (
    click.option(
        "--host",
        default="127.0.0.1",
        show_default=True,
        help="Address to bind; a non-loopback one needs --token or --insecure.",
    ),
    click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535)),
    click.option(
        "--name",
        "names",
        multiple=True,
        help="Name of each DIR in URLs, in order (default: its folder name).",
    ),
    click.option(
        "--token",
        envvar="INDEXER_TOKEN",
        help="Require 'Authorization: Bearer TOKEN' (or set $INDEXER_TOKEN).",
    ),
    click.option(
        "--metrics-token",
        envvar="INDEXER_METRICS_TOKEN",
        help="A second token that opens /readyz and /metrics only (for probes "
        "and scrapers; or set $INDEXER_METRICS_TOKEN). Without it they need "
        "--token.",
    ),
    click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without a token."),
    click.option(
        "--cors-origin",
        "cors",
        multiple=True,
        help="Allow browser requests from this origin (none by default).",
    ),
    click.option(
        "--max-upload",
        default="20M",
        show_default=True,
        help="Largest upload accepted (bytes, or with K/M/G); larger: 413.",
    ),
    click.option(
        "--batch-window-ms",
        default=3.0,
        show_default=True,
        type=click.FloatRange(0, 100),
        help="Embed uploads arriving this close together in one batch (0: off).",
    ),
    click.option(
        "--search-timeout",
        default=30.0,
        show_default=True,
        type=click.FloatRange(0.1),
        help="Seconds a search may take, decoding an upload included; then 503.",
    ),
    click.option(
        "--max-decode-pixels",
        default=100_000_000,
        show_default=True,
        type=click.IntRange(1_000_000),
        help="Pixels decoded at once by all requests together (uploads, "
        "thumbnails); ~8 bytes each: the default fits 1 GiB. Larger images wait "
        "their turn.",
    ),
    click.option(
        "--allowed-host",
        "allowed_hosts",
        multiple=True,
        help="Without --token, answer requests for this Host name too (besides "
        "localhost and IP addresses).",
    ),
    click.option(
        "--runtime",
        default="auto",
        show_default=True,
        type=click.Choice(["auto", "torch", "onnx", "openvino"]),
        help="What embeds uploads (auto: the portable model on the CPU).",
    ),
    storage_option,
)


@click.command()
@click.argument("dirs", metavar="DIR...", nargs=-1, required=True, type=click.Path(path_type=Path))
@with_options(*SERVE_OPTIONS)
def serve(
    dirs: tuple[Path, ...],
    host: str,
    port: int,
    names: tuple[str, ...],
    token: str | None,
    metrics_token: str | None,
    insecure: bool,
    cors: tuple[str, ...],
    max_upload: str,
    batch_window_ms: float,
    search_timeout: float,
    max_decode_pixels: int,
    allowed_hosts: tuple[str, ...],
    runtime: str,
    storage_options: tuple[str, ...],
) -> None:
    """Serve published collections: a JSON search API, metrics and a search page.

    Each DIR is loaded once and reloaded by itself when a build publishes a new version
    (checked first; a version that cannot be loaded is logged and the old one keeps serving).

      indexer serve photos.idx --port 8000      then open http://127.0.0.1:8000/
    """
    from indexer.cli.common import run_library
    from indexer.errors import InputError
    from indexer.index.index_type import parse_size
    from indexer.serve.app import ServeConfig, create_app
    from indexer.serve.registry import Registry, collection_names

    check_access(host, token, metrics_token, insecure)
    limit = run_library(lambda: parse_size(max_upload, "--max-upload"))
    if limit < 1024:
        raise click.UsageError(f"--max-upload {max_upload} is too small for any image")
    roots = run_library(lambda: collection_names(list(dirs), list(names)))
    import faiss

    # One query per search call: faiss's OpenMP team has nothing to share, and its idle
    # threads spin on the cores other requests decode on (bench/serve.py: the server's CPU per
    # upload at concurrency 1 from 20 to 12 ms).
    faiss.omp_set_num_threads(1)
    # The event loop and the worker threads share the GIL; a thread waiting for it gets it
    # after the switch interval (5 ms by default): under a flood of small requests that kept
    # the loop busy, a 1 ms search by id took 6 ms (bench/hostile.py).
    sys.setswitchinterval(SWITCH_SECONDS)
    from indexer.serve.budget import return_large_buffers

    if not return_large_buffers():
        logging.getLogger("indexer").info("not glibc: freed image memory may stay reserved")
    registry = Registry(roots, runtime, parse_pairs(storage_options, "--storage-option"))
    run_library(registry.refresh)
    if not registry.ready():
        missing = [n for n in roots if n not in {c.name for c in registry.all()}]
        run_library(lambda: _raise(InputError(
            f"collection(s) {missing} have no loadable published version: build them first "
            "(or see the log above)")))  # fmt: skip
    registry.watch()
    serve_cfg = ServeConfig(token, limit, tuple(cors), batch_window_ms / 1000, search_timeout,
                            max_decode_pixels=max_decode_pixels,
                            allowed_hosts=tuple(allowed_hosts),
                            metrics_token=metrics_token)  # fmt: skip
    app = create_app(registry, serve_cfg)
    import uvicorn

    from indexer.serve.guard import ConnectionLimits, server_config

    limits = ConnectionLimits(max_connections=_connection_cap())
    for loaded in registry.all():
        click.echo(describe_served(loaded))
    announcing(uvicorn.Server)(server_config(app, host, port, limits)).run()


def check_access(host: str, token: str | None, metrics_token: str | None, insecure: bool) -> None:
    """A token that is empty, a metrics token without one, or another machine's access
    without a token (unless --insecure): usage errors, before anything loads."""
    if token is not None and not token.strip():
        raise click.UsageError("--token is empty: give a token, or leave it out")
    if metrics_token is not None and (token is None or not metrics_token.strip()):
        raise click.UsageError("--metrics-token needs --token (and must not be empty)")
    if not _loopback(host) and token is None and not insecure:
        raise click.UsageError(
            f"--host {host} is reachable from other machines: give --token TOKEN (or "
            "$INDEXER_TOKEN), or --insecure to serve without one"
        )


def describe_served(loaded: Any) -> str:
    """One line per collection: its name, folder, version and size (random weights said)."""
    from indexer.collection.layout import RANDOM_WEIGHTS, random_weights

    line = (f"{loaded.name}: {loaded.root} (version {loaded.version}, "
            f"{len(loaded.collection):,} items)")  # fmt: skip
    return line + (f"; {RANDOM_WEIGHTS}" if random_weights(loaded.collection.manifest) else "")


def announcing(server: type) -> type:
    """uvicorn's Server that says, once it listens, the address to open (its real port
    where --port 0 let the system choose)."""

    class Announcing(server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if not self.started:
                return  # the address was taken: uvicorn said why, and it exits
            host, port = self.config.host, self.config.port
            for listening in getattr(self, "servers", []):
                for sock in listening.sockets or []:
                    port = sock.getsockname()[1]
            shown = f"[{host}]" if ":" in host else host
            click.echo(f"Ready: open http://{shown}:{port}/ (Ctrl-C stops)")

    return Announcing


def _connection_cap(wanted: int = 1024, spare: int = 256) -> int:
    """Open connections before the idle ones are closed: 1024, or fewer where the file
    limit is lower (raised to its hard limit first), leaving room for shards and models."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    except (ImportError, OSError, ValueError):  # not Unix, or not allowed: keep the limit
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(64, min(wanted, int(soft) - spare))


def _raise(exc: Exception) -> None:
    raise exc


def _loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
