"""A refused command writes nothing: no folder, no lock file, no history line, no metrics.

Every refusal path of `build`, `index` and `run` (bad input, a model that cannot load, a
collection it must not change), for a new --out and for an existing collection, compared
file by file (size and mtime) before and after. A locked collection and a run over its
failure budget are runs, not refusals: they are recorded (test_lock_history, test_runs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import Result

from tests.helpers import BUILD_FLAGS, run_cli


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root (links not followed): its size and mtime. An existing lock
    file's mtime is left out: taking the lock writes the holder's name and erases it."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        mtime = 0 if path.name == ".indexer.lock" else st.st_mtime_ns
        found[path.relative_to(root).as_posix()] = (st.st_size, mtime)
    return found


def one_error(result: Result) -> bool:
    """One line, "Error: ...", or click's usage block for a flag it checks itself."""
    lines = result.output.strip().splitlines()
    return lines[-1].startswith("Error: ") and (len(lines) == 1 or lines[0].startswith("Usage:"))


@pytest.fixture(scope="module")
def work(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a source, a collection built from it, and Parquet files good and bad."""
    root = tmp_path_factory.mktemp("refusals")
    shutil.copytree(corpus / "group0", root / "pics")
    built = run_cli("build", root / "pics", "--out", root / "built", *BUILD_FLAGS)
    assert built.exit_code == 0, built.output
    pq.write_table(pa.table({"key": ["a", "b"], "embedding": [[1.0, 2.0], [3.0]]}),
                   root / "ragged.parquet")  # fmt: skip
    pq.write_table(pa.table({"key": ["a"], "vec": [[1.0, 2.0]]}), root / "nocolumn.parquet")
    (root / "not.parquet").write_bytes(b"PAR")
    (root / "a-file").write_text("not a folder")
    (root / "theirs").mkdir()
    (root / "theirs" / "notes.txt").write_text("someone's")
    return root


NEW_OUT_BUILDS = {
    "missing source": ("{w}/nope",),
    "an http URL": ("https://example.com/a.jpg",),
    "an unreachable bucket": ("s3://photos/pics/", "--storage-option",
                              "endpoint_url=http://127.0.0.1:9"),
    "a missing checkpoint": ("{w}/pics", "--checkpoint", "{w}/none.safetensors"),
    "an unknown model": ("{w}/pics", "--model", "no_such_model_x"),
    "a bad partition": ("{w}/pics", "--partition", "3/2"),
    "a bad index type": ("{w}/pics", "--index-type", "IVF-nonsense"),
    "the GPU without CUDA": ("{w}/pics", "--decode", "gpu", "--device", "cpu"),
    "a bad storage option": ("{w}/pics", "--storage-option", "novalue"),
    "a missing dataset": ("hf:{w}/nodataset",),
    "an unwritable metrics file": ("{w}/pics", "--metrics-file", "{w}/a-file/m.prom"),
    "a partition of an unknown model": ("{w}/pics", "--partition", "0/2", "--model", "nope_y"),
    "a huge batch size": ("{w}/pics", "--batch-size", "99999999999999999999"),
    "a huge shard size": ("{w}/pics", "--shard-size", "99999999999999999999"),
    "a huge seed": ("{w}/pics", "--seed", "99999999999999999999"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(NEW_OUT_BUILDS))
def test_a_refused_first_build_leaves_no_folder(work: Path, case: str) -> None:
    before = tree(work)
    out = work / "new" / "deeper" / "c"
    args = [a.format(w=work) for a in NEW_OUT_BUILDS[case]]
    result = run_cli("build", *args, "--out", out, *BUILD_FLAGS)
    assert result.exit_code in (2, 3, 4), result.output
    assert one_error(result), result.output
    assert not (work / "new").exists()
    assert tree(work) == before


EXISTING_BUILDS = {
    "other weights without --rebuild": ("{w}/pics", "--seed", "3"),
    "another model without --rebuild": ("{w}/pics", "--model", "resnet18"),
    "a missing source": ("{w}/nope",),
    "an unknown model": ("{w}/pics", "--model", "no_such_model_x", "--rebuild"),
    "a missing checkpoint": ("{w}/pics", "--checkpoint", "{w}/none.pth", "--rebuild"),
    "an http URL": ("http://example.com/pics/",),
}


@pytest.mark.parametrize("case", sorted(EXISTING_BUILDS))
def test_a_refused_build_of_a_collection_changes_nothing(work: Path, case: str) -> None:
    before = tree(work / "built")
    args = [a.format(w=work) for a in EXISTING_BUILDS[case]]
    metrics = work / "metrics.prom"
    result = run_cli("build", *args, "--out", work / "built", *BUILD_FLAGS,
                     "--metrics-file", metrics)  # fmt: skip
    assert result.exit_code in (2, 3, 4), result.output
    assert one_error(result), result.output
    assert tree(work / "built") == before  # no history line, no lock file touched
    assert not metrics.exists()


def test_a_refused_build_into_someones_folder_leaves_it_as_it_was(work: Path) -> None:
    for out in (work / "theirs", work / "a-file"):
        before = tree(work)
        result = run_cli("build", work / "pics", "--out", out, *BUILD_FLAGS)
        assert result.exit_code == 2 and result.output.startswith("Error: --out"), result.output
        assert tree(work) == before


INDEX_REFUSALS = {
    "no collection there": ("{w}/none",),
    "a folder of photos": ("{w}/pics",),
    "a file that is not Parquet": ("--from-parquet", "{w}/not.parquet", "--out", "{w}/new"),
    "vectors of two lengths": ("--from-parquet", "{w}/ragged.parquet", "--out", "{w}/new"),
    "no embedding column": ("--from-parquet", "{w}/nocolumn.parquet", "--out", "{w}/new"),
    "a missing file": ("--from-parquet", "{w}/none.parquet", "--out", "{w}/new/x"),
    "a bad index type": ("{w}/built", "--index-type", "IVF-nonsense"),
    "an image collection as --out": ("--from-parquet", "{w}/ragged.parquet", "--out",
                                     "{w}/built"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(INDEX_REFUSALS))
def test_a_refused_index_writes_nothing(work: Path, case: str) -> None:
    before = tree(work)
    result = run_cli("index", *[a.format(w=work) for a in INDEX_REFUSALS[case]])
    assert result.exit_code in (2, 3), result.output
    assert one_error(result), result.output
    assert tree(work) == before  # no folder, and no lock file in a folder of photos


JOBS = {
    "a missing source": 'sources = ["{w}/nope"]\nout = "{w}/new"\n',
    "an unknown model": 'sources = ["{w}/pics"]\nout = "{w}/new"\nmodel = "no_such_model_x"\n',
    "a bad value": 'sources = ["{w}/pics"]\nout = "{w}/new"\nworkers = -1\n',
    "a bad storage option": 'sources = ["{w}/pics"]\nout = "{w}/new"\nstorage_options = ["x"]\n',
    "other weights": 'sources = ["{w}/pics"]\nout = "{w}/built"\nseed = 4\n',
    "a huge batch size": (
        'sources = ["{w}/pics"]\nout = "{w}/new"\nbatch_size = 9223372036854775807\n'
    ),
}


@pytest.mark.parametrize("case", sorted(JOBS))
def test_a_refused_job_writes_nothing(work: Path, tmp_path: Path, case: str) -> None:
    job = tmp_path / "job.toml"
    flags = 'pretrained = false\nworkers = 0\nprogress = false\nprecision = "fp32"\n'
    job.write_text(JOBS[case].format(w=work) + flags)
    before = tree(work)
    result = run_cli("run", job)
    assert result.exit_code in (2, 4), result.output
    assert one_error(result), result.output
    assert tree(work) == before


def test_a_fifo_named_like_our_history_is_not_ours(work: Path, tmp_path: Path) -> None:
    """A folder holding a FIFO called runs.jsonl is someone's: refused at once, not waited on."""
    import os

    out = tmp_path / "fifo-out"
    out.mkdir()
    os.mkfifo(out / "runs.jsonl")
    result = run_cli("build", work / "pics", "--out", out, *BUILD_FLAGS)
    assert result.exit_code == 2 and "is not empty and is not a collection" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["runs.jsonl"]


def test_a_huge_worker_count_is_refused_before_any_process(work: Path) -> None:
    before = tree(work)
    out = work / "new"
    result = run_cli("build", work / "pics", "--out", out, *BUILD_FLAGS, "--workers", "10**20")
    assert result.exit_code == 2 and "--workers" in result.output, result.output
    huge = run_cli("build", work / "pics", "--out", out, *BUILD_FLAGS, "--workers", str(10**20))
    assert huge.exit_code == 2 and "0<=x<=1024" in huge.output, huge.output
    assert tree(work) == before
