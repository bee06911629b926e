"""--from-parquet edges (#14): null keys, extreme and zero vectors, repair of changed files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import indexer.build.from_parquet as external
from indexer.errors import InputError
from tests.helpers import edit_manifest, read_embeddings_by_key, run_cli, write_vectors


def one_line_error(result: Any, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def repair_refused(result: Any, *fragments: str) -> None:
    """verify --repair prints the damage, then the reason it was not repaired on one line."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "nothing was repaired" in errors[0], result.output
    assert result.output.strip().splitlines()[-1] == errors[0], result.output
    for fragment in fragments:
        assert fragment in errors[0], result.output


def stored(out: Path) -> np.ndarray:
    table = pq.read_table(out / "shards").sort_by("id")
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())


def write_pairs(path: Path, keys: list[Any], vectors: list[list[float]], kind: Any) -> Path:
    pq.write_table(pa.table({"key": keys, "embedding": pa.array(vectors, pa.list_(kind))}), path)
    return path


def test_a_null_key_is_a_one_line_error_naming_file_and_row(tmp_path: Path) -> None:
    bad = write_pairs(tmp_path / "k.parquet", ["a", None, "c"], [[1, 0], [0, 1], [1, 1]],
                      pa.float32())  # fmt: skip
    result = run_cli("index", "--from-parquet", bad, "--out", tmp_path / "o")
    one_line_error(result, "k.parquet row 1 has no key", "--key-column")
    assert not (tmp_path / "o" / "current").exists()


def test_normalize_keeps_the_direction_of_huge_float32_vectors(tmp_path: Path) -> None:
    path = write_pairs(tmp_path / "h.parquet", ["big", "small"],
                       [[3e38, 3e38, 0.0], [0.0, 1e-40, 0.0]], pa.float32())  # fmt: skip
    out = tmp_path / "o"
    made = run_cli("index", "--from-parquet", path, "--out", out, "--normalize")
    assert made.exit_code == 0, made.output
    vectors = stored(out)
    np.testing.assert_allclose(vectors[0], [2**-0.5, 2**-0.5, 0], rtol=1e-6)
    np.testing.assert_allclose(vectors[1], [0, 1, 0], rtol=1e-6)
    assert manifest(out)["normalized"] is True


def test_normalize_handles_float64_beyond_float32(tmp_path: Path) -> None:
    path = write_pairs(tmp_path / "d.parquet", ["a", "b"], [[1e300, -1e300], [1e-300, 0.0]],
                       pa.float64())  # fmt: skip
    out = tmp_path / "o"
    made = run_cli("index", "--from-parquet", path, "--out", out, "--normalize")
    assert made.exit_code == 0, made.output
    np.testing.assert_allclose(stored(out), [[2**-0.5, -(2**-0.5)], [1, 0]], rtol=1e-6)


@pytest.mark.parametrize(
    ("values", "message"),
    [([[1.0, 0.0], [1e300, 0.0]], "beyond float32"), ([[1.0, 0.0], [1e-300, 0.0]], "round to 0")],
)
def test_without_normalize_float64_outside_float32_is_refused(
    tmp_path: Path, values: list[list[float]], message: str
) -> None:
    path = write_pairs(tmp_path / "d.parquet", ["a", "b"], values, pa.float64())
    result = run_cli("index", "--from-parquet", path, "--out", tmp_path / "o")
    one_line_error(result, "d.parquet row 1", message)


def test_a_zero_vector_is_refused_with_normalize(tmp_path: Path) -> None:
    path = write_pairs(tmp_path / "z.parquet", ["a", "b", "c"], [[1, 0], [0, 0], [0, 1]],
                       pa.float32())  # fmt: skip
    result = run_cli("index", "--from-parquet", path, "--out", tmp_path / "o", "--normalize")
    one_line_error(result, "z.parquet row 1", "all zeros", "--normalize")


def test_a_zero_vector_is_kept_as_given_without_normalize(tmp_path: Path) -> None:
    path = write_pairs(tmp_path / "z.parquet", ["a", "b", "c"], [[1, 0], [0, 0], [0, 1]],
                       pa.float32())  # fmt: skip
    out = tmp_path / "o"
    made = run_cli("index", "--from-parquet", path, "--out", out)
    assert made.exit_code == 0, made.output
    np.testing.assert_array_equal(stored(out)[1], [0, 0])
    assert manifest(out)["normalized"] is False


def test_unit_rows_never_turns_a_finite_nonzero_vector_into_zero() -> None:
    rows = np.array([[3.4e38, 3.4e38, -3.4e38], [1e-45, 0, 0], [1e-45, 3e38, 0]], np.float32)
    unit = external.unit_rows(rows, Path("x.parquet"), 0)
    assert unit.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(unit.astype(np.float64), axis=1), 1, rtol=1e-6)
    assert np.all(np.sign(unit[:2]) == np.sign(rows[:2]))
    assert np.argmax(np.abs(unit), axis=1).tolist() == [0, 0, 1]


# --- repair must copy the same files again, or refuse ---


def made_from(tmp_path: Path, rows: int = 290) -> tuple[Path, Path]:
    vectors = np.random.default_rng(0).standard_normal((rows, 8)).astype(np.float32)
    source = write_vectors(tmp_path / "v.parquet", vectors, [f"k{i}" for i in range(rows)])
    out = tmp_path / "ext"
    made = run_cli("index", "--from-parquet", source, "--out", out, "--shard-size", "100")
    assert made.exit_code == 0, made.output
    return source, out


def damage(out: Path) -> None:
    sorted((out / "shards").glob("*.parquet"))[1].unlink()


def test_the_manifest_records_each_files_identity(tmp_path: Path) -> None:
    source, out = made_from(tmp_path)
    entry = manifest(out)["sources"][0]
    st = source.stat()
    assert entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns
    from indexer.config import file_sha256

    assert entry["sha256"] == file_sha256(source)


def test_repair_refuses_a_source_file_that_changed(tmp_path: Path) -> None:
    source, out = made_from(tmp_path)
    vectors = np.random.default_rng(1).standard_normal((295, 8)).astype(np.float32)
    write_vectors(source, vectors, [f"k{i}" for i in range(295)])
    damage(out)
    result = run_cli("verify", "--repair", out)
    repair_refused(result, "v.parquet changed", "indexer index --from-parquet", f"--out {out}")
    assert "whole again" not in result.output
    assert manifest(out)["counts"]["items"] == 290  # nothing new was published


def test_repair_refuses_a_missing_source_file(tmp_path: Path) -> None:
    source, out = made_from(tmp_path)
    source.unlink()
    damage(out)
    repair_refused(run_cli("verify", "--repair", out), "v.parquet", "is gone", "--from-parquet")


def test_repair_refuses_a_manifest_without_checksums(tmp_path: Path) -> None:
    _, out = made_from(tmp_path)
    edit_manifest(out, lambda m: [s.pop("sha256") for s in m["sources"]])
    damage(out)
    repair_refused(run_cli("verify", "--repair", out), "no checksum", "--from-parquet")


def test_repair_copies_an_unchanged_file_again_even_if_touched(tmp_path: Path) -> None:
    source, out = made_from(tmp_path)
    before = read_embeddings_by_key(out)
    os.utime(source, ns=(1_000_000_000, 1_000_000_000))  # same bytes, another mtime
    damage(out)
    mended = run_cli("verify", "--repair", out)
    assert mended.exit_code == 0, mended.output
    after = read_embeddings_by_key(out)
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_a_file_changed_while_copied_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    source = write_vectors(tmp_path / "v.parquet", vectors, [f"k{i}" for i in range(20)])
    copy = external.copy_vectors

    def copy_then_change(*args: Any) -> Any:
        done = copy(*args)
        write_vectors(source, vectors[:10], [f"k{i}" for i in range(10)])
        return done

    monkeypatch.setattr(external, "copy_vectors", copy_then_change)
    cfg = external.ExternalConfig((source,), tmp_path / "o")
    with pytest.raises(InputError, match="changed while"):
        external.index_parquet(cfg)
    assert not (tmp_path / "o" / "current").exists()


def test_id_and_source_id_columns_do_not_collide(tmp_path: Path) -> None:
    vectors = np.eye(3, 2, dtype=np.float32)
    path = write_vectors(tmp_path / "c.parquet", vectors, ["a", "b", "c"], id=[7, 8, 9],
                         source_id=["x", "y", "z"])  # fmt: skip
    out = tmp_path / "o"
    made = run_cli("index", "--from-parquet", path, "--out", out)
    assert made.exit_code == 0, made.output
    table = pq.read_table(out / "shards").sort_by("id")
    assert table.column("source_id").to_pylist() == ["x", "y", "z"]
    assert table.column("source_id_2").to_pylist() == [7, 8, 9]


def test_files_whose_columns_disagree_are_refused(tmp_path: Path) -> None:
    vectors = np.eye(2, 2, dtype=np.float32)
    a = write_vectors(tmp_path / "a.parquet", vectors, ["a", "b"], label=["x", "y"])
    b = write_vectors(tmp_path / "b.parquet", vectors, ["c", "d"], label=[1, 2])
    result = run_cli("index", "--from-parquet", a, b, "--out", tmp_path / "o")
    one_line_error(result, "'label'", "string", "int64")
