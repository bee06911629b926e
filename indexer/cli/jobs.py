"""Job files: TOML settings under the build's flag names, checked as the flags are."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from indexer.errors import InputError

PATH_SETTINGS = ("out", "checkpoint", "metrics_file")


def read_job(path: Path) -> dict[str, Any]:
    """A job file's settings: the `indexer build` flags as TOML keys, paths relative to the file.

    Keys are returned with underscores (`batch-size` and `batch_size` are one setting, and giving
    both is an error); the values' types are checked against the flags by `job_flags`.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read job file {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8-sig")  # an editor's byte-order mark is still UTF-8
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(
            f"job file {path} is not UTF-8 text ({exc.reason} at line {line}, "
            f"byte {exc.start}): save it as UTF-8"
        ) from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"job file {path} is not valid TOML: {exc}") from exc
    settings = _one_spelling_each(path, raw)
    base = path.resolve().parent
    for key in PATH_SETTINGS:
        if isinstance(settings.get(key), str):
            settings[key] = _resolve_path(path, base, key, settings[key])
    if isinstance(settings.get("sources"), list):
        settings["sources"] = [_resolve_source(path, base, s) for s in settings["sources"]]
    table = settings.get("storage_options")  # [storage_options] KEY = VALUE, or a list
    if isinstance(table, dict):  # of "KEY=VALUE" as --storage-option takes them
        settings["storage_options"] = _option_pairs(table)
    return settings


def _option_pairs(table: dict[str, Any]) -> list[str]:
    """A [storage_options] table as --storage-option pairs; an inner table's (such as
    [storage_options.config_kwargs]) as TABLE.KEY=VALUE."""
    pairs = []
    for key, value in table.items():
        if isinstance(value, dict):
            pairs += [f"{key}.{inner}={_option_text(v)}" for inner, v in value.items()]
        else:
            pairs.append(f"{key}={_option_text(value)}")
    return pairs


def _option_text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _one_spelling_each(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """The settings under underscored names; a setting given under two spellings is an error."""
    spellings: dict[str, list[str]] = {}
    for key in raw:
        spellings.setdefault(key.replace("-", "_"), []).append(key)
    for name, keys in spellings.items():
        if len(keys) > 1:
            given = " and ".join(f"'{k}'" for k in keys)
            raise InputError(f"job file {path} gives setting '{name}' twice, as {given}: keep one")
    return {key.replace("-", "_"): value for key, value in raw.items()}


def _resolve_path(job: Path, base: Path, key: str, value: str) -> str:
    if not value:  # Path("") is ".": the job file's own folder
        raise InputError(f"job file {job}: setting '{key}' must not be empty")
    return str(base / Path(value).expanduser())


def _resolve_source(job: Path, base: Path, source: Any) -> Any:
    if not isinstance(source, str):
        return source  # job_argv refuses it, naming the expected type
    if "://" in source:  # a bucket (s3://, gs://, az://): not a path
        return source
    if source.startswith("hf:"):
        name = source[3:]
        local = name.startswith((".", "/", "~"))
        return f"hf:{base / Path(name).expanduser()}" if local else source
    return _resolve_path(job, base, "sources", source)


SETTING_KINDS = {
    "boolean": "true or false",
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
}


def toml_kind(param_type: object) -> str:
    """The TOML type a job file gives for a click parameter type (a key of SETTING_KINDS).

    Flags are booleans, INT and IntRange integers, FLOAT and FloatRange numbers (an integer or a
    float); every other type (text, Choice, Path, ...) is a string, as on a command line.
    """
    import click

    if isinstance(param_type, click.types.BoolParamType):
        return "boolean"
    if isinstance(param_type, click.types.IntParamType):
        return "integer"
    if isinstance(param_type, click.types.FloatParamType):
        return "number"
    return "string"


def job_flags(settings: dict[str, Any], job: Path, command: click.Command) -> dict[str, Any]:
    """The command's flags a job file's settings stand for, as the command line gives them.

    Each value must have the TOML type of its flag (toml_kind of the click type): a list of
    strings for SOURCES, true or false for flags, integers, numbers or strings for the rest;
    each flag's click type then converts and checks it (ranges, choices) as on a command line,
    and a setting left out takes the flag's default.
    """
    ctx = click.Context(command, info_name=command.name)
    unset = click.Option(["--unset"]).default  # click's "nobody gave it" (None before 8.2)
    left = dict(settings)
    flags: dict[str, Any] = {}
    for param in command.params:
        name = param.name or ""
        if name in left:
            many = param.multiple or param.nargs != 1
            value = check_setting(job, name, left.pop(name), toml_kind(param.type), many)
        else:
            value = param.consume_value(ctx, {})[0]  # the flag's default
        try:
            flags[name] = param.process_value(ctx, value)
            if flags[name] is unset and unset is not None:
                flags[name] = None  # as click gives a command an option nobody set
        except click.ClickException as exc:  # a value out of range, a missing SOURCES
            raise InputError(f"job file {job}: {exc.format_message()}") from exc
    if left:
        known = ", ".join(p.name or "" for p in command.params)
        raise InputError(f"job file {job} has unknown setting(s) {sorted(left)}; known: {known}")
    return flags


def check_setting(job: Path, name: str, value: Any, kind: str, many: bool = False) -> Any:
    """A job-file value, refused (an InputError naming the setting and the type it must have)
    when its TOML type is not its flag's: a list of them where the flag takes many."""
    if many:
        if isinstance(value, list) and all(_is_kind(v, kind) for v in value):
            return value
        plural = {"boolean": "booleans", "number": "numbers"}.get(kind, f"{kind}s")
        if isinstance(value, list):
            wrong = next(v for v in value if not _is_kind(v, kind))
            got = f"a list holding {_toml_type(wrong)}"
        else:
            got = _toml_type(value)
        hint = f": write {name} = [{_quoted(value)}]" if isinstance(value, str) else ""
        raise InputError(
            f"job file {job}: setting '{name}' must be a list of {plural}, not {got}{hint}"
        )
    if not _is_kind(value, kind):
        nul = kind == "string" and isinstance(value, str)
        got = "one holding a NUL character" if nul else _toml_type(value)
        raise InputError(
            f"job file {job}: setting '{name}' must be {SETTING_KINDS[kind]}, not {got}"
        )
    return value


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str) and "\0" not in value  # no path or name holds a NUL


def _quoted(value: str) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string


def _toml_type(value: Any) -> str:
    """How TOML names a parsed value's type, for error messages."""
    return next((name for kind, name in TOML_TYPES if isinstance(value, kind)), "a date or time")


TOML_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),  # before int: a bool is an int in Python
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
)
