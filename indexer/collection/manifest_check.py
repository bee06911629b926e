"""The manifest's field types, checked from a table: tampering is one line, never a crash."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

MAX_ID = 2**62  # ids are int64; part I of N numbers rows up to next_id * N
MISSING = object()
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.onnx$")  # a plain name in the version


def _get(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return MISSING
        doc = doc[part]
    return doc


def count(value: Any) -> bool:
    """A non-negative int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def positive(value: Any) -> bool:
    return count(value) and value > 0


def number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def text(value: Any) -> bool:
    return isinstance(value, str) and "\0" not in value


def optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is MISSING or value is None or check(value)


def numbers(n: int, check: Callable[[Any], bool] = number) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and len(value) == n and all(map(check, value))


def one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda value: any(value == c and type(value) is type(c) for c in choices)


def source_ok(source: Any) -> bool:
    """One entry of `sources`: its kind and what names it."""
    if not isinstance(source, dict) or not text(source.get("label", "")):
        return False
    paths = ("folder", "parquet", "webdataset", "bucket", "urllist")
    named = {**dict.fromkeys(paths, "path"), "hf": "name"}.get(str(source.get("kind")))
    return named is not None and text(source.get(named))


def shard_ok(shard: Any) -> bool:
    return isinstance(shard, dict) and count(shard.get("rows"))


# (field, check, what it must be); model.* rows apply only when model is not null
COMMON: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("schema_version", positive, "a positive integer"),
    ("embedding_dim", positive, "a positive integer"),
    ("metric", one_of("ip", "l2"), "ip or l2"),
    ("normalized", optional(one_of(True, False)), "true or false"),
    ("next_id", lambda v: v is MISSING or (count(v) and v < MAX_ID), "an integer from 0 to 2**62"),
    ("counts.embedded", count, "a non-negative integer"),
    ("shards", lambda v: isinstance(v, list) and all(map(shard_ok, v)), "a list of shards"),
    ("sources", lambda v: isinstance(v, list) and all(map(source_ok, v)), "a list of sources"),
    ("request", optional(lambda v: isinstance(v, dict)), "an object"),
    ("model", lambda v: v is None or isinstance(v, dict), "an object or null"),
    ("portable_model_reason", optional(text), "a line of text"),
)
MODEL: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("model.name", text, "a timm model name"),
    ("model.weights.kind", one_of("pretrained", "checkpoint", "random"), "a weights kind"),
    ("model.weights.seed", optional(count), "a non-negative integer"),
    ("model.weights.path", optional(text), "a path"),
    ("model.normalize", one_of(True, False), "true or false"),
    ("model.precision", one_of("fp32", "bf16"), "fp32 or bf16"),
    ("model.pooling", optional(text), "a pooling name"),
    ("model.feature_stage", optional(count), "a stage number"),
    ("model.labels", optional(count), "a non-negative integer"),
    ("model.label_set", optional(text), "a label set name"),
    ("model.data_config.input_size", numbers(3, positive), "3 positive integers"),
    ("model.data_config.mean", numbers(3), "3 numbers"),
    ("model.data_config.std", numbers(3), "3 numbers"),
    ("model.data_config.crop_pct", number, "a number"),
    ("model.data_config.interpolation", text, "an interpolation name"),
    ("model.data_config.crop_mode", text, "a crop mode"),
    ("decode.mode", one_of("fast", "exact"), "fast or exact"),
    ("decode.max_pixels", optional(positive), "a positive integer"),
    ("request.model", optional(text), "a timm model name"),  # absent in old collections
    ("request.weights.kind", optional(one_of("pretrained", "checkpoint", "random")), "a kind"),
    ("request.preprocessing", optional(one_of("fast", "exact")), "fast or exact"),
    # the collection's runtime and precision (decide.py); absent in older collections
    ("precision", optional(one_of("fp32", "bf16")), "fp32 or bf16"),
    ("runtime", optional(lambda v: isinstance(v, dict)), "an object"),
    ("runtime.name", optional(one_of("torch", "onnxruntime", "openvino")), "a runtime name"),
    ("runtime.precision", optional(one_of("fp32", "bf16")), "fp32 or bf16"),
)


def hexdigest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in HEX for c in value)


def label_names(value: Any) -> bool:
    return value is MISSING or (isinstance(value, list) and all(map(text, value)))


HEX = frozenset("0123456789abcdef")
# the exported model: a plain file name in the version (never a path out of it), its checksum
PORTABLE: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("portable_model.path", lambda v: text(v) and bool(MODEL_NAME.match(v)), "a plain .onnx name"),
    ("portable_model.sha256", hexdigest, "a sha256 hex digest"),
    ("portable_model.opset", positive, "a positive integer"),
    ("portable_model.bytes", optional(positive), "a positive integer"),
    ("portable_model.label_names", label_names, "a list of names"),
    ("portable_model.fidelity.min_cosine", number, "a number"),
)


def first_bad_field(manifest: Any) -> str | None:
    """What is wrong with a parsed manifest's types, or None (a small pure check)."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    rows = COMMON + (MODEL if isinstance(manifest.get("model"), dict) else ())
    if "portable_model" in manifest:
        rows += PORTABLE
    for field, check, what in rows:
        if not check(_get(manifest, field)):
            return f"{field} is not {what}"
    return runtime_mismatch(manifest)


def runtime_mismatch(manifest: dict[str, Any]) -> str | None:
    """The runtime record against what it says made the vectors: its precision the model's,
    a portable runtime only with a portable model, onnxruntime only in fp32."""
    runtime, model = manifest.get("runtime"), manifest.get("model")
    if not isinstance(runtime, dict) or not isinstance(model, dict):
        return None
    name, precision = runtime.get("name"), runtime.get("precision")
    if precision is not None and precision != model.get("precision"):
        return "runtime.precision is not model.precision"
    if name in ("onnxruntime", "openvino") and "portable_model" not in manifest:
        return "runtime.name is a portable runtime, and there is no portable_model"
    if name == "onnxruntime" and precision == "bf16":
        return "runtime.precision is bf16, which onnxruntime does not compute in"
    return None
