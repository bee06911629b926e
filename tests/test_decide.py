"""The runtime and precision choice: pure selectors tested from tables (no particular CPU needed),
the decision cache, and the refusals a user sees through the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from indexer.errors import InputError, RecipeMismatchError
from indexer.model.runtime_choice import (
    Choice,
    Decision,
    Machine,
    candidates,
    cpu_has_native_bf16,
    first_plan,
    later_plan,
    lookup,
    pick,
    recorded,
    remember,
    this_machine,
)
from tests.helpers import BUILD_FLAGS, run_cli

BOTH = frozenset({"onnxruntime", "openvino"})
BF16 = Machine(cuda=False, native_bf16=True, installed=BOTH)
PLAIN = Machine(cuda=False, native_bf16=False, installed=BOTH)
SLIM = Machine(cuda=False, native_bf16=True, installed=frozenset({"onnxruntime"}))
CUDA = Machine(cuda=True, native_bf16=False, installed=BOTH)


def c(label: str) -> Choice:
    runtime, precision = label.split()
    return Choice(runtime, precision)


@pytest.mark.parametrize(
    ("runtime", "precision", "machine", "expected"),
    [
        (
            "auto",
            "auto",
            BF16,
            "onnxruntime fp32, openvino fp32, openvino bf16, torch fp32, torch bf16",
        ),
        ("auto", "auto", PLAIN, "onnxruntime fp32, openvino fp32, torch fp32"),
        ("auto", "auto", SLIM, "onnxruntime fp32, torch fp32, torch bf16"),
        ("auto", "fp32", BF16, "onnxruntime fp32, openvino fp32, torch fp32"),
        ("auto", "bf16", BF16, "openvino bf16, torch bf16"),
        ("openvino", "auto", BF16, "openvino fp32, openvino bf16"),
        ("openvino", "bf16", BF16, "openvino bf16"),
        ("onnx", "auto", BF16, "onnxruntime fp32"),
        ("torch", "auto", PLAIN, "torch fp32"),
        ("torch", "bf16", BF16, "torch bf16"),
        ("auto", "auto", CUDA, "torch bf16"),
        ("torch", "fp32", CUDA, "torch fp32"),
        ("auto", "bf16", PLAIN, "!no native bf16"),
        ("openvino", "bf16", PLAIN, "!no native bf16"),
        ("onnx", "bf16", BF16, "!fp32 only"),
        ("openvino", "auto", SLIM, "!not installed"),
        ("onnx", "auto", CUDA, "!runs on the CPU"),
        ("tensorrt", "auto", BF16, "!unknown runtime"),
        ("auto", "fp16", BF16, "!unknown precision"),
    ],
)
def test_candidates(runtime: str, precision: str, machine: Machine, expected: str) -> None:
    if expected.startswith("!"):  # refused, with this in its line
        with pytest.raises(InputError, match=expected[1:]):
            candidates(runtime, precision, machine)
    else:
        found = candidates(runtime, precision, machine)
        assert [x.label for x in found] == expected.split(", ")


@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        ({"onnxruntime fp32": 500, "openvino bf16": 1400, "torch bf16": 700}, "openvino bf16"),
        ({"onnxruntime fp32": 500, "openvino fp32": 480, "torch fp32": 300}, "onnxruntime fp32"),
        ({"onnxruntime fp32": 480, "openvino fp32": 500}, "onnxruntime fp32"),  # a tie: order
        ({"onnxruntime fp32": 400, "openvino fp32": 500}, "openvino fp32"),
        ({"openvino fp32": 1000, "openvino bf16": 1030}, "openvino fp32"),  # a tie: fp32
        ({"openvino fp32": 1000, "openvino bf16": 1400}, "openvino bf16"),
        ({"torch fp32": 300}, "torch fp32"),
    ],
)
def test_pick_the_fastest_ties_to_fp32_then_fewer_imports(
    rates: dict[str, float], expected: str
) -> None:
    assert pick({c(k): v for k, v in rates.items()}).label == expected


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        (None, None),
        ({"model": None}, None),
        ({"model": {"precision": "fp32"}, "portable_model": {}}, "onnxruntime fp32"),
        ({"model": {"precision": "bf16"}, "portable_model": {}}, "torch bf16"),  # before records
        ({"model": {"precision": "fp32"}}, "torch fp32"),
        (
            {"model": {"precision": "fp32"}, "runtime": {"name": "openvino", "precision": "bf16"}},
            "openvino bf16",
        ),
    ],
)
def test_recorded(manifest: dict | None, expected: str | None) -> None:
    found = recorded(manifest)
    assert (found.label if found else None) == expected


@pytest.mark.parametrize(
    ("runtime", "precision", "machine", "built", "expected"),
    [
        ("auto", "auto", BF16, "openvino bf16", "openvino bf16"),
        ("openvino", "bf16", BF16, "openvino bf16", "openvino bf16"),
        ("auto", "auto", CUDA, "openvino bf16", "torch bf16"),  # said in a line
        ("auto", "auto", CUDA, "onnxruntime fp32", "torch fp32"),
        ("onnx", "auto", BF16, "openvino bf16", "!--rebuild"),
        ("auto", "fp32", BF16, "openvino bf16", "!--rebuild"),
        ("auto", "auto", PLAIN, "openvino bf16", "!natively"),
        ("auto", "auto", SLIM, "openvino fp32", "!not installed"),
    ],
)
def test_a_later_run_keeps_the_collections_choice(
    runtime: str, precision: str, machine: Machine, built: str, expected: str
) -> None:
    if expected.startswith("!"):
        with pytest.raises((InputError, RecipeMismatchError), match=expected[1:]):
            later_plan(runtime, precision, machine, c(built), Path("coll"))
    else:
        plan = later_plan(runtime, precision, machine, c(built), Path("coll"))
        assert plan.single == c(expected) and plan.how == "recorded"


def test_first_plan_forces_one_times_several_and_takes_a_cached_choice(
    fresh_cache: Path,
) -> None:
    assert first_plan("onnx", "auto", BF16, "k1").how == "forced"
    plan = first_plan("auto", "auto", BF16, "k1")
    assert plan.how == "auto" and len(plan.candidates) == 5
    remember("k1", Decision(c("openvino bf16"), "timed", "", {"openvino bf16": 1400.0}))
    cached = first_plan("auto", "auto", BF16, "k1")
    assert cached.how == "cached" and cached.single == c("openvino bf16")
    assert cached.others == plan.candidates  # timed if the cached choice fails its check
    # a machine that no longer offers the cached choice times again
    assert first_plan("auto", "auto", PLAIN, "k1").how == "auto"


@pytest.mark.parametrize("damage", ["corrupt", "foreign", "fifo", "unknown choice"])
def test_a_bad_decision_entry_is_timed_again(
    fresh_cache: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    remember("k2", Decision(c("openvino bf16"), "timed", ""))
    entry = fresh_cache / "runtimes" / "k2.json"
    if damage == "corrupt":
        entry.write_text("{not json")
    elif damage == "foreign":
        entry.write_text(json.dumps({**json.loads(entry.read_text()), "key": "other"}))
    elif damage == "fifo":  # never read (it would block)
        entry.unlink()
        os.mkfifo(entry)
    else:
        entry.write_text(json.dumps({**json.loads(entry.read_text()), "runtime": "tensorrt"}))
    assert lookup("k2", candidates("auto", "auto", BF16)) is None
    assert "timing again" in caplog.text


def test_refusals_through_the_cli_write_nothing(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    refused = run_cli("build", corpus, "--out", out, *BUILD_FLAGS, "--runtime", "onnx",
                      "--precision", "bf16")  # fmt: skip
    said = "fp32 only" if cpu_has_native_bf16() else "no native bf16"  # the first that applies
    assert refused.exit_code == 2 and said in refused.output, refused.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("images", "slowest", "expected"),
    [(64, 0.1, 64), (64, 0.3, 64), (64, 0.6, 32), (64, 2.4, 8), (64, 60.0, 8), (8, 5.0, 8)],
)
def test_a_large_model_is_timed_on_fewer_images(images: int, slowest: float, expected: int) -> None:
    from indexer.model.runtime_trial import timing_size

    assert timing_size(images, slowest) == expected


@pytest.mark.parametrize("value", ["0", "false", "No", " off "])
def test_native_bf16_can_be_turned_off(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INDEXER_NATIVE_BF16", value)
    assert not cpu_has_native_bf16()
    assert all(c.precision == "fp32" for c in candidates("auto", "auto", this_machine(False)))
