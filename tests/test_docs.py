"""The README and the documentation site: the site builds --strict, the README fits a screen,
no issue numbers, and every `indexer ...` command shown names a real command and real flags.

The Python examples are run by tests/test_readme.py.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250
ISSUE_NUMBER = re.compile(r"issue ?#?[0-9]|#[0-9]+", re.I)  # "(issue 19)", "issue #3", "#23"
SHELL_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>bash|sh|shell|console|zsh)[ \t]*\n"
    r"(?P<code>.*?)^(?P=indent)```",
    flags=re.S | re.M,
)
ANY_FENCE = re.compile(r"^([ \t]*)```.*?^\1```", flags=re.S | re.M)
SEPARATORS = {"|", "||", "&&", ";", "&"}
PREFIXES = {"sudo", "time", "exec", "nohup", "env"}


def pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --- (a) the site builds --strict ---------------------------------------------------------


def test_the_docs_site_builds_strict(tmp_path: Path) -> None:
    for module, package in (("mkdocs", "mkdocs"), ("material", "mkdocs-material")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{package} is not installed (pip install -e '.[dev]' installs it)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # material's end-of-life banner
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    assert (tmp_path / "site" / "index.html").is_file()


def test_the_readme_links_point_at_files_that_exist() -> None:
    """mkdocs checks the pages' links; the README's own relative links are checked here."""
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert local, "the README links to no docs page"
    missing = [t for t in local if not (ROOT / t.split("#", 1)[0]).exists()]
    assert not missing, missing


# --- (b) the README fits a screen (or a few) -------------------------------------------------


def test_the_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move details to docs/"
    )


# --- (c) no issue numbers ------------------------------------------------------------------------


def test_no_issue_numbers_in_the_readme_or_the_docs() -> None:
    found = [
        f"{rel(page)}:{number}: {line.strip()}"
        for page in pages()
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if ISSUE_NUMBER.search(line)
    ]
    assert not found, "\n".join(found)


# --- (d) every `indexer ...` command shown exists, with its flags ---------------------------------


@functools.cache
def indexer_command() -> tuple[str, ...]:
    """How to run the CLI: `python -m indexer` where it works, else the console script."""
    module = (sys.executable, "-m", "indexer")
    try:
        if subprocess.run([*module, "--help"], capture_output=True, timeout=120).returncode == 0:
            return module
    except subprocess.TimeoutExpired:
        pass
    script = Path(sys.executable).parent / "indexer"
    if script.is_file():
        return (str(script),)
    found = shutil.which("indexer")
    if found:
        return (found,)
    pytest.skip("neither `python -m indexer` nor the indexer console script can be run")


@functools.cache
def help_text(*sub: str) -> str:
    result = subprocess.run(
        [*indexer_command(), *sub, "--help"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "COLUMNS": "100"},
    )  # fmt: skip
    assert result.returncode == 0, f"indexer {' '.join(sub)} --help: {result.stderr}"
    return result.stdout


def section(text: str, title: str) -> list[str]:
    """The lines of a click help section ("Options:", "Commands:")."""
    lines = text.split(f"\n{title}\n", 1)[1].splitlines() if f"\n{title}\n" in text else []
    taken = []
    for line in lines:
        if line and not line.startswith(" "):
            break
        taken.append(line)
    return taken


@functools.cache
def subcommands() -> frozenset[str]:
    names = [re.match(r"  ([a-z][\w-]*)", line) for line in section(help_text(), "Commands:")]
    return frozenset(m.group(1) for m in names if m)


@functools.cache
def options(*sub: str) -> frozenset[str]:
    """Every option a command's --help declares (both of '--pretrained / --no-pretrained')."""
    flags = set()
    for line in section(help_text(*sub), "Options:"):
        declared = re.match(r"  (-\S.*?)(?:\s{2,}|$)", line)
        if not declared:
            continue
        for part in re.split(r",\s*|\s+/\s+", declared.group(1)):
            token = part.split()[0] if part.split() else ""
            if token.startswith("-"):
                flags.add(token)
    return frozenset(flags)


def shell_lines(text: str) -> list[tuple[int, str]]:
    """The command lines of a page's shell blocks: (line number, line), continuations joined,
    console blocks' prompts ($ ) only."""
    out = []
    for match in SHELL_FENCE.finditer(text):
        first = text.count("\n", 0, match.start("code")) + 1
        pending, start = "", first
        for offset, raw in enumerate(match.group("code").splitlines()):
            line = raw.strip()
            if match.group("lang") == "console" and not pending:
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not pending:
                start = first + offset
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            out.append((start, pending + line))
            pending = ""
    return out


def indexer_invocations(line: str) -> list[list[str]]:
    """The argument lists of every `indexer` (or `.../indexer`) run on one shell line,
    including a quoted command such as sbatch's --wrap "indexer index DIR"."""
    tokens = shlex.split(line, comments=True)
    found, segment = [], []
    for token in [*tokens, ";"]:
        if token not in SEPARATORS:
            segment.append(token)
            if token.startswith("indexer "):  # a command given to another as one argument
                found += indexer_invocations(token)
            continue
        words = list(segment)
        segment = []
        while words and (words[0] in PREFIXES or re.match(r"[A-Za-z_]\w*=", words[0])):
            words.pop(0)
        if words and (words[0] == "indexer" or words[0].endswith("/indexer")):
            found.append(words[1:])
    return found


def flags_of(args: list[str]) -> list[str]:
    """The options among arguments, also in a synopsis: '[--id', '--threshold=0.5', '-k'."""
    flags = []
    for arg in args:
        if arg == "--":
            break
        m = re.match(r"\[?(--?[A-Za-z][\w-]*)", arg)
        if m:
            flags.append(m.group(1))
    return flags


def all_invocations() -> list[tuple[str, list[str]]]:
    found = []
    for page in pages():
        for number, line in shell_lines(page.read_text(encoding="utf-8")):
            try:
                runs = indexer_invocations(line)
            except ValueError as exc:  # unbalanced quotes
                pytest.fail(f"{rel(page)}:{number}: cannot parse {line!r}: {exc}")
            found += [(f"{rel(page)}:{number}", args) for args in runs]
    return found


def test_every_indexer_command_shown_exists_with_its_flags() -> None:
    runs = all_invocations()
    assert len(runs) >= 40, f"only {len(runs)} indexer commands found in shell blocks"
    problems = []
    seen = set()
    for where, args in runs:
        globals_ = []
        while args and args[0].startswith("-"):
            globals_.append(args.pop(0))
        for flag in globals_:
            if flag not in options():
                problems.append(f"{where}: indexer has no option {flag}")
        if not args:
            if not globals_:
                problems.append(f"{where}: `indexer` without a command")
            continue
        sub = args[0]
        if sub not in subcommands():
            problems.append(
                f"{where}: no command `indexer {sub}` (commands: {sorted(subcommands())})"
            )
            continue
        seen.add(sub)
        for flag in flags_of(args[1:]):
            if flag not in options(sub):
                problems.append(f"{where}: `indexer {sub}` has no option {flag}")
    assert not problems, "\n".join(problems)
    assert seen == subcommands(), f"commands never shown in an example: {subcommands() - seen}"


def test_the_command_parser_sees_what_a_reader_sees() -> None:
    """The helpers above, on the shapes the pages use."""
    assert indexer_invocations("indexer build ~/p --out x  # a comment --nope") == [
        ["build", "~/p", "--out", "x"]
    ]
    assert indexer_invocations("HF_HUB_OFFLINE=1 .venv/bin/indexer -v info x | head") == [
        ["-v", "info", "x"]
    ]
    assert indexer_invocations('sbatch --wrap "indexer index /d"') == [["index", "/d"]]
    assert indexer_invocations("pip install --no-deps /path/to/indexer") == []
    assert flags_of(["[IMAGE|GLOB]...", "[--id", "KEY]...", "--threshold=1", "-k", "-1"]) == [
        "--id",
        "--threshold",
        "-k",
    ]
    text = "```console\n$ indexer info \\\n  x --json\nout --put\n```\n"
    assert shell_lines(text) == [(2, "indexer info x --json")]
    assert "--no-pretrained" in options("build") and "-k" in options("query")


def test_no_command_hides_in_an_indented_code_block() -> None:
    """Shell examples are fenced (```bash), so the test above sees them."""
    found = []
    for page in pages():
        text = ANY_FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), page.read_text("utf-8"))
        for number, line in enumerate(text.splitlines(), 1):
            if re.match(r"(?: {4,}|\t)(?:\$ )?(?:\S*/)?indexer [a-z]", line):
                found.append(f"{rel(page)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
