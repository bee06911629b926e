"""The container images, checked without a container engine (none runs here, and no base image
can be pulled): the Dockerfile parses, every stage and target named exists and runs `indexer`
as a user other than root, what it copies is in the build context (.dockerignore), `make image`
builds each target with the engine it finds, and the wheel built from that context, installed
in a fresh venv the way the slim stage installs it, has no torch or timm, prints its help,
answers a query and serves an upload as the full install does.
"""

from __future__ import annotations

import http.client
import json
import os
import posixpath
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import run_cli

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
TARGETS = ("cpu", "slim", "cuda", "ray")  # what the Makefile, the jobs and the docs name
WHEELS = "/tmp/wheels"  # where each stage copies the builder's wheel
VENV = "/opt/indexer"  # the images' venv
INSTRUCTIONS = frozenset(
    ("FROM", "COPY", "RUN", "ENV", "ARG", "WORKDIR", "USER", "ENTRYPOINT", "CMD", "EXPOSE", "LABEL")
)
FLAGS = {"FROM": {"platform"}, "COPY": {"from", "chown", "chmod", "link"}, "RUN": {"mount"}}
EXEC_FORMS = {"RUN", "CMD", "ENTRYPOINT", "COPY"}


# --- a parser for the instructions the Dockerfile uses ------------------------------------------


@dataclass(frozen=True)
class Instruction:
    cmd: str
    args: tuple[str, ...]  # the words; an exec form's list; RUN's shell form is one string
    flags: dict[str, str]
    exec_form: bool
    line: int


@dataclass(frozen=True)
class Stage:
    name: str
    base: str  # an earlier stage's name or an image, global ARGs substituted
    instructions: tuple[Instruction, ...]

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, instruction): continuations joined, comments and blank lines dropped
    (also inside a continuation, as Docker does); parser directives checked."""
    lines = text.splitlines()
    for raw in lines:
        directive = re.match(r"#\s*(\w+)\s*=\s*(\S+)\s*$", raw)
        if not directive:
            break
        if directive.group(1).lower() == "escape" and directive.group(2) != "\\":
            raise ValueError(f"escape={directive.group(2)} is not read by this parser")
    out, pending, start = [], "", 0
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += raw.rstrip()[:-1]  # Docker drops the escape and the newline
            continue
        out.append((start, pending + raw))
        pending = ""
    if pending:
        raise ValueError(f"line {start}: a continuation runs past the end of the file")
    return out


def parse_instruction(line: int, text: str) -> Instruction:
    keyword, _, rest = text.strip().partition(" ")
    cmd, rest = keyword.upper(), rest.strip()
    if cmd not in INSTRUCTIONS:
        raise ValueError(f"line {line}: unknown instruction {keyword!r}")
    flags = {}
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, _, value = flag[2:].partition("=")
        if name not in FLAGS.get(cmd, set()):
            raise ValueError(f"line {line}: {cmd} has no flag --{name}")
        flags[name], rest = value, rest.strip()
    if cmd in EXEC_FORMS and rest.startswith("["):
        words = json.loads(rest)  # a broken exec form is an error here, not a shell form
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"line {line}: {cmd}'s exec form is not a list of strings")
        return Instruction(cmd, tuple(words), flags, True, line)
    args = (rest,) if cmd in ("RUN", "CMD", "ENTRYPOINT") else tuple(shlex.split(rest))
    if not args or not args[0]:
        raise ValueError(f"line {line}: {cmd} without arguments")
    if cmd in ("ENV", "LABEL") and not all("=" in a for a in args):
        raise ValueError(f"line {line}: {cmd} takes KEY=VALUE pairs")
    if cmd in ("WORKDIR", "USER") and len(args) != 1:
        raise ValueError(f"line {line}: {cmd} takes one argument")
    if cmd == "COPY" and len(args) < 2:
        raise ValueError(f"line {line}: COPY takes sources and a destination")
    if cmd == "EXPOSE" and not all(re.fullmatch(r"\d+(/tcp|/udp)?", a) for a in args):
        raise ValueError(f"line {line}: EXPOSE takes ports")
    if cmd == "FROM" and not (len(args) == 1 or (len(args) == 3 and args[1].upper() == "AS")):
        raise ValueError(f"line {line}: FROM IMAGE [AS NAME]")
    return Instruction(cmd, args, flags, False, line)


def substitute(text: str, values: dict[str, str], line: int) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise ValueError(f"line {line}: ${name} is not a global ARG")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """The global ARGs (with their defaults) and the stages, in order."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    current: list[Instruction] | None = None
    for line, source in logical_lines(text):
        ins = parse_instruction(line, source)
        if ins.cmd == "FROM":
            base = substitute(ins.args[0], global_args, line)
            name = ins.args[2] if len(ins.args) == 3 else str(len(stages))
            if name in {s.name for s in stages}:
                raise ValueError(f"line {line}: a second stage named {name!r}")
            current = []
            stages.append(Stage(name, base, ()))
        elif current is None:
            if ins.cmd != "ARG":
                raise ValueError(f"line {line}: {ins.cmd} before the first FROM")
            name, _, default = ins.args[0].partition("=")
            global_args[name] = default
            continue
        else:
            current.append(ins)
        stages[-1] = Stage(stages[-1].name, stages[-1].base, tuple(current))
    if not stages:
        raise ValueError("no FROM")
    return global_args, stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    _, parsed = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    return {s.name: s for s in parsed}


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, the first base first."""
    found = [stages[name]]
    while found[0].base in stages:
        found.insert(0, stages[found[0].base])
    return found


def last(stages: dict[str, Stage], target: str, cmd: str) -> Instruction | None:
    every = [i for stage in chain(stages, target) for i in stage.all(cmd)]
    return every[-1] if every else None


def args_of(stages: dict[str, Stage], target: str) -> dict[str, str]:
    """The ARG defaults a target's RUNs see (its own stage's: ARGs do not carry over)."""
    return dict(a.args[0].partition("=")[::2] for a in stages[target].all("ARG"))


def env_of(stages: dict[str, Stage], target: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in chain(stages, target):
        for ins in stage.all("ENV"):
            env.update(a.partition("=")[::2] for a in ins.args)
    return env


def test_the_parser_reads_what_docker_reads() -> None:
    text = (
        "# syntax=docker/dockerfile:1\nARG BASE=python:3.12-slim\n\n"
        "FROM ${BASE} AS one\n"
        "RUN apt-get update \\\n"
        "# a comment inside a continuation is dropped\n"
        "  && echo done\n"
        'ENV A=1 B="two words" PATH=/v/bin:$PATH\n'
        "COPY --from=one --chown=1:1 a b/ dest/\n"
        'ENTRYPOINT ["indexer"]\n'
        "from one as two\n"
    )
    global_args, parsed = parse_dockerfile(text)
    assert global_args == {"BASE": "python:3.12-slim"}
    assert [(s.name, s.base) for s in parsed] == [("one", "python:3.12-slim"), ("two", "one")]
    run, env, copy, entry = parsed[0].instructions
    assert run.args == ("apt-get update   && echo done",) and run.line == 5
    assert env.args == ("A=1", "B=two words", "PATH=/v/bin:$PATH")
    assert copy.flags == {"from": "one", "chown": "1:1"} and copy.args == ("a", "b/", "dest/")
    assert entry.exec_form and entry.args == ("indexer",)
    bad = {
        "FROM a\nFROOM b\n": "unknown instruction",
        "FROM a\nENTRYPOINT [indexer]\n": "Expecting value",
        "FROM a\nCOPY --form=b x y\n": "no flag --form",
        "FROM $NOPE\n": "not a global ARG",
        "FROM a AS x\nFROM b AS x\n": "a second stage",
        "RUN true\n": "before the first FROM",
        "FROM a\nENV KEY value\n": "KEY=VALUE",
        "FROM a\nRUN x \\\n": "past the end",
    }
    for source, message in bad.items():
        with pytest.raises(ValueError, match=message):
            parse_dockerfile(source)


# --- (a) the stages and the targets --------------------------------------------------------------


def test_the_dockerfile_parses_into_its_stages(stages: dict[str, Stage]) -> None:
    names = list(stages)
    assert set(TARGETS) | {"builder"} <= set(names), names
    assert names[-1] == "cpu", "a plain `docker build .` builds the cpu image"
    for position, stage in enumerate(stages.values()):
        if stage.base in stages:
            assert names.index(stage.base) < position, f"{stage.name}: FROM a later stage"
        else:  # an image from a registry: pinned to a tag, never an implicit latest
            tag = stage.base.rpartition("/")[2].partition(":")[2]
            assert tag and tag != "latest", f"{stage.name}: FROM {stage.base} has no tag"
        for copy in stage.all("COPY"):
            if "from" in copy.flags:
                source = copy.flags["from"]
                assert source in stages, f"line {copy.line}: --from={source} is no stage"
                assert names.index(source) < position, f"line {copy.line}: a later stage"


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_runs_indexer_from_the_wheel_as_a_user_other_than_root(
    stages: dict[str, Stage], target: str
) -> None:
    entrypoint = last(stages, target, "ENTRYPOINT")
    assert entrypoint is not None and entrypoint.exec_form and entrypoint.args == ("indexer",)
    cmd = last(stages, target, "CMD")
    assert cmd is None or cmd.exec_form
    user = last(stages, target, "USER")
    assert user is not None, f"{target} runs as root"
    uid = user.args[0].partition(":")[0]
    assert uid.isdigit() and uid != "0", f"{target}: USER {user.args[0]} (numeric, not root)"
    runs = [r.args[0] for stage in chain(stages, target) for r in stage.all("RUN")]
    assert any(f"useradd --create-home --uid {uid} " in r for r in runs), f"no user {uid}"
    copies = [c for c in stages[target].all("COPY") if c.flags.get("from") == "builder"]
    assert [c.args for c in copies] == [("/wheels/", f"{WHEELS}/")]
    assert any(f"{WHEELS}/indexer-*.whl" in run.args[0] for run in stages[target].all("RUN"))
    builder_runs = [r.args[0] for r in stages["builder"].all("RUN")]
    assert any("pip wheel --no-deps" in r and "--wheel-dir /wheels ." in r for r in builder_runs)
    env = env_of(stages, target)
    assert env["VIRTUAL_ENV"] == VENV and env["PATH"].startswith(f"{VENV}/bin:")


def test_the_cpu_image_takes_torch_from_the_cpu_index_and_slim_takes_no_torch(
    stages: dict[str, Stage],
) -> None:
    cpu = stages["cpu"]
    assert args_of(stages, "cpu")["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert any("pip install --index-url ${TORCH_INDEX} torch torchvision" in r.args[0]
               for r in cpu.all("RUN"))  # fmt: skip
    assert args_of(stages, "cuda-base")["TORCH_INDEX"].startswith(
        "https://download.pytorch.org/whl/cu"
    )
    assert chain(stages, "cuda")[0].base.startswith("nvidia/cuda:")
    slim_runs = " ".join(r.args[0] for s in chain(stages, "slim") for r in s.all("RUN"))
    assert "pip install --no-deps " in slim_runs
    packages = args_of(stages, "slim")["SLIM_PACKAGES"].split()
    assert not {"torch", "timm", "torchvision"} & set(packages)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[^A-Za-z0-9_.-]", d, maxsplit=1)[0] for d in project}
    assert set(packages) <= names, set(packages) - names  # no package the project does not name
    make = (ROOT / "Makefile").read_text()
    slim_check = re.search(r"\$\(SLIM\)/bin/pip install --quiet (numpy[^\n]*)", make)
    assert slim_check and set(slim_check.group(1).split()) <= set(packages)
    assert {"starlette", "uvicorn", "python-multipart"} <= set(packages)  # indexer serve


def image_names(doc: Any) -> Iterator[str]:
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key == "image" and isinstance(value, str):
                yield value
            else:
                yield from image_names(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from image_names(value)


def pod_specs(doc: Any) -> Iterator[dict[str, Any]]:
    if isinstance(doc, dict):
        if "containers" in doc:
            yield doc
        for value in doc.values():
            yield from pod_specs(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from pod_specs(value)


def test_the_targets_named_elsewhere_exist(stages: dict[str, Stage]) -> None:
    make = (ROOT / "Makefile").read_text()
    default = re.search(r"^IMAGES \?= (.*)$", make, re.M)
    assert default and default.group(1).split() == ["cpu", "slim", "cuda"]
    user = last(stages, "cpu", "USER")
    assert user is not None
    uid = user.args[0].partition(":")[0]
    named = set()
    for path in sorted((ROOT / "jobs" / "kubernetes").glob("*.yaml")):
        docs = list(yaml.safe_load_all(path.read_text()))
        for image in (i for d in docs for i in image_names(d)):
            match = re.fullmatch(r"registry\.example\.com/indexer:([\w.-]+)", image)
            assert match, f"{path.name}: {image} is not registry.example.com/indexer:TARGET"
            named.add(match.group(1))
        for spec in (s for d in docs for s in pod_specs(d)):
            context = spec.get("securityContext", {})
            assert str(context.get("runAsUser")) == uid == str(context.get("fsGroup")), path.name
    assert named == {"cpu", "slim", "ray"}, named
    pages = [
        ROOT / "README.md",
        ROOT / "jobs" / "README.md",
        *sorted((ROOT / "docs").rglob("*.md")),
    ]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"--target ([a-z][\w-]*)", text):
            assert target in stages, f"{page.relative_to(ROOT)}: --target {target}"
        for listed in re.findall(r'IMAGES="([^"]*)"', text):
            assert set(listed.split()) <= set(TARGETS), f"{page.relative_to(ROOT)}: {listed}"
    assert set(TARGETS) <= named | set(default.group(1).split())


# --- make image, with stand-in engines ----------------------------------------------------------


def make_image(tmp_path: Path, engines: dict[str, bool]) -> tuple[subprocess.CompletedProcess, str]:
    """`make image` with only these engines on PATH (name: whether `ENGINE info` succeeds); the
    engines log their calls instead of building."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    folder = tmp_path / "engines"
    folder.mkdir()
    log = tmp_path / "calls"
    log.touch()
    for name, works in engines.items():
        script = folder / name
        script.write_text(
            f'#!/bin/sh\necho "{name} $*" >> "{log}"\n'
            f'if [ "$1" = info ]; then exit {0 if works else 1}; fi\n'
        )
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "CONTAINER_ENGINE")}
    done = subprocess.run(
        [make, "-s", "--no-print-directory", "-C", str(ROOT), "image",
         "IMAGE_REPO=registry.example.com/indexer"],
        env={**env, "PATH": str(folder)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return done, log.read_text()


def test_make_image_builds_each_target_with_the_engine_it_finds(tmp_path: Path) -> None:
    done, calls = make_image(tmp_path, {"docker": False, "podman": True})
    assert done.returncode == 0, done.stdout + done.stderr
    builds = [f"podman build --target {t} -t registry.example.com/indexer:{t} ." for t in
              ("cpu", "slim", "cuda")]  # fmt: skip
    assert calls.splitlines() == ["docker info", "podman info", *builds]


@pytest.mark.parametrize(
    ("engines", "says"),
    [
        ({}, "no container engine: install docker or podman"),
        ({"docker": False}, "'docker info' fails"),
    ],
)
def test_make_image_without_a_working_engine_says_so_in_one_line(
    tmp_path: Path, engines: dict[str, bool], says: str
) -> None:
    done, calls = make_image(tmp_path, engines)
    assert done.returncode != 0
    assert done.stdout.splitlines() == [done.stdout.strip()] and says in done.stdout
    assert "build" not in calls


# --- (b) the build context ----------------------------------------------------------------------


def glob_regex(pattern: str) -> str:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return out


def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = posixpath.normpath(line[1:].strip() if keep else line).lstrip("/")
        rules.append((keep, re.compile(glob_regex(pattern))))
    return rules


def in_context(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern that matches the path or a folder above it decides."""
    parts = relative.split("/")
    paths = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    kept = True
    for keep, rule in rules:
        if any(rule.fullmatch(p) for p in paths):
            kept = keep
    return kept


def context_files(source: str, rules: list[tuple[bool, re.Pattern[str]]]) -> list[str]:
    """The files under a COPY source (a file or a folder) that the build context holds."""
    path = ROOT / source
    files = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]
    return [r for r in (p.relative_to(ROOT).as_posix() for p in files) if in_context(r, rules)]


def test_the_ignore_rules_read_as_docker_reads_them() -> None:
    rules = [(False, re.compile(glob_regex("*"))), (True, re.compile(glob_regex("pkg"))),
             (False, re.compile(glob_regex("**/__pycache__")))]  # fmt: skip
    assert in_context("pkg/a/b.py", rules) and not in_context("pkg/a/__pycache__/b.pyc", rules)
    assert not in_context("other/pkg", rules) and not in_context("top.txt", rules)


def test_every_path_the_dockerfile_copies_is_in_the_build_context(
    stages: dict[str, Stage],
) -> None:
    rules = ignore_rules()
    copied = []
    for stage in stages.values():
        for copy in stage.all("COPY"):
            if "from" in copy.flags:
                continue
            for source in copy.args[:-1]:
                assert (ROOT / source).exists(), f"line {copy.line}: {source} does not exist"
                assert in_context(source.rstrip("/"), rules), f"{source} is in .dockerignore"
                copied += context_files(source, rules)
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "indexer").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}  # fmt: skip
    assert package <= set(copied), sorted(package - set(copied))
    assert {"pyproject.toml", "README.md", "indexer/serve/page.html"} <= set(copied)
    for outside in (".venv/bin/python", ".git/HEAD", "build/x", "site/index.html",
                    "tests/test_image.py", "indexer/__pycache__/x.pyc", "bench/x.py"):  # fmt: skip
        assert not in_context(outside, rules), f"{outside} would be sent to the engine"


# --- (c) the slim stage's install, in a fresh venv --------------------------------------------


def lay_out_builder(stages: dict[str, Stage], root: Path) -> Path:
    """The builder stage's files as its COPYs lay them out, from the build context only;
    returns its WORKDIR."""
    rules, workdir = ignore_rules(), "/"
    for ins in stages["builder"].instructions:
        if ins.cmd == "WORKDIR":
            workdir = posixpath.join(workdir, ins.args[0])
        if ins.cmd != "COPY" or "from" in ins.flags:
            continue
        *sources, dest = ins.args
        target = root / posixpath.join(workdir, dest).lstrip("/")
        for source in sources:
            for relative in context_files(source, rules):
                if (ROOT / source).is_dir():  # a folder's contents go into dest
                    inside = Path(relative).relative_to(source.rstrip("/"))
                    out = target / inside
                else:
                    out = target / Path(relative).name if dest.endswith("/") else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ROOT / relative, out)
    return root / workdir.lstrip("/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def upload(port: int, image: Path) -> dict[str, Any]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n5\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode() + image.read_bytes()  # fmt: skip
    body += f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/api/collections/photos/search", body,
                 {"Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    response = conn.getresponse()
    data = response.read()
    assert response.status == 200, data
    return dict(json.loads(data))


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def serve_until_ready(argv: list[str], env: dict[str, str], cwd: Path, port: int) -> Any:
    server = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 90  # a guard against a hung start, not a timing test
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if get(port, "/readyz")[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.2)
    server.kill()
    pytest.fail(f"indexer serve did not get ready: {server.communicate()[0]}")


@pytest.mark.slow
def test_the_slim_stage_installs_a_wheel_that_queries_and_serves_without_torch(
    stages: dict[str, Stage], collection: Path, corpus: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    source = lay_out_builder(stages, tmp_path / "builder")
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", ".",
         "-w", str(wheels)], cwd=source, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("indexer-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "indexer").rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}  # fmt: skip
    assert expected <= packaged, sorted(expected - packaged)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    image_env = env_of(stages, "slim")  # the image's PATH and VIRTUAL_ENV, in the venv
    env["PATH"] = image_env["PATH"].replace(VENV, str(venv)).replace("$PATH", env["PATH"])
    env["VIRTUAL_ENV"] = str(venv)
    env["HOME"] = str(tmp_path / "home")
    slim_args = args_of(stages, "slim")
    for run in stages["slim"].all("RUN"):  # the stage's own commands, in the venv
        done = subprocess.run(["sh", "-c", run.args[0].replace(WHEELS, str(wheels))],
                              env={**env, **slim_args}, cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    installed = time.monotonic()

    python = str(venv / "bin" / "python")
    for module in ("torch", "timm", "torchvision"):
        probe = subprocess.run([python, "-c", f"import {module}"], env=env, capture_output=True,
                               text=True, cwd=tmp_path)  # fmt: skip
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, module
    where = subprocess.run([python, "-c", "import indexer; print(indexer.__file__)"], env=env,
                           capture_output=True, text=True, cwd=tmp_path, check=True)  # fmt: skip
    assert where.stdout.startswith(str(venv)), where.stdout  # the wheel, not the checkout

    entry, cmd = last(stages, "slim", "ENTRYPOINT"), last(stages, "slim", "CMD")
    assert entry is not None and cmd is not None
    entrypoint = list(entry.args)
    assert shutil.which(entrypoint[0], path=env["PATH"]) == str(venv / "bin" / "indexer")
    helped = subprocess.run([*entrypoint, *cmd.args], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert helped.returncode == 0 and "query" in helped.stdout and "serve" in helped.stdout

    images = [str(p) for p in sorted(corpus.rglob("*.jpg"))[:3]]
    want = run_cli("query", *images, "--index", collection, "--json", "-k", "5",
                   "--runtime", "torch")  # fmt: skip
    assert want.exit_code == 0, want.output
    got = subprocess.run([*entrypoint, "query", *images, "--index", str(collection), "--json",
                          "-k", "5"], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert got.returncode == 0, got.stderr
    for g, w in zip(json.loads(got.stdout), json.loads(want.stdout), strict=True):
        assert [r["key"] for r in g["results"]] == [r["key"] for r in w["results"]]
        assert all(abs(a["score"] - b["score"]) < 1e-4
                   for a, b in zip(g["results"], w["results"], strict=True))  # fmt: skip

    port = free_port()
    server = serve_until_ready([*entrypoint, "serve", str(collection), "--name", "photos",
                                "--port", str(port)], env, tmp_path, port)  # fmt: skip
    try:
        answer = upload(port, Path(images[0]))
        first = json.loads(got.stdout)[0]["results"]
        assert [r["key"] for r in answer["results"]] == [r["key"] for r in first]
        status, page = get(port, "/")
        assert status == 200 and b"<html" in page.lower()  # the page ships in the wheel
    finally:
        server.terminate()
        server.communicate(timeout=30)
    print(
        f"wheel and slim install {installed - started:.1f} s, "
        f"checks {time.monotonic() - installed:.1f} s"
    )
