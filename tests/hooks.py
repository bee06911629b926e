"""Hooks the tests inject into a build's decoding or a repair: crashes, hangs, slow items, a
paused repair. In this process by use_decode_hook / use_repair_hook (monkeypatch); in a CLI
subprocess by running it as hooked_cli(...) + argv, `python -m tests.hooks` installing them.

The seams are the library's own: LoaderConfig.decode_hook ("module:function", called in the
decoding process with each key first) and repair's before_lock; the CLI only maps flags."""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

Patch = Callable[[Any, str, Any], None]


def use_decode_hook(monkeypatch: Any, spec: str | None) -> None:
    """Builds the CLI runs from now on call spec before each decode (None: no hook again)."""
    install_decode_hook(spec, monkeypatch.setattr)


def use_repair_hook(monkeypatch: Any, spec: str | None) -> None:
    """`indexer verify --repair` runs spec after its check, before it takes the lock."""
    install_repair_hook(spec, monkeypatch.setattr)


def install_decode_hook(spec: str | None, patch: Patch = setattr) -> None:
    import indexer.cli.build as cli_build

    real = getattr(cli_build.loader_config, "__wrapped__", cli_build.loader_config)
    if spec is None:
        patch(cli_build, "loader_config", real)
        return

    @functools.wraps(real)
    def hooked(flags: Any) -> Any:
        return replace(real(flags), decode_hook=spec)

    patch(cli_build, "loader_config", hooked)


def install_repair_hook(spec: str | None, patch: Patch = setattr) -> None:
    import indexer.verify.repair as repair

    real = getattr(repair.repair, "__wrapped__", repair.repair)
    if spec is None:
        patch(repair, "repair", real)
        return
    module, _, name = spec.partition(":")
    hook = getattr(importlib.import_module(module), name)

    @functools.wraps(real)
    def hooked(root: Any, keep: int, before_lock: Any = None, storage_options: Any = ()) -> Any:
        return real(root, keep, hook, storage_options)

    patch(repair, "repair", hooked)


def hooked_cli(decode: str | None = None, repair: str | None = None) -> list[str]:
    """The command line that runs `indexer ...` (append its arguments) with these hooks."""
    argv = [sys.executable, "-m", "tests.hooks"]
    argv += ["--decode-hook", decode] if decode else []
    argv += ["--repair-hook", repair] if repair else []
    return [*argv, "--"]


def _run_cli(argv: list[str]) -> None:
    """`python -m tests.hooks [--decode-hook M:F] [--repair-hook M:F] -- ARGS`: the console
    script (its signal handling and exit) with the hooks installed."""
    hooks = {"--decode-hook": install_decode_hook, "--repair-hook": install_repair_hook}
    while argv and argv[0] in hooks:
        hooks[argv[0]](argv[1])
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    from indexer.cli.main import entry

    sys.argv = ["indexer", *argv]
    entry()


def hostile(key: str) -> None:
    """Crash the decoding process on keys containing 'crash'; hang on keys containing 'hang'."""
    if "crash" in key:
        os.kill(os.getpid(), signal.SIGSEGV)
    if "hang" in key:
        while True:
            time.sleep(1)


def vanishing(key: str) -> None:
    """Delete or rewrite a file between listing and reading (INDEXER_TEST_ROOT holds them)."""
    root = os.environ["INDEXER_TEST_ROOT"]
    if "vanish" in key:
        os.unlink(os.path.join(root, key))
    if "rewrite" in key:
        with open(os.environ["INDEXER_TEST_REPLACEMENT"], "rb") as f:
            data = f.read()
        with open(os.path.join(root, key), "wb") as f:
            f.write(data)


def killer(key: str) -> None:
    """SIGKILL the process at the sixth item it reads (a build killed mid-run)."""
    killer.seen = getattr(killer, "seen", 0) + 1  # type: ignore[attr-defined]
    if killer.seen == 6:  # type: ignore[attr-defined]
        os.kill(os.getpid(), signal.SIGKILL)


def slow(key: str) -> None:
    """Take half a second per item (a build that is still running when the test acts)."""
    time.sleep(0.5)


def pause_before_repair() -> None:
    """Say so in INDEXER_TEST_PAUSED, then wait for INDEXER_TEST_RESUME to exist (2 min max)."""
    with open(os.environ["INDEXER_TEST_PAUSED"], "w") as f:
        f.write("paused")
    deadline = time.monotonic() + 120
    while not os.path.exists(os.environ["INDEXER_TEST_RESUME"]) and time.monotonic() < deadline:
        time.sleep(0.05)


if __name__ == "__main__":
    _run_cli(sys.argv[1:])
