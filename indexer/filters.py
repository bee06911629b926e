"""Metadata filters (--where): conditions on shard columns, parsed, then the ids they keep."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from indexer.errors import InputError

CONDITION = re.compile(r"^\s*([^<>=!\s][^<>=!]*?)\s*(!=|<=|>=|=|<|>)\s*(.*?)\s*$")
NUMERIC_OPS = ("<", "<=", ">", ">=")
LABEL = "label"  # the top predicted label (label_name[0]) of a collection built with --labels


@dataclass(frozen=True)
class Condition:
    column: str
    op: str  # = != < <= > >=
    value: str

    def __str__(self) -> str:
        return f"{self.column}{self.op}{self.value}"


def parse_where(where: str | Iterable[str] | None) -> list[Condition]:
    """COL=VALUE, COL!=VALUE, COL<N, COL<=N, COL>N, COL>=N; several are ANDed."""
    texts = [where] if isinstance(where, str) else list(where or [])
    conditions = []
    for text in texts:
        match = CONDITION.match(text)
        if match is None or not match.group(3):
            raise InputError(
                f"--where {text!r}: write COLUMN=VALUE, COLUMN!=VALUE, or COLUMN<NUMBER "
                "(also <=, >, >=), e.g. caption=dog or original_width>400"
            )
        conditions.append(Condition(*match.groups()))
    return conditions


def columns_needed(conditions: list[Condition], schema: pa.Schema) -> list[str]:
    """The shard columns the conditions read (checked: each exists, and fits its operator)."""
    names = []
    for c in conditions:
        column = "label_name" if c.column == LABEL and LABEL not in schema.names else c.column
        if column not in schema.names:
            hint = (
                " (build with --labels K to filter by predicted labels)"
                if c.column == LABEL
                else ""
            )
            raise InputError(
                f"--where {c}: the collection has no column {c.column!r}{hint}; its columns are "
                f"{', '.join(n for n in schema.names if n != 'embedding')}"
            )
        kind = schema.field(column).type
        if c.op in NUMERIC_OPS and not _numeric(kind):
            raise InputError(f"--where {c}: {c.op} compares numbers; column {c.column!r} is {kind}")
        if _numeric(kind) and _number(c.value) is None:
            raise InputError(
                f"--where {c}: column {c.column!r} holds numbers; {c.value!r} is not one"
            )
        names.append(column)
    return names


def keep_mask(table: pa.Table, conditions: list[Condition]) -> np.ndarray:
    """For each row of the table (holding the columns needed), whether every condition holds."""
    mask = np.ones(table.num_rows, dtype=bool)
    for c in conditions:
        column = "label_name" if c.column == LABEL and LABEL not in table.column_names else c.column
        mask &= _holds(table.column(column), c, column != c.column)
    return mask


def _holds(column: pa.ChunkedArray, c: Condition, top_label: bool) -> np.ndarray:
    import pyarrow.compute as pc

    array = column.combine_chunks()
    if top_label:  # label=NAME: the first of the predicted names
        array = pc.list_element(array, 0)
    if _numeric(array.type):
        values = array.to_numpy(zero_copy_only=False).astype(np.float64)
        present = ~np.isnan(values) if array.null_count == 0 else _present(array)
        target = float(_number(c.value) or 0.0)
        with np.errstate(invalid="ignore"):
            result = {"=": values == target, "!=": values != target, "<": values < target,
                      "<=": values <= target, ">": values > target,
                      ">=": values >= target}[c.op]  # fmt: skip
        return np.asarray(result & present, dtype=bool)
    texts = np.array([_text(v) for v in array.to_pylist()], dtype=object)
    equal = texts == c.value
    return np.asarray(equal if c.op == "=" else ~equal & (texts != None), dtype=bool)  # noqa: E711


def _present(array: pa.Array) -> np.ndarray:
    return np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def allowed_ids(paths: list[Path], schema: pa.Schema, conditions: list[Condition]) -> np.ndarray:
    """The sorted ids of the rows every condition keeps (the needed columns only are read)."""
    from indexer.shards import as_numpy, read_shard

    columns = sorted({"id", *columns_needed(conditions, schema)})
    kept = []
    for path in paths:
        table = read_shard(path, columns)
        kept.append(as_numpy(table.column("id"))[keep_mask(table, conditions)])
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)
