"""Metadata filters (--where): conditions on shard columns, parsed, then the ids they keep."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from indexer.errors import InputError

OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq, "!=": operator.ne, "<": operator.lt,
    "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}  # fmt: skip
NUMERIC_OPS = ("<", "<=", ">", ">=")
MAX_CONDITION_CHARS = 4096  # one condition, refused beyond (422 in the service); parsed linearly
MAX_CONDITIONS = 64  # conditions ANDed in one query
EXPONENT_CLAMP = 10**6  # 1e(+-huge) compares with every integer a column holds as 1e(+-this)
LABEL = "label"  # the top predicted label (label_name[0]) of a collection built with --labels


@dataclass(frozen=True)
class Condition:
    column: str
    op: str  # = != < <= > >=
    value: str

    def __str__(self) -> str:
        return f"{self.column}{self.op}{self.value}"


def parse_where(where: str | Iterable[str] | None) -> list[Condition]:
    """COL=VALUE, COL!=VALUE, COL<N, COL<=N, COL>N, COL>=N; several are ANDed (a bounded few)."""
    texts = [where] if isinstance(where, str) else list(where or [])
    if len(texts) > MAX_CONDITIONS:
        raise InputError(
            f"--where: {len(texts)} conditions given, at most {MAX_CONDITIONS} are allowed; "
            "drop the ones the others imply"
        )
    return [_parse_condition(text) for text in texts]


def _parse_condition(text: str) -> Condition:
    """One condition, in time linear in its (bounded) length: the operator is the first of
    < > = ! in it (no column name holds one), the column what precedes it, the value what
    follows it, each stripped of whitespace (a value is one line)."""
    if len(text) > MAX_CONDITION_CHARS:
        raise InputError(
            f"--where {text[:40]!r}... is {len(text)} characters long, over the limit of "
            f"{MAX_CONDITION_CHARS}; write a shorter condition"
        )
    at = min((i for i in map(text.find, "<>=!") if i >= 0), default=len(text))
    op = text[at : at + 2] if text[at : at + 2] in ("!=", "<=", ">=") else text[at : at + 1]
    column, value = text[:at].strip(), text[at + len(op) :].strip()
    if op in ("", "!") or not column or not value or "\n" in value:
        raise InputError(
            f"--where {text!r}: write COLUMN=VALUE, COLUMN!=VALUE, or COLUMN<NUMBER "
            "(also <=, >, >=), e.g. caption=dog or original_width>400"
        )
    return Condition(column, op, value)


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
        nested = pa.types.is_nested(kind) or pa.types.is_binary(kind)
        if nested and not (c.column == LABEL and column == "label_name"):
            raise InputError(  # a vector or list as text per row: unbounded work, no meaning
                f"--where {c}: column {c.column!r} is {kind}; filter on a column of numbers, "
                "text or booleans"
            )
        if c.op in NUMERIC_OPS and not _numeric(kind):
            raise InputError(f"--where {c}: {c.op} compares numbers; column {c.column!r} is {kind}")
        if _numeric(kind) and _number(c.value) is None:
            raise _not_a_number(c)
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
    if pa.types.is_integer(array.type):
        values = pc.fill_null(array, pa.scalar(0, array.type)).to_numpy(zero_copy_only=False)
        return _int_holds(values, c.op, _exact(c)) & _present(array)
    if _numeric(array.type):
        values = array.to_numpy(zero_copy_only=False).astype(np.float64)
        present = ~np.isnan(values) & _present(array)  # NaN never matches, as null never does
        target = float(_exact(c))
        with np.errstate(invalid="ignore"):
            result = OPERATORS[c.op](values, target)
        return np.asarray(result & present, dtype=bool)
    texts = np.array([_text(v) for v in array.to_pylist()], dtype=object)
    equal = texts == c.value
    return np.asarray(equal if c.op == "=" else ~equal & (texts != None), dtype=bool)  # noqa: E711


def _int_holds(values: np.ndarray, op: str, target: Decimal) -> np.ndarray:
    """values OP target, exactly: an integer column compared with an integer of its own type.

    Not a whole number, the target becomes its floor (x < 3.5 is x <= 3, x > 3.5 is x > 3, and
    x = 3.5 holds nowhere); past the column's range, every value falls on the same side of it.
    """
    if target.is_nan():  # as with floats: only != holds
        return np.full(len(values), op == "!=")
    floor = target.to_integral_value(rounding=ROUND_FLOOR)  # +-Infinity stays itself
    if floor != target:
        if op in ("=", "!="):
            return np.full(len(values), op == "!=")
        op = "<=" if op in ("<", "<=") else ">"
    info = np.iinfo(values.dtype)
    if floor < info.min or floor > info.max:  # every value on the same side
        return np.full(len(values), bool(OPERATORS[op](0, 1 if floor > info.max else -1)))
    return np.asarray(OPERATORS[op](values, values.dtype.type(int(floor))), dtype=bool)


def _exact(c: Condition) -> Decimal:
    """The number a condition's value writes, exactly (not rounded to a float)."""
    if _number(c.value) is None:  # columns_needed refuses it first
        raise _not_a_number(c)
    try:
        return Decimal(c.value)
    except InvalidOperation:  # an exponent past Decimal's: clamped, the same to every integer
        mantissa, _, exponent = c.value.lower().partition("e")
        clamped = max(-EXPONENT_CLAMP, min(EXPONENT_CLAMP, int(exponent)))
        return Decimal(f"{mantissa}e{clamped}")


def _not_a_number(c: Condition) -> InputError:
    return InputError(f"--where {c}: column {c.column!r} holds numbers; {c.value!r} is not one")


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
    from indexer.collection.shards import as_numpy, read_shard

    columns = sorted({"id", *columns_needed(conditions, schema)})
    kept = []
    for path in paths:
        table = read_shard(path, columns)
        kept.append(as_numpy(table.column("id"))[keep_mask(table, conditions)])
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)
