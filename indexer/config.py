"""Frozen configuration dataclasses: what the CLI (or a job file) hands to the library."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from indexer.errors import InputError

DEFAULT_MODEL = "test_convnext.r160_in1k"
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own limit (it only warns); enforced as an error
METRICS = ("ip", "l2")
PRECISIONS = ("auto", "fp32", "bf16")
RUNTIMES = ("auto", "torch", "onnx", "openvino")  # what embeds (indexer.model.runtime)
POOLINGS = ("head", "avg", "max", "gem")


StorageOptions = tuple[tuple[str, str], ...]  # --storage-option KEY=VALUE pairs, in order


@dataclass(frozen=True)
class SourceSpec:
    """One SOURCE argument: a folder path or ``hf:PATH_OR_NAME``, plus dataset options."""

    location: str
    split: str | None = None
    image_column: str | None = None
    follow_symlinks: bool = False  # folders: also follow links that point outside the folder
    key_column: str | None = None  # datasets: the column whose values are the keys
    storage_options: StorageOptions = ()  # buckets: fsspec options (never stored)
    read_concurrency: int = 64  # buckets: objects fetched at once by each reading worker
    url_column: str = "url"  # URL lists: the column holding each row's URL or path
    refetch: bool = False  # URL lists: fetch every row again (HTTP has no cheap fingerprint)
    read_retries: int = 3  # buckets and lists: tries after a passing failure (503, reset)


@dataclass(frozen=True)
class ModelConfig:
    """Which timm model, which weights, and how embeddings are produced."""

    name: str = DEFAULT_MODEL
    pretrained: bool = True
    checkpoint: Path | None = None
    seed: int = 0
    normalize: bool = True
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on CUDA and on CPUs with native bf16, else fp32
    pooling: str = "head"  # head: the model's own pre-logits; avg, max, gem: over a feature map
    feature_stage: int | None = None  # pool this stage's map (timm feature extraction) instead
    labels: int = 0  # store the classifier's top-K classes per item (0: none)
    runtime: str = "auto"  # what embeds: auto, torch, onnx, openvino (indexer.model.runtime)


DECODES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class LoaderConfig:
    """How images are read and batched."""

    batch_size: int = 64
    workers: int = 2
    preprocessing: str = "fast"  # fast (JPEG draft, reduce) or exact (timm's transform)
    progress: bool | None = None  # None: show a bar only on a terminal
    decode_timeout: float = 60.0  # seconds one item may take in a worker; 0: no limit
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_truncated: bool = False  # decode truncated files (missing part grey) instead of failing
    decode_hook: str | None = None  # "module:function" called with each key first (tests)
    decode: str = "auto"  # where JPEGs are decoded: cpu, gpu, auto (gpu where measured faster)


DEFAULT_INDEX_MEMORY = 16 * 1024**3  # generous: the budget only steers collections past ~50M


@dataclass(frozen=True)
class IndexConfig:
    """How the FAISS index is chosen, built over the shards and tuned."""

    metric: str = "ip"
    index_type: str = "auto"  # auto, flat, ivf, ivfsq, hnsw, or a FAISS factory string
    max_memory: int = DEFAULT_INDEX_MEMORY  # bytes the index may hold in memory
    target_recall: float = 0.95  # recall@k the search parameter is tuned to reach
    recall_queries: int = 1000  # stored vectors used as queries to measure and tune
    recall_k: int = 10
    seed: int = 0
    rebuild: bool = False  # build the index from scratch, never update the previous one
    max_update_share: float = 0.2  # more changed vectors than this share: rebuilt, not updated


ENGINES = ("local", "ray")


@dataclass(frozen=True)
class EngineConfig:
    """Where decoding and embedding run: this machine's DataLoader, or Ray Data."""

    kind: str = "local"
    address: str | None = None  # ray: a cluster to join; None starts a local Ray
    concurrency: int | None = None  # ray: embedding actors (one model each); None: 1


@dataclass(frozen=True)
class IndexOverrides:
    """Index settings given for `indexer index DIR`; None keeps what the collection recorded."""

    index_type: str | None = None
    max_memory: int | None = None
    target_recall: float | None = None
    rebuild: bool = False  # --rebuild-index

    def resolve(self, metric: str, recorded: dict[str, Any] | None) -> IndexConfig:
        before = recorded or {}
        base = IndexConfig(metric=metric)
        return IndexConfig(
            metric=metric,
            index_type=_first(self.index_type, before.get("requested"), base.index_type),
            max_memory=_first(self.max_memory, before.get("max_memory"), base.max_memory),
            target_recall=_first(
                self.target_recall, before.get("target_recall"), base.target_recall
            ),
            rebuild=self.rebuild,
        )


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


@dataclass(frozen=True)
class BuildConfig:
    """Everything ``indexer build`` needs."""

    sources: tuple[SourceSpec, ...]
    out: Path
    model: ModelConfig = field(default_factory=ModelConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    shard_size: int = 50_000
    rebuild: bool = False  # re-embed everything instead of updating incrementally
    retry_failed: bool = False  # read again files that failed and have not changed since
    max_failures: float = 0.05  # >= 1: a count of items; below 1: a fraction of the items
    keep: int = 2  # published versions kept (older ones are deleted)
    metrics_file: Path | None = None
    partition: tuple[int, int] | None = None  # (I, N): only part I of N; `out` is that part's
    engine: EngineConfig = field(default_factory=EngineConfig)
    # repair: damaged shards of the published version; their items are embedded again
    drop_shards: frozenset[str] = frozenset()


PATH_SETTINGS = ("out", "checkpoint", "metrics_file")


def read_job(path: Path) -> dict[str, Any]:
    """A job file's settings: the `indexer build` flags as TOML keys, paths relative to the file.

    Keys are returned with underscores (`batch-size` and `batch_size` are one setting, and giving
    both is an error); the values' types are checked against the flags by `cli.job_argv`.
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


def setting_text(job: Path, name: str, value: Any, kind: str, many: bool = False) -> list[str]:
    """A job-file value as command-line text (one item, or one per list element); an
    InputError naming the setting and the type it must have when its TOML type differs."""
    if many:
        if isinstance(value, list) and all(_is_kind(v, kind) for v in value):
            return [_text(v) for v in value]
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
    return [_text(value)]


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str) and "\0" not in value  # no path or name holds a NUL


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _quoted(value: str) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string


TOML_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),  # before int: a bool is an int in Python
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
)


def _toml_type(value: Any) -> str:
    """How TOML names a parsed value's type, for error messages."""
    return next((name for kind, name in TOML_TYPES if isinstance(value, kind)), "a date or time")


def file_sha256(path: Path) -> str:
    """The sha256 of a file (weights identity), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
