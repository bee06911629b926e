"""Partitions: N array-job parts of one collection, merged, equal a single build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from indexer.build.partitions import in_partition, parse_partition
from indexer.errors import InputError
from tests.helpers import BUILD_FLAGS, read_embeddings_by_key, run_cli
from tests.hooks import hooked_cli


@pytest.mark.parametrize(
    ("text", "parsed"), [("0/1", (0, 1)), ("2/8", (2, 8)), (" 7 / 8 ", (7, 8))]
)
def test_parse_partition(text: str, parsed: tuple[int, int]) -> None:
    assert parse_partition(text) == parsed


@pytest.mark.parametrize("bad", ["8/8", "-1/4", "1", "a/b", "1/0"])
def test_parse_partition_refuses(bad: str) -> None:
    with pytest.raises(InputError, match="I/N"):
        parse_partition(bad)


def test_every_key_is_in_exactly_one_part_whatever_the_order() -> None:
    keys = [f"dir{i % 7}/img{i}.jpg" for i in range(2000)]
    owners = [[i for i in range(5) if in_partition(k, (i, 5))] for k in keys]
    assert all(len(o) == 1 for o in owners)
    sizes = np.bincount([o[0] for o in owners])
    assert sizes.min() > 300  # roughly even
    assert [in_partition(k, (2, 5)) for k in reversed(keys)] == [
        in_partition(k, (2, 5)) for k in keys
    ][::-1]


def test_the_split_is_the_same_in_every_process() -> None:
    """Parts run as separate processes: the split must not depend on Python's hash seed."""
    keys = [f"dir/img{i}.jpg" for i in range(200)]
    script = (
        "import sys; from indexer.build.partitions import in_partition; "
        "print([i for i in range(200) if in_partition(f'dir/img{i}.jpg', (1, 4))])"
    )
    runs = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout
        for seed in ("1", "2")
    }  # fmt: skip
    assert runs == {f"{[i for i, k in enumerate(keys) if in_partition(k, (1, 4))]}\n"}


def _broken(corpus: Path, tmp_path: Path) -> Path:
    import shutil

    root = tmp_path / "src"
    shutil.copytree(corpus, root)
    (root / "group1" / "bad.jpg").write_bytes(b"not an image")
    return root


def test_three_parts_merged_equal_one_build(corpus: Path, tmp_path: Path) -> None:
    root = _broken(corpus, tmp_path)
    flags = (*BUILD_FLAGS, "--max-failures", "1")
    single = run_cli("build", root, "--out", tmp_path / "single", *flags)
    assert single.exit_code == 5, single.output
    parted = tmp_path / "parted"
    for i in range(3):
        part = run_cli("build", root, "--out", parted, *flags, "--partition", f"{i}/3")
        assert part.exit_code in (0, 5), part.output
        assert "merges the parts" in part.output
    early = run_cli("query", sorted(root.rglob("*.jpg"))[0], "--index", parted)
    assert early.exit_code == 3  # nothing published at the top until the merge
    killed = parted / "versions" / ".building-v000001"  # what a merge killed before left
    killed.mkdir(parents=True)
    (killed / ".request.json").write_text("{}")
    merged = run_cli("index", parted)
    assert merged.exit_code == 0, merged.output
    assert not [p.name for p in (parted / "versions").iterdir() if p.name.startswith(".")]
    a, b = read_embeddings_by_key(tmp_path / "single"), read_embeddings_by_key(parted)
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5
    errors = [pq.read_table(p / "errors.parquet").column("key").to_pylist()
              for p in (tmp_path / "single", parted)]  # fmt: skip
    assert errors[0] == errors[1] == ["group1/bad.jpg"]
    ids = pq.read_table(parted / "shards").column("id").to_pylist()
    assert len(ids) == len(set(ids))
    image = sorted(root.rglob("*.jpg"))[0]
    hit = run_cli("query", image, "--index", parted, "-k", "1")
    assert hit.exit_code == 0 and image.relative_to(root).as_posix() in hit.output
    assert run_cli("verify", parted).exit_code == 0


def test_a_killed_part_reruns_and_completes(corpus: Path, tmp_path: Path) -> None:
    parted = tmp_path / "parted"
    flags = ("--no-pretrained", "--no-progress", "--workers", "0", "--batch-size", "2",
             "--shard-size", "2")  # fmt: skip
    for i in (0, 2):
        assert run_cli("build", corpus, "--out", parted, *flags, "--partition", f"{i}/3")\
            .exit_code == 0  # fmt: skip
    repo = str(Path(__file__).resolve().parents[1])  # where tests.hooks is importable from
    env = {**os.environ, "PYTHONPATH": repo}
    cmd = [*hooked_cli(decode="tests.hooks:killer"), "build", str(corpus), "--out", str(parted),
           *flags, "--partition", "1/3"]  # fmt: skip
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    refused = run_cli("index", parted)
    assert refused.exit_code == 2 and "1/3" in refused.output, refused.output
    again = run_cli("build", corpus, "--out", parted, *flags, "--partition", "1/3")
    assert again.exit_code == 0, again.output
    assert run_cli("index", parted).exit_code == 0
    single = tmp_path / "single"
    assert run_cli("build", corpus, "--out", single, *flags).exit_code == 0
    a, b = read_embeddings_by_key(single), read_embeddings_by_key(parted)
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5


def test_parts_that_chose_other_runtimes_are_not_merged(corpus: Path, tmp_path: Path) -> None:
    """Each part's first build decides its runtime; parts that differ are refused at the merge,
    so one collection never mixes runtimes."""
    parted = tmp_path / "parted"
    for i, runtime in enumerate(("onnx", "torch")):
        flags = (*BUILD_FLAGS, "--runtime", runtime, "--partition", f"{i}/2")
        part = run_cli("build", corpus, "--out", parted, *flags)
        assert part.exit_code == 0, part.output
    refused = run_cli("index", parted)
    assert refused.exit_code == 2 and "embeds with torch fp32, part 0 with onnxruntime fp32" in (
        refused.output
    ), refused.output
    assert not (parted / "current").exists()
