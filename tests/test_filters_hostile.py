"""--where under hostile and exact inputs (issue 28, rows #1 and #8): conditions are parsed in
linear time and bounded length, and integer columns compare exactly, also past 2**53."""

from __future__ import annotations

import itertools
import json
import math
import operator
import os
import random
import re
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from indexer.errors import InputError
from indexer.query import filters
from indexer.query.filters import (
    MAX_CONDITION_CHARS,
    MAX_CONDITIONS,
    Condition,
    keep_mask,
    parse_where,
)
from tests.helpers import BUILD_FLAGS, run_cli, write_vectors

# the regex the parser was until issue 28 (quadratic on "a" + spaces): the oracle of the
# language the parser accepts, run here on short texts only
OLD_CONDITION = re.compile(r"^\s*([^<>=!\s][^<>=!]*?)\s*(!=|<=|>=|=|<|>)\s*(.*?)\s*$")
SPACES = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]


def old_parse(text: str) -> tuple[str, ...] | None:
    match = OLD_CONDITION.match(text)
    return match.groups() if match is not None and match.group(3) else None


def new_parse(text: str) -> tuple[str, ...] | None:
    try:
        (c,) = parse_where(text)
    except InputError as exc:
        assert str(exc).startswith(f"--where {text!r}: write COLUMN=VALUE"), exc
        return None
    return c.column, c.op, c.value


# --- parsing: today's language, in linear time, bounded ---


def test_the_regex_and_str_strip_agree_on_whitespace() -> None:
    """The parser strips with str.strip(); the old regex's \\s is the same set of characters."""
    assert [chr(c) for c in range(sys.maxunicode + 1) if re.match(r"\s", chr(c))] == SPACES


def test_every_short_text_parses_as_the_old_regex_parsed_it() -> None:
    alphabet = ["a", " ", "\n", "\r", "\x1c", "\xa0", "<", ">", "=", "!", "3"]
    for size in range(6):
        for letters in itertools.product(alphabet, repeat=size):
            text = "".join(letters)
            assert new_parse(text) == old_parse(text), repr(text)


def test_random_texts_parse_as_the_old_regex_parsed_them() -> None:
    alphabet = [*SPACES, "<", ">", "=", "!", "a", "_", ".", "-", "3", "é", "\u00b2", "\t"]
    rng = random.Random(28)
    for _ in range(20000):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 24)))
        assert new_parse(text) == old_parse(text), repr(text)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("caption=scene number 3", ("caption", "=", "scene number 3")),
        ("  original_width  >=  400 ", ("original_width", ">=", "400")),
        ("a!=b", ("a", "!=", "b")),
        ("a<=b", ("a", "<=", "b")),
        ("a=<3", ("a", "=", "<3")),
        ("a==b", ("a", "=", "=b")),
        ("a=b=c", ("a", "=", "b=c")),
        ("my col<3", ("my col", "<", "3")),
        ("a=\nb", ("a", "=", "b")),
        ("a=b\n", ("a", "=", "b")),
        ("a=b\rc", ("a", "=", "b\rc")),
        ("a\nb=c", ("a\nb", "=", "c")),
        ("a=b\nc", None),
        ("a!b", None),
        ("a! =b", None),
        ("=x", None),
        (" <3", None),
        ("a=", None),
        ("a<=  ", None),
        ("width", None),
        ("", None),
    ],
)
def test_conditions_parse_as_documented(text: str, want: tuple[str, ...] | None) -> None:
    assert new_parse(text) == want == old_parse(text)


def test_the_parser_holds_no_regex() -> None:
    """No pattern to backtrack: the operator is found by str.find, the rest by str.strip."""
    assert not any(isinstance(v, re.Pattern) for v in vars(filters).values())


def calls_made(text: str) -> int:
    """The function calls (Python and C) parse_where makes on the text: its work, untimed."""
    calls = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        parse_where(text)
    finally:
        sys.setprofile(None)
    return calls


def test_parsing_makes_as_many_calls_whatever_the_length() -> None:
    """Each call scans the text once at most (find, strip, slicing), and their number does not
    grow with the text: the work is linear in the length, which is bounded."""
    short, near_limit = ("a" + " " * n + "=" + " " * n + "1" for n in (200, 2000))
    assert calls_made(short) == calls_made(near_limit)
    assert len(near_limit) < MAX_CONDITION_CHARS


def test_a_huge_condition_is_refused_in_one_sentence() -> None:
    for text in ("a" + " " * 60_000, "a" + " " * 119_998 + "=", "x=" + "9" * 120_000):
        with pytest.raises(InputError) as caught:
            parse_where(["width>1", text])
        message = str(caught.value)
        assert f"{len(text)} characters long" in message and str(MAX_CONDITION_CHARS) in message
        assert "\n" not in message and len(message) < 200  # not the text echoed back


def test_conditions_up_to_the_limit_parse() -> None:
    pad = " " * ((MAX_CONDITION_CHARS - 3) // 2)
    text = (pad + "a" + pad + "<" + "3").ljust(MAX_CONDITION_CHARS)
    assert len(text) == MAX_CONDITION_CHARS
    assert parse_where(text) == [Condition("a", "<", "3")]
    assert parse_where("a=" + "b" * (MAX_CONDITION_CHARS - 2)) == [
        Condition("a", "=", "b" * (MAX_CONDITION_CHARS - 2))
    ]
    with pytest.raises(InputError, match="write COLUMN=VALUE"):
        parse_where("a" + " " * (MAX_CONDITION_CHARS - 1))  # no operator: today's message
    with pytest.raises(InputError, match="characters long"):
        parse_where(text + " ")


def test_at_most_so_many_conditions() -> None:
    assert len(parse_where([f"c{i}={i}" for i in range(MAX_CONDITIONS)])) == MAX_CONDITIONS
    with pytest.raises(InputError, match=f"at most {MAX_CONDITIONS} are allowed") as caught:
        parse_where(["width>1"] * (MAX_CONDITIONS + 1))
    assert "\n" not in str(caught.value)


# --- integer columns compare exactly ---

OPS = {"=": operator.eq, "!=": operator.ne, "<": operator.lt,
       "<=": operator.le, ">": operator.gt, ">=": operator.ge}  # fmt: skip
HUGE, TINY = "1e999999999999999999999", "1e-999999999999999999999"  # past Decimal's exponents
# what a huge exponent means to an integer, where Fraction would build 10**huge
STAND_INS: dict[str, Any] = {HUGE: math.inf, "-" + HUGE: -math.inf, TINY: Fraction(1, 10**9),
                             "-" + TINY: Fraction(-1, 10**9), "0" + HUGE[1:]: 0}  # fmt: skip
COLUMNS: dict[str, tuple[pa.DataType, list[int | None]]] = {
    "int64": (pa.int64(), [-(2**63), -(2**63) + 1, -1, 0, 1, 3, 2**53 - 1, 2**53, 2**53 + 1,
                           2**63 - 2, 2**63 - 1, None]),
    "uint64": (pa.uint64(), [0, 1, 3, 2**53 + 1, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 2,
                             2**64 - 1, None]),
    "int8": (pa.int8(), [-128, -1, 0, 3, 127, None]),
    "uint32": (pa.uint32(), [0, 3, 2**32 - 1, None]),
}  # fmt: skip
EXTRA_TARGETS = ["3.5", "-0.5", "0.5", "-1", "9007199254740992.5", "9007199254740993.0",
                 "9223372036854775806.5", "9223372036854775807.0", "-9223372036854775808.5",
                 "18446744073709551615.5", "18446744073709551616", "-18446744073709551617",
                 "1e20", "-1e20", "1e3", "300", "-300", "127.5", "4294967296", "inf", "-inf",
                 "nan", HUGE, "-" + HUGE, TINY, "-" + TINY, "0" + HUGE[1:]]  # fmt: skip


def targets(values: list[int | None]) -> list[str]:
    """Each value, its neighbours, and the non-integer and out-of-range targets."""
    near = {v + d for v in values if v is not None for d in (-1, 0, 1)}
    return [str(t) for t in sorted(near)] + EXTRA_TARGETS


CASES = [(name, target) for name, (_, values) in COLUMNS.items() for target in targets(values)]


def oracle(values: list[int | None], op: str, target: str) -> list[bool]:
    """Plain Python: int against Fraction (or float inf/nan) compares exactly; None never holds."""
    exact = STAND_INS.get(target, float(target) if not math.isfinite(float(target)) else None)
    if exact is None:
        exact = Fraction(target)
    return [v is not None and bool(OPS[op](v, exact)) for v in values]


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(("column", "target"), CASES)
def test_integer_columns_compare_exactly(column: str, target: str, op: str) -> None:
    kind, values = COLUMNS[column]
    half = len(values) // 2  # two chunks, as several row groups read
    table = pa.table({"x": pa.chunked_array([values[:half], values[half:]], kind)})
    (condition,) = parse_where(f"x{op}{target}")
    got = keep_mask(table, [condition])
    assert got.dtype == bool and got.tolist() == oracle(values, op, target)


def test_nulls_and_nans_never_match_in_float_columns() -> None:
    table = pa.table({"f": pa.array([1.5, math.nan, None, 2.0**53], pa.float64()),
                      "h": pa.array([1.5, math.nan, None, 3.0], pa.float32())})  # fmt: skip
    want = {"f=1.5": [1, 0, 0, 0], "f!=1.5": [0, 0, 0, 1], "f>1": [1, 0, 0, 1],
            "f<=9007199254740992": [1, 0, 0, 1], "h>=1.5": [1, 0, 0, 1],
            "h!=nan": [1, 0, 0, 1], "h=nan": [0, 0, 0, 0]}  # fmt: skip
    for text, keep in want.items():
        assert keep_mask(table, parse_where(text)).tolist() == [bool(k) for k in keep], text


def test_a_value_that_is_no_number_is_refused_on_an_integer_column() -> None:
    table = pa.table({"x": pa.array([1, 2], pa.int64())})
    with pytest.raises(InputError, match="is not one"):
        keep_mask(table, parse_where("x=wide"))


# --- through the CLI and the Python API on real collections ---

MTIME = 1_700_000_000_123_456_789  # a file's mtime in ns: far past 2**53, 256 apart as floats


def test_where_on_mtime_ns_tells_neighbouring_nanoseconds_apart(tmp_path: Path) -> None:
    from indexer.query.collection import Collection
    from indexer.synthetic import write_corpus

    files = sorted(write_corpus(tmp_path / "photos", 3, seed=1))
    for i, path in enumerate(files):
        os.utime(path, ns=(MTIME + i, MTIME + i))
    out = str(tmp_path / "c")
    built = run_cli("build", str(tmp_path / "photos"), "--out", out, *BUILD_FLAGS)
    assert built.exit_code == 0, built.output
    keys = [p.relative_to(tmp_path / "photos").as_posix() for p in files]
    collection = Collection.open(out)
    for where, keep in (
        ([f"mtime_ns={MTIME + 1}"], [1]),
        ([f"mtime_ns!={MTIME + 1}"], [0, 2]),
        ([f"mtime_ns>{MTIME}"], [1, 2]),
        ([f"mtime_ns<={MTIME + 1}", f"mtime_ns>={MTIME}.5"], [1]),
        ([f"mtime_ns<{MTIME}"], []),
    ):
        args = [a for w in where for a in ("--where", w)]
        result = run_cli("query", "--id", keys[0], "--index", out, "-k", "10", *args, "--json")
        assert result.exit_code == 0, result.output
        got = {r["key"] for r in json.loads(result.output)[0]["results"]}
        assert got == {keys[i] for i in keep}, where
        api = collection.query(ids=[keys[0]], k=10, where=where)[0]
        assert {h.key for h in api.hits} == got, where
    huge = run_cli("query", "--id", keys[0], "--index", out, "--where", "a" + " " * 120_000)
    assert huge.exit_code == 2 and "characters long" in huge.output, huge.output[:300]
    assert len(huge.output.strip().splitlines()) == 1


def test_where_on_a_uint64_column_of_an_external_collection(tmp_path: Path) -> None:
    from indexer.query.collection import Collection

    big = [2**64 - 1, 2**64 - 2, 2**63, 2**63 + 1, None]
    keys = ["a", "b", "c", "d", "e"]
    source = write_vectors(tmp_path / "v.parquet", np.eye(5, 5, dtype=np.float32), keys,
                           u=pa.array(big, pa.uint64()))  # fmt: skip
    made = run_cli("index", "--from-parquet", str(source), "--out", str(tmp_path / "o"))
    assert made.exit_code == 0, made.output
    collection = Collection.open(tmp_path / "o")
    for where, keep in (
        (f"u={2**64 - 2}", "b"),
        (f"u>{2**63}", "abd"),
        (f"u<{2**64 - 1}", "bcd"),
        ("u>-1", "abcd"),
        (f"u<{2**64}", "abcd"),
        (f"u>={2**63}.5", "abd"),
    ):
        hits = collection.query(ids=["a"], k=10, where=where)[0].hits
        assert {h.key for h in hits} == set(keep), where


def test_vector_and_list_columns_cannot_be_filtered() -> None:
    from indexer.query.filters import columns_needed

    schema = pa.schema([("embedding", pa.list_(pa.float32(), 4)), ("label_name",
                        pa.list_(pa.string())), ("n", pa.int64())])  # fmt: skip
    for where in ("embedding=1", "label_name=cat"):
        with pytest.raises(InputError, match="filter on a column of numbers"):
            columns_needed(parse_where(where), schema)
    assert columns_needed(parse_where("label=cat"), schema) == ["label_name"]  # its top label
